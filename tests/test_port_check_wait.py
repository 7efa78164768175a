"""`port-check --wait`: listeners that appear or go away, deadlines, --require, `-- COMMAND`."""

from __future__ import annotations

import json
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import LONG, ServerThread, invoke, netprobe_process, run_netprobe


class LateListener:
    """A port reserved now (bound, refusing) that starts listening after `delay_s`."""

    def __init__(self, delay_s: float) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.listening_at = 0.0
        self._timer = threading.Timer(delay_s, self._listen)
        self._timer.start()

    def _listen(self) -> None:
        self.sock.listen(64)
        self.listening_at = time.monotonic()

    def close(self) -> None:
        self._timer.cancel()
        self._timer.join(LONG)
        assert not self._timer.is_alive()
        self.sock.close()


@pytest.fixture
def late_listener() -> Iterator[LateListener]:
    listener = LateListener(1.0)
    try:
        yield listener
    finally:
        listener.close()


@pytest.mark.slow
def test_listener_appearing_after_a_second_ends_the_wait(late_listener: LateListener) -> None:
    start = time.monotonic()
    result = invoke(
        ["port-check", f"127.0.0.1:{late_listener.port}", "--wait", "--deadline", "5s", "--json"]
    )
    elapsed = time.monotonic() - start
    assert result.exit_code == 0, result.stderr
    assert elapsed >= 0.9
    assert elapsed < 4.5
    assert late_listener.listening_at > 0
    assert '"state": "open"' in result.text


def test_nothing_listening_exits_124_naming_the_target(closed_port: int) -> None:
    start = time.monotonic()
    result = invoke(
        ["port-check", f"127.0.0.1:{closed_port}", "--wait", "--deadline", "0.6s", "-t", "0.2"]
    )
    assert result.exit_code == 124
    assert time.monotonic() - start >= 0.55
    assert f"127.0.0.1:{closed_port}" in result.stderr
    assert "never" in result.stderr


def test_until_closed_waits_for_a_listener_to_go_away() -> None:
    srv = ServerThread()
    port = srv.port
    stopper = threading.Timer(0.5, srv.stop)
    stopper.start()
    try:
        start = time.monotonic()
        result = invoke(
            ["port-check", f"127.0.0.1:{port}", "--wait", "--until", "closed", "--deadline", "5s"]
        )
        assert result.exit_code == 0, result.stderr
        assert time.monotonic() - start >= 0.4
    finally:
        stopper.join(LONG)
        assert not stopper.is_alive()
        srv.stop()


def test_a_datagram_socket_at_a_unix_path_is_no_stream_listener(tmp_path: Path) -> None:
    # connect(2) answers EPROTOTYPE there: it was an `error` row, exit 6 ("this host
    # refused"), and `--until closed` could never hold.
    path = tmp_path / "log.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as live:
        live.bind(str(path))
        result = invoke(["port-check", f"unix:{path}", "--json"])
        assert result.exit_code == 1, result.stderr
        (row,) = [json.loads(line) for line in result.stdout.splitlines()]
        assert (row["state"], row["errno_name"]) == ("closed", "EPROTOTYPE")
        waited = invoke(["port-check", f"unix:{path}", "--wait", "--until", "closed"])
        assert waited.exit_code == 0, waited.stderr


def test_require_any_holds_at_once_over_three_targets(server: ServerThread) -> None:
    closed = [socket.socket() for _ in range(2)]
    try:
        for sock in closed:
            sock.bind(("127.0.0.1", 0))
        targets = [f"127.0.0.1:{s.getsockname()[1]}" for s in closed] + [f"127.0.0.1:{server.port}"]
        start = time.monotonic()
        result = invoke(["port-check", *targets, "--wait", "--require", "any", "--deadline", "5s"])
        assert result.exit_code == 0
        assert time.monotonic() - start < 2.0
        none = invoke(
            ["port-check", *targets[:2], "--wait", "--require", "any", "--deadline", "0.3s"]
        )
        assert none.exit_code == 124
    finally:
        for sock in closed:
            sock.close()


@pytest.mark.slow
def test_require_two_of_three_waits_for_the_second(
    server: ServerThread, closed_port: int, late_listener: LateListener
) -> None:
    targets = [f"127.0.0.1:{p}" for p in (server.port, closed_port, late_listener.port)]
    start = time.monotonic()
    result = invoke(["port-check", *targets, "--wait", "--require", "2", "--deadline", "5s"])
    assert result.exit_code == 0, result.stderr
    assert time.monotonic() - start >= 0.9  # the late listener was the second one


def _marker_command(marker: Path, status: int) -> list[str]:
    code = f"import sys; open({str(marker)!r}, 'w').write('ran'); sys.exit({status})"
    return ["--", sys.executable, "-c", code]


@pytest.mark.slow
def test_command_runs_only_after_success(tmp_path: Path, late_listener: LateListener) -> None:
    marker = tmp_path / "ran"
    argv = ["port-check", f"127.0.0.1:{late_listener.port}", "--wait", "--deadline", "5s"]
    proc = run_netprobe([*argv, *_marker_command(marker, 7)])
    assert proc.returncode == 7, proc.stderr  # the command's own status
    assert marker.read_text() == "ran"
    assert late_listener.listening_at > 0


def test_command_never_runs_when_the_wait_fails(tmp_path: Path, closed_port: int) -> None:
    marker = tmp_path / "ran"
    argv = ["port-check", f"127.0.0.1:{closed_port}", "--wait", "--deadline", "0.3s", "-t", "0.1"]
    proc = run_netprobe([*argv, *_marker_command(marker, 0)])
    assert proc.returncode == 124
    assert not marker.exists()
    assert f"127.0.0.1:{closed_port}".encode() in proc.stderr


def test_the_command_takes_the_process_over_as_wait_for_it_does(server: ServerThread) -> None:
    # exec: the command is the process netprobe was, so a supervisor's SIGTERM (docker stop,
    # systemd) reaches it. Run as a child, it was left running when netprobe got SIGTERM.
    code = "import os, sys, time; print(os.getpid(), flush=True); time.sleep(30)"
    argv = ["port-check", f"127.0.0.1:{server.port}", "--wait", "--deadline", "5s", "-q"]
    with netprobe_process([*argv, "--", sys.executable, "-c", code]) as proc:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], LONG * 2)
        assert ready, "the command did not start"
        assert int(proc.stdout.readline()) == proc.pid
        proc.send_signal(signal.SIGTERM)
        proc.wait(LONG)
    assert proc.returncode == -signal.SIGTERM  # the command's own end: a shell shows 143


def test_the_command_starts_with_sigpipe_as_a_shell_gives_it(server: ServerThread) -> None:
    # Python ignores SIGPIPE, and exec keeps an ignored signal ignored: `yes | head` in the
    # command would then spin on EPIPE instead of ending. (grep reads its own mask.)
    argv = ["port-check", f"127.0.0.1:{server.port}", "--wait", "--deadline", "5s", "-q"]
    proc = run_netprobe([*argv, "--", "grep", "SigIgn", "/proc/self/status"])
    assert proc.returncode == 0, proc.stderr
    ignored = int(proc.stdout.split()[-1], 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1))


def test_open_only_hides_the_other_rows_of_a_wait(server: ServerThread, closed_port: int) -> None:
    targets = [f"127.0.0.1:{server.port}", f"127.0.0.1:{closed_port}=closed"]
    result = invoke(["port-check", *targets, "--wait", "--deadline", "5s", "--json", "--open-only"])
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert [(r["port"], r["state"]) for r in rows] == [(server.port, "open")]


def test_ctrl_c_during_a_wait_says_where_it_stood() -> None:
    # A listener that stays open while we wait for it to close: every round connects to it,
    # so an accept() here proves the wait loop runs before SIGINT is sent.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.settimeout(LONG)
    port = listener.getsockname()[1]
    argv = ["port-check", f"127.0.0.1:{port}", "--wait", "--until", "closed", "--deadline", "60s"]
    try:
        with netprobe_process(argv) as proc:
            conn, _ = listener.accept()
            conn.close()
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=LONG)
    finally:
        listener.close()
    assert proc.returncode == 130
    assert out == b""
    assert b"port-check: interrupted after" in err
    assert b"Traceback" not in err


def test_a_listener_up_in_the_last_pause_before_the_deadline_is_found(
    late_listener: LateListener,
) -> None:
    # Rounds at about 0, 0.05, 0.15, 0.35 and 0.75 s; the next pause runs into the 1.5 s
    # deadline. The probe at its end was dropped along with the lookup there (a lookup cut at
    # once said EAI_AGAIN), so a service up at 1.0 s was "never held" (exit 124).
    argv = ["port-check", "--wait", "--deadline", "1.5s", "--interval", "10s", "--json"]
    result = invoke([*argv, f"127.0.0.1:{late_listener.port}"])
    assert result.exit_code == 0, (result.stdout, result.stderr)
