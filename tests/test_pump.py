"""The echo in C (netprobe._pump, the server core's _Pump) against real loopback clients: what
it adopts, and every way a connection goes back to its loop transport (EOF, RST, a chunk over
the limit, a write the kernel takes only part of, a pause, a close) keeping the bytes exact
and the close reasons the loop's."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import random
import select
import shutil
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from netprobe.server import CloseReason, Connection, ServerConfig
from tests.helpers import LONG
from tests.test_server import (
    Running,
    _in_loop,
    recv_exactly,
    send_then_read_back,
    serving,
    set_linger_zero,
)

NATIVE_BUILT = importlib.util.find_spec("netprobe._pump") is not None

_LOOPS: dict[str, Callable[[], Any] | None] = {"asyncio": None}
try:
    import uvloop

    _LOOPS["uvloop"] = uvloop.new_event_loop
except ImportError:
    pass


def test_the_echo_in_c_is_built_where_it_can_be() -> None:
    # setup.py builds it optional: a compile that fails leaves the Python echo, silently.
    # Where a compiler and Python's headers are present, that would be a bug of ours.
    headers = Path(sysconfig.get_paths()["include"], "Python.h")
    if not sys.platform.startswith("linux") or not shutil.which("cc") or not headers.exists():
        pytest.skip("no C compiler or no Python headers here: the Python echo serves")
    assert NATIVE_BUILT, "netprobe._pump did not build (see .venv/install.log)"


pytestmark = pytest.mark.skipif(not NATIVE_BUILT, reason="netprobe._pump not built here")


@pytest.fixture(params=list(_LOOPS))
def loop_factory(request: pytest.FixtureRequest) -> Callable[[], Any] | None:
    return _LOOPS[request.param]


class RawEcho:
    """Handler of a raw echo (the echo engine's contract): chunks up to LIMIT come back
    without a call; a larger one reaches on_data, which ends the connection."""

    LIMIT = 1 << 20

    @staticmethod
    def factory(limit: int = LIMIT, sndbuf: int | None = None) -> Callable[[], Any]:
        from netprobe.server import Handler

        class _Echo(Handler):
            __slots__ = ()
            echo_limit = limit

            def on_open(self, conn: Connection) -> None:
                if sndbuf is not None:
                    sock = conn.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)

            def on_data(self, conn: Connection, data: bytes) -> None:
                if len(data) > limit:
                    conn.close(CloseReason.FRAME_TOO_LARGE)
                else:
                    conn.write(data)

        return _Echo


@contextlib.contextmanager
def pumped(
    loop_factory: Callable[[], Any] | None, handler: Callable[[], Any], **config: Any
) -> Iterator[Running]:
    cfg = ServerConfig(port=0, native_echo=True, loop_factory=loop_factory, **config)
    with serving(cfg, handler) as srv:
        assert srv.server._pump is not None
        yield srv


def adopted(srv: Running) -> int:
    pump = srv.server._pump
    return -1 if pump is None else len(pump._conns)


def wait_adopted(srv: Running, count: int) -> None:
    deadline = time.monotonic() + LONG
    while adopted(srv) != count:
        assert time.monotonic() < deadline, f"{adopted(srv)} adopted, expected {count}"
        time.sleep(0.005)


def test_raw_echo_clients_are_echoed_in_c_byte_for_byte(
    loop_factory: Callable[[], Any] | None,
) -> None:
    rng = random.Random(4)
    with pumped(loop_factory, RawEcho.factory()) as srv, contextlib.ExitStack() as stack:
        clients = [stack.enter_context(srv.connect()) for _ in range(20)]
        wait_adopted(srv, 20)
        sent = [bytearray() for _ in clients]
        for _ in range(50):
            for i, client in enumerate(clients):
                msg = rng.randbytes(rng.randrange(1, 300))
                client.sendall(msg)
                sent[i] += msg
                assert recv_exactly(client, len(msg)) == msg
        assert adopted(srv) == 20, "a plain echo left the pump"
        for client in clients:
            client.shutdown(socket.SHUT_WR)
            assert client.recv(1) == b""
        closes = srv.wait_events("close", 20)
    by_id = {c.conn_id: c for c in closes}
    for i, _client in enumerate(clients):
        close = by_id[i + 1]
        assert (close.reason, close.bytes_in, close.bytes_out) == (
            "eof",
            len(sent[i]),
            len(sent[i]),
        )


def test_a_write_the_kernel_takes_in_part_goes_back_to_the_transport_in_order(
    loop_factory: Callable[[], Any] | None,
) -> None:
    # A small send buffer on our side and a client that sends before it reads: our send
    # comes short, the rest waits in the transport, reading pauses at its mark and resumes.
    payload = random.Random(9).randbytes(8 * 1024 * 1024)
    with pumped(loop_factory, RawEcho.factory(sndbuf=8192)) as srv:
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        client.settimeout(LONG)
        client.connect(srv.addr)
        with client:
            wait_adopted(srv, 1)
            assert send_then_read_back(client, payload) == payload
            assert adopted(srv) == 0, "the short write did not hand the connection back"
            client.shutdown(socket.SHUT_WR)
            assert client.recv(1) == b""
            (close,) = srv.wait_events("close", 1)
    assert (close.reason, close.bytes_in, close.bytes_out) == ("eof", len(payload), len(payload))


def test_a_reset_of_an_adopted_client_is_a_reset(loop_factory: Callable[[], Any] | None) -> None:
    with pumped(loop_factory, RawEcho.factory()) as srv, srv.connect() as other:
        client = srv.connect()
        wait_adopted(srv, 2)
        client.sendall(b"ping")
        assert recv_exactly(client, 4) == b"ping"
        set_linger_zero(client)
        client.close()
        (close,) = srv.wait_events("close", 1)
        assert (close.reason, close.bytes_in, close.bytes_out) == ("reset", 4, 4)
        other.sendall(b"still served")
        assert recv_exactly(other, 12) == b"still served"
        assert adopted(srv) == 1


def test_a_reset_with_bytes_in_flight_is_a_reset(loop_factory: Callable[[], Any] | None) -> None:
    # The RST arrives behind data: the pump reads the data, and its echo meets the reset
    # (a write error), or its next read does (a read error). Either way: reset, never eof.
    with pumped(loop_factory, RawEcho.factory()) as srv:
        for _ in range(20):
            client = srv.connect()
            client.sendall(b"x" * 1000)
            set_linger_zero(client)
            client.close()
        closes = srv.wait_events("close", 20)
    assert {c.reason for c in closes} == {"reset"}
    assert srv.server.totals().resets == 20


def test_a_chunk_over_the_limit_reaches_the_handler(loop_factory: Callable[[], Any] | None) -> None:
    with pumped(loop_factory, RawEcho.factory(limit=100)) as srv, srv.connect() as client:
        wait_adopted(srv, 1)
        client.sendall(b"a" * 100)
        assert recv_exactly(client, 100) == b"a" * 100
        client.sendall(b"b" * 101)
        assert client.recv(1000) == b""
        (close,) = srv.wait_events("close", 1)
    assert (close.reason, close.bytes_in, close.bytes_out) == ("frame-too-large", 201, 100)


def test_the_idle_clock_sees_what_the_pump_reads(loop_factory: Callable[[], Any] | None) -> None:
    # The pump stamps each read for the idle timeout: a client that talks every 0.1 s for
    # three timeouts stays; silent, it is dropped.
    with pumped(loop_factory, RawEcho.factory(), idle_timeout_s=0.3) as srv:
        with srv.connect() as client:
            wait_adopted(srv, 1)
            for _ in range(9):
                client.sendall(b"tick")
                assert recv_exactly(client, 4) == b"tick"
                time.sleep(0.1)
            assert not [e for e in srv.events if e.event == "close"]
            assert client.recv(1) == b""  # then silent: dropped
        (close,) = srv.wait_events("close", 1)
    assert (close.reason, close.bytes_in) == ("idle-timeout", 36)


def test_eof_goes_back_to_the_transport_and_counts(loop_factory: Callable[[], Any] | None) -> None:
    with pumped(loop_factory, RawEcho.factory()) as srv, srv.connect() as client:
        wait_adopted(srv, 1)
        client.sendall(b"last words")
        client.shutdown(socket.SHUT_WR)
        assert recv_exactly(client, 10) == b"last words"
        assert client.recv(1) == b""
        (close,) = srv.wait_events("close", 1)
        assert (close.reason, close.bytes_in, close.bytes_out) == ("eof", 10, 10)
        assert adopted(srv) == 0


@contextlib.contextmanager
def two_adopted(
    loop_factory: Callable[[], Any] | None,
) -> Iterator[tuple[Running, socket.socket, socket.socket, Connection, Connection]]:
    """A C echo with two clients adopted: the server, both client sockets, their Connections."""
    with (
        pumped(loop_factory, RawEcho.factory()) as srv,
        srv.connect() as first_client,
        srv.connect() as second_client,
    ):
        wait_adopted(srv, 2)
        first, second = sorted(srv.server._active, key=lambda c: c.conn_id)
        yield srv, first_client, second_client, first, second


def test_a_pause_and_a_write_of_the_server_leave_the_pump(
    loop_factory: Callable[[], Any] | None,
) -> None:
    # Whatever the server does to an adopted connection goes through its transport from then
    # on: a write (the pump's own writes would pass any bytes it left waiting), a pause.
    with two_adopted(loop_factory) as (srv, writes, pauses, first, second):
        _in_loop(srv, lambda: first.write(b"hello "))
        assert first._pumped < 0
        assert adopted(srv) == 1
        writes.sendall(b"world")
        assert recv_exactly(writes, 11) == b"hello world"
        _in_loop(srv, lambda: second.pause_reading("test"))
        assert adopted(srv) == 0
        pauses.sendall(b"held")
        time.sleep(0.1)
        pauses.setblocking(False)
        with pytest.raises(BlockingIOError):
            pauses.recv(10)  # paused: nothing read, nothing echoed
        pauses.settimeout(LONG)
        _in_loop(srv, lambda: second.resume_reading("test"))
        assert recv_exactly(pauses, 4) == b"held"


def test_a_stale_release_leaves_a_newer_connection_with_that_fd_alone(
    loop_factory: Callable[[], Any] | None,
) -> None:
    # A loop may close a socket before connection_lost runs; the fd number can then belong to
    # a newer connection the pump adopted. The old one's release must not take it out.
    with pumped(loop_factory, RawEcho.factory()) as srv, srv.connect() as client:
        wait_adopted(srv, 1)
        pump = srv.server._pump
        assert pump is not None
        conn = next(iter(srv.server._active))
        ghost = Connection(srv.server, conn.handler, 999, "ghost")
        ghost._pumped = conn._pumped
        _in_loop(srv, lambda: pump.release(ghost, resume=False))
        assert adopted(srv) == 1
        client.sendall(b"still mine")
        assert recv_exactly(client, 10) == b"still mine"


def test_a_lone_client_is_still_busy_polled(loop_factory: Callable[[], Any] | None) -> None:
    # Busy polling follows the pump's echo of a lone client: replies come from the poll, and
    # the connection stays adopted (its transport wrote everything at once).
    with (
        pumped(loop_factory, RawEcho.factory(), busy_poll_s=0.005) as srv,
        srv.connect() as client,
    ):
        wait_adopted(srv, 1)
        for i in range(200):
            msg = i.to_bytes(4, "big") * 16
            client.sendall(msg)
            assert recv_exactly(client, 64) == msg
        assert adopted(srv) == 1
        client.shutdown(socket.SHUT_WR)
        assert client.recv(1) == b""
        (close,) = srv.wait_events("close", 1)
    assert (close.reason, close.bytes_in, close.bytes_out) == ("eof", 12800, 12800)


def test_stop_with_adopted_clients_closes_them_and_the_pump(
    loop_factory: Callable[[], Any] | None,
) -> None:
    with pumped(loop_factory, RawEcho.factory()) as srv, contextlib.ExitStack() as stack:
        clients = [stack.enter_context(srv.connect()) for _ in range(5)]
        wait_adopted(srv, 5)
        srv.server.stop()
        for client in clients:
            assert client.recv(1) == b""
        closes = srv.wait_events("close", 5)
    assert {c.reason for c in closes} == {"shutdown"}
    assert srv.server._pump is None


def test_an_echo_limit_past_64_bits_is_a_limit_as_on_the_loop(
    loop_factory: Callable[[], Any] | None,
) -> None:
    # Handler.echo_limit is any int on the loop's path; the C read it as a long long and
    # raised at each read, after taking the bytes from the kernel: no echo, ever.
    with pumped(loop_factory, RawEcho.factory(limit=1 << 64)) as srv, srv.connect() as client:
        wait_adopted(srv, 1)
        client.sendall(b"no limit")
        assert recv_exactly(client, 8) == b"no limit"
        assert adopted(srv) == 1
        client.shutdown(socket.SHUT_WR)
        assert client.recv(1) == b""
        (close,) = srv.wait_events("close", 1)
    assert (close.reason, close.bytes_in, close.bytes_out) == ("eof", 8, 8)


def test_run_refuses_a_buffer_with_no_room_for_a_read() -> None:
    # Half of a 1-byte buffer is a read of 0 bytes, which the kernel answers as at EOF.
    from netprobe import _pump

    a, b = socket.socketpair()
    with a, b, select.epoll() as ep:
        a.setblocking(False)
        ep.register(a.fileno(), select.EPOLLIN)
        b.sendall(b"data")
        conn = RawEchoConn()
        with pytest.raises(ValueError, match="at least 2 bytes"):
            _pump.run(ep.fileno(), {a.fileno(): conn}, bytearray(1), 4, None, -1)
        assert _pump.run(ep.fileno(), {a.fileno(): conn}, bytearray(8), 4, None, -1) == []
        b.settimeout(LONG)
        assert recv_exactly(b, 4) == b"data"
    assert (conn.bytes_in, conn.bytes_out) == (4, 4)


class RawEchoConn:
    """What _pump.run reads and sets on a connection."""

    def __init__(self) -> None:
        self.bytes_in = 0
        self.bytes_out = 0
        self._last_rx = 0.0
        self._echo_limit = 1 << 20


_DROPS_ITS_CONN = """
import select, socket
from netprobe import _pump

conns = {}

class Dropped:
    bytes_in = bytes_out = 0
    _last_rx = 0.0

    @property
    def _echo_limit(self):
        conns.clear()  # the dict held the only other reference
        return 1 << 20

a, b = socket.socketpair()
a.setblocking(False)
ep = select.epoll()
ep.register(a.fileno(), select.EPOLLIN)
conns[a.fileno()] = Dropped()
b.sendall(b"data")
assert _pump.run(ep.fileno(), conns, bytearray(64), 4, None, -1) == []
b.settimeout(5)
assert b.recv(4) == b"data"
print("ok")
"""


def test_run_holds_a_connection_that_python_code_drops_from_conns() -> None:
    # run() calls Python code (attribute access) between taking a connection out of conns and
    # its last use. With a borrowed reference, that use read freed memory: malloc_debug fills
    # it with 0xDD, so the child crashes where it would otherwise work on garbage.
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONMALLOC": "malloc_debug", "PYTHONPATH": str(root)}
    child = subprocess.run(
        [sys.executable, "-c", _DROPS_ITS_CONN],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (child.returncode, child.stdout) == (0, "ok\n"), child.stderr[-2000:]


# What each loop's stream transport reads per call (uvloop: UV_STREAM_RECV_BUF_SIZE; asyncio:
# _SelectorSocketTransport.max_size): raw echo's --max-frame counts chunks of that size.
_LOOP_READ = {"asyncio": 262144, "uvloop": 256000}


@pytest.mark.parametrize("loop_name", list(_LOOPS))
def test_the_pump_reads_chunks_no_larger_than_its_loop_does(loop_name: str, tmp_path: Path) -> None:
    # --max-frame at the loop's read size never closes a stream on the loop's path: the pump's
    # reads must not be larger (uvloop reads 256000 bytes: 262144 made --max-frame 250KiB
    # close bulk clients with frame-too-large). The loop stands still while the client queues
    # more than one read's worth, so the pump's first read is a full one.
    limit = _LOOP_READ[loop_name]
    payload = random.Random(7).randbytes(limit + 50000)
    path = str(tmp_path / "e.sock")
    with (
        pumped(_LOOPS[loop_name], RawEcho.factory(limit=limit), path=path) as srv,
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client,
    ):
        # A Unix stream queues what the sender's buffer holds: room for the whole payload.
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * len(payload))
        client.connect(path)
        wait_adopted(srv, 1)
        blocked, release = threading.Event(), threading.Event()

        def stand_still() -> None:
            blocked.set()
            release.wait(LONG)

        srv.server.loop.call_soon_threadsafe(stand_still)
        assert blocked.wait(LONG)
        try:
            client.setblocking(False)
            queued = client.send(payload)
        finally:
            release.set()
        assert queued > limit, f"only {queued} bytes queued: the test needs more than one read"
        client.settimeout(LONG)
        client.sendall(payload[queued:])
        client.shutdown(socket.SHUT_WR)
        got = bytearray()
        while chunk := client.recv(65536):
            got += chunk
        (close,) = srv.wait_events("close", 1)
    assert (close.reason, close.bytes_in, bytes(got)) == ("eof", len(payload), payload)


class _BrokenLimit:
    """A connection whose limit cannot be read."""

    bytes_in = bytes_out = 0

    @property
    def _echo_limit(self) -> int:
        raise RuntimeError("not a connection's limit")


def test_a_connection_whose_attributes_fail_ends_alone() -> None:
    # An exception while serving one connection of a batch used to fail the whole call: the
    # chunks read from the others and held for the end of the batch were never written.
    from netprobe import _pump

    pairs = [socket.socketpair() for _ in range(3)]
    with contextlib.ExitStack() as stack, select.epoll() as ep:
        for a, b in pairs:
            stack.enter_context(a)
            stack.enter_context(b)
            a.setblocking(False)
            ep.register(a.fileno(), select.EPOLLIN)
            b.sendall(b"ping")
            b.settimeout(LONG)
        good = [RawEchoConn(), RawEchoConn()]
        broken = _BrokenLimit()
        conns: dict[int, Any] = {
            pairs[0][0].fileno(): good[0],
            pairs[1][0].fileno(): broken,
            pairs[2][0].fileno(): good[1],
        }
        reports = _pump.run(ep.fileno(), conns, bytearray(1 << 16), 16, None, -1)
        (fd, kind, value), *rest = reports
        assert not rest
        assert (fd, kind) == (pairs[1][0].fileno(), 7)
        assert isinstance(value, RuntimeError)
        assert recv_exactly(pairs[0][1], 4) == b"ping"
        assert recv_exactly(pairs[2][1], 4) == b"ping"
    assert [(c.bytes_in, c.bytes_out) for c in good] == [(4, 4), (4, 4)]


def test_the_server_ends_a_connection_the_c_echo_failed_on(
    loop_factory: Callable[[], Any] | None,
) -> None:
    # As a handler's failure: that connection closes with reason error and is counted, the
    # others are served on.
    with two_adopted(loop_factory) as (srv, victim, other, first, _second):
        _in_loop(srv, lambda: setattr(first, "_echo_limit", "not an int"))
        victim.sendall(b"ping")
        with pytest.raises(ConnectionResetError):  # aborted, as a failed handler's is
            victim.recv(10)
        (close,) = srv.wait_events("close", 1)
        assert (close.conn_id, close.reason) == (first.conn_id, "error")
        other.sendall(b"still served")
        assert recv_exactly(other, 12) == b"still served"
    assert srv.server.totals().errors == 1
