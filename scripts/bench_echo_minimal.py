"""Reference servers for scripts/bench_echo.py: the smallest correct Python echoes.

No features (limits, records, timeouts, Unix/UDP), one process. The default is a plain epoll
loop (recv_into and send, no asyncio): what Python itself costs on this machine, apart from any
event loop framework. `uvloop` is a one-line asyncio Protocol on uvloop (data_received writes
the bytes back): the floor of the framework netprobe echo runs on, so the distance between it
and netprobe is what netprobe's own code costs. `splice` (Linux) echoes in the kernel, a
thread per client moving bytes socket -> pipe -> socket with splice(2), never into user space:
what the issue's "Linux splice for raw echo" would reach on this machine. Loopback only; ends
on SIGTERM/SIGINT.

    python3 scripts/bench_echo_minimal.py PORT [epoll|uvloop|splice]
"""

from __future__ import annotations

import select
import socket
import sys
from typing import cast


def serve_uvloop(port: int) -> int:
    import asyncio

    import uvloop

    class Echo(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.Transport, transport)

        def data_received(self, data: bytes) -> None:
            self.transport.write(data)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_server(Echo, "127.0.0.1", port, backlog=4096)
        await asyncio.Event().wait()

    uvloop.run(serve())
    return 0


def splice_echo(conn: socket.socket, pipe_size: int = 1 << 20) -> None:
    """Echo one client with splice(2) until its EOF or an error, then close it."""
    import fcntl
    import os

    flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
    conn.setblocking(False)
    fd = conn.fileno()
    pipe_r, pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        pipe_size = fcntl.fcntl(pipe_w, 1031, pipe_size)  # F_SETPIPE_SZ; what the kernel gave
    except OSError:
        pipe_size = 65536
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    held = 0  # bytes in the pipe
    eof = False
    try:
        while not (eof and not held):
            moved = False
            # Read while the pipe has room and write what it holds, both without blocking:
            # the two directions overlap, as they do in an event loop's echo. A write asks for
            # exactly what the pipe holds (a longer one would be sent with MSG_MORE and its
            # last segment held back).
            if not eof and held < pipe_size:
                try:
                    got = os.splice(fd, pipe_w, pipe_size - held, flags=flags)
                except BlockingIOError:
                    pass
                else:
                    eof = got == 0
                    held += got
                    moved = True
            if held:
                try:
                    held -= os.splice(pipe_r, fd, held, flags=flags)
                    moved = True
                except BlockingIOError:
                    pass
            if not moved:
                want = select.POLLOUT if held else 0
                if not eof and held < pipe_size:
                    want |= select.POLLIN
                poller.modify(fd, want)
                poller.poll()
    except OSError:
        pass  # reset or broken pipe: this client is gone
    finally:
        os.close(pipe_r)
        os.close(pipe_w)
        conn.close()


def serve_splice(port: int) -> int:
    import threading

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(4096)
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=splice_echo, args=(conn,), daemon=True).start()


def main() -> int:
    modes: tuple[list[str], ...] = ([], ["epoll"], ["uvloop"], ["splice"])
    if len(sys.argv) not in (2, 3) or sys.argv[2:] not in modes:
        print("usage: bench_echo_minimal.py PORT [epoll|uvloop|splice]", file=sys.stderr)
        return 2
    port = int(sys.argv[1])
    if sys.argv[2:] == ["uvloop"]:
        return serve_uvloop(port)
    if sys.argv[2:] == ["splice"]:
        return serve_splice(port)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(4096)
    listener.setblocking(False)
    poller = select.epoll()
    poller.register(listener.fileno(), select.EPOLLIN)
    conns: dict[int, socket.socket] = {}
    pending: dict[int, memoryview] = {}  # bytes a short send left over: the peer reads slowly
    buf = bytearray(65536)
    view = memoryview(buf)
    lfd = listener.fileno()
    while True:
        for fd, _mask in poller.poll():
            if fd == lfd:
                while True:
                    try:
                        conn, _ = listener.accept()
                    except BlockingIOError:
                        break
                    conn.setblocking(False)
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    conns[conn.fileno()] = conn
                    poller.register(conn.fileno(), select.EPOLLIN)
                continue
            conn = conns[fd]
            try:
                rest = pending.pop(fd, None)
                if rest is None:
                    try:
                        n = conn.recv_into(buf)
                    except BlockingIOError:
                        continue
                    if not n:
                        raise ConnectionError
                    rest = view[:n]
                sent = conn.send(rest)
            except BlockingIOError:
                sent = 0
            except OSError:
                poller.unregister(fd)
                del conns[fd]
                conn.close()
                continue
            assert rest is not None  # set before any send
            if sent < len(rest):
                # Keep a copy (buf is reused) and wait for room; no reading meanwhile.
                pending[fd] = memoryview(bytes(rest[sent:]))
                poller.modify(fd, select.EPOLLOUT)
            elif rest.obj is not buf:
                poller.modify(fd, select.EPOLLIN)


if __name__ == "__main__":
    raise SystemExit(main())
