"""README.md and each command's --help name the same options (issue 8: the --help text is the
reference; keep them in step). In-process: the Click objects Typer builds, no subprocess."""

from __future__ import annotations

import re
from typing import Any

import pytest
import typer
from typer.core import TyperGroup, TyperOption

from netprobe.cli import build_app
from tests.helpers import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")

# Command path -> the README heading its section starts at. The reset commands share the
# triggers, actions and output notes of `### netprobe reset` (before its first `####`).
SECTIONS = {
    "port-check": "### `netprobe port-check`",
    "echo": "### `netprobe echo`",
    "send": "### `netprobe send`",
    "listen": "### `netprobe listen`",
    "backlog": "### `netprobe backlog`",
    "listeners": "### `netprobe listeners`",
    "doctor": "### `netprobe doctor`",
    "reset serve": "#### reset serve",
    "reset proxy": "#### reset proxy",
    "reset client": "#### reset client",
}
_RESET = "### `netprobe reset`"


def _section(heading: str) -> str:
    """From the line starting with `heading` to the next heading of its level or above."""
    lines = README.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(heading)]
    assert len(starts) == 1, f"README has {len(starts)} headings {heading!r}"
    level = len(heading.split(" ", 1)[0])
    end = starts[0] + 1
    while end < len(lines):
        mark = lines[end].split(" ", 1)[0]
        if mark and set(mark) == {"#"} and len(mark) <= level:
            break
        end += 1
    return "\n".join(lines[starts[0] : end])


def _synopsis(section: str) -> str:
    """The first code block of a section (fenced, or indented as the reset ones are)."""
    fenced = re.search(r"^```\n(.*?)^```", section, re.S | re.M)
    indented = re.search(r"^\n((?: {4}.*\S.*\n)+)", section, re.M)
    blocks = [m for m in (fenced, indented) if m is not None]
    assert blocks, "no synopsis block"
    return min(blocks, key=lambda m: m.start()).group(1)


def _names(text: str) -> set[str]:
    """Every `--flag` and `-x` the text writes (`-- COMMAND` and `-p-` are no flags)."""
    return set(re.findall(r"(?<![\w-])(--[a-z0-9][\w-]*|-[a-z0-9])(?![\w-])", text, re.I))


def _command(path: str) -> Any:
    command: Any = typer.main.get_command(build_app())
    for name in path.split():
        assert isinstance(command, TyperGroup)
        command = command.commands[name]
    return command


@pytest.mark.parametrize("path", ["", *SECTIONS], ids=lambda path: path or "netprobe")
def test_readme_and_help_name_the_same_options(path: str) -> None:
    # "": the root command's options (--version, --debug, completion), documented anywhere.
    section = _section(SECTIONS[path]) if path else README
    documented = _names(section)
    if path.startswith("reset "):
        documented |= _names(_section(_RESET).split("\n#### ", 1)[0])
    options = [p for p in _command(path).params if isinstance(p, TyperOption)]
    undocumented = []
    for option in options:
        names = [*option.opts, *option.secondary_opts]
        # By every long name (aliases too), or by its short one when it has no other (-4).
        wanted = [n for n in names if n.startswith("--")] or names[:1]
        undocumented += [n for n in wanted if n not in documented]
    assert not undocumented, f"netprobe {path}: --help has {undocumented}, README does not"
    if not path:
        return
    flags = {n for option in options for n in (*option.opts, *option.secondary_opts)}
    unknown = sorted(_names(_synopsis(section)) - flags - {"-h", "--help"})
    assert not unknown, f"netprobe {path}: README's synopsis has {unknown}, --help does not"


# Each way to ask `echo` for more than the plain raw echo: the options, and what they set.
_NOT_NATIVE: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "--mode": ({"mode": "discard"}, {}),
    "--framing": ({"framing": "line"}, {}),
    "--delay": ({"delay_s": 0.01}, {}),
    "--max-bytes": ({}, {"max_bytes": 1000}),
    "--udp": ({}, {"udp": True}),
}


@pytest.mark.parametrize("flag", list(_NOT_NATIVE))
def test_readme_names_every_option_that_keeps_the_echo_in_python(
    flag: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # README's sentence on `native_echo` is how a user learns which runs are in C: an option
    # that turns it off must be in it (`--delay` was not, and said `"native_echo": false`).
    import netprobe.engines.echo as engine
    from netprobe.server import ServerConfig

    monkeypatch.setattr(engine, "native_echo_available", lambda: True)  # where it was built
    assert engine.make_server(ServerConfig(port=0), engine.EchoOptions()).config.native_echo
    options, config = _NOT_NATIVE[flag]
    server = engine.make_server(ServerConfig(port=0, **config), engine.EchoOptions(**options))
    assert not server.config.native_echo
    sentence = re.search(r"`native_echo` says whether raw echo \((.*?)\) runs in C", README, re.S)
    assert sentence is not None, "README no longer explains native_echo"
    assert flag in _names(sentence.group(1)), f"README's native_echo sentence lacks {flag}"
