"""`netprobe reset client` against small loopback servers: the server sees ECONNRESET."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    LONG,
    SHORT,
    PeerReadsBeforeTheReset,
    invoke,
    netprobe_process,
    read_until_reset,
)


class _RecordingServer:
    """Accepts clients; for each one reads until EOF or error and records how it ended."""

    def __init__(self, reply: bytes = b"", close_first: bool = False, pace_s: float = 0.0) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.listener.settimeout(0.05)
        self.port: int = self.listener.getsockname()[1]
        self.reply = reply
        self.close_first = close_first
        self.pace_s = pace_s
        self.endings: list[tuple[str, int]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        workers = []
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            worker = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            worker.start()
            workers.append(worker)
        for worker in workers:
            worker.join(LONG)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(LONG)
        got = 0
        ending = "timeout"
        try:
            if self.reply:
                conn.sendall(self.reply)
            if self.close_first:
                conn.shutdown(socket.SHUT_WR)
            while True:
                if self.pace_s:
                    time.sleep(self.pace_s)
                data = conn.recv(8192 if self.pace_s else 65536)  # slow: small reads
                if not data:
                    ending = "eof"
                    break
                got += len(data)
        except ConnectionResetError:
            ending = "ECONNRESET"
        except OSError as exc:
            ending = type(exc).__name__
        finally:
            conn.close()
        with self._lock:
            self.endings.append((ending, got))

    def wait_for(self, count: int) -> list[tuple[str, int]]:
        deadline = time.monotonic() + LONG
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.endings) >= count:
                    return list(self.endings)
            time.sleep(0.01)
        raise AssertionError(f"only {len(self.endings)} of {count} clients ended")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(LONG)
        self.listener.close()
        assert not self._thread.is_alive()


@pytest.fixture
def recorder() -> Iterator[_RecordingServer]:
    srv = _RecordingServer()
    try:
        yield srv
    finally:
        srv.stop()


def _time_wait_on(port: int) -> set[tuple[str, str]]:
    """(local, remote) of /proc/net/tcp sockets in TIME_WAIT (state 06) with `port` at an end.

    Compare snapshots: an earlier listener on the same port number may have left some.
    """
    hexport = f"{port:04X}"
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state = fields[1], fields[2], fields[3]
        if state == "06" and hexport in (local.split(":")[1], remote.split(":")[1]):
            found.add((local, remote))
    return found


def _records(stdout: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.decode().splitlines()]


def test_after_bytes_server_sees_reset_and_no_time_wait(recorder: _RecordingServer) -> None:
    target = f"127.0.0.1:{recorder.port}"
    before = _time_wait_on(recorder.port)
    result = invoke(
        ["reset", "client", target, "--after-bytes", "50000", "--count", "4", "-c", "2", "--json"]
    )
    assert result.exit_code == 0, result.stderr
    records = _records(result.stdout)
    conns = [r for r in records if r["event"] == "connection"]
    assert len(conns) == 4
    for record in conns:
        assert record["ended_by"] == "client-rst"
        assert record["action"] == "rst"
        assert record["bytes_out"] == 50000
        assert record["trigger"] == "after-bytes 50000"
    assert records[-1]["event"] == "totals"
    assert records[-1]["resets_sent"] == 4
    endings = recorder.wait_for(4)
    # The server read some of the stream, then the reset (queued bytes may be dropped).
    assert all(ending == "ECONNRESET" for ending, _ in endings), endings
    assert _time_wait_on(recorder.port) - before == set()


def test_the_rst_waits_while_a_slow_server_takes_every_byte() -> None:
    # Before: the RST came right after the last send() and threw away what sat in our send
    # queue: a slow server got 87 KB of `--after-bytes 1MB` (bytes_out said 1,000,000).
    srv = _RecordingServer(pace_s=0.05)  # ~160 KB/s in small reads: ACKs 400 ms apart
    try:
        argv = ["reset", "client", f"127.0.0.1:{srv.port}", "--after-bytes", "200000", "--json"]
        result = invoke(argv)
        assert result.exit_code == 0, result.stderr
        assert srv.wait_for(1) == [("ECONNRESET", 200_000)]
        assert json.loads(result.stdout.decode().splitlines()[0])["bytes_out"] == 200_000
    finally:
        srv.stop()


def test_data_then_reset_at_once(recorder: _RecordingServer) -> None:
    before = _time_wait_on(recorder.port)
    result = invoke(["reset", "client", f"127.0.0.1:{recorder.port}", "hello", "--json"])
    assert result.exit_code == 0, result.stderr
    record = _records(result.stdout)[0]
    assert record["bytes_out"] == 5
    assert record["trigger"] == "after-bytes 5"
    assert recorder.wait_for(1)[0][0] == "ECONNRESET"
    assert _time_wait_on(recorder.port) - before == set()


def test_data_with_after_ms_is_sent_once(recorder: _RecordingServer) -> None:
    # Before: without --after-bytes the DATA was repeated to a 16 KiB chunk (bytes_out 16384).
    argv = ["reset", "client", f"127.0.0.1:{recorder.port}", "hello", "--after-ms", "200"]
    result = invoke([*argv, "--json"])
    assert result.exit_code == 0, result.stderr
    record = _records(result.stdout)[0]
    assert record["bytes_out"] == 5
    assert record["ended_by"] == "client-rst"
    ending, got = recorder.wait_for(1)[0]
    assert (ending, got) == ("ECONNRESET", 5)


@pytest.mark.parametrize(
    ("trigger", "label", "sent"),
    [
        # The triggers are shared by the three commands: the aliases of the client.
        (["--on-accept"], "on-connect", 0),
        (["--after-bytes-out", "3"], "after-bytes 3", 3),
    ],
)
def test_shared_trigger_names(
    recorder: _RecordingServer, trigger: list[str], label: str, sent: int
) -> None:
    result = invoke(["reset", "client", f"127.0.0.1:{recorder.port}", "hello", *trigger, "--json"])
    assert result.exit_code == 0, result.stderr
    record = _records(result.stdout)[0]
    assert (record["trigger"], record["bytes_out"]) == (label, sent)
    assert recorder.wait_for(1)[0] == ("ECONNRESET", sent)


def test_reports_server_closing_first() -> None:
    srv = _RecordingServer(reply=b"bye\n", close_first=True)
    try:
        # A timer far away: only the server's FIN can have ended the connection early.
        argv = ["reset", "client", f"127.0.0.1:{srv.port}", "--after-ms", "60s", "--json"]
        result = invoke(argv)
        assert result.exit_code == 0, result.stderr
        records = _records(result.stdout)
        record = records[0]
        assert record["bytes_in"] == 4
        assert record["server_closed_first"] is True
        assert record["ended_by"] == "server-fin"
        assert record["elapsed_s"] < 60
        # We still aborted it (our RST after their FIN): the totals count it as a reset sent.
        assert record["action"] == "rst"
        totals = records[-1]
        assert (totals["resets_sent"], totals["server_closed_first"]) == (1, 1)
        srv.wait_for(1)
    finally:
        srv.stop()


def test_on_connect_against_closed_port(closed_port: int) -> None:
    result = invoke(["reset", "client", f"127.0.0.1:{closed_port}", "--on-connect", "--json"])
    assert result.exit_code == 1
    record = _records(result.stdout)[0]
    assert record["state"] == "refused"
    assert record["errno_name"] == "ECONNREFUSED"


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--after-bytes", "-1"], "--after-bytes -1"),
        (["--after-bytes", "10", "--on-connect"], "two triggers"),
        (["--after-ms", "soon"], "--after-ms"),
        # The error names the trigger as typed (it is --after-bytes inside).
        (["--after-bytes-out", "10", "--after-ms", "5"], "--after-bytes-out and --after-ms"),
        (["--count", "0"], "--count"),
    ],
)
def test_bad_input(argv: list[str], words: str) -> None:
    result = invoke(["reset", "client", "127.0.0.1:9", *argv])
    assert result.exit_code == 2
    assert result.stdout == b""
    assert words in result.stderr
    assert result.stderr.count("\n") == 1


def test_bad_target() -> None:
    result = invoke(["reset", "client", "127.0.0.1"])
    assert result.exit_code == 2
    assert "HOST:PORT" in result.stderr


def test_unix_target_is_refused(tmp_path: Path) -> None:
    # Before: the client "reset" a Unix connection, reported client-rst, and the server read a
    # clean EOF: AF_UNIX has no RST.
    path = str(tmp_path / "c.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(4)
    try:
        result = invoke(["reset", "client", f"unix:{path}", "abc", "--json"])
    finally:
        listener.close()
    assert result.exit_code == 2
    assert result.stdout == b""
    assert "a Unix socket has no RST" in result.stderr
    assert result.stderr.count("\n") == 1


def test_against_a_server_that_resets_first() -> None:
    from netprobe.engines.reset_faults import TriggerKind
    from tests.test_reset_helpers import options, serve

    with serve(options(TriggerKind.ON_ACCEPT)) as (port, records):
        result = invoke(
            ["reset", "client", f"127.0.0.1:{port}", "--after-ms", "300", "--count", "3", "--json"]
        )
        deadline = time.monotonic() + LONG
        while len(records) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert result.exit_code == 4, result.stderr
    lines = _records(result.stdout)
    assert [r["ended_by"] for r in lines[:3]] == ["server-rst"] * 3
    assert all(r["elapsed_s"] < 0.3 for r in lines[:3])
    assert lines[-1]["server_reset_first"] == 3
    assert [r["action"] for r in records] == ["rst"] * 3


def test_non_loopback_target_needs_allow_remote() -> None:
    # 192.0.2.1 is TEST-NET-1: the command must refuse it before sending anything.
    result = invoke(["reset", "client", "192.0.2.1:80"])
    assert result.exit_code == 2
    assert result.stdout == b""
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert "192.0.2.1" in lines[0]
    assert "--allow-remote" in lines[0]


def test_a_stalled_send_is_that_connection_timing_out_not_the_end_of_the_run() -> None:
    # Nobody ever reads (the listener never accepts), so every send stalls at the timeout.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    try:
        result = invoke(
            ["reset", "client", f"127.0.0.1:{port}", "--after-bytes", "64M", "--count", "2",
             "--concurrency", "2", "--timeout", "500ms", "--json"]
        )  # fmt: skip
    finally:
        listener.close()
    records = [json.loads(line) for line in result.stdout.splitlines()]
    conns = [r for r in records if r.get("event") == "connection"]
    assert [r["ended_by"] for r in conns] == ["send-stalled", "send-stalled"]
    assert [r["state"] for r in conns] == ["timeout", "timeout"]
    # What the kernel took before the stall is still counted (socket buffers hold plenty).
    assert all(r["bytes_out"] > 0 for r in conns), conns
    assert records[-1]["event"] == "totals"
    assert records[-1]["bytes_out"] == sum(r["bytes_out"] for r in conns)
    assert result.exit_code == 3


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the RST by AF_UNSPEC: Linux")
def test_bytes_out_counts_what_the_server_read_while_the_rst_was_on_its_way(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # bytes_out was the bytes sent less a count of the unsent ones taken a moment before the
    # RST: a server reading just then got more than bytes_out said. Here it reads just then.
    from netprobe import sockets

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)  # inherited
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    accepted: list[socket.socket] = []

    def server() -> socket.socket:
        accepted.append(listener.accept()[0])
        return accepted[0]

    rst = PeerReadsBeforeTheReset(server)
    monkeypatch.setattr(sockets, "_LIBC", rst)
    try:
        result = invoke(
            ["reset", "client", f"127.0.0.1:{port}", "--after-bytes", "64M",
             "--timeout", "300ms", "--json"]
        )  # fmt: skip
        assert rst.reset.is_set(), result.stderr
        got = rst.read + read_until_reset(accepted[0])
    finally:
        listener.close()
        for conn in accepted:
            conn.close()
    record = json.loads(result.stdout.splitlines()[0])
    assert rst.unsent_at_call, "nothing was left unsent at the RST: this tests nothing"
    assert record["ended_by"] == "send-stalled", record
    assert record["bytes_out"] == got, record


def _read_to_eof(conn: socket.socket) -> None:
    while conn.recv(65536):
        pass


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_stops_connections_that_are_still_waiting(signum: int, code: int) -> None:
    # --after-ms 60s: without a stop flag the workers would hold Ctrl-C up for a minute.
    # SIGTERM the same way, then 143: it killed the run (no totals; the server saw a FIN).
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(LONG)
    port = listener.getsockname()[1]
    try:
        with netprobe_process(
            ["reset", "client", f"127.0.0.1:{port}", "--after-ms", "60s", "--count", "4",
             "--concurrency", "2", "--json"]
        ) as proc:  # fmt: skip
            accepted = [listener.accept()[0] for _ in range(2)]  # both workers are waiting
            proc.send_signal(signum)
            assert proc.wait(timeout=LONG) == code
            assert proc.stdout is not None
            records = [json.loads(line) for line in proc.stdout.read().splitlines()]
            # The aborted connections and the totals are still reported.
            assert [r["ended_by"] for r in records[:-1]] == ["interrupted", "interrupted"]
            assert (records[-1]["event"], records[-1]["resets_sent"]) == ("totals", 2)
            for conn in accepted:  # and each one aborted its connection on the way out
                conn.settimeout(LONG)
                with pytest.raises(ConnectionResetError):
                    _read_to_eof(conn)
                conn.close()
    finally:
        listener.close()


def test_a_name_other_than_localhost_is_refused_before_any_lookup() -> None:
    # As backlog and reset proxy: refused by name (exit 2), never resolved (a DNS query would
    # already leave the host). `.invalid` never resolves, so the old lookup gave exit 5.
    result = invoke(["reset", "client", "db.example.invalid:80"])
    assert result.exit_code == 2
    assert "db.example.invalid is a name" in result.stderr
    assert "--allow-remote" in result.stderr


def _syn_sent_to(port: int) -> bool:
    """Whether a connect to 127.0.0.1:PORT is waiting for its SYN's answer (SYN-SENT)."""
    with open("/proc/net/tcp") as table:
        next(table)
        for row in table:
            fields = row.split()
            if fields[2] == f"0100007F:{port:04X}" and fields[3] == "02":
                return True
    return False


@contextlib.contextmanager
def _full_backlog() -> Iterator[int]:
    """A port whose accept queue is full (backlog 0, one connection never accepted): the
    kernel drops further SYNs, so a connect there waits for an answer that does not come."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port), timeout=LONG)  # the one queue slot
    try:
        yield port
    finally:
        filler.close()
        listener.close()


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads /proc/net/tcp")
def test_ctrl_c_gives_up_a_connect_that_gets_no_answer() -> None:
    # A full accept queue drops SYNs: the connect waits for --timeout (60 s here). Before, Ctrl-C
    # waited that out; now the connect is given up and reported like the other interrupted ones.
    with (
        _full_backlog() as port,
        netprobe_process(
            ["reset", "client", f"127.0.0.1:{port}", "--timeout", "60s", "--json"]
        ) as proc,
    ):
        deadline = time.monotonic() + 4 * LONG
        while not _syn_sent_to(port):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the client never connected"
            time.sleep(SHORT)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=LONG) == 130
        assert proc.stdout is not None
        records = [json.loads(line) for line in proc.stdout.read().splitlines()]
        (conn,) = records[:-1]
        assert (conn["ended_by"], conn["state"], conn["action"]) == (
            "interrupted",
            "timeout",
            "none",
        )
        assert records[-1]["event"] == "totals"
        assert (records[-1]["connections"], records[-1]["failed"]) == (1, 0)


def test_duration_ends_the_run_and_cuts_the_running_connections(
    recorder: _RecordingServer,
) -> None:
    # Before: the deadline was looked at only before waiting for a free slot, so a third
    # connection started after the duration, and the running ones went on to --after-ms.
    result = invoke(
        ["reset", "client", f"127.0.0.1:{recorder.port}", "--after-ms", "6s", "--count", "10",
         "-c", "2", "--duration", "1s", "--json"]
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    records = _records(result.stdout)
    conns = [r for r in records if r["event"] == "connection"]
    assert [(r["ended_by"], r["state"], r["action"]) for r in conns] == [
        ("duration", "open", "rst"),
        ("duration", "open", "rst"),
    ]
    assert all(r["elapsed_s"] < 6.0 for r in conns), conns
    totals = records[-1]
    assert (totals["event"], totals["connections"], totals["resets_sent"], totals["failed"]) == (
        "totals",
        2,
        2,
        0,
    )
    endings = recorder.wait_for(2)
    assert [ending for ending, _ in endings] == ["ECONNRESET", "ECONNRESET"]


def test_duration_gives_up_a_connect_that_gets_no_answer() -> None:
    # A full accept queue drops SYNs: the connect would wait out --timeout (60 s). The run ends
    # at --duration instead. A connect cut by the run's end is no failure of its own, but a run
    # that made no connection at all is a timeout (exit 3).
    with _full_backlog() as port:
        result = invoke(
            ["reset", "client", f"127.0.0.1:{port}", "--timeout", "60s", "--duration", "0.3s",
             "--json"]
        )  # fmt: skip
        assert result.exit_code == 3, result.stderr
        records = _records(result.stdout)
        (conn,) = records[:-1]
        assert (conn["ended_by"], conn["state"], conn["action"]) == ("duration", "timeout", "none")
        assert conn["elapsed_s"] < 60
        assert (records[-1]["connections"], records[-1]["failed"]) == (1, 0)


def test_bytes_the_server_sent_before_its_rst_count_when_a_send_meets_the_rst() -> None:
    from netprobe.engines.reset_faults import TriggerKind
    from tests.test_reset_helpers import options, serve

    # The server echoes 1000 bytes, then resets; we are still sending (1 MB) and the send
    # takes the error. The 1000 bytes sit readable in our receive queue: bytes_in said 0 in
    # about a quarter of the connections.
    with serve(options(TriggerKind.AFTER_BYTES, 1000), backlog=256) as (port, _):
        argv = ["reset", "client", f"127.0.0.1:{port}", "--after-bytes", "1MB"]
        result = invoke([*argv, "--count", "40", "-c", "10", "--json"])
    assert result.exit_code == 4, result.stderr
    lines = _records(result.stdout)
    assert sorted({(r["ended_by"], r["bytes_in"]) for r in lines[:-1]}) == [("server-rst", 1000)]
