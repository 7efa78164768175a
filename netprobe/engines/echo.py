"""The echo engine: echo (RFC 862) and discard (RFC 863) handlers for the server core, raw or
frame-aware, with an optional delay. Does network I/O through netprobe.server; never prints.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from netprobe.errors import FrameTooLarge, IncompleteFrame, MalformedFrame
from netprobe.framing import DEFAULT_MAX_FRAME, NEED_DATA, Decoder, FramingSpec, parse_framing
from netprobe.server import (
    Bound,
    CloseReason,
    Connection,
    ConnEvent,
    DatagramHandler,
    Handler,
    Server,
    ServerConfig,
    ServerSummary,
    default_loop_factory,
    native_echo_available,
)

__all__ = ["DELAYED_REPLY_OVERHEAD", "EchoOptions", "handler_factory", "make_server", "serve_echo"]

MODES = ("echo", "discard")

# Close reasons beyond the server core's: the peer broke the framing.
MALFORMED_FRAME = "malformed-frame"
INCOMPLETE_FRAME = "incomplete-frame"


@dataclass(frozen=True, slots=True)
class EchoOptions:
    """How each connection is served.

    Attributes:
        mode: "echo" (send back) or "discard" (read and drop).
        framing: a framing name (raw, line, crlf, len8..len64, netstring).
        max_frame: the largest frame accepted; a larger one closes the connection.
        delay_s: wait this long before echoing each chunk (raw) or frame.
    """

    mode: str = "echo"
    framing: str = "raw"
    max_frame: int = DEFAULT_MAX_FRAME
    delay_s: float = 0.0


class _RawEcho(Handler):
    # The hot path of the benchmark: the connection itself echoes chunks up to echo_limit
    # (Handler.echo_limit); on_data sees only a chunk over --max-frame, or every chunk where
    # the connection cannot take that path (--max-bytes).
    __slots__ = ("echo_limit",)

    def __init__(self, max_frame: int) -> None:
        self.echo_limit = max_frame

    def on_data(self, conn: Connection, data: bytes) -> None:
        if len(data) > self.echo_limit:
            conn.close(CloseReason.FRAME_TOO_LARGE)
            return
        conn.write(data)


class _Discard(Handler):
    __slots__ = ("max_frame",)

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame

    @property
    def drain_chunk(self) -> int:  # type: ignore[override]
        # Dropped in the kernel, never read: no chunk may exceed --max-frame there either.
        return self.max_frame

    def on_data(self, conn: Connection, data: bytes) -> None:
        if len(data) > self.max_frame:
            conn.close(CloseReason.FRAME_TOO_LARGE)


class _FramedEcho(Handler):
    """Whole frames back (or dropped in discard mode), with an optional delay per frame.

    Delayed frames wait in a per-connection queue with one timer for its head: equal
    deadlines in the loop's timer heap are not FIFO, and this keeps the byte order. Reading
    pauses while the queue holds more than the high-water mark, so the delay cannot grow
    memory without bound.
    """

    __slots__ = ("closing", "decoder", "delay_s", "echo", "eof", "queue", "queued", "spec", "timer")

    def __init__(self, spec: FramingSpec, options: EchoOptions) -> None:
        self.spec = spec
        self.decoder: Decoder = spec.decoder(options.max_frame)
        self.echo = options.mode == "echo"
        self.delay_s = options.delay_s
        self.queue: deque[tuple[float, bytes]] = deque()
        self.queued = 0
        self.timer: Any = None
        self.eof = False
        # Why the connection ends once the queued frames are out: frames accepted before a
        # limit or a framing error are still echoed, as they are without --delay.
        self.closing: str | None = None

    def on_data(self, conn: Connection, data: bytes) -> None:
        self.decoder.feed(data)
        self._drain(conn)

    def on_eof(self, conn: Connection) -> None:
        self.eof = True
        self.decoder.feed(b"")
        self._drain(conn)
        if not conn.is_closing and not self.queue:
            conn.close(CloseReason.EOF)

    def on_limit(self, conn: Connection) -> None:
        self._close_after_queue(conn, CloseReason.LIMIT)

    def owes_output(self) -> bool:
        return bool(self.queue)

    def on_close(self, conn: Connection, reason: str) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.queue.clear()

    def _drain(self, conn: Connection) -> None:
        try:
            while True:
                frame = self.decoder.next_frame()
                if frame is NEED_DATA:
                    return
                if self.echo:
                    self._send(conn, self.spec.encode(frame))
        except FrameTooLarge:
            self._close_after_queue(conn, CloseReason.FRAME_TOO_LARGE)
        except MalformedFrame:
            self._close_after_queue(conn, MALFORMED_FRAME)
        except IncompleteFrame:
            self._close_after_queue(conn, INCOMPLETE_FRAME)

    def _close_after_queue(self, conn: Connection, reason: str) -> None:
        if not self.queue:
            conn.close(reason)
            return
        if self.closing is None:
            self.closing = reason
            conn.pause_reading("closing")  # nothing after the error or the limit is read

    def _send(self, conn: Connection, wire: bytes) -> None:
        if not self.delay_s:
            conn.write(wire)
            return
        due = conn.server.loop.time() + self.delay_s
        self.queue.append((due, wire))
        self.queued += len(wire)
        if self.queued > conn.server.config.high_water:
            conn.pause_reading("delay")
        if self.timer is None:
            self.timer = conn.call_later(self.delay_s, self._release, conn)

    def _release(self, conn: Connection) -> None:
        self.timer = None
        if conn.is_closing:
            return
        now = conn.server.loop.time()
        while self.queue and self.queue[0][0] <= now:
            _, wire = self.queue.popleft()
            self.queued -= len(wire)
            conn.write(wire)
        if self.queue:
            self.timer = conn.call_later(self.queue[0][0] - now, self._release, conn)
        elif self.closing is not None:
            conn.close(self.closing)
            return
        elif self.eof:
            conn.close(CloseReason.EOF)
        else:
            conn.restart_idle_clock()  # all that was owed is out: the idle timeout starts now
        if self.queued <= conn.server.config.low_water:
            conn.resume_reading("delay")


class _UdpEcho(DatagramHandler):
    def __init__(self, options: EchoOptions) -> None:
        self.echo = options.mode == "echo"
        self.max_frame = options.max_frame

    def on_datagram(self, data: bytes, addr: Any, reply: Callable[[bytes], None]) -> str | None:
        if len(data) > self.max_frame:
            return CloseReason.FRAME_TOO_LARGE  # counted: a silent drop would look like loss
        if self.echo:
            reply(data)
        return None


# What one waiting reply costs besides its payload (the timer handle, its arguments, the
# bytes object's header), counted so that empty datagrams cannot pile up without bound.
DELAYED_REPLY_OVERHEAD = 256


class _DelayedUdpEcho(_UdpEcho):
    """Each reply waits --delay in the loop's timers. What waits is bounded as a stream's
    delay queue is (the high-water mark, 256 KiB): UDP cannot pause its sender, so a datagram
    beyond that is dropped and counted `dropped`, as a reply the socket cannot take is."""

    def __init__(self, options: EchoOptions, server: Server) -> None:
        super().__init__(options)
        self.delay_s = options.delay_s
        self.server = server
        self.waiting_bytes = 0

    def on_datagram(self, data: bytes, addr: Any, reply: Callable[[bytes], None]) -> str | None:
        if len(data) > self.max_frame:
            return CloseReason.FRAME_TOO_LARGE
        if self.echo:
            cost = len(data) + DELAYED_REPLY_OVERHEAD
            if self.pending_replies and self.waiting_bytes + cost > self.server.config.high_water:
                return "dropped"
            self.pending_replies += 1
            self.waiting_bytes += cost
            self.server.loop.call_later(self.delay_s, self._reply, reply, data)
        return None

    def _reply(self, reply: Callable[[bytes], None], data: bytes) -> None:
        self.pending_replies -= 1
        self.waiting_bytes -= len(data) + DELAYED_REPLY_OVERHEAD
        reply(data)


def handler_factory(options: EchoOptions) -> Callable[[], Handler]:
    """The per-connection handler factory for these options.

    Raises:
        UsageError: unknown framing or mode.
    """
    from netprobe.errors import UsageError

    if options.mode not in MODES:
        raise UsageError(f"--mode {options.mode!r} is not one of {', '.join(MODES)}")
    spec = parse_framing(options.framing)
    if spec.name == "raw" and not options.delay_s:
        max_frame = options.max_frame
        if options.mode == "echo":
            return lambda: _RawEcho(max_frame)
        return lambda: _Discard(max_frame)
    return lambda: _FramedEcho(spec, options)


def make_server(
    config: ServerConfig,
    options: EchoOptions,
    *,
    on_event: Callable[[ConnEvent], None] | None = None,
    on_ready: Callable[[Bound], None] | None = None,
    on_totals: Callable[[ServerSummary], None] | None = None,
) -> Server:
    """Build (but do not start) an echo/discard server; call .listen() and .run() on it.

    Raises:
        UsageError: bad mode or framing.
    """
    factory = handler_factory(options)
    if config.loop_factory is None:
        config = dataclasses.replace(config, loop_factory=default_loop_factory())
    # The C echo serves raw echo only: chunks a connection echoes without its handler.
    raw = factory().echo_limit >= 0 and config.max_bytes is None
    if raw and not config.udp and not config.native_echo and native_echo_available():
        config = dataclasses.replace(config, native_echo=True)
    if config.udp:
        server = Server(
            config,
            datagram_handler=_UdpEcho(options),
            on_event=on_event,
            on_ready=on_ready,
            on_totals=on_totals,
        )
        if options.delay_s:
            server.datagram_handler = _DelayedUdpEcho(options, server)
        return server
    return Server(config, factory, on_event=on_event, on_ready=on_ready, on_totals=on_totals)


def serve_echo(
    config: ServerConfig,
    options: EchoOptions,
    *,
    on_event: Callable[[ConnEvent], None] | None = None,
    on_ready: Callable[[Bound], None] | None = None,
    on_totals: Callable[[ServerSummary], None] | None = None,
) -> ServerSummary:
    """Serve echo or discard until stopped (signal, count, duration); returns the totals.

    Raises:
        LocalError: bind failed. UsageError: bad mode or framing.
    """
    server = make_server(config, options, on_event=on_event, on_ready=on_ready, on_totals=on_totals)
    return server.run()


def _udp_round_trip(port: int, deadline: float) -> bool:
    import time

    from netprobe.errors import NetprobeError
    from netprobe.sockets import connect_udp, recv_some, resolve, send_all

    probe = b"netprobe doctor echo"
    try:
        with connect_udp(resolve("127.0.0.1", port)[0]) as sock:
            while time.monotonic() < deadline:
                send_all(sock, probe, deadline)
                try:
                    if recv_some(sock, 2048, min(deadline, time.monotonic() + 0.3)) == probe:
                        return True
                except NetprobeError:
                    continue  # a lost datagram: try again until the deadline
    except NetprobeError:
        return False
    return False
