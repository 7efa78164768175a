"""The server core against real loopback clients: concurrency, back-pressure, resets, limits,
accept control, UDP, Unix sockets, outbound connections and stopping."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import selectors
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from netprobe.server import (
    Bound,
    CloseReason,
    Connection,
    ConnEvent,
    DatagramHandler,
    Handler,
    Server,
    ServerConfig,
    parse_allow,
)
from netprobe.sockets import raise_nofile_limit
from tests.conftest import HAS_IPV6
from tests.helpers import LONG

_LOOPS: dict[str, Callable[[], Any] | None] = {"asyncio": None}
try:
    import uvloop

    _LOOPS["uvloop"] = uvloop.new_event_loop
except ImportError:  # the portable path only
    pass
# Every test runs on both event loops the core serves on: asyncio's (reset serve/proxy, and
# anywhere uvloop is missing) and uvloop's (echo, where installed).
_loop_factory: list[Callable[[], Any] | None] = [None]


@pytest.fixture(autouse=True, params=list(_LOOPS))
def event_loop_kind(request: pytest.FixtureRequest) -> Iterator[str]:
    _loop_factory[0] = _LOOPS[request.param]
    yield request.param
    _loop_factory[0] = None


class Echo(Handler):
    __slots__ = ()

    def on_data(self, conn: Connection, data: bytes) -> None:
        conn.write(data)


class FastEcho(Echo):
    """Chunks echoed by the connection itself, as `netprobe echo` does (Handler.echo_limit)."""

    __slots__ = ()
    echo_limit = 1 << 20


class UdpEcho(DatagramHandler):
    def on_datagram(self, data: bytes, addr: object, reply: Callable[[bytes], None]) -> None:
        reply(data)


class Running:
    """A Server running in a thread, with its events collected (thread-safe enough: list.append)."""

    def __init__(self, server: Server, events: list[ConnEvent]) -> None:
        self.server = server
        self.events = events
        assert server.bound is not None
        self.bound: Bound = server.bound

    @property
    def addr(self) -> tuple[str, int]:
        assert self.bound.host is not None
        assert self.bound.port is not None
        return self.bound.host, self.bound.port

    def connect(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.addr[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(LONG)
        sock.connect(self.addr)
        return sock

    def wait_events(self, kind: str, count: int) -> list[ConnEvent]:
        deadline = time.monotonic() + LONG
        while time.monotonic() < deadline:
            found = [e for e in list(self.events) if e.event == kind]
            if len(found) >= count:
                return found
            time.sleep(0.01)
        raise AssertionError(f"expected {count} {kind} events, got {self.events}")


@contextlib.contextmanager
def serving(
    config: ServerConfig,
    factory: Callable[[], Handler] | None = Echo,
    datagram_handler: DatagramHandler | None = None,
) -> Iterator[Running]:
    events: list[ConnEvent] = []
    ready = threading.Event()
    if config.loop_factory is None:
        config = dataclasses.replace(config, loop_factory=_loop_factory[0])
    server = Server(
        config,
        None if config.udp else factory,
        datagram_handler=datagram_handler,
        on_event=events.append,
        on_ready=lambda _bound: ready.set(),
    )
    server.listen()
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert ready.wait(LONG), "server did not become ready"
        yield Running(server, events)
    finally:
        server.stop()
        thread.join(LONG)
        assert not thread.is_alive(), "server thread did not stop"


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def set_linger_zero(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


# ---------------------------------------------------------------------------------------------


def test_500_concurrent_clients_each_get_their_own_bytes_back() -> None:
    n = 500
    raise_nofile_limit(4 * n + 256)
    rng = random.Random(4)
    payloads = [rng.randbytes(rng.randint(1, 16384)) for _ in range(n)]
    with serving(ServerConfig(port=0, backlog=1024)) as srv:
        clients = [srv.connect() for _ in range(n)]  # all open at once before any data moves
        sel = selectors.DefaultSelector()
        sent = [0] * n
        got = [bytearray() for _ in range(n)]
        try:
            for i, sock in enumerate(clients):
                sock.setblocking(False)
                sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, i)
            done = 0
            deadline = time.monotonic() + 4 * LONG
            while done < n:
                assert time.monotonic() < deadline, f"only {done} of {n} clients finished"
                for key, mask in sel.select(timeout=LONG):
                    i = key.data
                    sock = clients[i]
                    if mask & selectors.EVENT_WRITE and sent[i] < len(payloads[i]):
                        sent[i] += sock.send(payloads[i][sent[i] :])
                        if sent[i] == len(payloads[i]):
                            sel.modify(sock, selectors.EVENT_READ, i)
                    if mask & selectors.EVENT_READ:
                        chunk = sock.recv(65536)
                        assert chunk, f"client {i} got EOF early"
                        got[i] += chunk
                        if len(got[i]) == len(payloads[i]):
                            sel.unregister(sock)
                            done += 1
            for i in range(n):
                assert bytes(got[i]) == payloads[i], f"client {i} got other bytes"
        finally:
            sel.close()
            for sock in clients:
                sock.close()
        closes = srv.wait_events("close", n)
        assert {e.reason for e in closes} == {"eof"}
        assert sum(e.bytes_in for e in closes) == sum(map(len, payloads))
        assert len(srv.wait_events("accept", n)) == n


@pytest.mark.parametrize("handler", [Echo, FastEcho], ids=["on-data", "echo-limit"])
def test_stalled_client_never_delays_the_others(handler: type[Handler]) -> None:
    # A bystander first: the stalled client is never alone, so with FastEcho its small echoes
    # wait for the end of a loop turn (a path that once let its write buffer grow to 4 MB).
    with serving(ServerConfig(port=0), handler) as srv, srv.connect() as bystander:
        bystander.sendall(b"hello")
        assert recv_exactly(bystander, 5) == b"hello"
        stalled = srv.connect()
        stalled.setblocking(False)
        blob = b"s" * 65536
        pushed = 0
        # Push until the kernel buffers and the server's write buffer are full: the server
        # must stop reading from this client instead of buffering without bound.
        deadline = time.monotonic() + LONG
        idle_since = time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - idle_since < 0.3:
            try:
                pushed += stalled.send(blob)
                idle_since = time.monotonic()
            except BlockingIOError:
                time.sleep(0.01)
        assert pushed > 0
        with srv.connect() as other:
            for i in range(200):
                message = f"ping {i}\n".encode()
                other.sendall(message)
                assert recv_exactly(other, len(message)) == message
        limit = srv.server.config.high_water + 256 * 1024
        buffered = [c.write_buffer_size for c in list(srv.server._active)]
        assert max(buffered) <= limit, f"write buffer grew to {max(buffered)}"
        stalled.close()


# Busy polling reads a lone client's socket outside the loop; 10 ms windows make the RSTs,
# EOFs and limits below land while the server is polling, not only while the loop waits.
BUSY_POLL = pytest.mark.parametrize("busy_poll_s", [0.0, 0.01], ids=["loop", "busy-poll"])


def _settled_fds() -> int:
    """This process's fd count once it holds still: the close event of a connection comes
    from connection_lost, and asyncio's transport closes the socket only after it returns, so
    a count taken right after the event could still include that fd (a flaky baseline)."""
    deadline = time.monotonic() + LONG
    last, still = psutil.Process().num_fds(), 0
    while still < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
        now = psutil.Process().num_fds()
        still = still + 1 if now == last else 0
        last = now
    return last


@BUSY_POLL
def test_resets_are_logged_and_fds_return_to_baseline(busy_poll_s: float) -> None:
    with serving(ServerConfig(port=0, busy_poll_s=busy_poll_s)) as srv:
        with srv.connect() as warm:  # let the loop create whatever it keeps (self-pipe etc.)
            warm.sendall(b"x")
            assert recv_exactly(warm, 1) == b"x"
        srv.wait_events("close", 1)
        baseline = _settled_fds()
        n = 20
        for _ in range(n):
            sock = srv.connect()
            sock.sendall(b"hello" * 100)
            assert recv_exactly(sock, 500) == b"hello" * 100
            sock.sendall(b"unread by the server?")
            set_linger_zero(sock)
            sock.close()  # RST mid-stream
        closes = srv.wait_events("close", n + 1)
        resets = [e for e in closes if e.reason == "reset"]
        # The server may have read the last bytes before the RST arrived and seen it while
        # reading or while writing: reset either way, never a clean EOF.
        assert len(resets) == n, [e.reason for e in closes]
        with srv.connect() as after:  # still serving
            after.sendall(b"still here")
            assert recv_exactly(after, 10) == b"still here"
        srv.wait_events("close", n + 2)
        deadline = time.monotonic() + LONG
        while psutil.Process().num_fds() > baseline and time.monotonic() < deadline:
            time.sleep(0.01)
        assert psutil.Process().num_fds() == baseline
        assert srv.server.totals().resets == n


@pytest.mark.parametrize("size", [1, 1472, 9000, 65507])
def test_udp_datagrams_are_echoed_to_their_sender(size: int) -> None:
    with serving(ServerConfig(port=0, udp=True), datagram_handler=UdpEcho()) as srv:
        assert srv.bound.proto == "udp"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(LONG)
            payload = random.Random(size).randbytes(size)
            client.sendto(payload, srv.addr)
            data, addr = client.recvfrom(65536)
            assert data == payload
            assert addr == srv.addr
        totals = srv.server.totals()
        assert (totals.datagrams_in, totals.datagrams_out) == (1, 1)


def test_unix_stream_echo_and_file_removed(tmp_path: Path) -> None:
    path = str(tmp_path / "echo.sock")
    with serving(ServerConfig(path=path)) as srv:
        assert srv.bound == Bound("unix", path=path)
        assert srv.bound.to_record() == {"event": "listening", "proto": "unix", "path": path}
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(LONG)
            client.connect(path)
            client.sendall(b"over unix")
            assert recv_exactly(client, 9) == b"over unix"
        assert srv.wait_events("close", 1)[0].peer == "unix"
    assert not os.path.exists(path)


@pytest.mark.skipif(not HAS_IPV6, reason="no IPv6 loopback")
def test_ipv6_echo() -> None:
    with serving(ServerConfig(host="::1", port=0)) as srv:
        assert srv.bound.host == "::1"
        with srv.connect() as client:
            client.sendall(b"six")
            assert recv_exactly(client, 3) == b"six"
        assert srv.wait_events("accept", 1)[0].peer.startswith("[::1]:")


def test_max_conns_rejects_and_counts() -> None:
    with serving(ServerConfig(port=0, max_conns=2)) as srv:
        held = [srv.connect(), srv.connect()]
        for sock in held:
            sock.sendall(b"ok")
            assert recv_exactly(sock, 2) == b"ok"
        with srv.connect() as extra:
            assert extra.recv(10) == b""  # accepted and closed at once
        rejects = srv.wait_events("reject", 1)
        assert rejects[0].reason == "max-conns"
        assert srv.server.totals().rejected == 1
        for sock in held:
            sock.close()
        srv.wait_events("close", 2)
        with srv.connect() as again:  # room again
            again.sendall(b"back")
            assert recv_exactly(again, 4) == b"back"


def test_idle_timeout_drops_silent_clients() -> None:
    with serving(ServerConfig(port=0, idle_timeout_s=0.4)) as srv:
        with srv.connect() as talker, srv.connect() as silent:
            start = time.monotonic()
            for _ in range(10):  # the talker stays alive past the timeout
                talker.sendall(b"t")
                assert recv_exactly(talker, 1) == b"t"
                time.sleep(0.05)
            assert silent.recv(10) == b""
            assert time.monotonic() - start >= 0.35
            talker.sendall(b"u")
            assert recv_exactly(talker, 1) == b"u"
        reasons = [e.reason for e in srv.wait_events("close", 2)]
        assert reasons[0] == "idle-timeout"


class Drop(Handler):
    """A discard handler that lets the core drop bytes in the kernel (drain_chunk)."""

    __slots__ = ()
    drain_chunk = 65536


def test_quiet_discard_clients_cost_one_fd_each() -> None:
    # The drain's duplicate descriptor is only made for a client that streams.
    with serving(ServerConfig(port=0), Drop) as srv:
        with srv.connect() as warm:
            warm.sendall(b"x")
        srv.wait_events("close", 1)
        baseline = _settled_fds()
        clients = [srv.connect() for _ in range(10)]
        try:
            for client in clients:
                client.sendall(b"small")
            srv.wait_events("accept", 11)
            time.sleep(0.1)  # let the server read what they sent
            # 10 client sockets here plus 10 accepted ones: no duplicates.
            assert psutil.Process().num_fds() == baseline + 20
        finally:
            for client in clients:
                client.close()


def test_read_errors_get_the_loops_close_reasons() -> None:
    from netprobe.server import _reason_for

    assert _reason_for(ConnectionResetError(104, "reset")) == "reset"
    assert _reason_for(BrokenPipeError(32, "pipe")) == "reset"
    assert _reason_for(ConnectionAbortedError(103, "aborted")) == "reset"
    assert _reason_for(TimeoutError(110, "timed out")) == "reset"
    assert _reason_for(OSError(113, "no route")) == "error"


def test_drained_bytes_are_counted_limited_and_resets_seen() -> None:
    big = 16 * 1024 * 1024 + 3
    with serving(ServerConfig(port=0), Drop) as srv:
        with srv.connect() as warm:
            warm.sendall(b"x")
        srv.wait_events("close", 1)
        baseline = _settled_fds()
        with srv.connect() as client:
            client.sendall(b"d" * big)
            client.shutdown(socket.SHUT_WR)
            assert client.recv(1) == b""
        close = srv.wait_events("close", 2)[-1]
        assert (close.reason, close.bytes_in, close.bytes_out) == ("eof", big, 0)
        for _ in range(5):
            sock = srv.connect()
            sock.sendall(b"r" * 4_000_000)
            set_linger_zero(sock)
            sock.close()
        closes = srv.wait_events("close", 7)[2:]
        assert [e.reason for e in closes] == ["reset"] * 5
        deadline = time.monotonic() + LONG
        while psutil.Process().num_fds() > baseline and time.monotonic() < deadline:
            time.sleep(0.01)
        assert psutil.Process().num_fds() == baseline  # the drain's duplicate fds are closed
    with serving(ServerConfig(port=0, max_bytes=1_000_001), Drop) as srv:
        with srv.connect() as client, contextlib.suppress(OSError):
            client.sendall(b"d" * 4_000_000)
        close = srv.wait_events("close", 1)[0]
        assert (close.reason, close.bytes_in) == ("limit", 1_000_001)


@BUSY_POLL
def test_max_bytes_closes_with_reason_limit(busy_poll_s: float) -> None:
    with serving(ServerConfig(port=0, max_bytes=10, busy_poll_s=busy_poll_s)) as srv:
        with srv.connect() as client:
            client.sendall(b"0123456789abcdef")
            assert recv_exactly(client, 20) == b"0123456789"
        close = srv.wait_events("close", 1)[0]
        assert (close.reason, close.bytes_in, close.bytes_out) == ("limit", 10, 10)


@BUSY_POLL
def test_ping_pong_limit_reached_mid_exchange(busy_poll_s: float) -> None:
    with serving(ServerConfig(port=0, max_bytes=640, busy_poll_s=busy_poll_s)) as srv:
        with srv.connect() as client:
            for i in range(10):
                message = bytes([i]) * 64
                client.sendall(message)
                assert recv_exactly(client, 64) == message
            # The server closed at the 640th byte: these bytes find no reader, so the answer
            # is EOF or, when they arrived after the close, an RST.
            with contextlib.suppress(OSError):
                client.sendall(b"one too many")
            with contextlib.suppress(ConnectionResetError):
                assert recv_exactly(client, 1) == b""
        close = srv.wait_events("close", 1)[0]
        assert (close.reason, close.bytes_in, close.bytes_out) == ("limit", 640, 640)


@BUSY_POLL
@pytest.mark.parametrize("handler", [Echo, FastEcho], ids=["on-data", "echo-limit"])
def test_ping_pong_byte_exact_with_a_second_client_arriving(
    busy_poll_s: float, handler: type[Handler]
) -> None:
    rng = random.Random(7)
    with serving(ServerConfig(port=0, busy_poll_s=busy_poll_s), handler) as srv:
        first = srv.connect()
        second: socket.socket | None = None
        sent = 0
        try:
            for i in range(300):
                message = rng.randbytes(rng.choice([1, 64, 1500]))
                first.sendall(message)
                assert recv_exactly(first, len(message)) == message
                sent += len(message)
                if i == 100:  # while the first client is being polled, a second one comes
                    second = srv.connect()
                if second is not None and i % 50 == 0:
                    second.sendall(b"second")
                    assert recv_exactly(second, 6) == b"second"
            first.shutdown(socket.SHUT_WR)
            assert recv_exactly(first, 1) == b""
        finally:
            first.close()
            if second is not None:
                second.close()
        closes = srv.wait_events("close", 2)
        by_id = {e.conn_id: e for e in closes}
        assert (by_id[1].reason, by_id[1].bytes_in, by_id[1].bytes_out) == ("eof", sent, sent)
        assert by_id[2].bytes_in == by_id[2].bytes_out == 6 * 4


def test_busy_polling_follows_the_lone_client() -> None:
    # Busy polling asks per message whether its client is alone; the server keeps that answer
    # (Server._lone) as clients come and go, and an outbound connection counts too.
    def lone() -> int | None:
        conn = srv.server._lone
        return None if conn is None else conn.conn_id

    def settles(expected: int | None) -> None:
        deadline = time.monotonic() + LONG
        while lone() != expected and time.monotonic() < deadline:
            time.sleep(0.005)
        assert lone() == expected

    with (
        serving(ServerConfig(port=0, busy_poll_s=0.01), FastEcho) as srv,
        socket.create_server(("127.0.0.1", 0)) as elsewhere,  # the kernel completes connects
        contextlib.ExitStack() as clients,
    ):
        settles(None)
        first = clients.enter_context(srv.connect())
        settles(1)
        second = clients.enter_context(srv.connect())
        settles(None)
        first.close()
        settles(2)
        outbound: list[Connection] = []
        host, port = elsewhere.getsockname()
        srv.server.loop.call_soon_threadsafe(
            lambda: outbound.append(srv.server.open_connection(host, port, Echo()))
        )
        settles(None)
        srv.server.loop.call_soon_threadsafe(lambda: outbound[0].abort())
        settles(2)
        second.close()
        settles(None)


def _in_loop(srv: Running, fn: Callable[[], None]) -> None:
    """Run fn in the server's loop thread, as one callback, and wait for it."""
    done = threading.Event()

    def run() -> None:
        try:
            fn()
        finally:
            done.set()

    srv.server.loop.call_soon_threadsafe(run)
    assert done.wait(LONG)


def _conn(srv: Running, conn_id: int) -> Connection:
    return next(c for c in list(srv.server._active) if c.conn_id == conn_id)


@pytest.mark.parametrize("then", ["write", "close"])
def test_echoes_held_to_the_end_of_a_loop_turn_keep_their_place(then: str) -> None:
    # With several clients a raw echo waits for the end of its loop turn (one wake-up of a
    # client for all its replies). Whatever else that turn does to the connection (a write
    # of its handler, a close) comes after it, as if the echo had gone out at once.
    with serving(ServerConfig(port=0), FastEcho) as srv, contextlib.ExitStack() as clients:
        first = clients.enter_context(srv.connect())
        clients.enter_context(srv.connect())  # not alone: echoes wait for the turn's end
        deadline = time.monotonic() + LONG
        while time.monotonic() < deadline:  # both accepted, and their transports made
            active = list(srv.server._active)
            if len(active) == 2 and all(c.transport is not None for c in active):
                break
            time.sleep(0.005)
        conn = _conn(srv, 1)

        def turn() -> None:
            conn.data_received(b"echoed")  # as the loop delivers a read
            assert srv.server._replies, "the echo was not held: this test tests nothing"
            if then == "write":
                conn.write(b"+written")
            else:
                conn.close()

        _in_loop(srv, turn)
        expected = b"echoed+written" if then == "write" else b"echoed"
        assert recv_exactly(first, len(expected)) == expected
        if then == "close":
            assert first.recv(10) == b""
            close = srv.wait_events("close", 1)[0]
            assert (close.conn_id, close.bytes_out) == (1, len(b"echoed"))


def test_pause_accept_listens_but_never_accepts() -> None:
    with serving(ServerConfig(port=0, pause_accept=True, backlog=4)) as srv:
        with srv.connect() as client:  # the kernel completes the handshake into the queue
            client.sendall(b"queued")
            client.settimeout(0.2)
            with pytest.raises(TimeoutError):
                client.recv(10)
        assert srv.events == []
        assert srv.server.totals().connections == 0


def test_backlog_is_the_listen_backlog() -> None:
    from netprobe.sockets import fill_accept_queue

    with serving(ServerConfig(port=0, pause_accept=True, backlog=3)) as srv:
        listener = srv.server._listener
        assert listener is not None
        clients = fill_accept_queue(listener, deadline=time.monotonic() + LONG)
        try:
            assert len(clients) == 4  # Linux queues backlog + 1 (SOCKETS.md)
        finally:
            for sock in clients:
                sock.close()


def test_accept_rate_paces_accepts() -> None:
    with serving(ServerConfig(port=0, accept_rate=10)) as srv:
        start = time.monotonic()
        clients = [srv.connect() for _ in range(4)]
        try:
            for sock in clients:
                sock.sendall(b"r")
                assert recv_exactly(sock, 1) == b"r"
            # One token at start, then one every 0.1 s: the 4th accept is >= 0.3 s in.
            assert time.monotonic() - start >= 0.25
        finally:
            for sock in clients:
                sock.close()


def test_allow_closes_other_peers() -> None:
    allow = parse_allow(["192.0.2.0/24"])  # never sent to: only compared against
    with serving(ServerConfig(port=0, allow=allow)) as srv:
        with srv.connect() as client:
            assert client.recv(10) == b""
        assert srv.wait_events("reject", 1)[0].reason == "not-allowed"
    with (
        serving(ServerConfig(port=0, allow=parse_allow(["127.0.0.0/8"]))) as srv,
        srv.connect() as client,
    ):
        client.sendall(b"in")
        assert recv_exactly(client, 2) == b"in"


def test_parse_allow_rejects_garbage() -> None:
    from netprobe.errors import UsageError

    with pytest.raises(UsageError, match="not-a-net"):
        parse_allow(["not-a-net"])


def test_handler_error_ends_only_that_connection() -> None:
    class Boom(Handler):
        __slots__ = ()

        def on_data(self, conn: Connection, data: bytes) -> None:
            if data == b"boom":
                raise RuntimeError("handler bug")
            conn.write(data)

    with serving(ServerConfig(port=0), Boom) as srv:
        with srv.connect() as bad:
            bad.sendall(b"boom")
            with contextlib.suppress(ConnectionResetError):
                assert bad.recv(10) == b""
        with srv.connect() as good:
            good.sendall(b"fine")
            assert recv_exactly(good, 4) == b"fine"
        assert srv.wait_events("close", 1)[0].reason == "error"
        totals = srv.server.totals()
        # One failure, one error: the close with reason "error" is the count (it was two).
        assert (totals.errors, totals.reasons.get("error")) == (1, 1)


@pytest.mark.slow
def test_totals_from_another_thread_never_tear() -> None:
    # A closed connection leaves the active set and joins the totals in one loop callback;
    # a reader on another thread used to catch it in between (bytes_in went backwards, or
    # counted twice). Forced thread switches make that window likely if it exists.
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    seen: list[tuple[int, int]] = []
    stop = threading.Event()
    try:
        with serving(ServerConfig(port=0)) as srv:

            def watch() -> None:
                while not stop.is_set():
                    totals = srv.server.totals()
                    seen.append((totals.connections, totals.bytes_in))

            watcher = threading.Thread(target=watch)
            watcher.start()
            try:
                for _ in range(300):
                    with srv.connect() as client:
                        client.sendall(b"x" * 100)
                        client.shutdown(socket.SHUT_WR)
                        assert recv_exactly(client, 100) == b"x" * 100
            finally:
                stop.set()
                watcher.join(LONG)
    finally:
        sys.setswitchinterval(switch)
    assert seen
    in_order = [b for _c, b in seen]
    assert in_order == sorted(in_order), "bytes_in went backwards"
    assert all(b <= 100 * c for c, b in seen), "bytes counted twice"


def test_stop_within_a_second_despite_a_client_that_never_reads() -> None:
    events: list[ConnEvent] = []
    ready = threading.Event()
    server = Server(
        ServerConfig(port=0, loop_factory=_loop_factory[0]),
        Echo,
        on_event=events.append,
        on_ready=lambda _b: ready.set(),
    )
    server.listen()
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert ready.wait(LONG)
    assert server.bound is not None
    with socket.create_connection(("127.0.0.1", server.bound.port or 0), timeout=LONG) as hog:
        hog.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            for _ in range(200):
                hog.send(b"h" * 65536)
        time.sleep(0.1)
        start = time.monotonic()
        server.stop()
        thread.join(LONG)
        assert not thread.is_alive()
        # 0.5 s grace, then the hog is reset; without that the stop would take close_timeout_s
        # (10 s). The bound is generous because the machine running the tests may be loaded.
        assert time.monotonic() - start < 2.5
    assert [e.reason for e in events if e.event == "close"] == ["shutdown"]


def test_count_stops_after_n_clients() -> None:
    with serving(ServerConfig(port=0, count=2)) as srv:
        for _ in range(2):
            with srv.connect() as client:
                client.sendall(b"c")
                assert recv_exactly(client, 1) == b"c"
        thread_done = time.monotonic() + LONG
        while srv.server._loop is not None and time.monotonic() < thread_done:
            time.sleep(0.01)
        assert srv.server._loop is None, "server did not stop after --count clients"
        assert srv.server.totals().connections == 2


class Relay(Handler):
    """Forwards each client to an upstream through Server.open_connection (a tiny proxy)."""

    __slots__ = ("upstream",)
    target: tuple[str, int] = ("127.0.0.1", 0)
    failures: list[str | None] = []  # noqa: RUF012  # per-test scratch, set by the test

    def __init__(self) -> None:
        self.upstream: Connection | None = None

    def on_open(self, conn: Connection) -> None:
        relay = self

        class Back(Handler):
            __slots__ = ()

            def on_data(self, up: Connection, data: bytes) -> None:
                conn.write(data)

            def on_close(self, up: Connection, reason: str) -> None:
                if reason == CloseReason.CONNECT_ERROR:
                    relay.failures.append(up.errno_name)
                conn.close(reason)

        self.upstream = conn.server.open_connection(*self.target, Back())

    def on_data(self, conn: Connection, data: bytes) -> None:
        assert self.upstream is not None
        self.upstream.write(data)

    def on_close(self, conn: Connection, reason: str) -> None:
        if self.upstream is not None:
            self.upstream.close(reason)


def test_open_connection_relays_and_reports_connect_errors(closed_port: int) -> None:
    with serving(ServerConfig(port=0)) as upstream:
        Relay.target = upstream.addr
        Relay.failures = []
        with serving(ServerConfig(port=0), Relay) as proxy:
            with proxy.connect() as client:
                client.sendall(b"through the proxy")  # buffered until the upstream connects
                assert recv_exactly(client, 17) == b"through the proxy"
            Relay.target = ("127.0.0.1", closed_port)
            with proxy.connect() as client:
                assert client.recv(10) == b""
            deadline = time.monotonic() + LONG
            while not Relay.failures and time.monotonic() < deadline:
                time.sleep(0.01)
            assert Relay.failures == ["ECONNREFUSED"]


def test_outbound_writes_and_close_before_connect_are_delivered() -> None:
    with serving(ServerConfig(port=0)) as upstream:
        Relay.target = upstream.addr
        Relay.failures = []
        with serving(ServerConfig(port=0), Relay) as proxy:
            for _ in range(5):
                with proxy.connect() as client:
                    # Data and EOF at once: the upstream may still be connecting when the
                    # proxy closes it; what was written must still arrive before the FIN.
                    client.sendall(b"d" * 1000)
                    client.shutdown(socket.SHUT_WR)
                    with contextlib.suppress(ConnectionResetError):
                        while client.recv(65536):
                            pass
            closes = upstream.wait_events("close", 5)
            assert [e.bytes_in for e in closes] == [1000] * 5
            assert Relay.failures == []


def test_stop_during_a_connect_burst_leaks_no_fds() -> None:
    import gc

    # A process's first uvloop loop opens a pipe pair that lives as long as the process
    # (libuv's signal lock): a baseline taken before any loop ran would count it as a leak
    # whenever this test is the first in its worker to use uvloop.
    with serving(ServerConfig(port=0)) as srv, srv.connect():
        pass
    baseline = psutil.Process().num_fds()
    for _ in range(3):
        with serving(ServerConfig(port=0, backlog=256)) as srv:
            clients = [srv.connect() for _ in range(40)]
        # Stopped while accepts were still being set up; every server-side socket is closed.
        for sock in clients:
            sock.close()
    gc.collect()
    assert psutil.Process().num_fds() == baseline


class LateReader(Handler):
    """Pauses in on_open and resumes 100 ms later: what the client sent meanwhile, and its
    EOF, must reach on_data/on_eof afterwards, in order (whatever the transport did)."""

    __slots__ = ("got",)

    def __init__(self) -> None:
        self.got: list[bytes] = []

    def on_open(self, conn: Connection) -> None:
        conn.pause_reading("late")
        conn.call_later(0.1, conn.resume_reading, "late")

    def on_data(self, conn: Connection, data: bytes) -> None:
        self.got.append(data)

    def on_eof(self, conn: Connection) -> None:
        conn.write(b"".join(self.got))
        conn.close("eof")


def test_bytes_and_eof_sent_while_paused_arrive_after_resume() -> None:
    payload = bytes(range(256)) * 400
    with serving(ServerConfig(port=0), LateReader) as srv:
        for _ in range(5):
            with srv.connect() as client:
                client.sendall(payload)
                client.shutdown(socket.SHUT_WR)
                assert recv_until_eof(client) == payload


def recv_until_eof(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


@contextlib.contextmanager
def udp_serving(handler: DatagramHandler) -> Iterator[tuple[Running, socket.socket]]:
    """A UDP server with `handler`, and a client socket connected to it."""
    with (
        serving(ServerConfig(port=0, udp=True), datagram_handler=handler) as srv,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client,
    ):
        client.settimeout(LONG)
        client.connect(srv.addr)
        yield srv, client


def test_udp_empty_datagram_gets_an_empty_reply() -> None:
    # port-check --udp probes with an empty datagram; asyncio's sendto(b"") sends nothing.
    with udp_serving(UdpEcho()) as (_srv, client):
        client.send(b"")
        assert client.recv(100) == b""
        client.send(b"x")
        assert client.recv(100) == b"x"


def test_echo_picks_uvloop_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    from netprobe.engines.echo import EchoOptions, make_server
    from netprobe.server import event_loop_name

    monkeypatch.setenv("NETPROBE_EVENT_LOOP", "asyncio")
    assert event_loop_name() == "asyncio"
    assert make_server(ServerConfig(port=0), EchoOptions()).config.loop_factory is None
    monkeypatch.delenv("NETPROBE_EVENT_LOOP")
    have_uvloop = "uvloop" in _LOOPS
    assert event_loop_name() == ("uvloop" if have_uvloop else "asyncio")
    factory = make_server(ServerConfig(port=0), EchoOptions()).config.loop_factory
    assert (factory is not None) == have_uvloop


class _Oversized(DatagramHandler):
    """Replies with more than a UDP datagram can carry: the kernel refuses it (EMSGSIZE)."""

    def on_datagram(self, data: bytes, addr: object, reply: Callable[[bytes], None]) -> None:
        reply(b"x" * 70_000 if data == b"big" else data)


def test_udp_reply_the_kernel_refuses_is_not_counted_as_sent() -> None:
    with udp_serving(_Oversized()) as (srv, client):
        client.send(b"big")
        client.send(b"ok")
        assert client.recv(100) == b"ok"  # the server goes on after the failed send
        totals = srv.server.totals()
    assert (totals.datagrams_in, totals.datagrams_out, totals.bytes_out) == (2, 1, 2)
    assert totals.reasons.get("send-error") == 1


def test_an_aborted_connection_does_not_count_what_it_never_sent() -> None:
    # A client that sends and never reads: the echo backs up in the transport, and the stop
    # aborts the connection (RST) with that backlog unsent. bytes_out must leave it out.
    with serving(ServerConfig(port=0)) as srv:
        client = srv.connect()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.setblocking(False)
        chunk = b"z" * 65536
        stalled_since = None
        deadline = time.monotonic() + LONG
        while time.monotonic() < deadline:
            try:
                client.send(chunk)
                stalled_since = None
            except BlockingIOError:
                stalled_since = stalled_since or time.monotonic()
                if time.monotonic() - stalled_since > 0.3:  # the server stopped reading
                    break
                time.sleep(0.01)
        events = srv.events
    client.close()
    close = next(e for e in events if e.event == "close")
    assert close.reason == "shutdown"
    assert close.bytes_out < close.bytes_in  # the backlog it dropped was not sent


class _Flood(Handler):
    """Writes SIZE bytes at once on open (far past the write-buffer marks), then ends the
    connection the way `how` says."""

    __slots__ = ("how",)
    SIZE = 4 * 1024 * 1024

    def __init__(self, how: str) -> None:
        self.how = how

    def on_open(self, conn: Connection) -> None:
        conn.write(bytes(range(256)) * (self.SIZE // 256))
        if self.how == "half_close":
            conn.half_close()
        elif self.how == "close":
            conn.close()

    def on_write_paused(self, conn: Connection) -> None:
        pass  # nothing to read from this client: no pause to take

    def on_eof(self, conn: Connection) -> None:
        conn.close()


@pytest.mark.parametrize("how", ["half_close", "close"])
def test_a_large_backlog_then_fin_arrives_whole_and_in_order(how: str) -> None:
    # The client reads slowly at first: the bytes wait in our write buffer, the FIN after them.
    with serving(ServerConfig(port=0), lambda: _Flood(how)) as srv, srv.connect() as client:
        time.sleep(0.2)
        got = bytearray()
        while chunk := client.recv(1 << 20):
            got += chunk
        assert bytes(got) == bytes(range(256)) * (_Flood.SIZE // 256)
        if how == "half_close":
            client.sendall(b"still open")  # our half-close left the other direction alone
            client.shutdown(socket.SHUT_WR)
        (close,) = srv.wait_events("close", 1)
        assert close.reason == "eof"
        assert close.bytes_out == _Flood.SIZE


class _RawEcho(Handler):
    """A raw echo as the echo engine's: the connection writes chunks back itself."""

    __slots__ = ()
    echo_limit = 1 << 20

    def on_open(self, conn: Connection) -> None:
        # A small send buffer: the kernel takes our bytes a little at a time, so most of the
        # echo goes through our own write buffer (partial sends, waits for room).
        conn.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)

    def on_data(self, conn: Connection, data: bytes) -> None:
        conn.write(data)


def send_then_read_back(client: socket.socket, payload: bytes) -> bytes:
    """Send payload from a thread that starts half a second before the reading (it blocks
    once the buffers on the way are full), read as many bytes back and return them."""
    sender = threading.Thread(target=client.sendall, args=(payload,), daemon=True)
    sender.start()
    sender.join(0.5)
    got = bytearray()
    while len(got) < len(payload):
        chunk = client.recv(65536)
        assert chunk, f"EOF after {len(got)} of {len(payload)} bytes"
        got += chunk
    sender.join(LONG)
    return bytes(got)


def test_raw_echo_with_a_backlog_stays_byte_exact() -> None:
    # The client sends before it reads anything back: the echo's write buffer fills, reading
    # pauses and resumes, and bytes read meanwhile queue behind the unsent ones. A small
    # receive buffer keeps the kernel from absorbing it all.
    payload = random.Random(7).randbytes(8 * 1024 * 1024)
    with serving(ServerConfig(port=0), _RawEcho) as srv:
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        client.settimeout(LONG)
        client.connect(srv.addr)
        with client:
            assert send_then_read_back(client, payload) == payload
            client.shutdown(socket.SHUT_WR)
            assert client.recv(1) == b""
            (close,) = srv.wait_events("close", 1)
    assert (close.reason, close.bytes_in, close.bytes_out) == ("eof", len(payload), len(payload))


def test_a_client_that_resets_while_we_wait_to_write_is_seen_at_once() -> None:
    # It sends without reading: our write buffer fills and we stop reading it. Its RST then
    # must end the connection (reason reset) while it sits there, not at the server's stop.
    with serving(ServerConfig(port=0), _RawEcho) as srv:
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(srv.addr)
        client.setblocking(False)
        deadline = time.monotonic() + LONG
        stuck_since = None
        while time.monotonic() < deadline:
            try:
                client.send(b"x" * 65536)
                stuck_since = None
            except BlockingIOError:
                stuck_since = stuck_since or time.monotonic()
                if time.monotonic() - stuck_since > 0.3:
                    break  # nothing moves: every buffer on the way is full
                time.sleep(0.01)
        set_linger_zero(client)
        client.close()
        (close,) = srv.wait_events("close", 1)
        assert close.reason == "reset"
        assert srv.server.totals().active == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract names are Linux's")
def test_an_abstract_unix_name_has_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: `@name` was a path: a file of that name in the cwd was "not a socket" (exit 6),
    # else a socket file was made there and removed at exit.
    monkeypatch.chdir(tmp_path)
    name = f"@netprobe-server-{os.getpid()}-{time.monotonic_ns()}"
    (tmp_path / name).write_text("not ours")
    with serving(ServerConfig(path=name)) as srv:
        assert srv.bound == Bound("unix", path=name)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(LONG)
            client.bind("\0" + name[1:] + "-client")
            client.connect("\0" + name[1:])
            client.sendall(b"abstract")
            assert recv_exactly(client, 8) == b"abstract"
        assert srv.wait_events("close", 1)[0].peer == f"unix:{name}-client"
    assert (tmp_path / name).read_text() == "not ours"
