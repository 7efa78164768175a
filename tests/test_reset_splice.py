"""sockets.splice_relay (the reset proxy's zero-copy path) on real loopback TCP sockets."""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from netprobe.sockets import SPLICE_AVAILABLE, RelayResult, splice_relay
from tests.helpers import LONG

pytestmark = pytest.mark.skipif(not SPLICE_AVAILABLE, reason="splice(2) is Linux-only")


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname(), timeout=LONG)
        server, _ = listener.accept()
    server.settimeout(LONG)
    return client, server


class _Relay:
    """client <-> [a  relay  b] <-> upstream, the relay in a thread."""

    def __init__(self) -> None:
        self.client, self.a = _tcp_pair()
        self.b, self.upstream = _tcp_pair()
        self.wake_r, self.wake_w = os.pipe()
        self.moved: list[tuple[bool, int]] = []
        self.result: RelayResult | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.result = splice_relay(
            self.a.fileno(),
            self.b.fileno(),
            wake_fd=self.wake_r,
            on_moved=lambda up, n: self.moved.append((up, n)),
        )

    def wait(self) -> RelayResult:
        self.thread.join(LONG)
        assert not self.thread.is_alive()
        assert self.result is not None
        return self.result

    def close(self) -> None:
        os.write(self.wake_w, b"x")
        self.thread.join(LONG)
        for sock in (self.client, self.a, self.b, self.upstream):
            sock.close()
        os.close(self.wake_r)
        os.close(self.wake_w)


@pytest.fixture
def relay() -> Iterator[_Relay]:
    r = _Relay()
    try:
        yield r
    finally:
        r.close()


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def test_both_ways_with_half_close(relay: _Relay) -> None:
    up_payload = os.urandom(3 * 1024 * 1024 + 17)
    down_payload = os.urandom(1024 * 1024 + 5)
    got: dict[str, bytes] = {}

    def upstream_side() -> None:
        got["up"] = _read_all(relay.upstream)  # ends at the client's FIN, passed on
        relay.upstream.sendall(down_payload)
        relay.upstream.shutdown(socket.SHUT_WR)

    worker = threading.Thread(target=upstream_side)
    worker.start()
    relay.client.sendall(up_payload)
    relay.client.shutdown(socket.SHUT_WR)
    got["down"] = _read_all(relay.client)
    worker.join(LONG)
    result = relay.wait()
    assert got == {"up": up_payload, "down": down_payload}
    assert (result.ended, result.a_to_b, result.b_to_a) == (
        "eof",
        len(up_payload),
        len(down_payload),
    )
    assert sum(n for up, n in relay.moved if up) == len(up_payload)


def test_a_reset_is_reported_with_its_side(relay: _Relay) -> None:
    relay.client.sendall(b"ping")
    assert relay.upstream.recv(4) == b"ping"
    relay.upstream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    relay.upstream.close()
    result = relay.wait()
    assert (result.ended, result.reset_by, result.errno_name) == ("reset", "b", "ECONNRESET")


def test_wake_fd_stops_it(relay: _Relay) -> None:
    os.write(relay.wake_w, b"x")
    result: Any = relay.wait()
    assert result.ended == "stop"
