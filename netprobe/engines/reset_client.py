"""`reset client`: connect, send, then abort with RST at the trigger, N times. Does I/O.

Each attempt runs in a worker thread on blocking-with-deadline sockets from the socket core;
--concurrency bounds the workers. What the server did before our reset (bytes it sent back,
whether it closed or reset first) is recorded per connection.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Generator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from netprobe.engines.reset_faults import Trigger, TriggerKind
from netprobe.errors import DeadlineExceeded, NetworkError, PeerResetError
from netprobe.results import ConnectState
from netprobe.sockets import (
    Resolved,
    abort_connection,
    connect_nonblocking,
    read_queued,
    recv_some,
    reset_counting_unsent,
    send_queue_bytes,
    send_some,
)

__all__ = ["ClientReset", "ClientSummary", "Interrupted", "generated_stream", "run_reset_client"]

CLIENT_TRIGGERS = frozenset({TriggerKind.ON_CONNECT, TriggerKind.AFTER_BYTES, TriggerKind.AFTER_MS})

_CHUNK = 16 * 1024  # one send between two looks at the receive side
_PEEK_S = 0.001  # how long one look at the receive side may wait
# The longest a worker waits (on a stalled send, or for a server's reply) before it looks
# whether the run is being stopped (Ctrl-C): a stop must not wait out --timeout or --after-ms.
_HALT_POLL_S = 0.05


class _Halted(Exception):
    """The run is stopping: the worker aborts its connection and reports it ended by
    `_Halt.why` ("interrupted" or "duration")."""


class _Halt(threading.Event):
    """Set to stop the running connections; `why` is their `ended_by`: Ctrl-C
    ("interrupted") or the end of --duration ("duration")."""

    def __init__(self) -> None:
        super().__init__()
        self.why = "interrupted"

    def stop(self, why: str) -> None:
        if not self.is_set():
            self.why = why
            self.set()


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during run_reset_client: `rest` holds the records of the connections that were
    still running (each aborted, `ended_by` "interrupted"), so they can be reported too."""

    def __init__(self, rest: list[ClientReset]) -> None:
        super().__init__()
        self.rest = rest


@dataclass(frozen=True, slots=True)
class ClientReset:
    """One connection of `reset client`.

    Attributes:
        conn: 1-based connection number.
        target: the address connected to.
        state: the connect outcome (open, refused, timeout, ...), "reset" when the server
            reset first.
        errno_name: errno of a failed connect or of the server's reset.
        trigger: the trigger that ended the connection ("on-connect", "after-bytes 5000").
        action: what the client did: "rst", or "none" when the server ended it first.
        ended_by: "client-rst", "server-fin" (it closed first), "server-rst" (it reset
            first), "send-stalled" (the server stopped reading: a send timed out, state
            "timeout"), "interrupted" (Ctrl-C) or "duration" (the run's --duration ended:
            aborted, or a connect given up, state "timeout"; neither counts as failed), or the
            connect state when no connection was made.
        bytes_out: bytes the client sent that the server acknowledged (the RST discards the rest).
        bytes_in: bytes the server sent back before the reset.
        server_closed_first: the server closed (EOF) before the client's reset.
        connect_s: connect latency.
        elapsed_s: from connect() to the reset.
    """

    conn: int
    target: str
    state: ConnectState
    errno_name: str | None
    trigger: str
    action: str
    ended_by: str
    bytes_out: int
    bytes_in: int
    server_closed_first: bool
    connect_s: float
    elapsed_s: float
    kind: str = "reset client"


@dataclass(slots=True)
class ClientSummary:
    """Totals of one `reset client` run."""

    connections: int = 0
    resets_sent: int = 0
    server_closed_first: int = 0
    server_reset_first: int = 0
    failed: int = 0
    bytes_out: int = 0
    bytes_in: int = 0

    def add(self, result: ClientReset) -> None:
        self.connections += 1
        self.bytes_out += result.bytes_out
        self.bytes_in += result.bytes_in
        if result.action == "rst":  # ours: also after a server's FIN, or a stalled send
            self.resets_sent += 1
        if result.ended_by == "server-fin":
            self.server_closed_first += 1
        elif result.ended_by == "server-rst":
            self.server_reset_first += 1
        elif result.ended_by in ("interrupted", "duration"):
            pass  # cut short by the run's end: neither the server's doing nor a failure
        elif result.ended_by != "client-rst":
            self.failed += 1


def generated_stream(size: int, offset: int = 0) -> bytes:
    """`size` bytes of the generated stream starting at `offset` (a repeating 0..255 ramp)."""
    ramp = bytes(range(256))
    start = offset % 256
    reps = (start + size) // 256 + 1
    return (ramp * reps)[start : start + size]


class _Peer:
    """What the server has done so far on one connection."""

    def __init__(self) -> None:
        self.bytes_in = 0
        self.bytes_out = (
            0  # ours, counted as the kernel takes them; less the unacknowledged at the RST
        )
        self.closed = False  # EOF seen
        self.reset_errno: str | None = None

    @property
    def ended(self) -> bool:
        return self.closed or self.reset_errno is not None

    def look(self, sock: Any, wait_s: float) -> None:
        """Read whatever the server sent, waiting at most `wait_s` for the first byte."""
        # recv_some refuses a deadline already past, so even "no wait" waits a moment.
        deadline = time.monotonic() + max(wait_s, _PEEK_S)
        while not self.ended:
            try:
                data = recv_some(sock, 65536, deadline)
            except DeadlineExceeded:
                return
            except PeerResetError as exc:
                self.reset_errno = exc.errno_name or "ECONNRESET"
                return
            if not data:
                self.closed = True
                return
            self.bytes_in += len(data)
            deadline = time.monotonic() + 0.0001  # drain what is queued, then go on


def _one_client(
    conn: int,
    target: Resolved,
    shown: str,
    trigger: Trigger,
    data: bytes | None,
    timeout_s: float,
    halt: _Halt,
) -> ClientReset:
    start = time.monotonic()
    # A connect that gets no answer (a full backlog drops SYNs) would hold Ctrl-C up for
    # --timeout: `halt` ends its wait.
    outcome = connect_nonblocking(target, deadline=start + timeout_s, keep=True, cancel=halt)
    if outcome.state is not ConnectState.OPEN or outcome.sock is None:
        # A server that resets at accept can beat connect()'s own wake-up: SO_ERROR then
        # reads ECONNRESET. The handshake did complete, so the server reset first.
        ended_by = "server-rst" if outcome.state is ConnectState.RESET else str(outcome.state)
        if outcome.cancelled:
            ended_by = halt.why
        return ClientReset(
            conn, shown, outcome.state, outcome.errno_name, trigger.describe(), "none",
            ended_by, 0, 0, False, outcome.elapsed_s, outcome.elapsed_s,
        )  # fmt: skip
    sock = outcome.sock
    peer = _Peer()
    stalled = halted = False
    began = time.monotonic()
    try:
        if trigger.kind is TriggerKind.AFTER_BYTES:
            _send_until(sock, peer, data, int(trigger.value or 0), None, timeout_s, halt)
        elif trigger.kind is TriggerKind.AFTER_MS:
            stop_at = began + float(trigger.value or 0.0)
            _send_until(sock, peer, data, None, stop_at, timeout_s, halt)
            while not peer.ended and time.monotonic() < stop_at:
                if halt.is_set():
                    raise _Halted
                wait = min(_HALT_POLL_S, max(0.0, stop_at - time.monotonic()))
                peer.look(sock, wait)
        peer.look(sock, 0.0)  # what already arrived counts as "before the reset"
        _let_the_server_take_it(sock, peer, halt, timed=trigger.kind is TriggerKind.AFTER_MS)
    except NetworkError as exc:
        peer.reset_errno = peer.reset_errno or exc.errno_name or "error"
        # A send took the RST's error: what the server sent before it is still readable.
        peer.bytes_in += read_queued(sock)
    except DeadlineExceeded:
        # The server stopped reading and our send stalled: a result for this connection
        # (still ended by our RST), not the end of the whole run.
        stalled = True
    except _Halted:
        halted = True
    finally:
        # bytes_out keeps what reached the server: the RST discards what was never sent (to
        # a server that stopped reading, at a Ctrl-C; a slow one is waited for above). The
        # count and the RST are one step: a server reading in between would otherwise get
        # bytes counted as never sent.
        peer.bytes_out -= reset_counting_unsent(sock)
        abort_connection(sock)
    elapsed = time.monotonic() - start
    if halted and peer.reset_errno is None:
        ended_by, state, action = halt.why, ConnectState.OPEN, "rst"
    elif stalled and peer.reset_errno is None:
        ended_by, state, action = "send-stalled", ConnectState.TIMEOUT, "rst"
    elif peer.reset_errno is not None:
        ended_by, state, action = "server-rst", ConnectState.RESET, "none"
    elif peer.closed:
        ended_by, state, action = "server-fin", ConnectState.OPEN, "rst"
    else:
        ended_by, state, action = "client-rst", ConnectState.OPEN, "rst"
    return ClientReset(
        conn, shown, state, peer.reset_errno, trigger.describe(), action, ended_by,
        peer.bytes_out, peer.bytes_in, peer.closed, outcome.elapsed_s, elapsed,
    )  # fmt: skip


# The RST waits for the server to take what we sent (a RST discards what is still queued,
# SOCKETS.md §5) while it keeps reading: at most this long without progress (see
# engines/reset.py: a slow reader's ACKs come about 128 KiB apart). After a time trigger it
# waits at most _RST_TIMED_MAX_S in all: the RST keeps its moment.
_RST_FLUSH_S = 2.0
_RST_TIMED_MAX_S = 1.0


def _let_the_server_take_it(sock: Any, peer: _Peer, halt: _Halt, *, timed: bool) -> None:
    """Wait until the server has acknowledged what we sent, while it makes progress (after
    a time trigger, `timed`, at most _RST_TIMED_MAX_S in all: the RST keeps its moment).

    Without it the RST threw away what sat in our send queue: `--after-bytes 1MB` to a
    server reading 1 MB/s delivered 87 KB, and bytes_out said 1,000,000.
    """
    left = send_queue_bytes(sock) or 0
    give_up = time.monotonic() + _RST_FLUSH_S
    cap = time.monotonic() + _RST_TIMED_MAX_S if timed else float("inf")
    wait_s = _PEEK_S  # 1 ms at first, then less often (a slow server can take seconds)
    while left and not peer.ended and time.monotonic() < min(give_up, cap):
        if halt.is_set():
            raise _Halted
        peer.look(sock, wait_s)  # replies count as "before the reset" too
        wait_s = min(wait_s * 2, _HALT_POLL_S / 2)
        now_left = send_queue_bytes(sock) or 0
        if now_left < left:
            give_up = time.monotonic() + _RST_FLUSH_S
        left = now_left


def _send_until(
    sock: Any,
    peer: _Peer,
    data: bytes | None,
    limit: int | None,
    stop_at: float | None,
    timeout_s: float,
    halt: _Halt,
) -> None:
    """Send the stream until `limit` bytes or `stop_at`, reading replies in between.

    DATA repeats to reach `limit`; without a limit it is sent once. The generated stream
    has no end of its own. Stops early when the server closes or resets. The count is kept in
    peer.bytes_out as the kernel takes the bytes.

    Raises:
        DeadlineExceeded: a send made no progress for `timeout_s` (before `stop_at`).
        _Halted: the run is stopping.
    """
    while not peer.ended:
        sent = peer.bytes_out
        if limit is not None and sent >= limit:
            break
        if stop_at is not None and time.monotonic() >= stop_at:
            break
        if data is not None and limit is None and sent >= len(data):
            break
        if limit is not None:
            want = min(_CHUNK, limit - sent)
        elif data is not None:
            want = min(_CHUNK, len(data) - sent)  # once: what is left of it, never a repeat
        else:
            want = _CHUNK
        if data is None:
            chunk = generated_stream(want, sent)
        elif data:
            start = sent % len(data)
            chunk = (data[start:] + data * (want // len(data) + 1))[:want]
        else:
            break
        deadline = time.monotonic() + timeout_s
        if stop_at is not None:
            deadline = min(deadline, max(stop_at, time.monotonic() + _PEEK_S))
        view = memoryview(chunk)
        while view:
            if halt.is_set():
                raise _Halted
            now = time.monotonic()
            if now >= deadline:
                if stop_at is not None and now >= stop_at:
                    return
                raise DeadlineExceeded("send")
            try:
                count = send_some(sock, view, min(deadline, now + _HALT_POLL_S))
            except DeadlineExceeded:
                continue  # the loop looks at the stop flag and the real deadline
            peer.bytes_out += count
            view = view[count:]
        peer.look(sock, _PEEK_S)


def _next_done(
    pending: deque[Future[ClientReset | None]],
    interrupt: threading.Event | None,
    halt: _Halt,
    stop_at: float | None,
) -> ClientReset | None:
    """The oldest connection's result once it is done; None for one that never started (the
    run ended first). Waited for in slices, so a Ctrl-C flag is seen within _HALT_POLL_S (and
    raised), and the end of --duration stops the running connections as it passes."""
    future = pending[0]
    while not wait((future,), timeout=_HALT_POLL_S).done:
        if interrupt is not None and interrupt.is_set():
            raise KeyboardInterrupt
        if stop_at is not None and time.monotonic() >= stop_at:
            halt.stop("duration")
    result = future.result()
    pending.popleft()
    return result


def run_reset_client(
    target: Resolved,
    shown: str,
    *,
    trigger: Trigger,
    data: bytes | None,
    count: int,
    concurrency: int,
    timeout_s: float,
    duration_s: float | None = None,
    stop: threading.Event | None = None,
    on_start: Callable[[int], None] | None = None,
    interrupt: threading.Event | None = None,
) -> Generator[ClientReset, None, None]:
    """Run `count` aborting connections, at most `concurrency` at once; yield each result.

    Args:
        target: the resolved address (TCP or Unix).
        shown: the address as shown in results.
        trigger: on-connect, after-bytes N (bytes sent) or after-ms T.
        data: bytes to send (repeated for after-bytes), or None for the generated stream.
        timeout_s: per-connection connect and send timeout.
        duration_s: the run's length: no connection starts after it, and the ones still
            running then are aborted (`ended_by` "duration").
        stop: set it to stop starting connections.
        interrupt: set it (a SIGINT handler) for Ctrl-C: the running connections are aborted
            and Interrupted carries their records. A KeyboardInterrupt does the same.

    Yields results in connection-number order (a slow one holds back the later ones, but
    at most `concurrency` run at once).
    """
    started = time.monotonic()
    stop_at = None if duration_s is None else started + duration_s
    pending: deque[Future[ClientReset | None]] = deque()
    halt = _Halt()
    # Every finished connection, by number, filled in by the workers themselves: a Ctrl-C can
    # land between pool.submit() and pending.append() (submit starts a thread, and the
    # worker may connect before submit returns), and that connection must still be reported.
    finished: dict[int, ClientReset] = {}
    reported = 0  # connections 1..reported have been yielded
    # Workers running now. The pool cannot be asked: a Ctrl-C inside submit() can leave a
    # worker that already runs out of the threads its shutdown() waits for.
    active: set[int] = set()

    def work(conn: int) -> ClientReset | None:
        active.add(conn)
        try:
            if halt.is_set() or (stop_at is not None and time.monotonic() >= stop_at):
                return None  # Ctrl-C or the end of the run came first: it never starts
            result = _one_client(conn, target, shown, trigger, data, timeout_s, halt)
            finished[conn] = result
            return result
        finally:
            active.discard(conn)

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        try:
            for conn in range(1, count + 1):
                while len(pending) >= concurrency:
                    result = _next_done(pending, interrupt, halt, stop_at)
                    if result is not None:
                        reported = result.conn
                        finished.pop(reported, None)  # only the unreported are kept
                        yield result
                # Looked at after the wait for a free slot: that wait can outlast the run.
                if interrupt is not None and interrupt.is_set():
                    raise KeyboardInterrupt
                if stop is not None and stop.is_set():
                    break
                if halt.is_set():
                    break
                if stop_at is not None and time.monotonic() >= stop_at:
                    halt.stop("duration")  # the running ones end now, not a poll slice later
                    break
                if on_start is not None:
                    on_start(conn)
                pending.append(pool.submit(work, conn))
            while pending:
                result = _next_done(pending, interrupt, halt, stop_at)
                if result is not None:
                    reported = result.conn
                    finished.pop(reported, None)
                    yield result
        except KeyboardInterrupt:
            halt.stop("interrupted")  # the workers abort within _HALT_POLL_S and report it
            pool.shutdown(wait=True)
            # Workers see the halt within _HALT_POLL_S (a connect in progress too, through its
            # cancel flag); the timeout bounds this wait should one not.
            give_up = time.monotonic() + timeout_s + 1.0
            while active and time.monotonic() < give_up:
                time.sleep(_HALT_POLL_S / 5)
            rest = [finished[conn] for conn in sorted(finished) if conn > reported]
            raise Interrupted(rest) from None
        finally:
            # Ctrl-C (or a consumer that stops early): the workers abort their connections
            # within _HALT_POLL_S, so leaving the pool does not wait out --after-ms/--timeout.
            halt.set()
