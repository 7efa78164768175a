"""`netprobe listen` as a real process with real pipes, against send peers and raw sockets."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import HAS_IPV6
from tests.helpers import (
    LONG,
    ROOT,
    invoke,
    run_netprobe,
    serve_one_link_local_client,
    wait_in_syscall,
)


class Listen:
    """A `netprobe listen` process; the first stderr line (the announcement) is read at once."""

    def __init__(self, args: Sequence[str], stdout: Any = subprocess.PIPE) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "netprobe", "listen", *args],
            stdin=subprocess.PIPE,
            stdout=stdout,
            stderr=subprocess.PIPE,
            cwd=ROOT,
        )
        self.announce = self._stderr_line()

    def _stderr_line(self) -> str:
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        line = b""
        deadline = time.monotonic() + LONG
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            assert left > 0, f"no announcement from listen (got {line!r})"
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                byte = os.read(fd, 1)
                assert byte, f"listen exited before announcing (got {line!r})"
                line += byte
        return line.decode()

    @property
    def port(self) -> int:
        if self.announce.startswith("{"):
            return int(json.loads(self.announce)["port"])
        return int(self.announce.rsplit(":", 1)[1].split("/")[0])

    def read_stdout(self, count: int) -> bytes:
        """Read exactly `count` bytes of listen's stdout (bounded by LONG)."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        data = b""
        deadline = time.monotonic() + LONG
        while len(data) < count:
            left = deadline - time.monotonic()
            assert left > 0, f"listen wrote only {data!r}"
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, count - len(data))
                assert chunk, f"listen closed stdout after {data!r}"
                data += chunk
        return data

    def write(self, data: bytes, *, close: bool = False) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()
        if close:
            self.proc.stdin.close()
            self.proc.stdin = None  # communicate() would flush a closed stdin

    def finish(self) -> tuple[int, bytes, str]:
        """Wait for exit (stdin closed first); returns (code, stdout, rest of stderr)."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
            self.proc.stdin = None
        out, err = self.proc.communicate(timeout=LONG * 2)
        return self.proc.returncode, out, err.decode()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(LONG)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def spawn() -> Iterator[type[Listen]]:
    started: list[Listen] = []

    class Tracked(Listen):
        def __init__(self, args: Sequence[str], stdout: Any = subprocess.PIPE) -> None:
            super().__init__(args, stdout)
            started.append(self)

    try:
        yield Tracked
    finally:
        for item in started:
            item.kill()
            assert item.proc.returncode is not None


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=LONG)
    sock.settimeout(LONG)
    return sock


def _read_to_eof(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_listen_with_send_peer_both_directions(spawn: type[Listen]) -> None:
    listener = spawn([])
    assert listener.announce == f"listening on 127.0.0.1:{listener.port}/tcp\n"
    listener.write(b"from listener\n", close=True)
    peer = run_netprobe(["send", f"127.0.0.1:{listener.port}", "from sender"], timeout=LONG * 2)
    assert peer.returncode == 0, peer.stderr
    assert peer.stdout == b"from listener\n"
    code, out, err = listener.finish()
    assert code == 0, err
    assert out == b"from sender"
    lines = err.splitlines()
    assert lines[0].startswith("accepted 127.0.0.1:")
    assert "ended: eof" in lines[-1]


def test_stdin_eof_half_closes_and_keeps_reading(spawn: type[Listen]) -> None:
    listener = spawn([])
    with _connect(listener.port) as client:
        listener.write(b"hello", close=True)
        assert _read_to_eof(client) == b"hello"  # the listener's FIN arrived...
        client.sendall(b"late data")  # ...yet it still reads what the peer sends
        client.shutdown(socket.SHUT_WR)
        code, out, err = listener.finish()
    assert code == 0, err
    assert out == b"late data"


def test_both_directions_at_once(spawn: type[Listen]) -> None:
    listener = spawn([])
    with _connect(listener.port) as client:
        client.sendall(b"ping ")
        listener.write(b"pong ")  # stdin still open: listen relays without waiting for EOF
        assert client.recv(100) == b"pong "
        client.sendall(b"again")
        listener.write(b"", close=True)
        assert _read_to_eof(client) == b""
        client.close()
        code, out, _err = listener.finish()
    assert (code, out) == (0, b"ping again")


def test_peer_reset_is_reported_and_exits_4(spawn: type[Listen]) -> None:
    listener = spawn(["--json"])
    announce = json.loads(listener.announce)
    assert announce == {
        "event": "listening",
        "proto": "tcp",
        "host": "127.0.0.1",
        "port": listener.port,
    }
    client = _connect(listener.port)
    client.sendall(b"abc")
    # Reset only once listen has written the bytes out: an RST drops data still unread.
    assert listener.read_stdout(3) == b"abc"
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    code, out, err = listener.finish()
    assert code == 4, err
    assert out == b""
    events = [json.loads(line) for line in err.splitlines()]
    assert [e["event"] for e in events] == ["accept", "close"]
    assert events[1]["ended_by"] == "reset"
    assert events[1]["bytes_in"] == 3


def test_no_peer_within_idle_timeout_exits_3(spawn: type[Listen]) -> None:
    listener = spawn(["--idle-timeout", "200ms"])
    code, out, err = listener.finish()
    assert code == 3
    assert out == b""
    assert "nobody came" in err


def test_keep_open_serves_peers_one_after_another(spawn: type[Listen]) -> None:
    # --max-bytes ends the run right after the second peer (an idle timeout could race a
    # slow test runner between the two peers).
    listener = spawn(["--keep-open", "--max-bytes", "12"])
    listener.write(b"", close=True)
    for word in (b"first ", b"second"):
        with _connect(listener.port) as client:
            client.sendall(word)
            client.shutdown(socket.SHUT_WR)
            assert _read_to_eof(client) == b""
    code, out, err = listener.finish()
    assert code == 0, err
    assert out == b"first second"
    assert err.count("ended: eof") + err.count("ended: max-bytes") == 2


@pytest.mark.parametrize("proto", ["tcp", "unix"])
def test_keep_open_queues_a_burst_of_peers_while_one_is_served(
    spawn: type[Listen], tmp_path: Path, proto: str
) -> None:
    # Peers that come while one is served wait in the accept queue. listen(8) held 9: the
    # rest of a burst lost their SYNs (TcpExtListenOverflows, a 1 s retransmit each) or, over
    # Unix, got EAGAIN. A connect that is still pending after LONG is one the queue dropped.
    burst = 20
    path = str(tmp_path / "l.sock")
    family = socket.AF_UNIX if proto == "unix" else socket.AF_INET
    listener = spawn(
        ["--keep-open", "--max-bytes", str(burst + 1)]
        + (["--unix", path] if proto == "unix" else [])
    )
    address: Any = path if proto == "unix" else ("127.0.0.1", listener.port)
    clients: list[socket.socket] = []
    try:
        first = socket.socket(family, socket.SOCK_STREAM)
        clients.append(first)
        first.settimeout(LONG)
        first.connect(address)
        # Its session lasts while our stdin stays open: listen accepts nobody else meanwhile.
        assert listener._stderr_line().startswith("accepted ")
        pending = {}
        for _ in range(burst):
            sock = socket.socket(family, socket.SOCK_STREAM)
            clients.append(sock)
            sock.setblocking(False)
            err = sock.connect_ex(address)
            assert err in (0, errno.EINPROGRESS), f"connect #{len(clients)}: {os.strerror(err)}"
            pending[sock.fileno()] = sock
        poller = select.poll()
        for fd in pending:
            poller.register(fd, select.POLLOUT)
        deadline = time.monotonic() + LONG
        while pending and time.monotonic() < deadline:
            for fd, _ in poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
                err = pending.pop(fd).getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                assert err == 0, os.strerror(err)
                poller.unregister(fd)
        assert not pending, f"{len(pending)} of {burst} connects were not queued"
        for sock in clients:
            sock.setblocking(True)
            sock.sendall(b"x")
            sock.close()
        listener.write(b"", close=True)  # the first session ends; the queued ones follow
        code, out, err_text = listener.finish()
    finally:
        for sock in clients:
            sock.close()
    assert code == 0, err_text
    assert out == b"x" * (burst + 1)
    assert err_text.count("accepted ") == burst


@pytest.mark.parametrize("proto", ["tcp", "unix"])
def test_without_keep_open_a_later_peer_is_refused_not_queued(
    spawn: type[Listen], tmp_path: Path, proto: str
) -> None:
    # listen serves one peer. Its listener stayed open meanwhile: a later client completed its
    # connect, sent into an accept queue nobody would read (129 of them with backlog 128)
    # and got ECONNRESET only when listen exited, with exit 0.
    path = str(tmp_path / "l.sock")
    family = socket.AF_UNIX if proto == "unix" else socket.AF_INET
    listener = spawn(["--unix", path] if proto == "unix" else [])
    address: Any = path if proto == "unix" else ("127.0.0.1", listener.port)
    with socket.socket(family, socket.SOCK_STREAM) as first:
        first.settimeout(LONG)
        first.connect(address)
        assert listener._stderr_line().startswith("accepted ")
        with socket.socket(family, socket.SOCK_STREAM) as later:
            later.settimeout(LONG)
            with pytest.raises(ConnectionRefusedError):
                later.connect(address)
        _exchange_then_finish(listener, first, b"bye", b"hi")


def _exchange_then_finish(
    listener: Listen, client: socket.socket, ours: bytes, theirs: bytes
) -> None:
    """listen's stdin sends ours then EOF, the client theirs then EOF: each side gets the
    other's bytes whole, and listen exits 0."""
    listener.write(ours, close=True)
    client.sendall(theirs)
    client.shutdown(socket.SHUT_WR)
    assert _read_to_eof(client) == ours
    code, out, err = listener.finish()
    assert (code, out) == (0, theirs), err


def test_max_bytes(spawn: type[Listen]) -> None:
    listener = spawn(["--max-bytes", "4"])
    with _connect(listener.port) as client:
        client.sendall(b"abcdefgh")
        code, out, err = listener.finish()
    assert code == 0, err
    assert out == b"abcd"
    # The report counts what went to stdout, not the whole read that crossed the limit.
    assert "ended: max-bytes (received 4 B," in err


def test_max_bytes_gives_a_peer_still_sending_eof_not_a_reset(spawn: type[Listen]) -> None:
    # The close came with the peer's later bytes unread: the kernel answered RST, so a peer
    # that sent past the limit got ECONNRESET, not EOF (as echo's lingering close gives).
    listener = spawn(["--max-bytes", "10000"])  # less than a pipe holds: stdout never waits
    with _connect(listener.port) as client:
        client.sendall(b"x" * 150_000)
        assert _read_to_eof(client) == b""  # EOF; a reset raises ConnectionResetError
        code, out, err = listener.finish()
    assert code == 0, err
    assert out == b"x" * 10_000


def test_ctrl_c_while_max_bytes_lingers_still_reports_the_peer(spawn: type[Listen]) -> None:
    # The peer keeps sending past --max-bytes, so the close lingers (up to 1 s); a Ctrl-C
    # then ended the run with no report of the peer at all (the report came after the
    # linger). It is made before the linger now.
    listener = spawn(["--json", "--max-bytes", "100"])
    listener.write(b"", close=True)
    stop = threading.Event()

    def flood() -> None:
        with contextlib.suppress(OSError), _connect(listener.port) as client:
            while not stop.is_set():
                client.sendall(b"f" * 65536)

    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    try:
        assert listener.read_stdout(100) == b"f" * 100
        time.sleep(0.3)  # lingering now: the flood goes on
        listener.proc.send_signal(signal.SIGINT)
        code, _out, err = listener.finish()
    finally:
        stop.set()
        sender.join(LONG)
    assert code == 130, err
    events = [json.loads(line) for line in err.splitlines()]
    (close,) = [e for e in events if e["event"] == "close"]
    assert (close["ended_by"], close["bytes_in"]) == ("max-bytes", 100)


@pytest.mark.unix
def test_unix_socket(spawn: type[Listen], tmp_path: Path) -> None:
    path = str(tmp_path / "l.sock")
    listener = spawn(["--unix", path])
    assert listener.announce == f"listening on unix:{path}\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(LONG)
        client.connect(path)
        _exchange_then_finish(listener, client, b"hi unix", b"to listener")
    # As echo and reset serve: the socket file goes with the listener (before: left behind).
    assert not os.path.lexists(path)


def test_a_peer_that_closed_while_stdin_stays_open_is_reported_eof(spawn: type[Listen]) -> None:
    # Before: `ended: idle-timeout`, though the peer had sent its EOF; only listen's own stdin
    # (open, silent) kept the connection until the idle timeout.
    listener = spawn(["--port", "0", "--idle-timeout", "1s", "--json"])
    with socket.create_connection(("127.0.0.1", listener.port), timeout=LONG) as client:
        client.sendall(b"bye")
        client.shutdown(socket.SHUT_WR)
        assert _read_to_eof(client) == b""  # listen lets it go at the idle timeout
    assert listener.proc.wait(timeout=LONG) == 0  # stdin is still open: never closed here
    code, out, err = listener.finish()
    assert (code, out) == (0, b"bye"), err
    (close,) = [e for e in map(json.loads, err.splitlines()) if e["event"] == "close"]
    assert (close["ended_by"], close["bytes_in"]) == ("eof", 3)


@pytest.mark.parametrize("source", ["endless", "3 MB then silence"])
def test_a_peer_that_closed_but_never_read_our_stream_is_an_idle_timeout(source: str) -> None:
    # The other side of the test above: the peer closed its side and reads nothing, while our
    # stdin had bytes for it. Our upload stalled: idle-timeout, not eof. Endless (/dev/zero):
    # the pump always holds unsent input (a review found the first fix saying eof here). 3 MB
    # then an open, silent stdin: the kernel may take it all into its send queue, unread by
    # the peer (a second review found eof there too).
    stdin: Any = subprocess.PIPE
    zero = open("/dev/zero", "rb") if source == "endless" else None  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "netprobe", "listen", "--port", "0", "--idle-timeout",
         "1s", "--json"],
        stdin=zero or stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    writer = None
    try:
        if zero is None:
            assert proc.stdin is not None
            feed = proc.stdin

            def write_then_stay() -> None:
                with contextlib.suppress(BrokenPipeError):
                    feed.write(b"z" * 3_000_000)
                    feed.flush()  # and the pipe stays open: stdin goes silent, not at EOF

            writer = threading.Thread(target=write_then_stay, daemon=True)
            writer.start()
        assert proc.stderr is not None
        port = json.loads(proc.stderr.readline())["port"]
        with socket.create_connection(("127.0.0.1", port), timeout=LONG) as client:
            client.shutdown(socket.SHUT_WR)
            assert proc.wait(timeout=LONG) == 0
        events = [json.loads(line) for line in proc.stderr.read().splitlines()]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(LONG)
        if writer is not None:
            writer.join(LONG)
        for stream in (proc.stdin, proc.stderr, zero):
            if stream is not None:
                with contextlib.suppress(BrokenPipeError):
                    stream.close()
    (close,) = [e for e in events if e["event"] == "close"]
    assert close["ended_by"] == "idle-timeout"
    assert close["bytes_out"] > 0


def test_a_reader_pausing_past_the_idle_timeout_loses_nothing(spawn: type[Listen]) -> None:
    # Before: time blocked on a full stdout counted as the peer being idle, and a reader that
    # paused longer than --idle-timeout lost the rest of the upload.
    listen = spawn(["--port", "0", "--idle-timeout", "150ms"])
    payload = os.urandom(2 * 1024 * 1024)
    with _connect(listen.port) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        time.sleep(0.6)  # the reader of listen's stdout pauses, four idle timeouts long
        got = listen.read_stdout(len(payload))
        assert _read_to_eof(sock) == b""
    code, rest, err = listen.finish()
    assert got == payload
    assert rest == b""
    assert code == 0, err


def test_udp_datagrams_both_ways(spawn: type[Listen]) -> None:
    listener = spawn(["--udp", "--idle-timeout", "1500ms"])
    assert listener.announce.endswith("/udp\n")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(LONG)
        client.sendto(b"dgram", ("127.0.0.1", listener.port))
        listener.write(b"reply\n")
        assert client.recv(100) == b"reply"
        code, out, err = listener.finish()
    assert code == 0, err
    assert out == b"dgram"
    # The run's end reports the exchange as TCP reports a peer's end.
    assert "ended: idle-timeout (received 5 B, sent 5 B," in err


def test_udp_replies_from_stdin_keep_the_idle_clock_running(spawn: type[Listen]) -> None:
    # Idle means nothing moved either way, as for TCP. Before, only the peer's datagrams
    # counted: listen ended 1.5 s after the peer's one datagram (exit 0, `idle-timeout`), and
    # the replies stdin still fed it were lost. Each reply here comes 0.75 s after the last
    # (0.75 s of slack); the last comes 2.25 s after the peer's datagram.
    listener = spawn(["--udp", "--json", "--idle-timeout", "1500ms"])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(LONG)
        client.sendto(b"hi", ("127.0.0.1", listener.port))
        assert listener.read_stdout(2) == b"hi"
        got: list[bytes] = []
        for reply in (b"a", b"b", b"c", b"d"):
            if got:
                time.sleep(0.75)
            assert listener.proc.poll() is None, f"listen ended after replies {got}"
            listener.write(reply + b"\n")
            try:
                got.append(client.recv(100))
            except TimeoutError:
                pytest.fail(f"reply {reply!r} never came (listen: {listener.proc.poll()})")
        # A stdin that stays open and silent is no activity: the idle timeout still ends it.
        assert listener.proc.wait(LONG) == 0
        code, out, err = listener.finish()
    assert got == [b"a", b"b", b"c", b"d"]
    assert (code, out) == (0, b""), err  # b"hi" was read above
    close = [json.loads(line) for line in err.splitlines()][-1]
    assert (close["event"], close["ended_by"]) == ("close", "idle-timeout")
    assert (close["bytes_in"], close["bytes_out"]) == (2, 4)
    assert close["duration_ms"] >= 2250 + 1500 - 100  # the last reply, then a full idle timeout


def test_udp_on_a_wildcard_replies_from_the_address_the_peer_used(spawn: type[Listen]) -> None:
    # Before: from the route's address (127.0.0.1 for 127.0.0.5), which a peer whose UDP
    # socket is connected to 127.0.0.5 never takes.
    listener = spawn(["--udp", "--host", "0.0.0.0", "--idle-timeout", "1500ms"])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(LONG)
        client.connect(("127.0.0.5", listener.port))
        client.send(b"dgram")
        listener.write(b"reply\n")
        assert client.recv(100) == b"reply"
        code, out, err = listener.finish()
    assert code == 0, err
    assert out == b"dgram"


def test_tcp_ctrl_c_still_reports_the_close(spawn: type[Listen]) -> None:
    listener = spawn(["--json"])
    with socket.create_connection(("127.0.0.1", listener.port), timeout=LONG) as client:
        listener.write(b"abc")
        assert client.recv(3) == b"abc"
        client.sendall(b"hello")
        assert listener.read_stdout(5) == b"hello"  # both ways moved: now interrupt
        listener.proc.send_signal(signal.SIGINT)
        code, _out, err = listener.finish()
    assert code == 130
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert [e["event"] for e in events] == ["accept", "close"]
    close = events[-1]
    assert (close["ended_by"], close["bytes_in"], close["bytes_out"]) == ("interrupted", 5, 3)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.parametrize("udp", [False, True])
def test_a_signal_reports_the_peer_then_exits(
    spawn: type[Listen], udp: bool, sig: int, code: int
) -> None:
    # Ctrl-C is how a UDP listen usually ends, SIGTERM how a script stops one: either way the
    # peer is reported (ended_by interrupted), then 128 + the signal.
    listener = spawn(["--json", *(["--udp"] if udp else [])])
    kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as client:
        client.settimeout(LONG)
        client.connect(("127.0.0.1", listener.port))
        client.send(b"hello")
        assert listener.read_stdout(5) == b"hello"  # it has the bytes: now the signal
        listener.proc.send_signal(sig)
        exit_code, _out, err = listener.finish()
    assert exit_code == code
    close = [json.loads(line) for line in err.splitlines() if line.startswith("{")][-1]
    assert (close["event"], close["ended_by"], close["bytes_in"]) == ("close", "interrupted", 5)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("udp", [False, True], ids=["tcp", "udp"])
def test_a_stdout_that_fails_still_reports_the_peer(spawn: type[Listen], udp: bool) -> None:
    # `listen > /dev/full`: it printed the accept, then only "local I/O error: ENOSPC": no
    # close event, no word of the peer.
    with open("/dev/full", "wb") as full:
        listen = spawn(["-p", "0", "--json", *(["--udp"] if udp else [])], full)
    if udp:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"hi\n", ("127.0.0.1", listen.port))
    else:
        with _connect(listen.port) as sock:
            sock.sendall(b"hi\n")
            sock.shutdown(socket.SHUT_WR)
            _read_to_eof(sock)
    code, _out, err = listen.finish()
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    closes = [e for e in events if e["event"] == "close"]
    assert [(e["ended_by"], e.get("errno_name")) for e in closes] == [("error", "ENOSPC")], err
    assert code == 6, err


def test_udp_json_events_end_with_a_close(spawn: type[Listen]) -> None:
    listener = spawn(["--udp", "--json", "--max-bytes", "6"])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.sendto(b"abc", ("127.0.0.1", listener.port))
        client.sendto(b"defgh", ("127.0.0.1", listener.port))
        code, out, err = listener.finish()
        peer = f"127.0.0.1:{client.getsockname()[1]}"
    assert code == 0, err
    assert out == b"abcdef"
    events = [json.loads(line) for line in err.splitlines()]
    assert [e["event"] for e in events] == ["peer", "close"]
    assert events[0]["peer"] == events[1]["peer"] == peer
    close = events[1]
    assert (close["ended_by"], close["bytes_in"], close["bytes_out"]) == ("max-bytes", 6, 0)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--udp", "--unix", "/tmp/x.sock"], "exclude each other"),
        # Before: the IP options were silently ignored with --unix.
        (
            ["--unix", "/tmp/x.sock", "-6", "--idle-timeout", "0.2"],
            "-6 has no effect with --unix /tmp/x.sock",
        ),
        (["--unix", "/tmp/x.sock", "-4", "--idle-timeout", "0.2"], "-4 has no effect"),
        (
            ["--unix", "/tmp/x.sock", "--host", "::1", "--idle-timeout", "0.2"],
            "--host ::1 has no effect",
        ),
        (
            ["--unix", "/tmp/x.sock", "--port", "0", "--idle-timeout", "0.2"],
            "--port 0 has no effect",
        ),
        (["--port", "70000"], "65535"),
        (["--max-bytes", "0"], "--max-bytes 0 must be at least 1 byte"),
        (["--idle-timeout", "later"], "not a duration"),
        (["--max-bytes", "lots"], "not a size"),
    ],
)
def test_bad_input_exits_2(args: list[str], needle: str) -> None:
    res = invoke(["listen", *args])
    assert res.exit_code == 2
    assert res.stdout == b""
    assert len(res.stderr.strip().splitlines()) == 1
    assert needle in res.stderr


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--host", "::1", "-4"], "-4 and --host ::1 contradict each other"),
        (["--host", "127.0.0.1", "-6"], "-6 and --host 127.0.0.1 contradict each other"),
        (["--host", "[::1]"], "--host '[::1]'"),
        (["--host", ""], "--host ''"),
    ],
)
def test_host_and_family_conflicts_exit_2(args: list[str], words: str) -> None:
    # Before: exit 5 with "resolve: EAI_FAMILY ..." or "EAI_NONAME" naming no host.
    res = invoke(["listen", "--idle-timeout", "0.2", *args])
    assert res.exit_code == 2, res.stderr
    assert res.stdout == b""
    lines = res.stderr.splitlines()
    assert len(lines) == 1
    assert words in lines[0]


@pytest.mark.skipif(not HAS_IPV6, reason="no ::1 on this host")
@pytest.mark.parametrize("proto", [[], ["--udp"]])
def test_dash_6_without_host_binds_ipv6_loopback(proto: list[str]) -> None:
    # Before: the default 127.0.0.1 was resolved as IPv6: exit 5, EAI_FAMILY.
    res = invoke(["listen", "-6", "--json", "--idle-timeout", "0.1", *proto])
    assert res.exit_code == 3, res.stderr  # nobody came: the documented timeout code
    announce = json.loads(res.stderr.splitlines()[0])
    assert announce["event"] == "listening"
    assert announce["host"] == "::1"
    assert announce["proto"] == ("udp" if proto else "tcp")


# --- sweep fix: --idle-timeout 0 means no limit, as it does for send ------------------------


def test_idle_timeout_0_is_documented_as_no_limit() -> None:
    # Before: 0 quietly meant "wait forever", which neither --help nor README said.
    res = invoke(["listen", "--help"])
    assert res.exit_code == 0
    text = " ".join(res.text.replace("│", " ").split())
    assert "no peer, no data); 0 disables it" in text


def test_idle_timeout_0_waits_for_a_late_peer(spawn: type[Listen]) -> None:
    listener = spawn(["--idle-timeout", "0"])
    time.sleep(0.3)  # longer than any "0 s" wait: nobody has come yet
    assert listener.proc.poll() is None
    with _connect(listener.port) as peer:
        peer.sendall(b"late")
        peer.shutdown(socket.SHUT_WR)
        code, out, err = listener.finish()
        assert _read_to_eof(peer) == b""
    assert code == 0, err
    assert out == b"late"
    assert "ended: eof" in err


def test_sigterm_with_stdout_stuck_exits_at_once_and_quietly() -> None:
    # Before (stdout buffered, the default): after the peer's report the process waited for
    # its reader to take what the buffer held (forever, for a reader that stopped reading).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    with subprocess.Popen(
        [sys.executable, "-m", "netprobe", "listen", "--port", "0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env=env,
    ) as proc:
        assert proc.stderr is not None
        announce = proc.stderr.readline().decode()
        port = int(announce.rsplit(":", 1)[1].split("/")[0])
        stop = threading.Event()

        def trickle() -> None:
            # Small pieces: each one lands in stdout's buffer, which then holds bytes at exit.
            with contextlib.suppress(OSError), _connect(port) as sock:
                while not stop.is_set():
                    sock.sendall(b"z" * 1000)
                    time.sleep(0.001)

        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        try:
            wait_in_syscall(proc.pid, "write", 1)  # the 64 KiB pipe is full: it waits on stdout
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(LONG)  # nobody reads stdout, yet it exits
        finally:
            stop.set()
            thread.join(LONG)
        err = proc.stderr.read().decode()
    assert code == 143, err
    assert "ended: interrupted" in err
    assert "Exception ignored" not in err


# --- link-local addresses keep their zone; Unix peers; abstract Unix names ---------------


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_a_link_local_listener_announces_the_address_with_its_zone(proto: str) -> None:
    # Before: `"host": "fe80::1"` and peers `[fe80::1]:P`: addresses nobody can connect to.
    udp = ["--udp", "--idle-timeout", "0"] if proto == "udp" else []
    argv = ["listen", "--host", "fe80::1%lo", "--port", "0", "--json", *udp]
    seen = serve_one_link_local_client(
        argv, announced_on="stderr", proto="udp-send" if udp else "tcp"
    )
    assert seen["announce"]["host"] == "fe80::1%lo", seen
    assert seen["connect_error"] is None
    peers = {event["peer"] for event in seen["events"] if "peer" in event}
    assert len(peers) == 1
    assert peers.pop().startswith("[fe80::1%lo]:")


def test_an_unnamed_unix_peer_is_spelled_as_echo_spells_it(
    spawn: type[Listen], tmp_path: Path
) -> None:
    # Before: `unix:(unnamed)` here, `unix` in echo and reset serve.
    path = str(tmp_path / "l.sock")
    listener = spawn(["--unix", path, "--json"])
    events = _one_unix_client(listener, path, b"")
    assert [(e["event"], e["peer"]) for e in events] == [("accept", "unix"), ("close", "unix")]


def _one_unix_client(
    listener: Listen, address: str, sent: bytes, bind_to: str | None = None
) -> list[dict[str, Any]]:
    """One Unix client of `listen`: it gets `sent` from the listener's stdin and EOF; the
    listener's stderr events once it ended (exit 0)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(LONG)
        if bind_to is not None:
            client.bind(bind_to)
        client.connect(address)
        listener.write(sent, close=True)
        client.shutdown(socket.SHUT_WR)
        assert _read_to_eof(client) == sent
    code, _out, err = listener.finish()
    assert code == 0, err
    return [json.loads(line) for line in err.splitlines()]


def test_an_abstract_unix_name(spawn: type[Listen]) -> None:
    # Before: a socket file named `@netprobe-...` in the current directory, not abstract.
    name = f"@netprobe-listen-{os.getpid()}-{time.monotonic_ns()}"
    listener = spawn(["--unix", name, "--json"])
    assert json.loads(listener.announce) == {"event": "listening", "proto": "unix", "path": name}
    assert not os.path.lexists(ROOT / name)
    # An abstract client: shown as `unix:@...`.
    client_name = "\0" + name[1:] + "-client"
    events = _one_unix_client(listener, "\0" + name[1:], b"hi abstract", bind_to=client_name)
    assert {e["peer"] for e in events} == {f"unix:{name}-client"}
