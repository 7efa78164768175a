"""The one connection engine: many non-blocking connects in flight on one poll loop.

port-check, backlog and doctor all drive their connects through `run_connects`. It does I/O
(sockets, epoll) and nothing else: no printing, no policy about what a state means.

Strategy: a bounded set of sockets in flight, each registered for writability; attempts
start in order, so their deadlines are in order too and expire from the front of a deque.
Memory is constant in the number of jobs: the job iterator is consumed lazily and each
finished attempt is yielded and forgotten.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import select
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from netprobe.results import ConnectState
from netprobe.sockets import classify_errno, errno_name, set_linger_zero

__all__ = ["ConnectJob", "ConnectResult", "ConnectorStats", "run_connects"]

_IN_PROGRESS = frozenset({errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY, errno.EAGAIN})
_OUT_OF_FDS = frozenset({errno.EMFILE, errno.ENFILE})


@dataclass(frozen=True, slots=True)
class ConnectJob:
    """One attempt to make.

    Attributes:
        key: anything the caller wants back with the result (e.g. the target and port).
        family: socket.AF_INET, AF_INET6 or AF_UNIX.
        sockaddr: what connect() takes.
        source: local address to bind before connecting (None: the kernel chooses).
    """

    key: Any
    family: int
    sockaddr: Any
    source: str | None = None


@dataclass(slots=True)
class ConnectResult:
    """How one attempt ended.

    Attributes:
        job: the job this answers.
        state: OPEN, REFUSED, TIMEOUT, UNREACHABLE, RESET or ERROR.
        errno_name: symbolic errno; None for OPEN and for our own timeout.
        started_at: monotonic time connect() was called.
        elapsed_s: connect latency (time to the verdict).
        held_s: how long an OPEN connection was held before release (0 without hold).
        ended_by: for held connections, how the hold ended: "hold" (we closed it), "reset"
            (the peer sent RST: ECONNRESET), "eof" (the peer closed) or "stop" (run ended).
    """

    job: ConnectJob
    state: ConnectState
    errno_name: str | None
    started_at: float
    elapsed_s: float
    held_s: float = 0.0
    ended_by: str | None = None


@dataclass(slots=True)
class ConnectorStats:
    """Running figures of one run_connects call (read them while iterating or after)."""

    started: int = 0
    in_flight: int = 0
    held: int = 0
    peak_held: int = 0
    concurrency: int = 0
    fd_backoffs: int = 0  # times EMFILE/ENFILE made the connector lower its concurrency
    lowest_concurrency: int = 0
    extra: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class _Attempt:
    job: ConnectJob
    sock: socket.socket
    started_at: float
    deadline: float
    done: bool = False
    connected_at: float = 0.0
    release_at: float = 0.0


def run_connects(
    jobs: Iterable[ConnectJob],
    *,
    concurrency: int,
    timeout_s: float,
    rate: float | None = None,
    hold_s: float = 0.0,
    stop_at: float | None = None,
    abortive_close: bool = True,
    stats: ConnectorStats | None = None,
) -> Iterator[ConnectResult]:
    """Run the jobs with at most `concurrency` sockets open; yield each result as it ends.

    Args:
        concurrency: sockets in flight at once (connecting plus held).
        timeout_s: per-attempt connect timeout.
        rate: at most this many new attempts per second (None: as fast as possible).
        hold_s: keep each established connection open this long before closing it; the
            result is then yielded at release, with `ended_by` telling how the hold ended.
        stop_at: monotonic time at which the run ends: no attempt starts, pending ones end
            as TIMEOUT with ended_by "stop", held ones are released.
        abortive_close: close with RST (no TIME_WAIT, as nmap does) instead of FIN.
        stats: filled in as the run goes (for progress display and reports).

    Yields results in completion order. Running out of file descriptors lowers the
    concurrency to what is open at that moment (counted in stats.fd_backoffs); with nothing
    in flight the job ends as ERROR EMFILE.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    st = stats if stats is not None else ConnectorStats()
    st.concurrency = st.lowest_concurrency = concurrency
    poller = select.epoll() if hasattr(select, "epoll") else None
    if poller is None:  # pragma: no cover - non-Linux fallback
        yield from _run_connects_poll(jobs, concurrency, timeout_s, rate, hold_s, stop_at, st)
        return
    pending: dict[int, _Attempt] = {}  # fd -> connecting attempt
    held: dict[int, _Attempt] = {}  # fd -> established attempt being held
    order: collections.deque[_Attempt] = collections.deque()  # connecting, in start order
    held_order: collections.deque[_Attempt] = collections.deque()  # held, in release order
    job_iter = iter(jobs)
    exhausted = False
    limit = concurrency
    interval = 1.0 / rate if rate else 0.0
    next_start = time.monotonic()
    out: list[ConnectResult] = []
    try:
        while True:
            now = time.monotonic()
            stopping = stop_at is not None and now >= stop_at
            # Start new attempts while there is room (and the rate allows).
            while not exhausted and not stopping and len(pending) + len(held) < limit:
                if interval and now < next_start:
                    break
                job = next(job_iter, None)
                if job is None:
                    exhausted = True
                    break
                attempt = _start(job, now, timeout_s, out)
                if attempt is _NO_FD:
                    if pending or held:
                        limit = max(1, len(pending) + len(held))
                        st.fd_backoffs += 1
                        st.lowest_concurrency = min(st.lowest_concurrency, limit)
                        job_iter = _prepend(job, job_iter)
                        break
                    out.append(_failed(job, now, errno.EMFILE))
                elif attempt is not None:
                    assert isinstance(attempt, _Attempt)
                    pending[attempt.sock.fileno()] = attempt
                    order.append(attempt)
                    poller.register(attempt.sock.fileno(), select.EPOLLOUT)
                st.started += 1
                if interval:
                    next_start = max(next_start + interval, now - 1.0)
                now = time.monotonic()
            if stopping:
                exhausted = True
            st.in_flight, st.held = len(pending), len(held)
            st.peak_held = max(st.peak_held, st.held)
            if out:
                yield from out
                out.clear()
            if exhausted and not pending and not held:
                return
            # Sleep until the next event, the next deadline, the next release or start.
            wake = []
            if order:
                wake.append(order[0].deadline)
            if held_order:
                wake.append(held_order[0].release_at)
            if interval and not exhausted and len(pending) + len(held) < limit:
                wake.append(next_start)
            if stop_at is not None and not stopping:
                wake.append(stop_at)
            timeout = max(0.0, min(wake) - time.monotonic()) if wake else -1
            for fd, mask in poller.poll(timeout if timeout >= 0 else -1, 1024):
                attempt_or_none = pending.pop(fd, None)
                now = time.monotonic()
                if attempt_or_none is not None:
                    _finish_connect(
                        attempt_or_none, now, hold_s, poller, held, held_order, out, abortive_close
                    )
                    continue
                held_attempt = held.get(fd)
                if held_attempt is None:
                    continue
                how = _peer_ending(held_attempt.sock, mask)
                if how == "data":
                    # The peer talks; we only care how it ends, so stop waking on input.
                    poller.modify(fd, select.EPOLLRDHUP)
                    continue
                del held[fd]
                _end_hold(held_attempt, now, how, out)
                held_attempt.sock.close()
            now = time.monotonic()
            stop_now = stop_at is not None and now >= stop_at
            while order and (order[0].done or order[0].deadline <= now or stop_now):
                attempt = order.popleft()
                if attempt.done:
                    continue
                attempt.done = True
                pending.pop(attempt.sock.fileno(), None)
                attempt.sock.close()  # SYN-SENT: closing sends nothing (tcp_need_reset)
                out.append(
                    ConnectResult(
                        attempt.job,
                        ConnectState.TIMEOUT,
                        None,
                        attempt.started_at,
                        now - attempt.started_at,
                        ended_by="stop" if attempt.deadline > now else None,
                    )
                )
            while held_order and (
                held_order[0].done or held_order[0].release_at <= now or stop_now
            ):
                attempt = held_order.popleft()
                if attempt.done:
                    continue
                held.pop(attempt.sock.fileno(), None)
                _end_hold(attempt, now, "stop" if attempt.release_at > now else "hold", out)
                _close(attempt.sock, abortive_close)
    finally:
        for attempt in list(pending.values()) + list(held.values()):
            attempt.sock.close()
        poller.close()


_NO_FD = object()


def _prepend(first: ConnectJob, rest: Iterator[ConnectJob]) -> Iterator[ConnectJob]:
    yield first
    yield from rest


def _failed(job: ConnectJob, now: float, code: int | None) -> ConnectResult:
    return ConnectResult(job, classify_errno(code), errno_name(code), now, 0.0)


def _start(job: ConnectJob, now: float, timeout_s: float, out: list[ConnectResult]) -> Any:
    """Create the socket and call connect_ex; an immediate verdict goes straight to out."""
    try:
        sock = socket.socket(job.family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    except OSError as exc:
        if exc.errno in _OUT_OF_FDS:
            return _NO_FD
        out.append(_failed(job, now, exc.errno))
        return None
    try:
        if job.source is not None:
            no_port = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", None)
            if no_port is not None and job.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_IP, no_port, 1)
            sock.bind((job.source, 0))
        code = sock.connect_ex(job.sockaddr)
    except OSError as exc:
        sock.close()
        out.append(_failed(job, now, exc.errno))
        return None
    if code in _IN_PROGRESS and not (job.family == socket.AF_UNIX and code == errno.EAGAIN):
        return _Attempt(job, sock, now, now + timeout_s)
    # Finished at once: a blocking-style verdict (some kernels), or AF_UNIX's EAGAIN when
    # the listener's queue is full (SOCKETS.md §3: no waiting happens for Unix sockets).
    elapsed = time.monotonic() - now
    state = classify_errno(code)
    if state is ConnectState.OPEN:
        _close(sock, True)
        out.append(ConnectResult(job, state, None, now, elapsed))
    else:
        sock.close()
        out.append(ConnectResult(job, state, errno_name(code), now, elapsed))
    return None


def _finish_connect(
    attempt: _Attempt,
    now: float,
    hold_s: float,
    poller: Any,
    held: dict[int, _Attempt],
    held_order: collections.deque[_Attempt],
    out: list[ConnectResult],
    abortive_close: bool,
) -> None:
    attempt.done = True  # the deadline deque drops it lazily
    sock = attempt.sock
    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)  # read once: reading clears it
    elapsed = now - attempt.started_at
    state = classify_errno(code)
    if state is ConnectState.OPEN and hold_s > 0:
        attempt.done = False
        attempt.connected_at = now
        attempt.release_at = now + hold_s
        fd = sock.fileno()
        # Watch the held socket for the peer's RST or FIN while we wait.
        poller.modify(fd, select.EPOLLIN | select.EPOLLRDHUP)
        held[fd] = attempt
        held_order.append(attempt)
        return
    if state is ConnectState.OPEN:
        _close(sock, abortive_close)
        out.append(ConnectResult(attempt.job, state, None, attempt.started_at, elapsed))
    else:
        sock.close()
        # ECONNRESET here means the handshake completed and the peer aborted before we
        # looked (an accept-and-reset server is that fast on loopback).
        ended_by = "reset" if state is ConnectState.RESET else None
        out.append(
            ConnectResult(
                attempt.job, state, errno_name(code), attempt.started_at, elapsed, 0.0, ended_by
            )
        )


def _peer_ending(sock: socket.socket, mask: int) -> str:
    """How a held connection ended when epoll flagged it: "reset", "eof" or "data"."""
    try:
        data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except ConnectionResetError:
        return "reset"
    except BlockingIOError:
        return "eof" if mask & (select.EPOLLRDHUP | select.EPOLLHUP) else "data"
    except OSError:
        return "reset"
    return "eof" if data == b"" else "data"


def _end_hold(attempt: _Attempt, now: float, how: str, out: list[ConnectResult]) -> None:
    attempt.done = True
    state = ConnectState.RESET if how == "reset" else ConnectState.OPEN
    out.append(
        ConnectResult(
            attempt.job,
            state,
            "ECONNRESET" if how == "reset" else None,
            attempt.started_at,
            attempt.connected_at - attempt.started_at,
            held_s=now - attempt.connected_at,
            ended_by=how,
        )
    )


def _close(sock: socket.socket, abortive: bool) -> None:
    if abortive:
        with contextlib.suppress(OSError):
            set_linger_zero(sock)
    sock.close()


def _run_connects_poll(
    jobs: Iterable[ConnectJob],
    concurrency: int,
    timeout_s: float,
    rate: float | None,
    hold_s: float,
    stop_at: float | None,
    st: ConnectorStats,
) -> Iterator[ConnectResult]:  # pragma: no cover - non-Linux fallback
    """Portable fallback: one attempt at a time through the socket core's helper."""
    from netprobe.sockets import Resolved, connect_nonblocking

    for job in jobs:
        if stop_at is not None and time.monotonic() >= stop_at:
            return
        st.started += 1
        start = time.monotonic()
        outcome = connect_nonblocking(
            Resolved(job.family, job.sockaddr), deadline=start + timeout_s, source=job.source
        )
        yield ConnectResult(job, outcome.state, outcome.errno_name, start, outcome.elapsed_s)
        if rate:
            time.sleep(max(0.0, 1.0 / rate - (time.monotonic() - start)))
