"""`reset serve` and `reset proxy`: handlers on the one server core that misbehave on cue.
Does I/O (through netprobe.server and netprobe.sockets).

Strategy: every connection draws its action from the run's FaultSchedule when it opens
(plan step, seeded coin, or always), then a TriggerState counts its bytes/frames while timers
watch after-ms / on-idle. Bytes before the trigger are served faithfully (echoed, discarded,
forwarded); at the trigger the action runs: rst aborts (SO_LINGER 0) once the bytes before it
are acknowledged, fin and half-close send FIN and drain what the peer still sends (so the FIN
is not turned into a RST by unread data), hang stops reading and writing (until the peer
is gone: _HangWatch), slow routes the output through a paced _Pipe.

The proxy joins a client connection and an outbound upstream connection with two _Pipes (one
per direction) that apply toxics (latency, jitter, bandwidth, slices) when enabled and write
straight through when not; back-pressure pauses the *other* side's reading. A connection no
fault can touch is handed to a splice(2) relay thread instead (Linux): both transports stay
paused while the kernel moves the bytes, and the relay is stopped before either socket closes.
Relays keep to a share of RLIMIT_NOFILE (8 fds each against 2), so later clients still fit.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from netprobe import sockets
from netprobe.engines.reset_client import generated_stream
from netprobe.engines.reset_faults import (
    PROXY_TRIGGERS,
    SERVE_TRIGGERS,
    Action,
    Direction,
    FaultSchedule,
    ServeMode,
    Toxics,
    Trigger,
    TriggerKind,
    TriggerState,
    parse_mode,
)
from netprobe.errors import FrameTooLarge, FramingError, MalformedFrame
from netprobe.server import (
    DEFAULT_HIGH_WATER,
    DEFAULT_LOW_WATER,
    Bound,
    CloseReason,
    Connection,
    Handler,
    Server,
    ServerConfig,
    ServerSummary,
)

__all__ = [
    "PROXY_TRIGGERS",
    "SERVE_TRIGGERS",
    "Direction",
    "FaultTotals",
    "ProxyControl",
    "ResetOptions",
    "ServeControl",
    "ServeMode",
    "Toxics",
    "make_proxy",
    "make_serve",
    "parse_mode",
]


def _framing_reason(exc: FramingError) -> str:
    # --after-frames parses the peer's bytes: a stream it cannot parse ends the connection
    # with the same reasons `echo --framing` logs, not as a handler "error" with an RST.
    if isinstance(exc, FrameTooLarge):
        return "frame-too-large"
    return "malformed-frame" if isinstance(exc, MalformedFrame) else "incomplete-frame"


# After a `fin` action, the peer gets this long to close its side before we close ours.
_FIN_LINGER_S = 2.0
# The side an rst or fin spares (proxy) is closed with FIN, then given this long to close too.
_SPARE_LINGER_S = 0.5
# The send mode writes this much per step while the peer keeps up.
_SEND_CHUNK = 64 * 1024
_SEND_STEPS = 16  # chunks per loop turn
# Paced output wakes at most this often (a 1 KB/s trickle writes ~10-byte pieces).
_PACE_TICK_S = 0.01
# At most this many splice relay threads; further connections use the event loop.
_RELAY_LIMIT = 256
# A spliced connection holds 8 fds (its two sockets, the relay's wake pipe, a pipe pair per
# direction), one on the event loop 2. So that splicing never costs many connections under a
# low `ulimit -n`, relays together hold at most 1/_RELAY_FD_SHARE of the RLIMIT_NOFILE soft
# limit, and one starts only while that share of the limit stays free for accepts and
# upstream connects; other connections use the event loop.
_SPLICED_FDS = 8
_RELAY_EXTRA_FDS = 6
_RELAY_FD_SHARE = 8
# An `rst` first lets the bytes sent before the trigger reach the peer (a RST discards what
# is still queued, SOCKETS.md §5), for as long as the peer keeps taking them: it gives up
# after this long without progress (a peer that stopped reading). Not less: a reader taking
# small pieces reopens its window only after about 128 KiB (half a 256 KiB receive buffer,
# on loopback here), so a steady reader's ACKs come 128 KiB / rate apart: 1 s cut readers
# of 100 KB/s after 195 KB of 400 KB, 2 s keeps those above about 64 KiB/s (measured: 80
# KB/s whole, 60 KB/s cut).
_RST_FLUSH_S = 2.0
_RST_FLUSH_TIMED_MAX_S = 1.0
_RST_POLL_S = 0.001
_RST_POLL_MAX_S = 0.02


def _unsent(conn: Connection) -> int:
    """Bytes written to conn that its peer has not acknowledged yet (buffer + kernel queue)."""
    transport = conn.transport
    if transport is None:
        return 0
    queued = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if sock is None:
        return queued
    return queued + (sockets.send_queue_bytes(sock) or 0)


def _abort_flushed(conn: Connection, reason: str, *, timed: bool = False) -> None:
    """Abort (RST) once what was written has reached the peer, or after _RST_FLUSH_S in
    which the peer took nothing more. (A fixed 200 ms cut a slow reader short: a client
    reading 320 KB/s got ECONNRESET after 195 KB of a 2 MB trigger.) A time trigger
    (`timed`: --after-ms, --on-idle) keeps its timing: at most _RST_FLUSH_TIMED_MAX_S late,
    however much a flood has queued by then."""
    if conn.is_closing:
        return
    conn.pause_reading("rst")
    now = time.monotonic()
    cap = now + _RST_FLUSH_TIMED_MAX_S if timed else None
    _flush_then_abort(conn, reason, now + _RST_FLUSH_S, _unsent(conn), cap, _RST_POLL_S)


def _flush_then_abort(
    conn: Connection, reason: str, deadline: float, left: int, cap: float | None, poll_s: float
) -> None:
    if conn.is_closing:
        return
    now = time.monotonic()
    unsent = _unsent(conn)
    if unsent < left:
        deadline = now + _RST_FLUSH_S  # the peer is still reading: give it more time
    if unsent and now < deadline and (cap is None or now < cap):
        # 1 ms at first (a fast reader's RST keeps its moment), then less often: a slow
        # reader can take seconds, and a poll a millisecond per connection adds up.
        next_poll = min(poll_s * 2, _RST_POLL_MAX_S)
        conn.call_later(poll_s, _flush_then_abort, conn, reason, deadline, unsent, cap, next_poll)
        return
    conn.abort(reason)


def _timed(trigger: Trigger | None) -> bool:
    """A trigger of time, not of bytes or frames: its RST keeps close to its moment."""
    return trigger is not None and trigger.kind in (TriggerKind.AFTER_MS, TriggerKind.ON_IDLE)


# How often the run looks for the peers of hung connections that have left (see _HangWatch).
_HANG_CHECK_S = 0.5


class _HangWatch:
    """The run's hung connections, checked every _HANG_CHECK_S for a peer that left.

    A hung connection is paused, so the event loop no longer watches its socket and never saw
    its peer leave: the socket (and a proxy's upstream connection) stayed until the run ended.
    Reading to find out is no option: the read would take the bytes the hang must leave unread
    (the peer's window has to fill so that it times out); sockets.HangupPoller looks without
    reading, one syscall per tick for the whole run, and the timer runs only while some
    connection hangs.

    An RST means the peer is gone. A FIN does not: a client that shut only its write side
    (`nc -N`, `netprobe send`, an HTTP/1.0 client) still waits for an answer, and the hang is
    there to make exactly that client time out. So after a FIN (where `fin_leaves` is False)
    the hang goes on and keepalive probes (sockets.probe_peer) find out whether the peer still
    exists: a closed one resets a probe once its FIN-WAIT-2 time is over, a vanished host
    answers none, and either shows up here as an error.
    """

    def __init__(self) -> None:
        self._poller: sockets.HangupPoller | None = None
        self._fds: dict[Connection, int] = {}
        self._watched: dict[int, tuple[Connection, Callable[[Connection], None], bool]] = {}
        self._timer: Any = None

    def add(
        self, conn: Connection, on_left: Callable[[Connection], None], *, fin_leaves: bool
    ) -> None:
        """Call on_left(conn) once conn's peer has reset (or, if fin_leaves, sent FIN)."""
        sock = conn.get_extra_info("socket")
        if sock is None or conn.is_closing or conn in self._fds:
            return
        if self._poller is None:
            self._poller = sockets.HangupPoller()
        if not self._poller.available:
            return
        fd = sock.fileno()
        self._poller.add(fd)
        self._fds[conn] = fd
        self._watched[fd] = (conn, on_left, fin_leaves)
        if self._timer is None:
            self._timer = conn.call_later(_HANG_CHECK_S, self._check, conn.server.loop)

    def discard(self, conn: Connection) -> None:
        """Stop watching conn (before its socket closes: a closed fd number is soon reused)."""
        fd = self._fds.pop(conn, None)
        if fd is None or self._poller is None:
            return
        del self._watched[fd]
        self._poller.remove(fd)
        if not self._fds and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self, loop: Any) -> None:
        self._timer = None
        assert self._poller is not None
        left = []
        for fd, gone in self._poller.ready():
            entry = self._watched.get(fd)
            if entry is None:
                continue
            conn, on_left, fin_leaves = entry
            if gone or fin_leaves:
                self.discard(conn)
                left.append((conn, on_left))
                continue
            # Only a FIN: from now on an error (a probe reset or unanswered) ends the hang.
            self._poller.remove(fd)
            self._poller.add(fd, fin=False)
            sock = conn.get_extra_info("socket")
            if sock is not None:
                sockets.probe_peer(sock)
        if self._fds:
            self._timer = loop.call_later(_HANG_CHECK_S, self._check, loop)
        for conn, on_left in left:
            if not conn.is_closing:
                on_left(conn)


@dataclass(slots=True)
class ResetOptions:
    """Everything `reset serve` / `reset proxy` need besides the server config.

    Attributes:
        trigger: when faults act (None: never; faults are then only toxics/accept faults).
        schedule: which connections are faulted, with which action.
        slow_rate: bytes per second for the `slow` action.
        mode / send_bytes: serve only: echo, discard, or send a generated stream.
        upstream: proxy only: (host, port) to forward to.
        direction: proxy only: the side(s) the action hits and whose bytes count.
        toxics: proxy only.
        connect_timeout_s: proxy only: upstream connect timeout.
        splice: proxy only: relay faithful connections with splice(2) in a thread (Linux),
            which moves bytes without copying them through Python; False keeps every
            connection on the portable event-loop path.
    """

    trigger: Trigger | None
    schedule: FaultSchedule
    slow_rate: int | None = None
    mode: ServeMode = ServeMode.ECHO
    send_bytes: int | None = None
    upstream: tuple[str, int] | None = None
    direction: Direction = Direction.BOTH
    toxics: Toxics = field(default_factory=Toxics)
    connect_timeout_s: float = 5.0
    splice: bool = True

    @property
    def faithful(self) -> bool:
        """True when no trigger and no toxic can ever touch a proxied byte."""
        t = self.toxics
        return (
            self.trigger is None and not t.shaping and t.limit_bytes is None and t.timeout_s is None
        )


_FILLER = "filler"  # the close reason of our own queue fillers
_UPSTREAM_RESET = "upstream-reset"  # the proxy's client was reset because the upstream was
_RELAY_UNAVAILABLE = "unavailable"  # a splice relay that could not start: the loop carries on


@dataclass(slots=True)
class FaultTotals:
    """What the faults did over a run (merged into the totals record)."""

    faulted: int = 0
    passed: int = 0
    actions: dict[str, int] = field(default_factory=dict)
    fillers: int = 0  # our own accept-queue fillers the server accepted (slow-accept)

    def to_record(self) -> dict[str, Any]:
        return {"faulted": self.faulted, "passed": self.passed, "actions": dict(self.actions)}

    def clients_only(self, record: dict[str, Any]) -> dict[str, Any]:
        """The server core's totals record without our queue fillers: it counts every accepted
        connection, and a filler is ours, not a client."""
        if not self.fillers:
            return record
        out = dict(record)
        out["connections"] = record["connections"] - self.fillers
        reasons = dict(record.get("reasons", {}))
        left = reasons.pop(_FILLER, 0) - self.fillers
        if left > 0:
            reasons[_FILLER] = left
        out["reasons"] = reasons
        return out


class _Run:
    """Run-wide state shared by every handler of one server (loop thread only)."""

    def __init__(
        self,
        options: ResetOptions,
        on_record: Callable[[dict[str, Any]], None] | None,
        kind: str,
    ) -> None:
        self.options = options
        self.on_record = on_record
        self.kind = kind
        self.enabled = True
        self.index = 0
        self.totals = FaultTotals()
        self.fillers: set[str] = set()  # our own queue fillers (slow-accept), as peers
        self.rng = random.Random(options.schedule.seed)
        self.server: Server | None = None
        self.relays = 0  # splice relays running now
        self.sessions = 0  # proxied connections open now (2 sockets each, once connected)
        self._fds_at_start: int | None = None  # fds open before the first session
        self.hangs = _HangWatch()

    def relay_fits(self) -> bool:
        """Whether one more splice relay stays within its share of RLIMIT_NOFILE (see
        _RELAY_FD_SHARE). The fds in use are estimated from the counts (listing /proc/self/fd
        per connection would cost about a millisecond at 2,000 fds)."""
        try:
            import resource

            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        except (ImportError, OSError, ValueError):
            return True
        if soft == resource.RLIM_INFINITY or soft <= 0:
            return True
        share = soft // _RELAY_FD_SHARE
        if (self.relays + 1) * _SPLICED_FDS > share:
            return False
        if self._fds_at_start is None:
            try:
                # This session's two sockets are open already.
                self._fds_at_start = len(os.listdir("/proc/self/fd")) - 2 * self.sessions
            except OSError:
                self._fds_at_start = 16  # no /proc: a typical start
        in_use = self._fds_at_start + 2 * self.sessions + _RELAY_EXTRA_FDS * self.relays
        return in_use + _RELAY_EXTRA_FDS <= soft - share

    def draw(self) -> tuple[int, Action]:
        index = self.index
        self.index += 1
        if self.options.trigger is None:
            return index, Action.OK
        return index, self.options.schedule.action_for(index)

    def decoder(self) -> Any:
        trig = self.options.trigger
        if trig is None or trig.kind is not TriggerKind.AFTER_FRAMES or trig.framing is None:
            return None
        from netprobe.framing import parse_framing

        return parse_framing(trig.framing).decoder()

    def account(self, action: Action, fired: bool) -> None:
        if fired:
            self.totals.faulted += 1
            self.totals.actions[action] = self.totals.actions.get(action, 0) + 1
        else:
            self.totals.passed += 1

    def emit(self, record: dict[str, Any]) -> None:
        if self.on_record is not None:
            self.on_record({"event": "connection", "kind": self.kind, **record})


class _Pipe:
    """One direction of bytes on its way into `dest`: straight through, or shaped.

    Shaping (when the run's faults are enabled): each chunk is held until its due time
    (latency + jitter, never reordering), then written in slices of at most `slice_size` with
    `slice_delay_s` between them, within a token bucket of `rate` bytes per second. Above
    the high-water mark of held bytes `on_full(True)` asks the source to stop reading.
    """

    def __init__(
        self,
        dest: Connection,
        toxics: Toxics,
        run: _Run,
        on_full: Callable[[bool], None],
        timer_conn: Connection,
    ) -> None:
        self.dest = dest
        self.toxics = toxics
        self.run = run
        self.on_full = on_full
        self.timer_conn = timer_conn  # whose call_later to use (any live connection will do)
        self.rate: int | None = toxics.bandwidth
        self.dropped = False
        self.sealed = False
        self.forwarded = 0
        self._queue: deque[list[Any]] = deque()  # [due, bytes, offset]
        self._queued = 0
        self._last_due = 0.0
        self._tokens = 0.0
        self._tokens_at = time.monotonic()
        self._timer: Any = None
        self._full = False
        self._on_drained: list[Callable[[], None]] = []

    @property
    def queued(self) -> int:
        return self._queued

    def _shaping(self) -> bool:
        return self.run.enabled and (self.toxics.shaping or self.rate is not None)

    def set_rate(self, rate: int | None) -> None:
        self.rate = rate
        self._tokens = 0.0
        self._tokens_at = time.monotonic()

    def push(self, data: bytes) -> None:
        if self.dropped or self.sealed or not data:
            return
        if not self._queue and not self._shaping():
            self.forwarded += len(data)
            self.dest.write(data)
            return
        due = time.monotonic()
        if self.run.enabled and (self.toxics.latency_s or self.toxics.jitter_s):
            jitter = self.run.rng.uniform(-self.toxics.jitter_s, self.toxics.jitter_s)
            due += max(0.0, self.toxics.latency_s + jitter)
        due = max(due, self._last_due)
        self._last_due = due
        self._queue.append([due, data, 0])
        self._queued += len(data)
        if not self._full and self._queued > DEFAULT_HIGH_WATER:
            self._full = True
            self.on_full(True)
        self._pump()

    def when_drained(self, callback: Callable[[], None]) -> None:
        """Run callback once every held byte is written (at once if none is held)."""
        if not self._queue or self.dropped:
            callback()
        else:
            self._on_drained.append(callback)

    def seal(self) -> None:
        """Accept no more bytes; those already held still go out (then when_drained runs)."""
        self.sealed = True

    def drop(self) -> None:
        """Forget held bytes and ignore later ones (the destination is gone or cut off)."""
        self.dropped = True
        self._queue.clear()
        self._queued = 0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _wake(self) -> None:
        self._timer = None
        self._pump()

    def _later(self, delay_s: float) -> None:
        self._timer = self.timer_conn.call_later(max(0.0, delay_s), self._wake)

    def _pump(self) -> None:
        if self._timer is not None or self.dropped:
            return
        toxics = self.toxics
        while self._queue:
            if self.dest.is_closing:
                self.drop()
                return
            head = self._queue[0]
            due, data, offset = head
            shaping = self._shaping()
            now = time.monotonic()
            if shaping and due > now:
                self._later(due - now)
                return
            count = len(data) - offset
            if shaping and toxics.slice_size:
                count = min(count, toxics.slice_size)
            if shaping and self.rate is not None:
                rate = float(self.rate)
                self._tokens = min(rate * 0.1 + 1.0, self._tokens + (now - self._tokens_at) * rate)
                self._tokens_at = now
                step = max(1.0, rate * _PACE_TICK_S)
                if self._tokens < min(step, count):
                    self._later((min(step, count) - self._tokens) / rate)
                    return
                count = min(count, int(self._tokens))
                self._tokens -= count
            piece = data[offset : offset + count]
            head[2] = offset + count
            if head[2] >= len(data):
                self._queue.popleft()
            self._queued -= count
            self.forwarded += count
            self.dest.write(piece)
            if self._full and self._queued < DEFAULT_LOW_WATER:
                self._full = False
                self.on_full(False)
            if shaping and toxics.slice_size and toxics.slice_delay_s and self._queue:
                self._later(toxics.slice_delay_s)
                return
        if self._full:
            self._full = False
            self.on_full(False)
        callbacks, self._on_drained = self._on_drained, []
        for callback in callbacks:
            callback()


# ---------------------------------------------------------------------------------------------
# reset serve
# ---------------------------------------------------------------------------------------------


class _ServeHandler(Handler):
    """One client of `reset serve`: echo/discard/send until the trigger, then the action."""

    __slots__ = (
        "_after_fire",
        "_filler",
        "_idle_timer",
        "_pipe",
        "_sent",
        "_timers",
        "action",
        "conn",
        "fired_at",
        "index",
        "last_rx",
        "run",
        "state",
    )

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.conn: Connection | None = None
        self.index = -1
        self.action = Action.OK
        self.state = TriggerState(None)
        self.fired_at: float | None = None
        self.last_rx = 0.0
        self._pipe: _Pipe | None = None
        self._timers: list[Any] = []
        # The --on-idle check: one pending handle, re-armed in place (kept in _timers, each
        # re-arm grew the list by one handle per check for as long as the client talked).
        self._idle_timer: Any = None
        self._sent = 0
        self._after_fire: Action | None = None  # the action now in force
        self._filler = False

    # -- lifecycle ---------------------------------------------------------------------------

    def on_open(self, conn: Connection) -> None:
        self.conn = conn
        if conn.peer in self.run.fillers:
            # One of our own accept-queue fillers (slow-accept): not a client, let it go.
            self.run.fillers.discard(conn.peer)
            self._filler = True
            self.run.totals.fillers += 1
            conn.abort(_FILLER)
            return
        self.index, self.action = self.run.draw()
        options = self.run.options
        trigger = options.trigger
        self.last_rx = conn.started_at
        if self.action is not Action.OK and trigger is not None:
            self.state = TriggerState(trigger, self.run.decoder())
            if trigger.at_once:
                self.fire()
                if conn.is_closing or self._after_fire is Action.HANG:
                    return
            elif trigger.kind is TriggerKind.AFTER_MS:
                self._timers.append(conn.call_later(float(trigger.value or 0), self._timer_fire))
            elif trigger.kind is TriggerKind.ON_IDLE:
                self._idle_timer = conn.call_later(float(trigger.value or 0), self._idle_check)
        if options.mode is ServeMode.SEND:
            self._pump_send()

    def on_data(self, conn: Connection, data: bytes) -> None:
        self.last_rx = time.monotonic()
        done = self._after_fire
        if done in (Action.RST, Action.FIN, Action.HALF_CLOSE, Action.HANG):
            return  # dropped: the connection is ending (or hung)
        if not self.state.fired and self.state.trigger is not None:
            try:
                cut = self.state.cut_in(data)
            except FramingError as exc:
                conn.close(_framing_reason(exc))
                return
            if cut is not None:
                self._serve(data[:cut])
                self.fire()
                if self._after_fire is Action.SLOW:
                    self._serve(data[cut:])
                return
        self._serve(data)

    def on_eof(self, conn: Connection) -> None:
        if self._after_fire in (Action.FIN, Action.HALF_CLOSE, Action.HANG):
            conn.close(str(self._after_fire))
            return
        if self._pipe is not None and self._pipe.queued:
            self._pipe.when_drained(lambda: conn.close("eof"))
            return
        conn.close("eof")

    def on_write_paused(self, conn: Connection) -> None:
        # Only an echo must stop reading while its output backs up (what it reads becomes
        # output). send and discard keep reading: their bytes_in, --after-bytes and --on-idle
        # must see a client that sends but does not read (send's flood fills this buffer;
        # _pump_send already stops at the high-water mark).
        if self.run.options.mode is ServeMode.ECHO:
            super().on_write_paused(conn)

    def on_write_resumed(self, conn: Connection) -> None:
        super().on_write_resumed(conn)
        if self.run.options.mode is ServeMode.SEND:
            self._pump_send()

    def on_close(self, conn: Connection, reason: str) -> None:
        self.run.hangs.discard(conn)
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self._pipe is not None:
            self._pipe.drop()
        if self._filler:
            return
        fired = self.fired_at is not None
        self.run.account(self.action, fired)
        trigger = self.run.options.trigger
        self.run.emit(
            {
                "conn_id": conn.conn_id,
                "peer": conn.peer,
                "trigger": trigger.describe() if trigger is not None else None,
                "action": str(self.action),
                "fired": fired,
                "fired_at_s": None if self.fired_at is None else round(self.fired_at, 6),
                "bytes_in": conn.bytes_in,
                "bytes_out": conn.bytes_out,
                "duration_s": round(time.monotonic() - conn.started_at, 6),
                "reason": reason,
                "errno_name": conn.errno_name,
            }
        )

    # -- serving -----------------------------------------------------------------------------

    def _serve(self, data: bytes) -> None:
        if data and self.run.options.mode is ServeMode.ECHO:
            self._out(data)

    def _out(self, data: bytes) -> None:
        conn = self.conn
        assert conn is not None
        if not data or conn.is_closing or self._after_fire in (Action.HANG, Action.RST):
            return
        if self._pipe is not None:
            self._pipe.push(data)
            return
        if not self.state.fired and self.state.trigger is not None:
            cut = self.state.cut_out(len(data))
            if cut is not None:
                conn.write(data[:cut])
                self.fire()
                self._push_slow(data[cut:])
                return
        conn.write(data)

    def _push_slow(self, data: bytes) -> None:
        # After a `slow` action the rest of the output goes through the pacing pipe.
        if self._after_fire is Action.SLOW and self._pipe is not None:
            self._pipe.push(data)

    def _pump_send(self) -> None:
        conn = self.conn
        assert conn is not None
        limit = self.run.options.send_bytes
        steps = 0
        while not conn.is_closing and self._after_fire not in (Action.HANG, Action.FIN, Action.RST):
            if self._after_fire is Action.HALF_CLOSE:
                return
            steps += 1
            if steps > _SEND_STEPS:
                # Give the loop a turn: while the kernel takes every byte the write buffer
                # never fills, and a peer's RST is only noticed between callbacks.
                conn.call_later(0, self._pump_send)
                return
            if limit is not None and self._sent >= limit:
                # The response is complete: FIN once the paced bytes are out, then close
                # when the peer does.
                if self._pipe is not None and self._pipe.queued:
                    self._pipe.when_drained(conn.half_close)
                else:
                    conn.half_close()
                return
            if self._pipe is not None:
                if self._pipe.queued >= _SEND_CHUNK:
                    self._pipe.when_drained(self._pump_send)
                    return
            elif conn.write_buffer_size >= DEFAULT_HIGH_WATER:
                return  # on_write_resumed calls us again
            size = _SEND_CHUNK if limit is None else min(_SEND_CHUNK, limit - self._sent)
            chunk = generated_stream(size, self._sent)
            self._sent += size
            self._out(chunk)

    # -- the fault ---------------------------------------------------------------------------

    def _timer_fire(self) -> None:
        if self.conn is not None and not self.conn.is_closing and not self.state.fired:
            self.state.fired = True
            self.fire()

    def _idle_check(self) -> None:
        conn = self.conn
        trigger = self.run.options.trigger
        if conn is None or conn.is_closing or self.state.fired or trigger is None:
            return
        idle = float(trigger.value or 0)
        left = self.last_rx + idle - time.monotonic()
        if left > 0:
            self._idle_timer = conn.call_later(left, self._idle_check)
            return
        self.state.fired = True
        self.fire()

    def fire(self) -> None:
        """Perform this connection's action now."""
        conn = self.conn
        assert conn is not None
        self.state.fired = True
        if not self.run.enabled or self.fired_at is not None:
            return
        self.fired_at = time.monotonic() - conn.started_at
        action = self.action
        self._after_fire = action
        if action is Action.RST:
            _abort_flushed(conn, "rst", timed=_timed(self.run.options.trigger))
        elif action is Action.FIN:
            self._fin(conn, "fin")
        elif action is Action.HALF_CLOSE:
            conn.half_close()
        elif action is Action.HANG:
            conn.pause_reading("hang")
            self.run.hangs.add(conn, self._client_left, fin_leaves=False)
        elif action is Action.SLOW:
            rate = self.run.options.slow_rate
            self._pipe = _Pipe(conn, Toxics(bandwidth=rate), self.run, self._pipe_full, conn)
            self._pipe.set_rate(rate)

    @staticmethod
    def _client_left(conn: Connection) -> None:
        # The hung client sent FIN or RST: it sends no more, so reading (and dropping, see
        # on_data) opens no window it could use. The read brings its FIN to on_eof, which
        # closes with a FIN of ours (nothing left unread, so not an RST), or its RST to the
        # usual reset close; an echo's full write buffer must not hold the read back either.
        for key in ("hang", "write-buffer"):
            conn.resume_reading(key)

    def _fin(self, conn: Connection, reason: str) -> None:
        # FIN now, then read (and drop) until the peer closes: closing with unread bytes
        # would send RST instead (TCPAbortOnClose, SOCKETS.md §5).
        conn.half_close()
        self._timers.append(conn.call_later(_FIN_LINGER_S, conn.close, reason))

    def _pipe_full(self, full: bool) -> None:
        conn = self.conn
        if conn is None or self.run.options.mode is not ServeMode.ECHO:
            return  # as on_write_paused: only an echo's reading makes output
        if full:
            conn.pause_reading("slow")
        else:
            conn.resume_reading("slow")


class ServeControl:
    """Accept-queue control of a `reset serve` run (--no-accept / --slow-accept)."""

    def __init__(self, server: Server, run: _Run) -> None:
        self._server = server
        self._run = run
        self._fillers: list[Any] = []

    def prefill(self, *, timeout_s: float = 5.0) -> int:
        """Connect our own clients until the accept queue is full; returns how many.

        Call after server.listen(). Later clients' SYNs are then dropped, so their connects
        time out (or wait for a retransmit after an accept), with no root needed. Unix
        sockets are skipped: a full Unix queue fails connects at once (EAGAIN), not slowly.
        """
        from netprobe.sockets import fill_accept_queue, format_sockaddr

        bound = self._server.bound
        listener = self._server.listener
        if bound is None or listener is None or bound.path is not None:
            return 0
        clients = fill_accept_queue(listener, deadline=time.monotonic() + timeout_s)
        for client in clients:
            # Spelled as the server spells its peers, which it is matched against.
            self._run.fillers.add(format_sockaddr(client.getsockname()))
        self._fillers.extend(clients)
        config = self._server.config
        if config.count is not None and not config.pause_accept:
            config.count += len(clients)  # the fillers will be accepted too: not clients
        return len(clients)

    def release(self) -> None:
        """Close our queue fillers (at the end of the run)."""
        from netprobe.sockets import abort_connection

        for client in self._fillers:
            abort_connection(client)
        self._fillers.clear()


def make_serve(
    config: ServerConfig,
    options: ResetOptions,
    *,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    on_ready: Callable[[Bound], None] | None = None,
    on_totals: Callable[[ServerSummary], None] | None = None,
) -> tuple[Server, FaultTotals, ServeControl]:
    """Build the `reset serve` server (not started).

    Args:
        on_record: receives one dict per finished connection (event "connection").
        on_ready: receives the bound address once listening.
        on_totals: receives running totals on SIGUSR1.

    Returns:
        (server, fault totals filled in as it runs, accept-queue control).
    """
    run = _Run(options, on_record, "reset serve")
    server = Server(config, lambda: _ServeHandler(run), on_ready=on_ready, on_totals=on_totals)
    run.server = server
    return server, run.totals, ServeControl(server, run)


# ---------------------------------------------------------------------------------------------
# reset proxy
# ---------------------------------------------------------------------------------------------


class _Session:
    """One proxied connection: the client side, the upstream side, two pipes, the fault."""

    def __init__(self, run: _Run, client: Connection) -> None:
        self.run = run
        self.client = client
        self.upstream: Connection | None = None
        self.up: _Pipe | None = None  # client -> upstream
        self.down: _Pipe | None = None  # upstream -> client
        self.index, self.action = run.draw()
        run.sessions += 1
        trigger = run.options.trigger if self.action is not Action.OK else None
        self.states = {
            Direction.UP: TriggerState(trigger, run.decoder()),
            Direction.DOWN: TriggerState(trigger, run.decoder()),
        }
        limit = run.options.toxics.limit_bytes
        limit_trigger = None if limit is None else Trigger(TriggerKind.AFTER_BYTES, limit)
        self.limits = {d: TriggerState(limit_trigger) for d in (Direction.UP, Direction.DOWN)}
        self.fired_at: float | None = None
        self.done_action: Action | None = None
        self.timers: list[Any] = []
        self.idle_timer: Any = None  # the --on-idle check, re-armed in place
        self.last_rx = client.started_at
        self.fins_passed: set[Direction] = set()  # FINs handed on, not only received
        self.closed = {"client": False, "upstream": False}
        self.end_reason: str | None = None
        self.upstream_errno: str | None = None
        self.emitted = False
        self.relay: _SpliceRelay | None = None
        # Sides sent a FIN to end them (fin, or spared by an rst/fin on the other side): read
        # and dropped until the peer's FIN, then closed with this reason (_fin, _spare).
        self.lingering: dict[Connection, str] = {}

    # -- sides and directions ----------------------------------------------------------------

    def _faulted(self, direction: Direction) -> bool:
        chosen = self.run.options.direction
        return chosen is Direction.BOTH or chosen is direction

    def _toxic_for(self, direction: Direction) -> Toxics:
        return self.run.options.toxics if self._faulted(direction) else Toxics()

    def _side(self, direction: Direction) -> Connection | None:
        """The connection a direction's bytes go to (the side its fault hits)."""
        return self.client if direction is Direction.DOWN else self.upstream

    # -- set-up ----------------------------------------------------------------------------

    def start(self) -> None:
        run = self.run
        assert run.server is not None
        assert run.options.upstream is not None
        host, port = run.options.upstream
        self.client.pause_reading("upstream")
        self.upstream = run.server.open_connection(
            host, port, _UpstreamHandler(self), timeout_s=run.options.connect_timeout_s
        )
        toxics = run.options.toxics
        if toxics.timeout_s is not None:
            self.timers.append(self.client.call_later(toxics.timeout_s, self._timeout))

    def upstream_open(self) -> None:
        assert self.upstream is not None
        up_conn, client = self.upstream, self.client
        self.up = _Pipe(up_conn, self._toxic_for(Direction.UP), self.run,
                        lambda full: self._hold(client, full), client)  # fmt: skip
        self.down = _Pipe(client, self._toxic_for(Direction.DOWN), self.run,
                          lambda full: self._hold(up_conn, full), client)  # fmt: skip
        if self._start_relay():
            return
        trigger = self.run.options.trigger
        if self.action is Action.OK:
            trigger = None
        due_now = trigger is not None and (
            trigger.at_once or (trigger.kind is TriggerKind.AFTER_MS and not trigger.value)
        )
        if not due_now and self.run.enabled and self.run.options.toxics.limit_bytes == 0:
            # Nothing to pass, so nothing to wait for (as `--after-bytes 0`): waiting for a
            # first byte instead left a silent client, or a server that waits to be spoken
            # to, connected for good. (A fault due now comes first, as it did.)
            self._close_both("limit")
            return
        client.resume_reading("upstream")
        if trigger is None:
            return
        if due_now:
            self.fire()
        elif trigger.kind is TriggerKind.AFTER_MS:
            started = self.client.started_at
            delay = max(0.0, started + float(trigger.value or 0) - time.monotonic())
            self.timers.append(self.client.call_later(delay, self._timer_fire))
        elif trigger.kind is TriggerKind.ON_IDLE:
            self.idle_timer = self.client.call_later(float(trigger.value or 0), self._idle)

    def _start_relay(self) -> bool:
        """Hand a faithful connection to a splice relay thread (Linux); False: stay here."""
        from netprobe.sockets import SPLICE_AVAILABLE

        run, upstream = self.run, self.upstream
        if (
            not SPLICE_AVAILABLE
            or not run.options.splice
            or not run.options.faithful
            or run.relays >= _RELAY_LIMIT
            or not run.relay_fits()
            or upstream is None
            or self.client.transport is None
            or upstream.transport is None
        ):
            return False
        client_sock = self.client.transport.get_extra_info("socket")
        upstream_sock = upstream.transport.get_extra_info("socket")
        if client_sock is None or upstream_sock is None:
            return False
        # Neither transport has read or written a byte yet (the client was paused from its
        # accept, upstream pauses in its on_open), so the relay sees the streams whole.
        try:
            relay = _SpliceRelay(self, client_sock.fileno(), upstream_sock.fileno())
        except OSError:  # no fd for its wake pipe (EMFILE): the event-loop path needs none
            return False
        upstream.pause_reading("relay")
        self.client.pause_reading("relay")
        self.client.resume_reading("upstream")
        self.relay = relay
        run.relays += 1
        self.relay.start()
        return True

    def relay_moved(self, up: bool, count: int) -> None:
        """(relay thread) count more bytes reached one side: keep the counters current."""
        upstream = self.upstream
        assert upstream is not None
        if up:
            self.client.bytes_in += count
            upstream.bytes_out += count
        else:
            upstream.bytes_in += count
            self.client.bytes_out += count

    def relay_done(self, result: Any) -> None:
        """(loop thread) the relay ended: close as a transparent path would."""
        self._stop_relay()
        client, upstream = self.client, self.upstream
        assert upstream is not None
        if result.ended == _RELAY_UNAVAILABLE:
            upstream.resume_reading("relay")
            client.resume_reading("relay")
            return
        if result.ended == "eof":
            self._close_both("eof")
        elif result.ended in ("reset", "error"):
            culprit, other = (client, upstream) if result.reset_by == "a" else (upstream, client)
            reason = "reset" if result.ended == "reset" else "error"
            if culprit is upstream:
                self.upstream_errno = result.errno_name
                # Not the client's reset: the totals' `resets` count client resets only.
                reason = _UPSTREAM_RESET if reason == "reset" else reason
            self.end_reason = reason
            other.abort(reason)  # pass the RST on
            culprit.abort(reason)

    def _stop_relay(self) -> None:
        relay, self.relay = self.relay, None
        if relay is not None:
            relay.stop()
            self.run.relays -= 1

    @staticmethod
    def _hold(conn: Connection, full: bool) -> None:
        if full:
            conn.pause_reading("pipe")
        else:
            conn.resume_reading("pipe")

    # -- data --------------------------------------------------------------------------------

    def data(self, direction: Direction, data: bytes) -> None:
        self.last_rx = time.monotonic()
        pipe = self.up if direction is Direction.UP else self.down
        if pipe is None:
            return
        if self.done_action is Action.HANG:
            return
        if self.run.enabled:
            limit = self.limits[direction]
            if limit.trigger is not None and self._faulted(direction) and not limit.fired:
                try:
                    cut = limit.cut_in(data)
                except FramingError as exc:
                    self._close_both(_framing_reason(exc))
                    return
                if cut is not None:
                    # The first N bytes still go out (a shaping pipe may hold them a while):
                    # close both sides once they have, not before.
                    pipe.push(data[:cut])
                    pipe.seal()
                    pipe.when_drained(lambda: self._close_both("limit"))
                    return
            state = self.states[direction]
            if state.trigger is not None and self._faulted(direction) and not state.fired:
                try:
                    cut = state.cut_in(data)
                except FramingError as exc:
                    self._close_both(_framing_reason(exc))
                    return
                if cut is not None:
                    pipe.push(data[:cut])
                    self.fire()
                    if self.done_action in (Action.SLOW, Action.HALF_CLOSE):
                        pipe.push(data[cut:])
                    return
        pipe.push(data)

    def eof(self, direction: Direction) -> None:
        """The source of `direction` sent FIN: pass it on once the pipe drained."""
        source = self.client if direction is Direction.UP else self.upstream
        ending = None if source is None else self.lingering.pop(source, None)
        if source is not None and ending is not None:
            source.close(ending)  # we ended this side with a FIN: its peer's FIN completes it
            return
        if source is not None and self.done_action is Action.HANG:
            # Its peer left a hung connection, and nothing is forwarded any more: close this
            # side (everything it sent was read, so with a FIN); side_closed sees to the other.
            source.close(self.end_reason or str(Action.HANG))
            return
        pipe = self.up if direction is Direction.UP else self.down
        dest = self._side(direction)
        if dest is None:
            return

        def done() -> None:
            dest.half_close()
            # Both FINs handed on: a FIN received while the other pipe still held bytes (a
            # latency, a bandwidth) closed both sides with those bytes lost.
            self.fins_passed.add(direction)
            if len(self.fins_passed) == 2:
                self._close_both("eof")

        if pipe is None:
            done()
        else:
            pipe.when_drained(done)

    def write_paused(self, conn: Connection, paused: bool) -> None:
        """conn cannot take more: stop (or restart) reading from the other side."""
        other = self.upstream if conn is self.client else self.client
        if other is None:
            return
        if paused:
            other.pause_reading("peer")
        else:
            other.resume_reading("peer")

    def side_closed(self, which: str, conn: Connection, reason: str) -> None:
        # The transport closes the socket right after this callback: the relay thread and
        # the hang watch must let go of the descriptors first.
        self._stop_relay()
        self.run.hangs.discard(conn)
        self.closed[which] = True
        if which == "upstream":
            # The relay may have recorded it already (splice path): a close keeps that errno.
            self.upstream_errno = conn.errno_name or self.upstream_errno
        other = self.upstream if which == "client" else self.client
        # After rst or fin the action owns the other side's ending (an rst may still be
        # waiting for its last bytes to be acknowledged). After a hang the client's leaving
        # ends the upstream too (it is held for the client only), while the upstream's leaving
        # must not end the client's hang: the client is the one meant to time out.
        hung = self.done_action is Action.HANG
        owned = self.done_action in (Action.RST, Action.FIN) or (hung and which == "upstream")
        first_reset = reason == "reset" and self.end_reason not in ("reset", _UPSTREAM_RESET)
        if first_reset and (which == "client" or not owned):
            # A reset ends the connection whatever fault came before it (slow and half-close
            # leave the ending to the peers; the record's action and fired tell the fault).
            self.end_reason = _UPSTREAM_RESET if which == "upstream" else "reset"
        if other is not None and not other.is_closing and not owned:
            if reason == "reset":
                # Pass the RST on, as a transparent path would; when the upstream sent it,
                # the client's close says so (it is not a client reset).
                other.abort(_UPSTREAM_RESET if which == "upstream" else "reset")
            elif hung:
                # The hung upstream may hold bytes we never read: a plain close would send
                # RST (TCPAbortOnClose), not the FIN that passes the client's FIN on.
                self._spare(other, self.end_reason or reason)
            else:
                # The client's close carries the record's reason: the totals count that one.
                ending = self.end_reason or reason
                pipe = self.down if which == "upstream" else self.up
                if pipe is None:
                    other.close(ending)
                else:
                    pipe.when_drained(lambda: other.close(ending))
        if self.closed["client"] and (self.upstream is None or self.closed["upstream"]):
            self._finish(reason)

    # -- faults ------------------------------------------------------------------------------

    def _timer_fire(self) -> None:
        if not self.client.is_closing:
            self.fire()

    def _idle(self) -> None:
        trigger = self.run.options.trigger
        if self.client.is_closing or trigger is None or self.fired_at is not None:
            return
        left = self.last_rx + float(trigger.value or 0) - time.monotonic()
        if left > 0:
            self.idle_timer = self.client.call_later(left, self._idle)
            return
        self.fire()

    def _timeout(self) -> None:
        if self.run.enabled and not self.client.is_closing:
            for pipe in (self.up, self.down):
                if pipe is not None:
                    pipe.drop()
            self._close_both("timeout")

    def _close_both(self, reason: str) -> None:
        self.end_reason = self.end_reason or reason
        for conn in (self.client, self.upstream):
            if conn is not None and not conn.is_closing:
                conn.close(self.end_reason)  # the totals count the record's reason

    def fire(self) -> None:
        """Apply this session's action to the faulted side(s)."""
        for state in self.states.values():
            state.fired = True
        if not self.run.enabled or self.fired_at is not None:
            return
        self.fired_at = time.monotonic() - self.client.started_at
        action = self.action
        self.done_action = action
        if action is not Action.SLOW:  # slow changes the pace, not how the connection ends
            self.end_reason = str(action)
        faulted = [d for d in (Direction.DOWN, Direction.UP) if self._faulted(d)]
        others = [d for d in (Direction.DOWN, Direction.UP) if not self._faulted(d)]
        if action is Action.RST:
            timed = _timed(self.run.options.trigger)
            for d in faulted:
                self._act_after_drain(d, lambda side: _abort_flushed(side, "rst", timed=timed))
            for d in others:
                self._close_after_drain(d, "rst")
        elif action in (Action.FIN, Action.HALF_CLOSE):
            for d in faulted:
                self._act_after_drain(
                    d, self._half_close if action is Action.HALF_CLOSE else self._fin
                )
            if action is Action.FIN:
                for d in others:
                    self._close_after_drain(d, "fin")
        elif action is Action.HANG:
            for d in (Direction.DOWN, Direction.UP):
                self._pipe(d).drop()
                side = self._side(d)
                if side is not None:
                    side.pause_reading("hang")
                    self.run.hangs.add(side, self._hung_peer_left, fin_leaves=side is self.upstream)
        elif action is Action.SLOW:
            for d in faulted:
                self._pipe(d).set_rate(self.run.options.slow_rate)

    @staticmethod
    def _hung_peer_left(side: Connection) -> None:
        # A hung side's peer sent FIN or RST: it sends no more, so reading (and dropping,
        # see data) opens no window it could use. The read brings its FIN to eof() or its
        # RST to side_closed(), which end the connection as after any other fault.
        for key in ("hang", "peer", "pipe"):
            side.resume_reading(key)

    def _act_after_drain(self, direction: Direction, act: Callable[[Connection], None]) -> None:
        """Forward nothing more towards this side; act on it once the bytes held are out."""
        side = self._side(direction)
        pipe = self._pipe(direction)
        pipe.seal()
        if side is not None:
            pipe.when_drained(lambda: act(side))

    @staticmethod
    def _half_close(side: Connection) -> None:
        side.half_close()

    def _fin(self, side: Connection) -> None:
        side.half_close()
        self.lingering[side] = "fin"
        self.timers.append(side.call_later(_FIN_LINGER_S, side.close, "fin"))

    def _close_after_drain(self, direction: Direction, reason: str) -> None:
        """Close the side an action spares once its bytes are out, with a FIN, not an RST."""
        side = self._side(direction)
        pipe = self._pipe(direction)
        pipe.seal()  # nothing more goes to it: a write after its FIN would fail
        if side is not None:
            pipe.when_drained(lambda: self._spare(side, reason))

    def _spare(self, side: Connection, reason: str) -> None:
        # As serve's fin: FIN now, then read (and drop: the pipe its bytes would take is
        # sealed) until the peer's FIN or the linger. A plain close with bytes from the peer
        # still unread would send RST instead (TCPAbortOnClose, SOCKETS.md §5).
        if side.is_closing:
            return
        self.lingering[side] = reason
        side.half_close()
        self.run.hangs.discard(side)  # read from now on: the loop sees its peer's FIN
        for key in ("peer", "pipe", "hang"):  # holds for a direction that carries nothing more
            side.resume_reading(key)
        self.timers.append(side.call_later(_SPARE_LINGER_S, side.close, reason))

    def _pipe(self, direction: Direction) -> _Pipe:
        pipe = self.up if direction is Direction.UP else self.down
        assert pipe is not None
        return pipe

    def _finish(self, reason: str) -> None:
        if self.emitted:
            return
        self.emitted = True
        self.run.sessions -= 1
        for timer in self.timers:
            timer.cancel()
        self.timers.clear()
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        for pipe in (self.up, self.down):
            if pipe is not None:
                pipe.drop()
        client = self.client
        # A stop closed the client first: its reason is what the totals count.
        if client.reason == CloseReason.SHUTDOWN:
            reason = client.reason
        else:
            reason = self.end_reason or reason
        _emit_proxy_record(
            self.run, client, self.upstream, self.action, self.fired_at, reason, self.upstream_errno
        )


def _emit_proxy_record(
    run: _Run,
    client: Connection,
    upstream: Connection | None,
    action: Action,
    fired_at: float | None,
    reason: str,
    upstream_errno: str | None,
) -> None:
    """The one record of a proxied connection, counted in the run's totals."""
    run.account(action, fired_at is not None)
    trigger = run.options.trigger
    run.emit(
        {
            "conn_id": client.conn_id,
            "peer": client.peer,
            "trigger": trigger.describe() if trigger is not None else None,
            "action": str(action),
            "direction": str(run.options.direction),
            "fired": fired_at is not None,
            "fired_at_s": None if fired_at is None else round(fired_at, 6),
            "bytes_in": client.bytes_in,
            "bytes_out": client.bytes_out,
            "upstream_bytes_out": 0 if upstream is None else upstream.bytes_out,
            "upstream_bytes_in": 0 if upstream is None else upstream.bytes_in,
            "duration_s": round(time.monotonic() - client.started_at, 6),
            "reason": reason,
            "upstream_errno": upstream_errno,
        }
    )


class _SpliceRelay:
    """A thread that runs sockets.splice_relay for one session, stoppable from the loop."""

    def __init__(self, session: _Session, client_fd: int, upstream_fd: int) -> None:
        self.session = session
        self.fds = (client_fd, upstream_fd)
        self.wake_r, self.wake_w = os.pipe()
        self.loop = session.client.server.loop
        self.thread = threading.Thread(target=self._run, name="reset-relay", daemon=True)
        self.stopped = False

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        from netprobe.sockets import RelayResult, errno_name, splice_relay

        try:
            result = splice_relay(
                self.fds[0], self.fds[1], wake_fd=self.wake_r, on_moved=self.session.relay_moved
            )
        except OSError as exc:
            # Its pipes could not be made (EMFILE at the fd limit): nothing has moved, so the
            # event loop can carry this connection instead.
            result = RelayResult(0, 0, _RELAY_UNAVAILABLE, None, errno_name(exc.errno))
        except Exception:  # a bug here must still hand the connection back
            result = RelayResult(0, 0, "error")
        if result.ended != "stop":
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                self.loop.call_soon_threadsafe(self.session.relay_done, result)

    def stop(self) -> None:
        """Wake the thread, wait for it (it never blocks elsewhere), free the wake pipe."""
        if self.stopped:
            return
        self.stopped = True
        with contextlib.suppress(OSError):
            os.write(self.wake_w, b"x")
        if self.thread is not threading.current_thread():
            self.thread.join(2.0)
        os.close(self.wake_r)
        os.close(self.wake_w)


class _ClientHandler(Handler):
    __slots__ = ("run", "session")

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.session: _Session | None = None

    def on_open(self, conn: Connection) -> None:
        self.session = _Session(self.run, conn)
        self.session.start()

    def on_data(self, conn: Connection, data: bytes) -> None:
        if self.session is not None:
            self.session.data(Direction.UP, data)

    def on_eof(self, conn: Connection) -> None:
        if self.session is not None:
            self.session.eof(Direction.UP)

    def on_write_paused(self, conn: Connection) -> None:
        if self.session is not None:
            self.session.write_paused(conn, True)

    def on_write_resumed(self, conn: Connection) -> None:
        if self.session is not None:
            self.session.write_paused(conn, False)

    def on_close(self, conn: Connection, reason: str) -> None:
        if self.session is not None:
            self.session.side_closed("client", conn, reason)
        else:
            # Accepted, but a stop cancelled its set-up before on_open: the server core
            # counts it, so it ends with its one record too (it passed nothing).
            _emit_proxy_record(self.run, conn, None, Action.OK, None, reason, None)


class _UpstreamHandler(Handler):
    __slots__ = ("session",)

    def __init__(self, session: _Session) -> None:
        self.session = session

    def on_open(self, conn: Connection) -> None:
        self.session.upstream_open()

    def on_data(self, conn: Connection, data: bytes) -> None:
        self.session.data(Direction.DOWN, data)

    def on_eof(self, conn: Connection) -> None:
        self.session.eof(Direction.DOWN)

    def on_write_paused(self, conn: Connection) -> None:
        self.session.write_paused(conn, True)

    def on_write_resumed(self, conn: Connection) -> None:
        self.session.write_paused(conn, False)

    def on_close(self, conn: Connection, reason: str) -> None:
        self.session.side_closed("upstream", conn, reason)


@dataclass(slots=True)
class ProxyControl:
    """Run-time switch of a proxy's faults (SIGUSR1 flips it)."""

    run: _Run

    @property
    def enabled(self) -> bool:
        return self.run.enabled

    def toggle(self) -> bool:
        """Flip faults on/off; returns the new state."""
        self.run.enabled = not self.run.enabled
        return self.run.enabled


def make_proxy(
    config: ServerConfig,
    options: ResetOptions,
    *,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    on_ready: Callable[[Bound], None] | None = None,
    on_toggle: Callable[[bool, ServerSummary], None] | None = None,
) -> tuple[Server, FaultTotals, ProxyControl]:
    """Build the `reset proxy` server (not started).

    Args:
        on_toggle: called after SIGUSR1 flipped the faults, with the new state and totals.

    Returns:
        (server, fault totals filled in as it runs, the control to flip faults).
    """
    run = _Run(options, on_record, "reset proxy")
    control = ProxyControl(run)

    def flipped(summary: ServerSummary) -> None:
        state = control.toggle()
        if on_toggle is not None:
            on_toggle(state, summary)

    server = Server(
        config,
        lambda: _ClientHandler(run),
        on_ready=on_ready,
        on_totals=flipped,
    )
    run.server = server
    return server, run.totals, control
