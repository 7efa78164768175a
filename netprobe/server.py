"""The one server core: listeners (TCP v4/v6, UDP, Unix stream), a controllable accept loop,
per-connection handlers with limits and back-pressure, events, and graceful stop. Does I/O.

Strategy: asyncio at the Protocol/Transport level (not streams). One event loop serves every
connection; the transport gives non-blocking I/O and write buffering, the protocol object *is*
the `Connection` (one object per client, `__slots__`, so 10,000 idle clients stay small).
The accept loop is our own `add_reader` on the listening socket rather than
`loop.create_server`, because asyncio's accept loop can be neither paused nor paced.

How to build on it (echo, listen, reset serve, reset proxy)::

    class Upper(Handler):
        def on_data(self, conn: Connection, data: bytes) -> None:
            conn.write(data.upper())

    summary = Server(ServerConfig(port=0), Upper, on_ready=print, on_event=print).run()

- `Handler` subclasses get callbacks: `on_open(conn)`, `on_data(conn, data)`, `on_eof(conn)`
  (default: `conn.close("eof")`, which flushes first), `on_close(conn, reason)`, and
  `on_write_paused(conn)` / `on_write_resumed(conn)` (default: stop/restart reading from the
  same connection, which bounds the memory a non-reading client can cost; a proxy overrides
  them to pause the *other* side). The handler factory is called once per connection.
- `Connection` offers `write`, `close(reason)` (FIN after flushing; aborted if the flush does
  not finish within `ServerConfig.close_timeout_s`), `abort(reason)` (RST: SO_LINGER 0),
  `half_close()` (SHUT_WR after flushing), `pause_reading(key)` / `resume_reading(key)`
  (reading stays paused while any key holds it), `call_later(delay_s, fn, *args)`, and the
  fields `conn_id`, `peer`, `started_at`, `bytes_in`, `bytes_out`, `reason`, `errno_name`.
- `Server.open_connection(host, port, handler)` starts an outbound TCP connection in the same
  loop (for the reset proxy), to one address of a name (`sockets.preferred`): `handler.on_open`
  runs once it is connected, and a failed connect ends in `handler.on_close(conn,
  "connect-error")` with `conn.errno_name` set. Outbound connections are not counted in the
  totals and produce no events; they are closed on stop.
- UDP: pass `datagram_handler=` (a `DatagramHandler`): `on_datagram(data, addr, reply)`.
- Events (`ConnEvent`: accept / close / reject) go to `on_event`; the bound address
  (`Bound`) to `on_ready` once listening; `on_totals` gets a `ServerSummary` on SIGUSR1.
- `Server.run()` blocks until SIGINT/SIGTERM (main thread only), `--count`/`--duration`, or
  `Server.stop()` from any thread; it then stops accepting, closes clients (aborting those that
  do not finish within 0.5 s), removes the Unix socket file, and returns a `ServerSummary`.
- `ServerConfig.workers = N` (POSIX): run() forks N-1 workers after listen(); TCP workers each
  bind their own socket in one SO_REUSEPORT group, so the kernel spreads clients over the
  cores; the parent forwards SIGTERM/SIGUSR1 and sums the workers' totals into its own.
  Measured worthwhile for many concurrent connections (scripts/bench_echo.py), not for one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import ipaddress
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, cast

from netprobe import sockets

__all__ = [
    "DEFAULT_HIGH_WATER",
    "DEFAULT_LOW_WATER",
    "Bound",
    "CloseReason",
    "ConnEvent",
    "Connection",
    "DatagramHandler",
    "Handler",
    "Server",
    "ServerConfig",
    "ServerSummary",
    "parse_allow",
    "run_server",
]

# Write-buffer marks per connection. Above HIGH the connection stops reading (its client is
# not reading our replies fast enough); below LOW it reads again. 256 KiB keeps a bulk stream
# moving at loopback speed (measured in scripts/bench_echo.py) and caps a stalled client's cost.
DEFAULT_HIGH_WATER = 256 * 1024
DEFAULT_LOW_WATER = 64 * 1024
# Connections accepted per readiness event: enough to drain a burst, small enough that a
# flood of connects cannot starve the connections already being served.
_ACCEPT_BATCH = 64
# After EMFILE/ENFILE on accept, retrying at once would spin: wait this long.
_ACCEPT_BACKOFF_S = 0.1
# On stop, clients get this long to take their last bytes before they are aborted. The whole
# stop must finish within 1 s: this, then the output's waits for a slow reader (render's
# SETTLE_S and FINISH_S, 0.6 s at most for stdout and stderr together; they keep a final
# totals line for a reader that lags 0.3 s).
_SHUTDOWN_GRACE_S = 0.35
# A close of ours while the client may still send (a limit, a framing error, an idle timeout,
# a stop) lingers: FIN after our bytes, then what the client still sends is read and dropped
# until its FIN. Closing with its bytes unread would make the kernel answer RST at once and
# throw away what we had queued for it (the echo it is owed). The linger also ends once every
# byte we sent was acknowledged and the client has been quiet this long; close_timeout_s caps
# it (then RST, and bytes_out loses what the client never got).
_LINGER_QUIET_S = sockets.LINGER_QUIET_S
_LINGER_CHECK_S = 0.05
# uvloop counts timer deadlines in whole milliseconds: a timer may run up to 1 ms before the
# delay has passed by time.monotonic().
_TIMER_SLACK_S = 0.002

_monotonic = time.monotonic
_perf_counter = time.perf_counter
# One busy-poll run hands control back to the loop after this long (or its window, if longer)
# even while bytes keep coming (a bulk stream): timers, signals, new clients and write flushing
# must not wait.
_BUSY_POLL_MAX_S = 0.002
# Request/response traffic comes in small reads; a stream fills the buffer. Polling pays off only
# for the first: for a stream it takes CPU the sender needs, so a large read ends it.
_BUSY_POLL_SMALL = 16384
# With several clients, echoes of reads below this size wait for the end of the loop turn
# (Connection.data_received). A larger read is written at once: a client that sends and never
# reads fills the loop's read buffer, which the loop reads up to 32 times a turn, and each
# write must be able to pause reading as the write buffer crosses its mark; it is the last
# read of a turn that comes short. So at most one held echo per connection, below this size,
# rides on top of the write buffer's mark.
_BATCH_BELOW = 16384
# Linux TCP's recv(MSG_TRUNC) drops bytes without copying them (tcp(7)): drain_chunk handlers.
# The kernel never writes this buffer; it is there because recv_into wants one.
_DRAIN_WORKS = sys.platform == "linux" and hasattr(socket, "MSG_TRUNC")
_DRAIN_FLAGS = getattr(socket, "MSG_TRUNC", 0) | getattr(socket, "MSG_DONTWAIT", 0)
_DRAIN_BUFFER = bytearray(1 << 20) if _DRAIN_WORKS else bytearray()
_DRAIN_ROUNDS = 64
_DRAIN_START = 65536  # a read this large means a streaming client: worth draining

_native: Any  # netprobe._pump, or None where it was not built
try:
    from netprobe import _pump as _native
except ImportError:  # no C compiler at install, not Linux: Python echoes
    _native = None
NATIVE_ECHO_ENV = "NETPROBE_NATIVE_ECHO"
# What the loop's own transport reads per call. Our own reads (the pump's, a busy poll's) ask
# for no more, so the chunks, and with them raw echo's --max-frame verdicts, are the loop's.
_READ_UVLOOP = 256000  # uvloop's UV_STREAM_RECV_BUF_SIZE (not exported)
_READ_ASYNCIO = 262144  # asyncio's _SelectorSocketTransport.max_size
_PUMP_EVENTS = 512  # sockets served per turn of the loop: then timers, accepts, signals
# The reports of netprobe._pump.run (see its docstring).
_K_EVENT, _K_READ_ERROR, _K_EOF, _K_OVER, _K_KEEP, _K_SEND_ERROR, _K_ECHOED, _K_FAILED = range(8)


def native_echo_available() -> bool:
    """True where raw echo runs in C (netprobe._pump built, epoll) and NETPROBE_NATIVE_ECHO
    is not 0."""
    if os.environ.get(NATIVE_ECHO_ENV, "").strip() == "0":
        return False
    return _native is not None and hasattr(select, "epoll")


# What a parent sends its workers (stop, running totals) and Ctrl-C from a terminal.
_WORKER_SIGNALS = {signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR1", signal.SIGTERM)}

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class CloseReason(StrEnum):
    """Why a connection ended (the `reason` of close events). Handlers may use other strings."""

    EOF = "eof"  # the client closed (FIN) and we finished
    RESET = "reset"  # the client sent RST (ECONNRESET / EPIPE)
    IDLE_TIMEOUT = "idle-timeout"  # no bytes from the client for idle_timeout_s
    LIMIT = "limit"  # max_bytes reached
    FRAME_TOO_LARGE = "frame-too-large"  # a frame above --max-frame
    SHUTDOWN = "shutdown"  # the server stopped
    ERROR = "error"  # another socket error (errno_name says which)
    CONNECT_ERROR = "connect-error"  # an outbound connect failed
    # Rejections (event "reject"): accepted and closed at once.
    MAX_CONNS = "max-conns"
    NOT_ALLOWED = "not-allowed"


@dataclass
class ServerConfig:
    """What to listen on and how to limit it.

    Attributes:
        host, port: TCP or UDP address (port 0 picks a free port).
        path: a Unix stream socket path (host/port ignored).
        udp: serve UDP datagrams instead of TCP.
        family: 0, socket.AF_INET or socket.AF_INET6 for resolving host.
        backlog: listen() backlog.
        max_conns: clients above this many at once are accepted and closed at once (reject).
        idle_timeout_s: close a connection that sent nothing for this long.
        max_bytes: close a connection (reason "limit") once it has sent this many bytes.
        accept_rate: accept at most this many connections per second (token bucket).
        pause_accept: listen but never accept (the backlog fills up).
        allow: only peers in these networks are served; others are closed at once.
        count: stop after this many clients were served (UDP: datagrams).
        duration_s: stop after this long.
        reuse_port: set SO_REUSEPORT on the listener.
        high_water, low_water: per-connection write-buffer marks (back-pressure).
        close_timeout_s: a graceful close whose flush takes longer than this is aborted.
        handle_signals: stop on SIGINT/SIGTERM, totals on SIGUSR1 (main thread only).
        late_signals_ignored: with handle_signals, once the server has stopped, SIGINT,
            SIGTERM and SIGUSR1 are ignored instead of restored to their defaults: for a
            process that exits when run() returns, a signal in its last milliseconds must not
            turn a clean exit into death by signal (143, 138) or an interrupt (130).
        loop_factory: event loop factory for asyncio.Runner; None: asyncio's own loop. The
            echo server passes default_loop_factory() (uvloop where installed).
        workers: processes sharing the listening socket (POSIX fork, TCP/Unix streams only;
            run() forks workers - 1 children after listen(); totals are summed at the end,
            conn_id values stay unique, events come from every process).
        busy_poll_s: after handling a small read (< 16 KiB) from a client, keep reading that
            client's socket (non-blocking, without the event loop) until it stays silent this
            long, while it is the only client (0: off). A ping-pong client's next message then arrives on
            a running CPU instead of waking a sleeping one, as with Linux's net.core.busy_read
            for NIC queues; the cost is this much CPU after each burst. POSIX only.
        native_echo: serve raw-echo connections (Handler.echo_limit) with netprobe._pump, the
            echo in C, where it was built (Linux with a C compiler at install; see
            native_echo_available). Elsewhere, or with NETPROBE_NATIVE_ECHO=0, they stay on
            the loop's transports and Connection.data_received.
    """

    host: str = "127.0.0.1"
    port: int = 0
    path: str | None = None
    udp: bool = False
    family: int = 0
    backlog: int = 128
    max_conns: int | None = None
    idle_timeout_s: float | None = None
    max_bytes: int | None = None
    accept_rate: float | None = None
    pause_accept: bool = False
    allow: Sequence[IPNetwork] = ()
    count: int | None = None
    duration_s: float | None = None
    reuse_port: bool = False
    high_water: int = DEFAULT_HIGH_WATER
    low_water: int = DEFAULT_LOW_WATER
    close_timeout_s: float = 10.0
    handle_signals: bool = True
    late_signals_ignored: bool = False
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    workers: int = 1
    busy_poll_s: float = 0.0
    native_echo: bool = False


@dataclass(frozen=True, slots=True)
class Bound:
    """The address a server listens on (what the announce line shows)."""

    proto: str  # "tcp" | "udp" | "unix"
    host: str | None = None
    port: int | None = None
    path: str | None = None

    def to_record(self) -> dict[str, Any]:
        """`{"event": "listening", "proto": ..., "host": ..., "port": ...}` (or "path")."""
        if self.path is not None:
            return {"event": "listening", "proto": self.proto, "path": self.path}
        return {"event": "listening", "proto": self.proto, "host": self.host, "port": self.port}

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        return f"{sockets.format_hostport(self.host or '', self.port)}/{self.proto}"


@dataclass(frozen=True, slots=True)
class ConnEvent:
    """One connection event: accept, close (with bytes, duration and reason), or reject."""

    event: str  # "accept" | "close" | "reject"
    conn_id: int
    peer: str
    bytes_in: int = 0
    bytes_out: int = 0
    duration_s: float = 0.0
    reason: str | None = None

    def to_record(self) -> dict[str, Any]:
        """A JSON-ready dict; accept and reject events carry only the fields that apply."""
        record: dict[str, Any] = {"event": self.event, "conn_id": self.conn_id, "peer": self.peer}
        if self.event == "close":
            record["bytes_in"] = self.bytes_in
            record["bytes_out"] = self.bytes_out
            record["duration_s"] = round(self.duration_s, 6)
        if self.reason is not None:
            record["reason"] = str(self.reason)
        return record


@dataclass
class ServerSummary:
    """Totals of one server run (also the running totals shown on SIGUSR1).

    Attributes:
        connections: clients accepted and served (TCP and Unix; UDP counts datagrams_in).
        active: connections open right now.
        rejected: clients closed at once (max_conns, allow) or datagrams dropped (allow).
        bytes_in, bytes_out: payload bytes received and written.
        resets: connections the client reset.
        errors: connections ended by another socket error, plus accept errors.
        reasons: close reason -> count.
        datagrams_in, datagrams_out: UDP only.
        duration_s: from listening to now (or to the stop).
        worker, workers: in a running total of a server with workers > 1, which process's
            (1..workers) it is: each process reports its own on SIGUSR1. None otherwise
            (the final totals are summed).
    """

    connections: int = 0
    active: int = 0
    rejected: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    resets: int = 0
    errors: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    datagrams_in: int = 0
    datagrams_out: int = 0
    duration_s: float = 0.0
    worker: int | None = None
    workers: int | None = None

    def to_record(self) -> dict[str, Any]:
        """A JSON-ready dict (event "totals"); "worker"/"workers" only when set."""
        record = {
            "event": "totals",
            "connections": self.connections,
            "active": self.active,
            "rejected": self.rejected,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "resets": self.resets,
            "errors": self.errors,
            "reasons": dict(self.reasons),
            "datagrams_in": self.datagrams_in,
            "datagrams_out": self.datagrams_out,
            "duration_s": round(self.duration_s, 6),
        }
        if self.worker is not None:
            record["worker"] = self.worker
            record["workers"] = self.workers
        return record


class Handler:
    """Per-connection behaviour: subclass and override what you need. One instance per
    connection (the server calls the factory for each). Callbacks run in the loop thread and
    must not block; exceptions in them abort the connection with reason "error"."""

    __slots__ = ()

    # A handler that never looks at the bytes (a discard server) sets this to a chunk size:
    # on Linux TCP the connection then drops what the kernel holds in chunks of at most this
    # many bytes without copying them out (recv MSG_TRUNC), counting them as received;
    # on_data still sees the bytes the event loop read itself.
    drain_chunk: int = 0
    # A handler whose on_data does nothing but write back each chunk of at most this many
    # bytes unchanged (a raw echo) sets this: the connection then writes such chunks back
    # itself, without calling on_data (with other clients connected, at the end of the loop
    # turn, in order with anything else done to it); longer ones still go to on_data. -1: not
    # such a handler.
    echo_limit: int = -1

    def on_open(self, conn: Connection) -> None:
        """The connection is established (accepted, or outbound connected)."""

    def on_data(self, conn: Connection, data: bytes) -> None:
        """Bytes arrived (never empty)."""

    def on_eof(self, conn: Connection) -> None:
        """The peer half-closed (FIN). Default: close after flushing what is buffered."""
        conn.close(CloseReason.EOF)

    def on_limit(self, conn: Connection) -> None:
        """--max-bytes was reached: the bytes kept have been delivered and reading has stopped.
        Default: close (reason limit) after flushing what is buffered. A handler still holding
        output for the peer (a delayed echo) may send it first, then close."""
        conn.close(CloseReason.LIMIT)

    def on_close(self, conn: Connection, reason: str) -> None:
        """The connection is gone (called exactly once, also for failed outbound connects)."""

    def owes_output(self) -> bool:
        """Whether the handler holds bytes it will still send unprompted (a delayed echo): the
        idle timeout does not run meanwhile, since the client waits for them (and it starts
        again once they are sent: see Connection.restart_idle_clock)."""
        return False

    def on_write_paused(self, conn: Connection) -> None:
        """conn's write buffer passed the high-water mark. Default: stop reading from conn."""
        conn.pause_reading("write-buffer")

    def on_write_resumed(self, conn: Connection) -> None:
        """conn's write buffer drained below the low-water mark. Default: read again."""
        conn.resume_reading("write-buffer")


class DatagramHandler:
    """UDP behaviour: `on_datagram(data, addr, reply)`; reply(bytes) answers the sender.

    A handler that calls reply later (a delayed echo) counts those in `pending_replies`: a
    stop waits for them (--count/--once up to close_timeout_s, a signal up to the 0.5 s
    grace) and counts the ones it could not wait for as `dropped`.
    """

    pending_replies: int = 0

    def on_datagram(self, data: bytes, addr: Any, reply: Callable[[bytes], None]) -> str | None:
        """One datagram arrived from addr. Returns None, or why it gets no reply (a reason
        counted in the totals' `reasons`, e.g. "frame-too-large")."""
        return None


def _ended_how(status: int) -> str:
    """A waitpid status in words: "was killed by SIGKILL", "exited with status 70"."""
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        return f"was killed by {name}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


def _reason_for(exc: BaseException) -> str:
    """The close reason of a connection that ended with exc (the loop's or a read of ours)."""
    if isinstance(exc, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
        return CloseReason.RESET
    if isinstance(exc, TimeoutError) and getattr(exc, "errno", None) == errno.ETIMEDOUT:
        return CloseReason.RESET  # keepalive/retransmit gave up: the peer is gone
    return CloseReason.ERROR


class Connection(asyncio.Protocol):
    """One TCP or Unix stream connection; the asyncio protocol and the handler's handle.

    Attributes:
        conn_id: 1, 2, 3 ... in accept order (outbound connections count down from -1).
        peer: the client's address as text (`127.0.0.1:5555`, `[::1]:5555`, `unix`).
        started_at: time.monotonic() at accept.
        bytes_in, bytes_out: bytes received, and bytes written (buffered or sent).
        reason: why it closed (None while open).
        errno_name: the errno that ended it, if any (ECONNRESET, ECONNREFUSED, ...).
        handler: the Handler instance.
        outbound: True for connections made with Server.open_connection.
    """

    __slots__ = (
        "_abort_pending",
        "_aborted",
        "_close_handle",
        "_closing",
        "_done",
        "_drain_from",
        "_drain_sock",
        "_echo_limit",
        "_eof_pending",
        "_eof_sent",
        "_fd",
        "_held",
        "_idle_handle",
        "_last_rx",
        "_linger_since",
        "_max_bytes",
        "_pauses",
        "_peer_eof",
        "_pending",
        "_pumped",
        "_server",
        "_stamp_rx",
        "_taken_seen",
        "_was_owed",
        "bytes_in",
        "bytes_out",
        "conn_id",
        "errno_name",
        "handler",
        "outbound",
        "peer",
        "reason",
        "started_at",
        "transport",
    )

    def __init__(
        self, server: Server, handler: Handler, conn_id: int, peer: str, outbound: bool = False
    ) -> None:
        self._server = server
        self.handler = handler
        self.conn_id = conn_id
        self.peer = peer
        self.outbound = outbound
        self.transport: asyncio.Transport | None = None
        self.started_at = _monotonic()
        self._last_rx = self.started_at
        # Only the idle timeout reads the time of the last receipt between two reads: without
        # one, the echo's hot path need not take the time (a clock read per message).
        self._stamp_rx = server.config.idle_timeout_s is not None and not outbound
        self.bytes_in = 0
        self.bytes_out = 0
        self.reason: str | None = None
        self.errno_name: str | None = None
        self._max_bytes = None if outbound else server.config.max_bytes
        self._closing = False
        self._done = False
        self._peer_eof = False
        self._eof_sent = False
        self._linger_since = 0.0
        self._abort_pending = False  # abort() before an outbound connect finished
        self._aborted = False  # abort() ran: a second one must not count the drop again
        self._eof_pending = False  # half_close() before an outbound connect finished
        self._pauses: set[str] | None = None
        # Bytes (and an EOF: the b"" item) the transport delivered while paused, handed over
        # on resume; see data_received.
        self._held: list[bytes] | None = None
        self._pending: list[bytes] | None = None
        self._idle_handle: asyncio.TimerHandle | None = None
        self._taken_seen = 0  # _bytes_taken() at the last idle check
        self._was_owed = False  # and whether some of bytes_out was not taken yet then
        self._close_handle: asyncio.TimerHandle | None = None
        self._fd = -1  # the socket's fd when busy polling applies to this connection
        self._drain_from = -1  # the socket's fd when a drain_chunk handler may drain it
        self._drain_sock: socket.socket | None = None  # a dup of that fd, once a client streams
        # Chunks up to this size are echoed back on arrival (Handler.echo_limit); -1 where
        # something must see them first (a --max-bytes count, an outbound connection).
        self._echo_limit = -1 if outbound or self._max_bytes is not None else handler.echo_limit
        self._pumped = -1  # the socket's fd while the server's _Pump echoes it

    # -- the handler's API ---------------------------------------------------------------

    @property
    def server(self) -> Server:
        """The Server this connection belongs to (its loop, config, open_connection)."""
        return self._server

    @property
    def is_closing(self) -> bool:
        """True once close/abort was called or the connection was lost."""
        return self._closing or self._done

    @property
    def write_buffer_size(self) -> int:
        """Bytes written but not yet handed to the kernel."""
        held = sum(len(data) for conn, data in list(self._server._replies) if conn is self)
        if self.transport is None:
            return held + sum(len(chunk) for chunk in self._pending or ())
        return held + self.transport.get_write_buffer_size()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """The transport's extra info ("peername", "sockname", "socket"); default if none."""
        if self.transport is None:
            return default
        return self.transport.get_extra_info(name, default)

    def write(self, data: bytes) -> None:
        """Queue bytes for the peer (never blocks; dropped once the connection is closing)."""
        if self._closing or self._done:
            return
        if self._pumped >= 0:  # the transport writes from now on: after what the pump sent
            self._server._unpump(self, resume=True)
        if self._server._replies:
            self._server._write_replies()  # echoed bytes queued before these go first
        self.bytes_out += len(data)
        transport = self.transport
        if transport is None:  # outbound, not connected yet
            if self._pending is None:
                self._pending = []
            self._pending.append(bytes(data))
            return
        transport.write(data)

    def close(self, reason: str = CloseReason.EOF) -> None:
        """Close gracefully: flush what is buffered, then FIN. The first reason given wins."""
        if self.reason is None:
            self.reason = reason
        if self._closing or self._done:
            return
        if self._pumped >= 0:
            self._server._unpump(self, resume=False)
        if self._server._replies:
            self._server._write_replies()  # queued echoes are part of what the close flushes
        self._closing = True
        transport = self.transport
        if transport is None:
            return  # outbound still connecting: connection_made flushes, then closes
        if not (self._peer_eof or self._eof_sent) and transport.can_write_eof():
            sock = transport.get_extra_info("socket")
            server = self._server
            # Lingering sockets are not counted by --max-conns, but as many again at most.
            crowded = (
                server.config.max_conns is not None and server._lingering >= server.config.max_conns
            )
            if sock is not None and not crowded and self._linger(transport):
                return
        transport.close()
        if transport.get_write_buffer_size():
            # A client that never reads would keep the flush (and this fd) forever.
            loop = self._server.loop
            self._close_handle = loop.call_later(
                self._server.config.close_timeout_s, self.abort, reason
            )

    def _linger(self, transport: asyncio.Transport) -> bool:
        # A Unix socket needs it too: what we wrote already sits in the client's own queue,
        # but a close with its bytes unread in ours makes the kernel end that stream with
        # ECONNRESET, not EOF.
        try:
            transport.write_eof()  # FIN once the buffered bytes are out
        except OSError:  # the client is gone already (ENOTCONN): a plain close
            return False
        # The client's quiet time counts from here at the earliest (without an idle timeout
        # _last_rx is not kept per read).
        self._linger_since = self._last_rx = _monotonic()
        if not self.outbound:
            self._server._lingering += 1  # closed for --max-conns: its slot is free
        self._pauses = self._held = None
        transport.resume_reading()  # data_received drops what comes now
        self._close_handle = self._server.loop.call_later(_LINGER_CHECK_S, self._linger_check)
        return True

    def _linger_check(self) -> None:
        self._close_handle = None
        if self._server._replies:
            self._server._write_replies()
        transport = self.transport
        if self._done or transport is None:
            return
        now = _monotonic()
        quiet = now - self._last_rx + _TIMER_SLACK_S
        if not transport.get_write_buffer_size() and quiet >= _LINGER_QUIET_S:
            sock = transport.get_extra_info("socket")
            if sock is None or not sockets.send_queue_bytes(sock):
                # Every byte we sent was acknowledged: a late byte from the client can no
                # longer cost it one of ours (the RST it provokes finds nothing to drop).
                transport.close()
                return
        if now - self._linger_since >= self._server.config.close_timeout_s:
            self.abort(self.reason or CloseReason.EOF)
            return
        self._close_handle = self._server.loop.call_later(_LINGER_CHECK_S, self._linger_check)

    def abort(self, reason: str = CloseReason.ERROR) -> None:
        """Close at once with RST (SO_LINGER 0); buffered bytes are dropped."""
        if self.reason is None:
            self.reason = reason
        if self._done or self._aborted:
            return
        if self._pumped >= 0:
            self._server._unpump(self, resume=False)
        if self._server._replies:
            self._server._write_replies()  # then dropped with the rest, and counted so
        self._closing = True
        transport = self.transport
        if transport is None:
            self._abort_pending = True  # outbound still connecting
            return
        self._aborted = True  # uvloop reports the dropped buffer until connection_lost
        # (Both loops keep the fd open until connection_lost has run, a close() of theirs
        # too: the socket is still this connection's.)
        sock = transport.get_extra_info("socket")
        # Before our RST (it zeroes the kernel's counters). Once counted so, bytes_out is
        # what was sent: taking the unsent away again below came to 0 (a splice relay's
        # client that reset with 128 KB delivered showed bytes_out 0).
        counted = self.reason == CloseReason.RESET and self._count_only_sent(sock)
        if not counted:  # what was dropped was never received: bytes_out counts it no more
            self.bytes_out -= min(self.bytes_out, transport.get_write_buffer_size())
        if sock is not None and sock.family != socket.AF_UNIX:
            with contextlib.suppress(OSError):
                sockets.set_linger_zero(sock)
            # The RST also throws away what the kernel has not sent yet. Until the RST goes
            # the kernel sends on as the client reads, and the loop closes its fd only in a
            # later turn: the RST goes now, right after the count (a count at the loop's
            # close was tens of KB short).
            unsent = sockets.reset_counting_unsent(sock)
            if not counted:
                self.bytes_out -= min(self.bytes_out, unsent)
        transport.abort()

    def _count_only_sent(self, sock: socket.socket | None) -> bool:
        """bytes_out capped at what the kernel sent before the peer's RST; False: the kernel
        could not tell (the peer's RST has not closed the socket, or no TCP_INFO)."""
        # The peer reset: its RST threw away what was never sent (our buffer and the kernel's
        # queue), which never reached it (4.7 MB counted for a client holding 128 KB). Not for
        # a reset passed on to a connection still open (a proxy's upstream after its client's
        # RST): that one sends until our own RST, which abort() counts.
        sent = sockets.sent_before_reset(sock) if sock is not None else None
        if sent is not None:
            self.bytes_out = min(self.bytes_out, sent)
        return sent is not None

    def half_close(self) -> None:
        """Send FIN after the buffered bytes (shutdown SHUT_WR); reading continues."""
        if self._pumped >= 0:
            self._server._unpump(self, resume=True)
        if self._server._replies:
            self._server._write_replies()
        transport = self.transport
        if transport is None:
            self._eof_pending = True  # outbound still connecting: after the buffered bytes
        elif not self._closing and transport.can_write_eof():
            try:
                transport.write_eof()
            except OSError:
                # The peer reset before the loop saw it (shutdown: ENOTCONN): its RST ends
                # the connection, as the loop's next read would have said.
                self._reset_seen_first()
                return
            # Whoever half-closes reads on and closes when it chooses: no linger then.
            self._eof_sent = True

    def _reset_seen_first(self) -> None:
        number = 0
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                number = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self.errno_name = sockets.errno_name(number or errno.ECONNRESET)
        self.abort(CloseReason.RESET)

    def pause_reading(self, key: str = "handler") -> None:
        """Stop reading from the peer until every key that paused it has resumed it."""
        if self._pumped >= 0:
            self._server._unpump(self, resume=False)
        if self._pauses is None:
            self._pauses = set()
        if not self._pauses and self.transport is not None and not self._closing:
            self.transport.pause_reading()
        self._pauses.add(key)

    def resume_reading(self, key: str = "handler") -> None:
        """Release the pause held by `key`; reading restarts when no key holds it."""
        if not self._pauses or key not in self._pauses:
            return
        self._pauses.discard(key)
        if not self._pauses and self.transport is not None and not self._closing:
            self.transport.resume_reading()
        if not self._pauses and self._held is not None:
            held, self._held = self._held, None
            # These bytes were read before the pause: polling or draining the socket between
            # two of them would slip newer bytes in between.
            fd, drain_from = self._fd, self._drain_from
            self._fd = self._drain_from = -1
            try:
                for chunk in held:  # a handler that pauses again re-holds the rest, in order
                    if chunk:
                        self.data_received(chunk)
                    else:
                        self.eof_received()
            finally:
                if not self._done:
                    self._fd, self._drain_from = fd, drain_from

    def restart_idle_clock(self) -> None:
        """The idle timeout counts from now: the handler has just sent what it owed (a
        delayed echo), and the client's silence until then was waiting, not idling."""
        self._last_rx = _monotonic()

    def call_later(self, delay_s: float, fn: Callable[..., Any], *args: Any) -> asyncio.TimerHandle:
        """Run fn(*args) after delay_s in the loop; the handle's cancel() stops it."""
        return self._server.loop.call_later(delay_s, fn, *args)

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        config = self._server.config
        self.transport.set_write_buffer_limits(high=config.high_water, low=config.low_water)
        if self._closing:  # closed while an outbound connect was in progress
            self._closing = False
            if self._abort_pending:
                self.abort(self.reason or CloseReason.SHUTDOWN)
                return
            for chunk in self._pending or ():
                self.transport.write(chunk)
            self._pending = None
            self.close(self.reason or CloseReason.EOF)
            return
        if self._pauses:
            self.transport.pause_reading()
        if config.busy_poll_s > 0 and not self.outbound and os.name == "posix":
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                self._fd = sock.fileno()
        if self.handler.drain_chunk > 0 and _DRAIN_WORKS:
            sock = self.transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                self._drain_from = sock.fileno()
        if config.idle_timeout_s is not None and not self.outbound:
            self._idle_handle = self._server.loop.call_later(
                config.idle_timeout_s, self._check_idle
            )
        try:
            self.handler.on_open(self)
            if self._pending:
                for chunk in self._pending:
                    self.transport.write(chunk)
                self._pending = None
            if self._eof_pending:
                self.half_close()
        except Exception:
            self._handler_failed()
            return
        pump = self._server._pump
        if pump is not None and self._echo_limit >= 0 and self._drain_from < 0:
            # In a later turn: both loops start reading after connection_made and ignore a
            # pause made in it (uvloop; asyncio before gh-103607).
            self._server.loop.call_soon(pump.adopt, self)

    def data_received(self, data: bytes) -> None:
        size = len(data)
        if size <= self._echo_limit and not (self._closing or self._pauses):
            # The echo server's hot path, once per message: _receive's first branch written
            # out here, one Python call less (~400 instructions a message; callgrind,
            # scripts/bench_instructions.py).
            self.bytes_in += size
            self.bytes_out += size
            if self._stamp_rx:
                self._last_rx = _monotonic()
            server = self._server
            lone = server._lone is self
            if not lone:
                if size < _BATCH_BELOW:
                    # Several clients: the replies of this loop turn go out together at its
                    # end (Server._write_replies), so a client waiting on many of them is
                    # woken once for the lot rather than once for each.
                    replies = server._replies
                    if not replies:
                        server.loop.call_soon(server._write_replies)
                    replies.append((self, data))
                    return
                if server._replies:
                    server._write_replies()  # this one's held echoes go first
            # (Alone: none of its echoes can be held: it became alone in _connection_done,
            # after _finish wrote them.)
            try:
                self.transport.write(data)  # type: ignore[union-attr]  # set while not _done
            except Exception:
                self._handler_failed()
                return
            if lone:
                self._after_lone_read(size)
            return
        if self._closing:  # lingering: read and dropped (see _linger)
            self._last_rx = _monotonic()
            return
        if self._pauses:
            # Paused, yet the transport delivered: CPython 3.11 before the gh-103607 fix
            # ignores pause_reading() made in connection_made, and bytes read in the same
            # loop turn as a pause still arrive. Hold them; resume_reading() hands them over.
            self._hold(data)
            return
        self._receive(data)
        if self._drain_from >= 0:
            self._drain(size)
        elif self._server._lone is self:
            self._after_lone_read(size)

    def _after_lone_read(self, size: int) -> None:
        # Busy polling pays only while one client is connected (see _busy_poll).
        if size >= _BUSY_POLL_SMALL:
            # A stream, not request/response: polling it would only take CPU from the sender,
            # so this connection is not polled again.
            self._fd = -1
        elif self._fd >= 0:
            self._busy_poll()

    def _drain(self, last_read: int) -> None:
        sock = self._drain_sock
        if sock is None:
            # The duplicate descriptor (ours to close, so the loop's stays the loop's) only for
            # a client that streams: a quiet one must not cost a second fd under `ulimit -n`.
            if last_read < _DRAIN_START or self._closing or self._done:
                return
            try:
                sock = self._drain_sock = socket.socket(fileno=os.dup(self._drain_from))
            except OSError:  # out of fds: the loop reads it all, as without draining
                self._drain_from = -1
                return
        chunk = min(self.handler.drain_chunk, len(_DRAIN_BUFFER))
        for _ in range(_DRAIN_ROUNDS):  # then the loop: other clients get their turn
            if self._pauses or self._closing or self._done:
                return
            size = chunk
            if self._max_bytes is not None:
                size = min(size, self._max_bytes - self.bytes_in)
            try:
                count = sock.recv_into(_DRAIN_BUFFER, size, _DRAIN_FLAGS)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._read_failed(exc)
                return
            if not count:
                return  # EOF stays readable: the loop delivers it as usual
            if self._stamp_rx:
                self._last_rx = _monotonic()
            self.bytes_in += count
            if self._max_bytes is not None and self.bytes_in >= self._max_bytes:
                self.close(CloseReason.LIMIT)
                return

    def _read_failed(self, exc: OSError) -> None:
        # A read of our own (drain, busy poll) took the socket's error: the kernel reports an
        # RST once, so the loop would never see this one. Close as the loop would have.
        self.errno_name = sockets.errno_name(exc.errno)
        self.abort(_reason_for(exc))

    def _busy_poll(self) -> None:
        server = self._server
        if server._replies:
            server._write_replies()  # queued while another client was still connected
        window = server.config.busy_poll_s
        now = _perf_counter()
        quiet_until = now + window
        give_back = now + max(window, _BUSY_POLL_MAX_S)
        fd = self._fd
        transport = self.transport
        if transport is None:
            return
        waited = False  # the socket was empty at least once since the last read
        while server._lone is self:
            # is_closing(): a write failed and the transport closed itself; connection_lost
            # (and with it _closing) only comes in a later loop turn.
            if (
                self._pauses
                or self._closing
                or self._done
                or server._stopping
                or transport.is_closing()
            ):
                return
            try:
                data = os.read(fd, server._read_size)
            except BlockingIOError:
                waited = True
                now = _perf_counter()
                if now >= quiet_until or now >= give_back:
                    return
                continue
            except InterruptedError:
                continue
            except OSError as exc:
                self._read_failed(exc)
                return
            if not data:
                return  # EOF stays readable: the loop delivers it as usual
            now = _perf_counter()
            self._receive(data)
            if len(data) >= _BUSY_POLL_SMALL:
                self._fd = -1  # a stream (see data_received)
            quiet_until = now + window
            if (
                not waited
                or now >= give_back
                or len(data) >= _BUSY_POLL_SMALL
                or transport.get_write_buffer_size()
            ):
                # Back to the loop: its turn is due, or the peer streams rather than waits:
                # bytes already there when we looked (a request/response peer is still
                # waiting for our answer then), a large read, or a backlog the loop must flush
                # as the socket drains. The loop reads a stream in large chunks; polling it
                # in small ones costs the CPU the sender needs.
                return
            waited = False

    def _receive(self, data: bytes) -> None:
        if self._stamp_rx:
            self._last_rx = _monotonic()
        size = len(data)
        if size <= self._echo_limit:
            # Raw echo, what on_data and write would do without the calls (the reads of a busy
            # poll come here; the loop's take the same branch written out in data_received).
            self.bytes_in += size
            self.bytes_out += size
            try:
                self.transport.write(data)  # type: ignore[union-attr]  # set while not _done
            except Exception:
                self._handler_failed()
            return
        limit = self._max_bytes
        if limit is not None and self.bytes_in + len(data) >= limit:
            if self.bytes_in >= limit:
                return  # past the limit (its handler may still be sending): dropped
            data = data[: limit - self.bytes_in]
            self.bytes_in = limit
            if data:
                self._deliver(data)
            if self._closing or self._done:
                return
            self.pause_reading("limit")
            try:
                self.handler.on_limit(self)
            except Exception:
                self._handler_failed()
            return
        self.bytes_in += len(data)
        self._deliver(data)

    def _deliver(self, data: bytes) -> None:
        try:
            self.handler.on_data(self, data)
        except Exception:
            self._handler_failed()

    def _hold(self, data: bytes) -> None:
        if self._held is None:
            self._held = []
        self._held.append(data)

    def eof_received(self) -> bool:
        self._peer_eof = True
        if self._closing:
            if self.transport is not None:  # lingering: the client is done too
                self.transport.close()
            return True
        if self._pauses:
            self._hold(b"")  # EOF after the held bytes
            return True
        try:
            self.handler.on_eof(self)
        except Exception:
            self._handler_failed()
        return True  # keep the write side open: the handler decides when to close

    def pause_writing(self) -> None:
        try:
            self.handler.on_write_paused(self)
        except Exception:
            self._handler_failed()

    def resume_writing(self) -> None:
        try:
            self.handler.on_write_resumed(self)
        except Exception:
            self._handler_failed()

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(exc)

    # -- internals ------------------------------------------------------------------------

    def _finish(self, exc: BaseException | None) -> None:
        if self._done:
            return
        if self._pumped >= 0:
            self._server._unpump(self, resume=False)
        self._done = True
        self._closing = True
        if self._server._replies:
            self._server._write_replies()  # the others' (its own were not sent: not counted)
        if self._linger_since and not self.outbound:
            self._server._lingering -= 1
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None
        if self._close_handle is not None:
            self._close_handle.cancel()
            self._close_handle = None
        if exc is not None:
            number = getattr(exc, "errno", None)
            self.errno_name = self.errno_name or sockets.errno_name(number)
            if self.reason is None:
                self.reason = _reason_for(exc)
        if self.reason is None:
            self.reason = CloseReason.EOF
        if self.reason == CloseReason.RESET and self.transport is not None and not self._aborted:
            self._count_only_sent(self.transport.get_extra_info("socket"))
        self.transport = None
        self._fd = self._drain_from = -1
        if self._drain_sock is not None:
            self._drain_sock.close()
            self._drain_sock = None
        self._server._connection_done(self)

    def _bytes_taken(self) -> int:
        """Bytes written that left our buffer and the kernel's unacknowledged queue."""
        if self._server._replies:
            self._server._write_replies()
        transport = self.transport
        if transport is None:
            return self.bytes_out
        sock = transport.get_extra_info("socket")
        queued = (sockets.send_queue_bytes(sock) or 0) if sock is not None else 0
        return self.bytes_out - transport.get_write_buffer_size() - queued

    def _handler_failed(self) -> None:
        # A bug in a handler must not take the server down: this connection ends, others go on.
        # The close with reason "error" counts it in the totals' errors; only when another
        # reason already won (it was closing) is the failure counted apart, so never twice.
        if self.reason is not None and self.reason != CloseReason.ERROR:
            self._server._handler_errors += 1
        self.abort(CloseReason.ERROR)

    def _check_idle(self) -> None:
        self._idle_handle = None
        if self._done or self._closing:
            return
        timeout = self._server.config.idle_timeout_s
        assert timeout is not None
        now = _monotonic()
        if self.handler.owes_output():
            self._last_rx = now  # waiting for our answer (a --delay) is not idling
        else:
            # A client taking the output it is owed is not idle, though it sends nothing (we
            # may have stopped reading it until it catches up: its silence is then ours). So
            # the clock restarts when it took some since the last check, if some was owed
            # then or still is: a reply taken at once does not count, a client that takes
            # nothing is dropped, one that took the last of it a moment ago is not.
            # (Nothing written since a check that found it all taken: no need to ask.)
            taken = self._taken_seen
            if self.bytes_out != taken or self._was_owed:
                taken = self._bytes_taken()
            owed = taken < self.bytes_out
            if taken > self._taken_seen and (owed or self._was_owed):
                self._last_rx = now
            self._taken_seen = taken
            self._was_owed = owed
        left = self._last_rx + timeout - now
        if left > 0:
            self._idle_handle = self._server.loop.call_later(left, self._check_idle)
            return
        # A silent client may also be a non-reading one: don't wait for a flush it never takes.
        if self.write_buffer_size:
            self.abort(CloseReason.IDLE_TIMEOUT)
        else:
            self.close(CloseReason.IDLE_TIMEOUT)


_PKTINFO_READS = 64  # datagrams read per readiness event: then other work gets its turn


def _loop_read_size(loop: asyncio.AbstractEventLoop) -> int:
    if type(loop).__module__.partition(".")[0] == "uvloop":
        return _READ_UVLOOP
    return _READ_ASYNCIO


class _Pump:
    """Raw echo in C (netprobe._pump) for the connections it adopts.

    Measured by scripts/bench_echo.py (100 clients ping-pong, 2 cores): Python's per-message
    path (uvloop's callback, then Connection.data_received) costs about 2 us of user CPU a
    message, and the kernel about 11; the pump's C about a tenth of those 2 us.

    The pump's epoll set is one fd the loop watches. An adopted connection keeps its loop
    transport, paused, so everything but the plain echo (EOF, errors, a chunk over the limit, a
    write the kernel takes only part of, anything that pauses, writes to or closes the
    connection) goes back to that transport for good (release): the loop's code handles it as
    for any other connection. While adopted, the transport's write buffer is empty, so the
    pump's writes keep the order of the connection's bytes.
    """

    __slots__ = ("_buf", "_conns", "_epoll", "_fd", "_loop", "_server")

    def __init__(self, server: Server, loop: asyncio.AbstractEventLoop) -> None:
        self._server = server
        self._loop = loop
        self._epoll = select.epoll()
        self._fd = self._epoll.fileno()
        self._conns: dict[int, Connection] = {}
        self._buf = bytearray(2 * server._read_size)  # see netprobe._pump.run
        loop.add_reader(self._fd, self._run)

    def adopt(self, conn: Connection) -> None:
        """Echo conn's chunks in C from now on, if it is still a plain raw echo."""
        if conn._pumped >= 0 or conn._closing or conn._done or conn._pauses:
            return
        server = self._server
        if server._replies:
            server._write_replies()  # echoes held for this loop turn go out before ours
        transport = conn.transport
        if transport is None or transport.is_closing() or transport.get_write_buffer_size():
            return
        sock = transport.get_extra_info("socket")
        fd = sock.fileno() if sock is not None else -1
        if fd < 0 or fd in self._conns:
            return
        transport.pause_reading()
        try:
            self._epoll.register(fd, select.EPOLLIN)
        except OSError:  # ENOMEM, ENOSPC (max_user_watches): the loop serves it
            transport.resume_reading()
            return
        self._conns[fd] = conn
        conn._pumped = fd

    def release(self, conn: Connection, resume: bool) -> None:
        """Hand conn back to its transport; resume: the transport reads again (else the
        caller is pausing or closing it)."""
        fd = conn._pumped
        conn._pumped = -1
        # The identity check: a loop that closed the fd before connection_lost may have
        # given its number to a newer connection, adopted since.
        if self._conns.get(fd) is conn:
            del self._conns[fd]
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(fd)
        transport = conn.transport
        if (
            resume
            and transport is not None
            and not (conn._pauses or conn._closing or conn._done)
            and not transport.is_closing()
        ):
            transport.resume_reading()

    def close(self) -> None:
        """Stop (every connection has finished, and with it left the set, by now)."""
        for conn in list(self._conns.values()):
            self.release(conn, resume=False)
        with contextlib.suppress(Exception):  # the loop may be closing too
            self._loop.remove_reader(self._fd)
        self._epoll.close()

    def _run(self) -> None:
        server = self._server
        lone = server._lone
        # Busy polling (ServerConfig.busy_poll_s) still applies to a lone client: run() says
        # when it echoed that one, and the poll follows as on the loop's path.
        lone_fd = lone._pumped if lone is not None and lone._fd >= 0 else -1
        now = _monotonic() if server.config.idle_timeout_s is not None else None
        assert _native is not None
        try:
            reports = _native.run(self._fd, self._conns, self._buf, _PUMP_EVENTS, now, lone_fd)
        except InterruptedError:
            return
        conns = self._conns
        for fd, kind, value in reports:
            conn = conns.get(fd)
            if conn is None:
                continue  # released by an earlier report of this batch
            if kind == _K_ECHOED:
                conn._after_lone_read(value)
                transport = conn.transport
                if (
                    conn._pumped >= 0
                    and transport is not None
                    and transport.get_write_buffer_size()
                ):
                    self.release(conn, resume=True)  # the poll's writes left bytes waiting
            elif kind == _K_KEEP:
                # Counted already; the rest waits in the transport, whose marks pause reading.
                self.release(conn, resume=True)
                try:
                    conn.transport.write(value)  # type: ignore[union-attr]  # set while adopted
                except Exception:
                    conn._handler_failed()
            elif kind == _K_OVER:
                self.release(conn, resume=True)
                conn.data_received(value)
            elif kind == _K_FAILED:
                self.release(conn, resume=False)
                conn._handler_failed()  # ends it with reason error, counted
            elif kind in (_K_READ_ERROR, _K_SEND_ERROR):
                # The kernel reports a socket's error once: the transport would not see it.
                self.release(conn, resume=False)
                conn._read_failed(OSError(value, os.strerror(value)))
            else:  # EOF or EPOLLERR/EPOLLHUP, nothing taken: the transport reads them itself
                self.release(conn, resume=True)


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: Server, handler: DatagramHandler) -> None:
        self.server = server
        self.handler = handler
        self.transport: asyncio.DatagramTransport | None = None
        self.raw_sock: socket.socket | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(
        self, data: bytes, addr: Any, reply_from: sockets.ReplyFrom | None = None
    ) -> None:
        """A datagram from the transport, or (with reply_from) from read_with_pktinfo."""
        server = self.server
        totals = server._totals
        count = server.config.count
        # The stop requested at the Nth datagram takes a loop turn or more; datagrams already
        # queued behind it (a burst) must not be served: --count N (and --once) mean N.
        if server._stopping or (count is not None and totals.datagrams_in >= count):
            return
        if server.config.allow and not server._allowed(addr):
            # Counted as TCP's are, with their reason (no event per datagram: a flood of them
            # would be a flood of lines).
            totals.rejected += 1
            reason = CloseReason.NOT_ALLOWED
            totals.reasons[reason] = totals.reasons.get(reason, 0) + 1
            return
        totals.datagrams_in += 1
        totals.bytes_in += len(data)
        # No transport: the wildcard path (read_with_pktinfo).
        reply = (
            self._replier(addr)
            if self.transport is not None
            else self._replier_from(addr, reply_from)
        )
        try:
            unanswered = self.handler.on_datagram(data, addr, reply)
        except Exception:
            server._handler_errors += 1
        else:
            if unanswered:
                totals.reasons[unanswered] = totals.reasons.get(unanswered, 0) + 1
        if count is not None and totals.datagrams_in >= count:
            server._served_count = True
            server._request_stop()

    def _replier(self, addr: Any) -> Callable[[bytes], None]:
        server = self.server
        totals = server._totals
        transport = self.transport
        assert transport is not None
        # The selector transport has get_write_buffer_size; the DatagramTransport stub lacks it.
        buffered: Callable[[], int] = getattr(transport, "get_write_buffer_size", lambda: 0)

        def reply(payload: bytes) -> None:
            # UDP may drop: above the high-water mark we drop rather than buffer without bound.
            if transport.is_closing():
                return
            if buffered() > server.config.high_water:
                totals.reasons["dropped"] = totals.reasons.get("dropped", 0) + 1
                return
            # Counted before the send: the peer may read the reply (and ask for the totals)
            # before this thread runs again.
            totals.datagrams_out += 1
            totals.bytes_out += len(payload)
            raw = self.raw_sock
            if raw is None or (payload and buffered()):
                # Behind replies the transport holds: it keeps their order.
                if payload:
                    transport.sendto(payload, addr)
                    return
                raw = None
            # Sent here rather than by the transport: a send that fails at once (EMSGSIZE,
            # EACCES) reaches the transport's error_received, indistinguishable from an ICMP
            # error for an earlier reply, and the reply would stay counted as sent. asyncio's
            # sendto(b"") also sends nothing on CPython 3.11, yet an empty datagram is a real
            # reply (port-check --udp probes with one).
            try:
                if raw is None:
                    raise OSError("no socket for an empty reply")
                raw.sendto(payload, addr)
            except (BlockingIOError, InterruptedError):
                if payload:  # the socket buffer is full: the transport queues it
                    transport.sendto(payload, addr)
                    return
                self._unsent(totals, payload)
            except OSError:
                self._unsent(totals, payload)

        return reply

    # -- a wildcard address (0.0.0.0, ::): replies leave from the address each datagram came to

    def read_with_pktinfo(self) -> None:
        """The socket is readable (loop.add_reader): serve what it holds. On a wildcard
        address each reply leaves from the address its datagram came to (see
        sockets.enable_pktinfo), which the loop's datagram transport cannot do."""
        sock = self.raw_sock
        if sock is None:
            return
        for _ in range(_PKTINFO_READS):
            try:
                data, addr, reply_from = sockets.recv_datagram_to(sock)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # an ICMP error for an earlier reply (port unreachable)
                self.server._totals.errors += 1
                continue
            self.datagram_received(data, addr, reply_from)
            if self.raw_sock is None:  # --count reached, or the stop came: closed
                return

    def _replier_from(
        self, addr: Any, pktinfo: sockets.ReplyFrom | None
    ) -> Callable[[bytes], None]:
        totals = self.server._totals

        def reply(payload: bytes) -> None:
            sock = self.raw_sock
            if sock is None:
                return
            totals.datagrams_out += 1
            totals.bytes_out += len(payload)
            try:
                sock.sendmsg([payload], [pktinfo] if pktinfo is not None else [], 0, addr)
            except (BlockingIOError, InterruptedError):
                # The socket's buffer is full. Without the transport's queue (it cannot pick
                # the source address), a reply that does not fit is dropped, as UDP may.
                totals.datagrams_out -= 1
                totals.bytes_out -= len(payload)
                totals.reasons["dropped"] = totals.reasons.get("dropped", 0) + 1
            except OSError:
                self._unsent(totals, payload)

        return reply

    def close(self) -> None:
        """Stop reading and close the socket (the wildcard path, which has no transport)."""
        sock, self.raw_sock = self.raw_sock, None
        if sock is not None:
            with contextlib.suppress(OSError, ValueError, RuntimeError):
                self.server.loop.remove_reader(sock.fileno())
            sock.close()

    @staticmethod
    def _unsent(totals: ServerSummary, payload: bytes) -> None:
        totals.datagrams_out -= 1
        totals.bytes_out -= len(payload)
        totals.reasons["send-error"] = totals.reasons.get("send-error", 0) + 1

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for earlier replies (port unreachable on loopback): count, keep serving.
        self.server._totals.errors += 1


EVENT_LOOP_ENV = "NETPROBE_EVENT_LOOP"


def _in_thread_of(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def event_loop_name() -> str:
    """The event loop servers run on: "uvloop" where it is installed and not turned off
    with NETPROBE_EVENT_LOOP=asyncio, else "asyncio"."""
    if os.environ.get(EVENT_LOOP_ENV, "").strip().lower() == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def default_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory, or None (asyncio's own loop): see event_loop_name.

    Measured by scripts/bench_echo.py on 2 cores: uvloop runs the echo's one-connection
    ping-pong ~1.2x and its 100-connection rate 1.3-1.45x faster than asyncio's selector loop.
    asyncio stays the portable path (Windows, PyPy, NETPROBE_EVENT_LOOP=asyncio), and the
    reset servers' path: their splice relay takes sockets from under the transports, which
    asyncio's loop allows and uvloop's (libuv's own fd watchers) does not.
    """
    if event_loop_name() != "uvloop":
        return None
    import uvloop

    return uvloop.new_event_loop


def parse_allow(specs: Sequence[str]) -> tuple[IPNetwork, ...]:
    """Parse --allow CIDR blocks (`10.0.0.0/8`, `::1`, `192.0.2.7`).

    Raises:
        UsageError: a block that is not an IPv4/IPv6 network.
    """
    from netprobe.errors import UsageError

    networks: list[IPNetwork] = []
    for spec in specs:
        try:
            networks.append(ipaddress.ip_network(spec.strip(), strict=False))
        except ValueError as exc:
            raise UsageError(f"--allow {spec!r} is not a CIDR block: {exc}") from None
    return tuple(networks)


class Server:
    """One listening server; see the module docstring for how handlers plug in.

    Args:
        config: what to listen on, limits.
        handler_factory: called once per TCP/Unix connection; returns its Handler.
        datagram_handler: the handler for UDP (config.udp).
        on_event: receives a ConnEvent for each accept, close and reject.
        on_ready: receives the Bound address once listening (before any accept).
        on_totals: receives running totals on SIGUSR1.
    """

    def __init__(
        self,
        config: ServerConfig,
        handler_factory: Callable[[], Handler] | None = None,
        *,
        datagram_handler: DatagramHandler | None = None,
        on_event: Callable[[ConnEvent], None] | None = None,
        on_ready: Callable[[Bound], None] | None = None,
        on_totals: Callable[[ServerSummary], None] | None = None,
    ) -> None:
        if config.udp and datagram_handler is None:
            raise ValueError("a UDP server needs a datagram_handler")
        if not config.udp and handler_factory is None:
            raise ValueError("a stream server needs a handler_factory")
        self.config = config
        self.handler_factory = handler_factory
        self.datagram_handler = datagram_handler
        self.on_event = on_event
        self.on_ready = on_ready
        self.on_totals = on_totals
        # Called in a forked worker before it reports and exits (it never returns from run()):
        # the place to flush what its callbacks still hold. The counters it returns (lines
        # of output the worker lost, say) are summed over the workers in worker_counters.
        self.on_worker_exit: Callable[[], dict[str, int]] | None = None
        self.worker_counters: dict[str, int] = {}
        self.bound: Bound | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: socket.socket | None = None
        self._unix_inode: tuple[int, int] | None = None
        # What serves UDP: the loop's transport, or on a wildcard address the protocol itself.
        self._udp_transport: asyncio.DatagramTransport | _UdpProtocol | None = None
        self._active: set[Connection] = set()
        self._lingering = 0  # of _active: closed by us, reading the client's last bytes away
        self._outbound: set[Connection] = set()
        # The client while it is the only connection open (none outbound either), else None:
        # busy polling asks per message, so this is kept up to date rather than counted then.
        self._lone: Connection | None = None
        # Raw echoes of this loop turn not yet written (see Connection.data_received). Anything
        # else that writes to, closes or measures a connection writes them first, so the order
        # of a connection's bytes is what it was.
        self._replies: list[tuple[Connection, bytes]] = []
        self._pump: _Pump | None = None  # while serving with config.native_echo
        self._read_size = _READ_ASYNCIO  # the loop's read size, set in serve()
        self._setup_tasks: set[asyncio.Task[Any]] = set()
        self._next_id = 0
        self._worker = 0  # 0: the parent (or the only process); 1..N-1: forked workers
        # Workers that ended without reporting their totals ("worker 2 (pid 123) was killed
        # by SIGKILL"): what they served is missing from the totals; each counts as an error.
        self.lost_workers: list[str] = []
        self._children: list[tuple[int, int, int]] = []  # (pid, summary fd, lifeline fd)
        self._lifeline: int | None = None
        # The signal mask before listen() held the signals the loop will handle (see
        # _hold_signals); None when nothing is held.
        self._held_mask: set[int | signal.Signals] | None = None
        self._next_out_id = 0
        self._accepting = False
        self._accept_done = False
        self._accept_timer: asyncio.TimerHandle | None = None
        self._accept_starved = False  # out of fds (or memory) since the last accept
        self._tokens = 0.0
        self._tokens_at = 0.0
        self._started_at = 0.0
        self._stop_future: asyncio.Future[None] | None = None
        self._stop_requested = False
        self._stopping = False
        self._handler_errors = 0
        self._served_count = False  # UDP: the stop comes from --count, not a signal
        self._totals = ServerSummary()
        self._thread_lock = threading.Lock()

    # -- public API --------------------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop (only valid while the server runs)."""
        assert self._loop is not None, "server is not running"
        return self._loop

    @property
    def listener(self) -> socket.socket | None:
        """The listening socket after listen() (e.g. for sockets.fill_accept_queue); None
        before listen(), for UDP once serving, and after stop. Do not accept() on it."""
        return self._listener

    def listen(self) -> Bound:
        """Bind and listen now (run() does it if you don't); returns the bound address.

        Raises:
            LocalError: bind failed (address in use, permission, ...).
            ResolveError: host does not resolve.
        """
        if self.bound is not None:
            return self.bound
        try:
            return self._listen()
        except BaseException:
            self._release_signals()
            raise

    def _listen(self) -> Bound:
        config = self.config
        # The signals are held from the bind on, not during a name's lookup: a Ctrl-C must
        # end a lookup that hangs (README: a lookup never holds a run).
        hold = self._hold_signals
        if config.udp:
            sock = sockets.open_udp(
                config.host, config.port, family=config.family, on_resolved=hold
            )
            name = sock.getsockname()
            self.bound = Bound("udp", sockets.sockaddr_host(name), int(name[1]))
        elif config.path is not None:
            sock = sockets.open_listener(
                None, backlog=config.backlog, path=config.path, on_resolved=hold
            )
            self._unix_inode = sockets.file_identity(config.path)
            self.bound = Bound("unix", path=config.path)
        else:
            sock = sockets.open_listener(
                config.host,
                config.port,
                backlog=config.backlog,
                family=config.family,
                # Workers each get their own socket in one SO_REUSEPORT group, so the
                # kernel spreads the clients over them (a shared socket lets one take all).
                reuse_port=config.reuse_port or config.workers > 1,
                # Our workers' group, not one another program already runs on this port.
                new_reuse_group=config.workers > 1 and not config.reuse_port,
                on_resolved=hold,
            )
            name = sock.getsockname()
            self.bound = Bound("tcp", sockets.sockaddr_host(name), int(name[1]))
        sock.setblocking(False)
        self._listener = sock
        return self.bound

    def unlisten(self) -> None:
        """Undo listen() for a caller that will not serve after all: close the listener (and
        its Unix socket file) and let the signals held since listen() through."""
        self._close_listener()
        self.bound = None
        self._release_signals()

    def run(self) -> ServerSummary:
        """Listen (if not yet), serve until stopped, and return the totals.

        Raises:
            LocalError, ResolveError: from listen().
        """
        self.listen()
        if self.config.workers > 1 and not self._children:
            self._fork_workers(self.config.workers - 1)
        try:
            with asyncio.Runner(loop_factory=self.config.loop_factory) as runner:
                summary = runner.run(self.serve())
        finally:
            self._release_signals()  # serve() never got as far as its handlers
            self._close_listener()
        if self._children:
            self._collect_workers(summary)
        summary.worker = summary.workers = None  # summed over the workers by now
        return summary

    # -- workers (POSIX) ------------------------------------------------------------------------

    def _fork_workers(self, count: int) -> None:
        import sys

        if self.config.udp:
            raise ValueError("workers > 1 needs a stream listener")
        sys.stdout.flush()
        sys.stderr.flush()
        # A worker is born with the stop and totals signals blocked (they wait until its loop
        # handles them): the parent forwards SIGUSR1 as soon as it announces, and a worker
        # that got it before blocking it died of it (the default action).
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _WORKER_SIGNALS)
        try:
            for index in range(1, count + 1):
                summary_r, summary_w = os.pipe()
                life_r, life_w = os.pipe()
                pid = os.fork()
                if pid == 0:  # the worker: serve, report totals through the pipe, never return
                    os.close(summary_r)
                    os.close(life_w)
                    for _pid, fd1, fd2 in self._children:
                        os.close(fd1)
                        os.close(fd2)
                    self._become_worker(index, summary_w, life_r)
                os.close(summary_w)
                os.close(life_r)
                self._children.append((pid, summary_r, life_w))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def _become_worker(self, index: int, summary_fd: int, lifeline_fd: int) -> None:
        import json

        # _WORKER_SIGNALS are blocked already (inherited from _fork_workers): a SIGTERM from
        # the parent waits until this worker's loop handles it, and cannot kill it unreported.
        self._worker = index
        self._children = []
        self._lifeline = lifeline_fd
        bound = self.bound
        if bound is not None and bound.proto == "tcp" and bound.host is not None:
            # Our own socket in the parent's SO_REUSEPORT group (same address and port).
            assert self._listener is not None
            self._listener.close()
            self._listener = sockets.open_listener(
                bound.host,
                bound.port or 0,
                backlog=self.config.backlog,
                reuse_port=True,
            )
            self._listener.setblocking(False)
        self.on_ready = None  # the parent announces
        self._unix_inode = None  # the parent removes the socket file
        code = 0
        try:
            with asyncio.Runner(loop_factory=self.config.loop_factory) as runner:
                summary = runner.run(self.serve())
            record = summary.to_record()
            if self.on_worker_exit is not None:
                on_exit, self.on_worker_exit = self.on_worker_exit, None
                record["counters"] = on_exit()
            os.write(summary_fd, json.dumps(record).encode())
        except BaseException:
            code = 70
        finally:
            if self.on_worker_exit is not None:
                with contextlib.suppress(BaseException):
                    self.on_worker_exit()
            os._exit(code)

    def _signal_workers(self, sig: int) -> None:
        for pid, _fd, _life in self._children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def _collect_workers(self, summary: ServerSummary) -> None:
        import json

        self._signal_workers(signal.SIGTERM)
        deadline = _monotonic() + 2.0
        for index, (pid, summary_fd, lifeline_fd) in enumerate(self._children, start=2):
            os.close(lifeline_fd)
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if _monotonic() > deadline:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    _done, status = os.waitpid(pid, 0)
                    break
                time.sleep(0.01)
            with os.fdopen(summary_fd, "rb") as pipe:
                data = pipe.read()
            if not data:
                summary.errors += 1  # the worker died without reporting
                self.lost_workers.append(f"worker {index} (pid {pid}) {_ended_how(status)}")
                continue
            record = json.loads(data)
            for name in ("connections", "rejected", "bytes_in", "bytes_out", "resets", "errors"):
                setattr(summary, name, getattr(summary, name) + int(record[name]))
            for name, number in record.get("counters", {}).items():
                self.worker_counters[name] = self.worker_counters.get(name, 0) + int(number)
            for reason, number in record["reasons"].items():
                summary.reasons[reason] = summary.reasons.get(reason, 0) + int(number)
        self._children = []

    async def serve(self) -> ServerSummary:
        """Serve in the running loop until stopped; returns the totals."""
        self.listen()
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._read_size = _loop_read_size(loop)
        self._stop_future = loop.create_future()
        if self._stop_requested:
            self._stop_future.set_result(None)
        self._started_at = _monotonic()
        self._tokens_at = self._started_at
        self._tokens = 1.0
        installed = self._install_signals(loop)
        self._release_signals()  # a signal held since listen() is handled now
        if self._worker:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _WORKER_SIGNALS)
        duration_handle = None
        if self._lifeline is not None:
            # EOF on the lifeline: the parent is gone, so this worker must not outlive it.
            loop.add_reader(self._lifeline, self._request_stop)
        try:
            if self.config.duration_s is not None:
                duration_handle = loop.call_later(self.config.duration_s, self._request_stop)
            if self.config.udp:
                await self._start_udp(loop)
            elif self.config.native_echo and native_echo_available():
                self._pump = _Pump(self, loop)
            if self.on_ready is not None and self.bound is not None:
                self.on_ready(self.bound)
            if not self.config.udp and not self.config.pause_accept:
                self._start_accepting()
            await self._stop_future
            await self._shutdown()
        finally:
            if duration_handle is not None:
                duration_handle.cancel()
            if self._worker and installed:
                # A worker's work is done; a late SIGTERM/SIGUSR1 from the parent must not
                # kill it (default action) before it reports its totals: block them first.
                signal.pthread_sigmask(signal.SIG_BLOCK, installed)
            self._remove_signals(loop, installed)
            if self._lifeline is not None:
                loop.remove_reader(self._lifeline)
            self._close_listener()
            if self._pump is not None:
                self._pump.close()
                self._pump = None
        summary = self.totals()
        self._loop = None
        return summary

    def stop(self) -> None:
        """Ask the server to stop (thread-safe; also before run() starts)."""
        with self._thread_lock:
            loop = self._loop
            if loop is None or loop.is_closed():
                self._stop_requested = True
                return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nothing to stop
            loop.call_soon_threadsafe(self._request_stop)

    def totals(self) -> ServerSummary:
        """A snapshot of the running totals (consistent from any thread).

        The loop thread updates several counters per event; another thread reading them
        directly could catch a closed connection neither active nor yet in the totals. So
        from another thread the snapshot is taken by the loop, between two callbacks.
        """
        loop = self._loop
        if loop is not None and loop.is_running() and not _in_thread_of(loop):
            done: concurrent.futures.Future[ServerSummary] = concurrent.futures.Future()

            def take() -> None:
                if not done.done():
                    done.set_result(self._snapshot())

            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(take)
                with contextlib.suppress(concurrent.futures.TimeoutError):
                    return done.result(timeout=2.0)
        return self._snapshot()

    def _snapshot(self) -> ServerSummary:
        t = self._totals
        active = tuple(self._active)  # one C-level copy: safe against the loop thread
        live_in = sum(c.bytes_in for c in active)
        live_out = sum(c.bytes_out for c in active)
        return ServerSummary(
            connections=t.connections,
            active=len(active),
            rejected=t.rejected,
            bytes_in=t.bytes_in + live_in,
            bytes_out=t.bytes_out + live_out,
            resets=t.resets,
            errors=t.errors + self._handler_errors,
            reasons=dict(t.reasons),
            datagrams_in=t.datagrams_in,
            datagrams_out=t.datagrams_out,
            duration_s=_monotonic() - self._started_at if self._started_at else 0.0,
            worker=self._worker + 1 if self.config.workers > 1 else None,
            workers=self.config.workers if self.config.workers > 1 else None,
        )

    def open_connection(
        self, host: str, port: int, handler: Handler, *, timeout_s: float | None = 10.0
    ) -> Connection:
        """Start an outbound TCP connection in this loop (loop thread only), to one address
        of a name (sockets.preferred), looked up at each call.

        Returns the Connection at once; writes, half_close() and close() before it connects
        are applied in order once it does (abort() drops everything). On success
        handler.on_open(conn) runs (not if it was closed meanwhile); on failure
        handler.on_close(conn, "connect-error") with conn.errno_name set (ECONNREFUSED, ...).
        """
        self._next_out_id -= 1
        conn = Connection(
            self, handler, self._next_out_id, sockets.format_hostport(host, port), outbound=True
        )
        self._outbound.add(conn)
        self._update_lone()
        task = self.loop.create_task(self._connect(conn, host, port, timeout_s))
        self._setup_tasks.add(task)
        task.add_done_callback(self._setup_tasks.discard)
        return conn

    # -- internals ------------------------------------------------------------------------------

    async def _connect(
        self, conn: Connection, host: str, port: int, timeout_s: float | None
    ) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                address = await self._one_address(host, port)
                await self.loop.create_connection(lambda: conn, address, port)
        except TimeoutError as exc:
            conn.errno_name = sockets.errno_name(exc.errno) or "ETIMEDOUT"
            conn.reason = CloseReason.CONNECT_ERROR
            conn._finish(None)
        except OSError as exc:
            conn.errno_name = sockets.errno_name(exc.errno) or "EAI_FAIL"
            conn.reason = CloseReason.CONNECT_ERROR
            conn._finish(None)

    async def _one_address(self, host: str, port: int) -> str:
        # A name given to create_connection had each of its addresses tried in turn: the proxy
        # reached a `localhost` upstream on [::1] where port-check and the proxy's own start-up
        # check look at 127.0.0.1. Looked up here, not once at start: a name that does not
        # resolve is each connection's connect-error (README), as an upstream that went away.
        try:
            ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            infos = await self.loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            answers = [sockets.Resolved(info[0], info[4]) for info in infos]
            return sockets.preferred(answers).host
        return host

    def _hold_signals(self) -> None:
        # From listen() on, clients connect (a script polling the port starts now): a stop or
        # SIGUSR1 before the loop's handlers are in would kill the server (SIGTERM, SIGUSR1:
        # exit by signal, no totals; a Unix socket file left behind) or raise in the middle
        # of its set-up. Held until serve() has installed them, then handled as usual.
        # Only for a command's own server (late_signals_ignored: echo, reset serve and proxy),
        # which serves in the thread that listens, the main one: a library caller may listen
        # here and serve in another thread, which could not release the main thread's mask.
        if (
            self._held_mask is not None
            or not (self.config.handle_signals and self.config.late_signals_ignored)
            or threading.current_thread() is not threading.main_thread()
            or not hasattr(signal, "pthread_sigmask")
        ):
            return
        wanted = {signal.SIGINT, signal.SIGTERM}
        usr1 = getattr(signal, "SIGUSR1", None)
        if usr1 is not None and self.on_totals is not None:
            wanted.add(usr1)
        self._held_mask = signal.pthread_sigmask(signal.SIG_BLOCK, wanted)

    def _release_signals(self) -> None:
        if self._held_mask is None or threading.current_thread() is not threading.main_thread():
            return  # held by the main thread: only it can let them through
        mask, self._held_mask = self._held_mask, None
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> list[int]:
        if (
            not self.config.handle_signals
            or threading.current_thread() is not threading.main_thread()
        ):
            return []
        installed: list[int] = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._request_stop)
            installed.append(sig)
        usr1 = getattr(signal, "SIGUSR1", None)
        if usr1 is not None and self.on_totals is not None:
            loop.add_signal_handler(usr1, self._report_totals)
            installed.append(usr1)
        return installed

    def _remove_signals(self, loop: asyncio.AbstractEventLoop, installed: list[int]) -> None:
        # SIGUSR1 too: its default action also kills, and a script toggling or polling a
        # server (kill -USR1) must not turn a finished run into death by signal.
        late = (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR1", signal.SIGTERM))
        stops = [sig for sig in installed if sig in late]
        if not (self.config.late_signals_ignored and stops and hasattr(signal, "pthread_sigmask")):
            for sig in installed:
                loop.remove_signal_handler(sig)
            return
        # remove_signal_handler restores the default action; a signal between that and
        # SIG_IGN would kill a process whose run is over. Blocked meanwhile, it waits, and
        # meets SIG_IGN when the old mask comes back.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
        try:
            for sig in installed:
                loop.remove_signal_handler(sig)
                if sig in stops:
                    signal.signal(sig, signal.SIG_IGN)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def _report_totals(self) -> None:
        self._signal_workers(signal.SIGUSR1)  # each worker prints its own running totals
        if self.on_totals is not None:
            self.on_totals(self.totals())

    def _request_stop(self) -> None:
        if self._stop_future is not None and not self._stop_future.done():
            self._stop_future.set_result(None)
            self._signal_workers(signal.SIGTERM)

    async def _start_udp(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self._listener is not None
        assert self.datagram_handler is not None
        handler = self.datagram_handler
        sock = self._listener
        if sockets.enable_pktinfo(sock):
            protocol = _UdpProtocol(self, handler)
            protocol.raw_sock = sock
            loop.add_reader(sock.fileno(), protocol.read_with_pktinfo)
            self._udp_transport = protocol
            self._listener = None  # the protocol owns it now
            return
        transport, protocol = await loop.create_datagram_endpoint(
            lambda: _UdpProtocol(self, handler), sock=sock
        )
        protocol.raw_sock = sock  # for empty replies (see _UdpProtocol.datagram_received)
        self._udp_transport = transport
        self._listener = None  # the transport owns it now

    def _start_accepting(self) -> None:
        if self._accepting or self._accept_done or self._listener is None or self._stopping:
            return
        self._accepting = True
        self.loop.add_reader(self._listener.fileno(), self._on_acceptable)

    def _stop_accepting(self) -> None:
        if self._accept_timer is not None:
            self._accept_timer.cancel()
            self._accept_timer = None
        if self._accepting and self._listener is not None:
            self.loop.remove_reader(self._listener.fileno())
        self._accepting = False

    def _resume_accepting(self) -> None:
        self._accept_timer = None
        self._start_accepting()

    def _on_acceptable(self) -> None:
        listener = self._listener
        if listener is None:
            return
        rate = self.config.accept_rate
        # Workers share the listener and all wake up for it: one accept per wake-up each
        # spreads the clients over them instead of letting the first one take the burst.
        batch = _ACCEPT_BATCH if self.config.workers <= 1 else 1
        for _ in range(batch):
            if rate is not None and not self._take_token(rate):
                return
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                if rate is not None:
                    self._tokens += 1.0  # the token was not used
                return
            except OSError as exc:
                self._accept_failed(exc)
                return
            self._accept_starved = False
            self._admit(sock, addr)
            if not self._accepting:
                return

    def _take_token(self, rate: float) -> bool:
        now = _monotonic()
        # The bucket holds at most one second's worth, so a paced server never bursts more.
        self._tokens = min(max(rate, 1.0), self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        self._stop_accepting()
        wait = (1.0 - self._tokens) / rate
        self._accept_timer = self.loop.call_later(wait, self._resume_accepting)
        return False

    def _accept_failed(self, exc: OSError) -> None:
        # Linux: ECONNABORTED/EPROTO etc. mean that one client vanished before accept(); the
        # queue goes on. EMFILE/ENFILE/ENOBUFS/ENOMEM mean we are out of resources: back off.
        starved = exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
        # A shortage is counted once, not once per retry: retries every _ACCEPT_BACKOFF_S
        # would make the count measure how long it lasted.
        if not (starved and self._accept_starved):
            self._totals.errors += 1
            if starved:
                key = "accept-" + (sockets.errno_name(exc.errno) or "error")
                self._totals.reasons[key] = self._totals.reasons.get(key, 0) + 1
        if starved:
            self._accept_starved = True
            self._stop_accepting()
            self._accept_timer = self.loop.call_later(_ACCEPT_BACKOFF_S, self._resume_accepting)

    def _allowed(self, addr: Any) -> bool:
        if not isinstance(addr, tuple):
            return True  # Unix peers have no address to filter on
        try:
            ip = ipaddress.ip_address(str(addr[0]).split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            mapped = ip.ipv4_mapped
            return any(mapped in net or ip in net for net in self.config.allow)
        return any(ip in net for net in self.config.allow)

    def _admit(self, sock: socket.socket, addr: Any) -> None:
        config = self.config
        peer = sockets.format_sockaddr(addr)
        if config.allow and not self._allowed(addr):
            self._reject(sock, peer, CloseReason.NOT_ALLOWED)
            return
        if config.max_conns is not None and len(self._active) - self._lingering >= config.max_conns:
            self._reject(sock, peer, CloseReason.MAX_CONNS)
            return
        assert self.handler_factory is not None
        self._totals.connections += 1
        try:
            handler = self.handler_factory()
        except Exception:
            self._handler_errors += 1
            sock.close()
            return
        conn = Connection(self, handler, self._new_id(), peer)
        self._active.add(conn)
        self._update_lone()
        if config.count is not None and self._totals.connections >= config.count:
            self._accept_done = True
            self._stop_accepting()
            self._close_listener()  # later clients are refused, as by a finished server
        if self.on_event is not None:
            self.on_event(ConnEvent("accept", conn.conn_id, peer))
        sock.setblocking(False)
        task = self.loop.create_task(self.loop.connect_accepted_socket(lambda: conn, sock))
        self._setup_tasks.add(task)
        task.add_done_callback(lambda done: self._setup_done(done, conn, sock))

    def _setup_done(self, task: asyncio.Task[Any], conn: Connection, sock: socket.socket) -> None:
        self._setup_tasks.discard(task)
        exc = None if task.cancelled() else task.exception()
        if conn.transport is None and not conn._done and (task.cancelled() or exc is not None):
            # No transport took the socket (stopped at once, or the client vanished in
            # between): close it here, or it would leak until garbage collection.
            sock.close()
            conn._finish(exc)

    def _write_replies(self) -> None:
        replies = self._replies
        if not replies:
            return
        self._replies = []
        for conn, data in replies:
            if conn._closing or conn._done:
                # Lost in this turn, or a write of it failed just now: never sent.
                conn.bytes_out -= len(data)
                continue
            try:
                conn.transport.write(data)  # type: ignore[union-attr]  # set while not _done
            except Exception:
                conn._handler_failed()

    def _unpump(self, conn: Connection, resume: bool) -> None:
        pump = self._pump
        if pump is None:
            conn._pumped = -1
        else:
            pump.release(conn, resume)

    def _update_lone(self) -> None:
        active = self._active
        self._lone = next(iter(active)) if len(active) == 1 and not self._outbound else None

    def _new_id(self) -> int:
        # Interleaved across workers (worker k of N numbers k+1, k+1+N, ...): ids stay unique.
        self._next_id += 1
        return (self._next_id - 1) * max(1, self.config.workers) + self._worker + 1

    def _reject(self, sock: socket.socket, peer: str, reason: str) -> None:
        # Counted before the close: the client may see its close (and read the totals) before
        # this thread runs again.
        self._totals.rejected += 1
        self._totals.reasons[reason] = self._totals.reasons.get(reason, 0) + 1
        # FIN first, then what the client already sent is read away: closed with its bytes
        # unread, the socket would answer a bare RST (no EOF for the client to see).
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
            sock.setblocking(False)
            while sock.recv(65536):
                pass
        sock.close()
        if self.on_event is not None:
            self.on_event(ConnEvent("reject", self._new_id(), peer, reason=reason))

    def _connection_done(self, conn: Connection) -> None:
        if conn.outbound:
            self._outbound.discard(conn)
            self._update_lone()
            self._call_on_close(conn)
            return
        self._active.discard(conn)
        self._update_lone()
        totals = self._totals
        reason = str(conn.reason or CloseReason.EOF)
        totals.bytes_in += conn.bytes_in
        totals.bytes_out += conn.bytes_out
        totals.reasons[reason] = totals.reasons.get(reason, 0) + 1
        if reason == CloseReason.RESET:
            totals.resets += 1
        elif reason == CloseReason.ERROR:
            totals.errors += 1
        self._call_on_close(conn)
        if self.on_event is not None:
            self.on_event(
                ConnEvent(
                    "close",
                    conn.conn_id,
                    conn.peer,
                    conn.bytes_in,
                    conn.bytes_out,
                    _monotonic() - conn.started_at,
                    reason,
                )
            )
        if self._accept_done and not self._active:
            self._request_stop()

    def _call_on_close(self, conn: Connection) -> None:
        try:
            conn.handler.on_close(conn, conn.reason or CloseReason.EOF)
        except Exception:
            self._handler_errors += 1

    async def _shutdown(self) -> None:
        self._stopping = True
        self._stop_accepting()
        self._close_listener()
        loop = self.loop
        if self._udp_transport is not None:
            await self._await_replies(loop)
            self._udp_transport.close()
            self._udp_transport = None
        for conn in list(self._active) + list(self._outbound):
            conn.close(CloseReason.SHUTDOWN)
        deadline = loop.time() + _SHUTDOWN_GRACE_S
        while (self._active or self._outbound) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self._active) + list(self._outbound):
            conn.abort(CloseReason.SHUTDOWN)
        for task in list(self._setup_tasks):
            task.cancel()
        # Let the transports deliver connection_lost (scheduled with call_soon).
        for _ in range(3):
            await asyncio.sleep(0)
        for conn in list(self._active) + list(self._outbound):
            conn._finish(None)  # never set up (cancelled): account for it anyway

    async def _await_replies(self, loop: asyncio.AbstractEventLoop) -> None:
        handler = self.datagram_handler
        if handler is None or not handler.pending_replies:
            return
        # --count N / --once promised N replies; a signal promised a quick exit.
        wait = self.config.close_timeout_s if self._served_count else _SHUTDOWN_GRACE_S
        deadline = loop.time() + wait
        while handler.pending_replies and loop.time() < deadline:
            await asyncio.sleep(0.01)
        if handler.pending_replies:
            reasons = self._totals.reasons
            reasons["dropped"] = reasons.get("dropped", 0) + handler.pending_replies

    def _close_listener(self) -> None:
        listener = self._listener
        if listener is None:
            return
        self._listener = None
        if self._accepting and self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(listener.fileno())
            self._accepting = False
        listener.close()
        path = self.config.path
        if path is not None:
            sockets.remove_own_socket_file(path, self._unix_inode)
            self._unix_inode = None


def run_server(
    config: ServerConfig,
    handler_factory: Callable[[], Handler] | None = None,
    *,
    datagram_handler: DatagramHandler | None = None,
    on_event: Callable[[ConnEvent], None] | None = None,
    on_ready: Callable[[Bound], None] | None = None,
    on_totals: Callable[[ServerSummary], None] | None = None,
) -> ServerSummary:
    """Build a Server and run it until it stops (see Server and the module docstring).

    Raises:
        LocalError: bind failed. ResolveError: host does not resolve.
    """
    return Server(
        config,
        handler_factory,
        datagram_handler=datagram_handler,
        on_event=on_event,
        on_ready=on_ready,
        on_totals=on_totals,
    ).run()
