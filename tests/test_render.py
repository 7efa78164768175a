"""The output layer and the exit-code rules: pure functions, no sockets."""

from __future__ import annotations

import contextlib
import io
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from netprobe.errors import (
    DeadlineExceeded,
    LocalError,
    NetworkError,
    PeerResetError,
    ResolveError,
    UsageError,
)
from netprobe.exitcodes import ExitStatus, exit_status_for_error, exit_status_for_state, worst
from netprobe.render import Column, LineSink, OutputFormat, Renderer, choose_format
from netprobe.results import ConnectState
from tests.helpers import LONG, ROOT

COLUMNS = [Column("host", "HOST"), Column("port", "PORT", align_right=True), Column("ms", "MS")]
ROWS = [{"host": "b", "port": 80, "ms": 1.23456}, {"host": "a", "port": 443, "ms": None}]


def _render(fmt: OutputFormat) -> str:
    out = io.StringIO()
    renderer = Renderer(fmt, out, COLUMNS, sort_key=lambda r: r["host"])
    renderer.emit_all(ROWS)
    renderer.close()
    return out.getvalue()


def test_json_lines_carry_every_key_in_order_of_arrival() -> None:
    lines = _render(OutputFormat.JSON).splitlines()
    assert [json.loads(line) for line in lines] == ROWS


def test_csv_has_a_header_and_empty_cells_for_none() -> None:
    assert _render(OutputFormat.CSV).splitlines() == ["host,port,ms", "b,80,1.235", "a,443,"]


def test_plain_streams_and_table_sorts_and_aligns() -> None:
    assert _render(OutputFormat.PLAIN).splitlines() == ["b 80 1.235", "a 443 -"]
    assert _render(OutputFormat.TABLE).splitlines() == [
        "HOST  PORT  MS",
        "a      443  -",
        "b       80  1.235",
    ]
    assert _render(OutputFormat.QUIET) == ""


def test_choose_format() -> None:
    pipe = io.StringIO()  # not a terminal
    assert choose_format(json_out=False, csv_out=False, quiet=False, out=pipe) is OutputFormat.PLAIN
    assert choose_format(json_out=True, csv_out=False, quiet=False, out=pipe) is OutputFormat.JSON
    assert choose_format(json_out=False, csv_out=True, quiet=False, out=pipe) is OutputFormat.CSV
    assert choose_format(json_out=False, csv_out=False, quiet=True, out=pipe) is OutputFormat.QUIET
    with pytest.raises(UsageError, match="--json and --csv exclude each other"):
        choose_format(json_out=True, csv_out=True, quiet=False, out=pipe)


def test_worst_follows_the_documented_order() -> None:
    assert worst([]) is ExitStatus.OK
    assert worst([ExitStatus.TIMEOUT, ExitStatus.RESET]) is ExitStatus.RESET
    assert worst([ExitStatus.RESET, ExitStatus.NOT_OPEN]) is ExitStatus.NOT_OPEN
    assert worst([ExitStatus.NOT_OPEN, ExitStatus.RESOLVE]) is ExitStatus.RESOLVE
    assert worst([ExitStatus.RESOLVE, ExitStatus.LOCAL]) is ExitStatus.LOCAL
    assert worst([ExitStatus.LOCAL, ExitStatus.INTERNAL, ExitStatus.OK]) is ExitStatus.INTERNAL
    assert worst([ExitStatus.OK, ExitStatus.WAIT_DEADLINE]) is ExitStatus.WAIT_DEADLINE


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (UsageError("x"), ExitStatus.USAGE),
        (LocalError("x"), ExitStatus.LOCAL),
        (ResolveError("resolve", -2, "EAI_NONAME"), ExitStatus.RESOLVE),
        (PeerResetError("recv", 104, "ECONNRESET"), ExitStatus.RESET),
        (DeadlineExceeded("recv"), ExitStatus.TIMEOUT),
        (NetworkError("connect", 111, "ECONNREFUSED"), ExitStatus.NOT_OPEN),
        (KeyboardInterrupt(), ExitStatus.INTERRUPTED),
        (RuntimeError("bug"), ExitStatus.INTERNAL),
    ],
)
def test_exit_status_for_error(exc: BaseException, status: ExitStatus) -> None:
    assert exit_status_for_error(exc) is status


def test_every_connect_state_has_an_exit_status() -> None:
    assert exit_status_for_state(ConnectState.OPEN) is ExitStatus.OK
    assert exit_status_for_state(ConnectState.REFUSED) is ExitStatus.NOT_OPEN
    assert exit_status_for_state(ConnectState.TIMEOUT) is ExitStatus.TIMEOUT
    assert exit_status_for_state(ConnectState.RESET) is ExitStatus.RESET
    assert exit_status_for_state(ConnectState.RESOLVE) is ExitStatus.RESOLVE
    assert {exit_status_for_state(s) for s in ConnectState} <= set(ExitStatus)


def test_bytes_that_are_not_utf8_are_shown_as_escapes() -> None:
    from netprobe.render import dump_json, format_value, shown

    path = b"/tmp/x\xff".decode("utf-8", "surrogateescape")  # as argv or the kernel gives it
    assert shown(path) == "/tmp/x\\xff"
    assert format_value(path) == "/tmp/x\\xff"
    assert json.loads(dump_json({"address": path, "ok": "💀"})) == {
        "address": "/tmp/x\\xff",
        "ok": "💀",  # characters beyond the BMP stay what they are
    }


def test_csv_without_rows_still_has_its_header() -> None:
    out = io.StringIO()
    renderer = Renderer(OutputFormat.CSV, out, [Column("port", "PORT"), Column("state", "STATE")])
    renderer.close()
    assert out.getvalue() == "port,state\n"


def test_a_path_that_is_not_utf8_is_a_result_not_an_internal_error() -> None:
    env = dict(os.environ, PYTHONIOENCODING="utf-8")  # strict, as under an en_US.UTF-8 locale
    proc = subprocess.run(
        [sys.executable, "-m", "netprobe", "port-check", os.fsdecode(b"unix:/nonexistent/x\xff")],
        capture_output=True,
        timeout=30,
        cwd=ROOT,
        env=env,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr  # closed (ENOENT), not 70
    assert b"/nonexistent/x\\xff" in proc.stdout


def test_line_sink_never_blocks_drops_past_its_limit_and_says_so() -> None:
    import threading

    read_fd, write_fd = os.pipe()
    stream = os.fdopen(write_fd, "w")
    try:
        sink = LineSink(stream, limit=10_000, dropped_line=lambda n: f"dropped {n}")
        before = set(threading.enumerate())
        lines = [f"line {i:06d} " + "x" * 88 for i in range(2000)]  # 200 KB: 3x the pipe
        for line in lines:
            sink.write(line)  # nobody reads yet: this must still return
        assert sink.dropped > 0
        writers = set(threading.enumerate()) - before
        assert writers
        got = bytearray()

        def read_all() -> None:
            while chunk := os.read(read_fd, 65536):
                got.extend(chunk)

        reader = threading.Thread(target=read_all)
        reader.start()
        assert sink.close(10.0) == sink.dropped  # all the rest was written
        sink.write("after")  # once drained, lines go straight out again
        assert sink.close(10.0) == sink.dropped
        # Its queue written, the sink's thread ends: it must not keep a process that wants to
        # fork later (connector workers) threaded.
        for writer in writers:
            writer.join(10)
            assert not writer.is_alive()
    finally:
        stream.close()
    reader.join(10)
    text = got.decode().splitlines()
    assert text[-2:] == [text[-2], "after"]
    assert text[-2].startswith("dropped ")
    # Each gap is told where it is ("dropped N" before the next line that made it), and they
    # add up; the lines that made it are whole and in order.
    notes = [int(line.split()[1]) for line in text if line.startswith("dropped ")]
    assert sum(notes) == sink.dropped
    written = [line for line in text[:-1] if not line.startswith("dropped ")]
    made_it = set(written)
    assert written == [line for line in lines if line in made_it]
    assert len(written) + sink.dropped == len(lines)


def _echo_with_output(stdout: int, stderr: int, ready: str, *args: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "netprobe", "echo", "--port", "0", "--ready-file", ready, *args],
        stdout=stdout,
        stderr=stderr,
        cwd=ROOT,
    )
    deadline = time.monotonic() + LONG
    while not os.path.exists(ready):
        assert proc.poll() is None, "echo exited"
        assert time.monotonic() < deadline, "echo never got ready"
        time.sleep(0.02)
    return proc


@contextlib.contextmanager
def _stopped_at_the_end(proc: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    """The echo process, killed (by its PID) if the test left it running."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(LONG)
        if proc.stderr is not None:
            proc.stderr.close()


def _echo_clients(port: int, count: int) -> None:
    for number in range(count):
        with socket.create_connection(("127.0.0.1", port), timeout=LONG) as sock:
            sock.sendall(b"x")
            assert sock.recv(1) == b"x", f"client {number} got no echo"


def test_an_unread_terminal_never_stops_the_echo(tmp_path: Path) -> None:
    # A terminal says "writable" with any room at all, so a line written from the loop on
    # that word could still block it: echo froze after about 240 clients on a pty nobody read.
    master, slave = os.openpty()
    ready = str(tmp_path / "ready.json")
    try:
        with _stopped_at_the_end(_echo_with_output(slave, slave, ready)) as proc:
            os.close(slave)
            slave = -1
            _echo_clients(json.loads(Path(ready).read_text())["port"], 800)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(LONG) == 0
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)


@pytest.mark.parametrize("workers", [1, 2])
def test_the_final_totals_go_out_before_a_slow_readers_backlog(
    tmp_path: Path, workers: int
) -> None:
    # 600 clients' events (about 120 KB) wait for a reader that starts only at the end and
    # takes 80 KB/s: the totals used to queue behind them and be lost at exit. Now what is
    # still queued after a moment is dropped and counted, and the totals go out next.
    import threading

    read_end, write_end = os.pipe()
    ready = str(tmp_path / "ready.json")
    try:
        argv = ["--json", "--workers", str(workers)]
        got = bytearray()

        def read_slowly() -> None:
            while chunk := os.read(read_end, 4096):
                got.extend(chunk)
                time.sleep(0.05)

        spawned = _echo_with_output(write_end, subprocess.DEVNULL, ready, *argv)
        with _stopped_at_the_end(spawned) as proc:
            os.close(write_end)
            write_end = -1
            _echo_clients(json.loads(Path(ready).read_text())["port"], 600)
            proc.send_signal(signal.SIGTERM)
            reader = threading.Thread(target=read_slowly)
            reader.start()
            assert proc.wait(LONG) == 0
            reader.join(LONG * 2)
            assert not reader.is_alive()
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    records = [json.loads(line) for line in got.decode().splitlines()]
    totals = records[-1]
    assert (totals["event"], totals["final"]) == ("totals", True), records[-3:]
    assert totals["connections"] == 600
    events = [r for r in records if r["event"] in ("accept", "close")]
    assert totals["events_dropped"] > 0
    # Every event is either in the stream or counted as dropped (each worker's too), and the
    # stream itself tells of every one dropped (the last, just before the totals).
    assert len(events) + totals["events_dropped"] == 2 * 600
    markers = [r["lines"] for r in records if r["event"] == "dropped"]
    assert sum(markers) == totals["events_dropped"], markers


def test_a_full_disk_under_the_event_output_is_exit_6(tmp_path: Path) -> None:
    # Before: every write error counted as "the reader is gone", and the run ended 0 with its
    # results lost; a write error of this host's own is a local I/O error.
    ready = str(tmp_path / "ready.json")
    with open("/dev/full", "wb") as full:
        spawned = _echo_with_output(full.fileno(), subprocess.PIPE, ready, "--json")
    with _stopped_at_the_end(spawned) as proc:
        _echo_clients(json.loads(Path(ready).read_text())["port"], 3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(LONG) == 6
        assert proc.stderr is not None
        (line,) = proc.stderr.read().decode().splitlines()
    assert "local I/O error: ENOSPC" in line


def test_a_full_disk_with_a_stderr_nobody_reads_still_exits_6_promptly(tmp_path: Path) -> None:
    # Text mode: the events fill stderr (never read), stdout is a full disk. The exit-6 line
    # used to be written to that stderr with a blocking write: the run never ended.
    ready = str(tmp_path / "ready.json")
    with open("/dev/full", "wb") as full:
        spawned = _echo_with_output(full.fileno(), subprocess.PIPE, ready)
    with _stopped_at_the_end(spawned) as proc:
        _echo_clients(json.loads(Path(ready).read_text())["port"], 1500)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(LONG) == 6


def test_no_signal_reaches_the_writer_thread() -> None:
    # While the main thread blocks SIGTERM (a server's stop does), the kernel handed a
    # process-directed SIGTERM to the writer thread, whose default action killed the process.
    script = """
import os, signal, sys, time
from netprobe.render import LineSink
master, slave = os.openpty()
sink = LineSink(os.fdopen(slave, "w"))
for i in range(3000):
    sink.write(f"line {i:05d} " + "x" * 60)  # more than a terminal holds: the thread waits
time.sleep(0.2)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.3)
print("alive")
sys.stdout.flush()
os._exit(0)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, timeout=LONG * 2, cwd=ROOT
    )
    assert (done.returncode, done.stdout) == (0, b"alive\n"), done.stderr


def test_a_named_fifo_gets_the_lines_again_once_a_new_reader_comes(tmp_path: Path) -> None:
    # Before: the first EPIPE (the reader left) stopped all output for good, the totals too.
    fifo = tmp_path / "events"
    os.mkfifo(fifo)
    first = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # so the writer's open does not wait
    ready = str(tmp_path / "ready.json")
    with open(fifo, "wb") as writer:
        spawned = _echo_with_output(writer.fileno(), subprocess.DEVNULL, ready, "--json")
    second = -1
    got = bytearray()
    try:
        with _stopped_at_the_end(spawned) as proc:
            port = json.loads(Path(ready).read_text())["port"]
            _echo_clients(port, 1)
            os.close(first)  # the reader leaves
            first = -1
            _echo_clients(port, 2)  # their events meet EPIPE
            second = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
            _echo_clients(port, 1)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(LONG) == 0
            os.set_blocking(second, True)
            while chunk := os.read(second, 65536):
                got.extend(chunk)
    finally:
        for fd in (first, second):
            if fd >= 0:
                os.close(fd)
    records = [json.loads(line) for line in got.decode().splitlines()]
    # The pipe keeps what the first reader left unread (client 1's lines); clients 2 and 3
    # came with no reader (their closes may have come after the second one opened).
    accepts = [r["conn_id"] for r in records if r["event"] == "accept"]
    assert accepts in ([4], [1, 4]), records
    totals = records[-1]
    assert (totals["event"], totals["connections"]) == ("totals", 4)
    events = [r for r in records if r["event"] in ("accept", "close")]
    assert len(events) + totals["events_dropped"] == 2 * 4
    # The stream says where lines went missing, and how many in all.
    markers = [r["lines"] for r in records if r["event"] == "dropped"]
    assert markers
    assert sum(markers) == totals["events_dropped"] >= 2


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_status_line_rewrites_one_line_on_a_terminal_only() -> None:
    # port-check --wait used to print a new progress line every round on a terminal.
    from netprobe.render import StatusLine

    tty = _Tty()
    line = StatusLine(tty)
    line.show("1/3 open")
    line.show("2/3 open")
    line.clear()
    line.clear()  # once is enough
    assert tty.getvalue() == "\r\033[K1/3 open\r\033[K2/3 open\r\033[K"
    pipe = io.StringIO()
    quiet = StatusLine(pipe)
    quiet.show("1/3 open")
    quiet.clear()
    assert (quiet.enabled, pipe.getvalue()) == (False, "")


def test_status_line_is_cut_to_the_terminal_width() -> None:
    # A wrapped line is erased only on its last row: each round left the first rows behind.
    from netprobe.render import StatusLine

    tty = _Tty()
    line = StatusLine(tty)
    line.show("x" * 200)  # StringIO has no fileno: the width falls back to 80 columns
    shown = tty.getvalue().removeprefix("\r\033[K")
    assert shown == "x" * 76 + "..."


def test_status_line_on_a_terminal_of_unknown_size_uses_80_columns() -> None:
    # A pty whose size was never set says 0 x 0: the line was cut to "p...".
    import os

    from netprobe.render import StatusLine

    master, slave = os.openpty()
    try:
        with open(slave, "w", closefd=False) as tty:
            line = StatusLine(tty)
            assert line.enabled
            assert line._columns() == 80
    finally:
        os.close(master)
        os.close(slave)


@pytest.mark.parametrize(("term", "shown"), [("xterm-256color", True), ("dumb", False)])
def test_progress_shows_only_on_a_terminal_that_can_erase(
    monkeypatch: pytest.MonkeyPatch, term: str, shown: bool
) -> None:
    from netprobe.render import StatusLine

    monkeypatch.setenv("TERM", term)
    master, slave = os.openpty()
    stream = os.fdopen(slave, "w")
    try:
        line = StatusLine(stream)
        line.show("waiting")
        line.clear()
        stream.write("END\n")  # what came before it is all the line wrote
        stream.flush()
        got = b""
        while b"END" not in got:
            assert select.select([master], [], [], LONG)[0], got
            got += os.read(master, 4096)
    finally:
        stream.close()
        os.close(master)
    assert (b"\x1b[K" in got) is shown
    assert (b"waiting" in got) is shown


def test_line_sink_counts_every_line_a_gone_reader_lost() -> None:
    # The first line (the one whose write met EPIPE) was not counted: "dropped 2N-1" of 2N.
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    stream = os.fdopen(write_fd, "w")
    try:
        sink = LineSink(stream)
        for number in range(3):
            sink.write(f"line {number}")
        assert sink.close(1.0) == 3
        assert sink.dropped == 3
    finally:
        with contextlib.suppress(BrokenPipeError):
            stream.close()
