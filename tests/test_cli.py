"""The CLI skeleton: version, help, python -m, one-line errors, doctor."""

from __future__ import annotations

import pytest

from netprobe import __version__
from tests.helpers import invoke, run_netprobe

COMMANDS = ["port-check", "echo", "send", "listen", "backlog", "listeners", "reset", "doctor"]


def test_version() -> None:
    result = invoke(["--version"])
    assert result.exit_code == 0
    assert result.text.strip() == f"netprobe {__version__}"


def test_python_dash_m_works_like_netprobe() -> None:
    proc = run_netprobe(["--version"])
    assert proc.returncode == 0
    assert proc.stdout.decode().strip() == f"netprobe {__version__}"


def test_help_lists_every_command() -> None:
    result = invoke(["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.text


def test_unknown_option_is_one_line_usage_error() -> None:
    result = invoke(["doctor", "--no-such-flag"])
    assert result.exit_code == 2
    assert result.stdout == b""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "--no-such-flag" in lines[0]
    assert "Traceback" not in result.stderr


def test_no_arguments_shows_help_and_exits_2() -> None:
    result = invoke([])
    assert result.exit_code == 2
    assert "port-check" in result.text + result.stderr


@pytest.mark.parametrize(
    "argv",
    [["echo", "--unix", ""], ["reset", "serve", "--unix", ""], ["listen", "--unix", ""]],
)
def test_empty_unix_path_is_bad_input(argv: list[str]) -> None:
    result = invoke(argv)
    assert result.exit_code == 2
    assert result.stdout == b""
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert "Unix socket path is empty" in lines[0]
