"""Bad input and odd environments end in one stderr line and a documented exit code, never an
internal error: --debug, out-of-range numbers, unreadable target files, closed stdio."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from netprobe.errors import UsageError
from netprobe.sockets import POLL_MAX_S, parse_duration, parse_size, poll_ms, wait_readable
from tests.helpers import ROOT, invoke, run_netprobe


def _closed_port() -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound, never listening: refused
    return sock, sock.getsockname()[1]


def test_debug_shows_the_traceback_and_keeps_the_exit_code() -> None:
    plain = run_netprobe(["port-check", "127.0.0.1:99999"])
    debug = run_netprobe(["--debug", "port-check", "127.0.0.1:99999"])
    assert plain.returncode == debug.returncode == 2
    assert b"Traceback" not in plain.stderr
    assert b"Traceback" in debug.stderr
    assert debug.stderr.rstrip().endswith(plain.stderr.rstrip())  # the same line, last


def test_debug_after_the_command_is_that_command_s_bad_option() -> None:
    proc = run_netprobe(["port-check", "127.0.0.1:1", "--debug"])
    assert proc.returncode == 2
    assert b"Traceback" not in proc.stderr
    assert proc.stderr.decode().count("\n") == 1
    assert "--debug" in proc.stderr.decode()


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["port-check", "127.0.0.1:\u00b2"], "'\u00b2' is not a port number"),
        (["port-check", "127.0.0.1:1", "--require", "\u00b2"], "--require"),
        (["port-check", "127.0.0.1:1", "--timeout", "99999999999999h"], "too long"),
        (["port-check", "127.0.0.1:1", "--timeout", "0"], "--timeout 0"),
        (["send", "127.0.0.1:1", "hi", "--timeout", "0"], "--timeout 0"),
        (["reset", "client", "127.0.0.1:1", "--timeout", "0"], "--timeout 0"),
        (["port-check", "127.0.0.1:1", "--until", "closed"], "--until is for wait mode"),
        (["port-check", "127.0.0.1:1", "--deadline", "5s"], "--deadline is for wait mode"),
        (["send", "[::1]:1", "hi", "-4"], "-4 and '[::1]:1' contradict each other"),
        (["send", "127.0.0.1:1", "hi", "-6"], "-6 and '127.0.0.1:1' contradict each other"),
    ],
)
def test_out_of_range_values_are_usage_errors(argv: list[str], needle: str) -> None:
    result = invoke(argv)
    assert result.exit_code == 2
    assert needle in result.stderr
    assert result.stderr.count("\n") == 1
    assert "internal error" not in result.stderr


def test_duration_and_size_limits() -> None:
    assert parse_duration("1000000000") == 1e9
    for text in ("1000000001", "9" * 400, "99999999999999h"):
        with pytest.raises(UsageError, match="too long"):
            parse_duration(text)
    assert parse_size("1T") == 1024**4
    for text in ("9" * 400, "99999999999T"):
        with pytest.raises(UsageError, match="too large"):
            parse_size(text)


def test_targets_file_that_is_not_utf8(tmp_path: os.PathLike[str]) -> None:
    bad = os.path.join(tmp_path, "targets.txt")
    with open(bad, "wb") as handle:
        handle.write(b"127.0.0.1:1\n\xff\xfe\n")
    result = invoke(["port-check", "--targets-file", bad])
    assert result.exit_code == 2
    assert "not UTF-8" in result.stderr
    assert "0xff" in result.stderr


def _run_with_fd_closed(fd: int, argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "netprobe", *argv],
        capture_output=True,
        timeout=30,
        cwd=ROOT,
        check=False,
        preexec_fn=lambda: os.close(fd),
    )


def test_targets_from_a_closed_stdin() -> None:
    proc = _run_with_fd_closed(0, ["port-check", "--targets-file", "-"])
    assert proc.returncode == 2
    assert b"stdin is closed" in proc.stderr
    assert b"Traceback" not in proc.stderr


def test_closed_stdout_runs_as_if_sent_to_dev_null() -> None:
    sock, port = _closed_port()
    try:
        proc = _run_with_fd_closed(1, ["port-check", f"127.0.0.1:{port}"])
    finally:
        sock.close()
    assert proc.returncode == 1  # the check's own outcome (closed), not an internal error
    assert b"stdout is closed" in proc.stderr
    assert b"internal error" not in proc.stderr


def test_poll_timeouts_stay_inside_poll_s_int() -> None:
    assert poll_ms(0.0001) == 1
    assert poll_ms(1.5) == 1500
    assert poll_ms(1e9) == 2**31 - 1 == int(POLL_MAX_S * 1000)


def test_wait_readable_with_a_deadline_decades_away() -> None:
    left, right = socket.socketpair()
    try:
        right.send(b"x")
        ready = wait_readable([left], time.monotonic() + 1e9)  # poll() would overflow at 1e12 ms
        assert ready == [left.fileno()]
    finally:
        left.close()
        right.close()
