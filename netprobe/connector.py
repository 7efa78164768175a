"""The one connection engine: many non-blocking connects in flight on one epoll loop.

port-check, backlog and doctor all drive their connects through `run_connects`. It does I/O
(sockets, epoll, and optionally forked worker processes) and nothing else: no printing, no
policy about what a state means.

Strategy: a bounded set of sockets in flight, each registered for writability; attempts
start in order, so their deadlines are in order too and expire from the front of a deque.
Memory is constant in the number of jobs: the job iterator is consumed lazily and each
finished attempt is yielded and forgotten.

Speed (a 65,535-port loopback scan is the yardstick): on loopback the whole handshake, or
the RST of a closed port, is processed inside connect() itself, so the verdict is known when
connect_ex() returns EINPROGRESS. A second connect_ex() on the same socket reports it
(ECONNREFUSED, 0 once connected, EALREADY while still waiting), which skips the epoll
registration, the wake-up and the per-attempt bookkeeping object; only attempts that really
wait (remote hosts, full accept queues) enter the poll set. That second call also resets a
refused socket (Linux: __inet_stream_connect's sock_error path disconnects it), so the next
attempt reuses it: a closed port costs two syscalls instead of socket, connect, getsockopt
and close. If a kernel does not reset it, reuse switches itself off. The rest of the cost is
the kernel's, so large runs can be split over forked worker processes (`workers`), one per
core, whose results stream back over pipes.

Truthfulness on this host's own addresses: a connect to 127.0.0.1:P (or to any address of
this host's interfaces) whose kernel-chosen source port happens to be P connects the socket
to itself (TCP simultaneous open), and two of our own pending sockets can likewise connect to
each other. Neither is a listener, so such a "handshake" is reported as REFUSED (closed),
never OPEN.
"""

from __future__ import annotations

import _socket
import collections
import contextlib
import errno
import os
import select
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from netprobe.results import ConnectState
from netprobe.sockets import (
    POLL_MAX_S,
    _map_errors,
    classify_connect_errno,
    drain_signal_wake,
    errno_name,
    signal_wake_fd,
)

__all__ = ["ConnectJob", "ConnectResult", "ConnectorStats", "run_connects"]

_OUT_OF_FDS = frozenset({errno.EMFILE, errno.ENFILE})
# Results are handed to the caller in batches of at most this many, so a scan whose verdicts
# all arrive inside connect() still streams instead of finishing before the first yield.
_BATCH = 512


# Not frozen: a frozen dataclass's __init__ costs 3x more, once per port of a scan.
@dataclass(slots=True)
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
    """Running figures of one run_connects call (read them while iterating or after).

    `extra` carries rarer counters: "self_connects" (handshakes with one of our own sockets,
    reported as REFUSED) and "workers" (processes used).
    """

    started: int = 0
    in_flight: int = 0
    held: int = 0
    peak_held: int = 0
    concurrency: int = 0
    fd_backoffs: int = 0  # times EMFILE/ENFILE made the connector lower its concurrency
    lowest_concurrency: int = 0
    extra: dict[str, int] = field(default_factory=dict)
    # The connect times (s) of the connections held right now (one process only; callable
    # from another thread). A held connection's result comes at its release: a run ended
    # before that (a Ctrl-C during a hold) still knows how long their handshakes took.
    held_connect_times: Callable[[], list[float]] = list


@dataclass(slots=True)
class _Attempt:
    job: ConnectJob
    sock: _socket.socket
    started_at: float
    deadline: float
    done: bool = False
    connected_at: float = 0.0
    release_at: float = 0.0
    loop_port: int = 0  # destination port, when ours could be it (0: not indexed)


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
    workers: int = 1,
    on_refused: Callable[[ConnectJob], None] | None = None,
) -> Iterator[ConnectResult]:
    """Run the jobs with at most `concurrency` sockets open; yield each result as it ends.

    Args:
        concurrency: sockets in flight at once (connecting plus held), over all workers.
        timeout_s: per-attempt connect timeout.
        rate: at most this many new attempts per second (None: as fast as possible).
        hold_s: keep each established connection open this long before closing it; the
            result is then yielded at release, with `ended_by` telling how the hold ended.
        stop_at: monotonic time at which the run ends: no attempt starts, pending ones end
            as TIMEOUT with ended_by "stop", held ones are released.
        abortive_close: close with RST (no TIME_WAIT, as nmap does) instead of FIN.
        stats: filled in as the run goes (for progress display and reports).
        workers: at most this many processes; job i goes to process i % workers, and the
            extra ones are forked (Linux, single-threaded callers only: fork() in a threaded
            process can deadlock the child, so threaded callers silently get 1). The job
            iterable must then be a side-effect-free generator, since every process walks
            it, or better a Sequence (each process then only touches its own share).
        on_refused: called with the job of each refused attempt (ECONNREFUSED) instead of
            yielding a result for it: a scan that reports only open ports then builds
            nothing for its closed ones (one process only: not with workers > 1).

    Yields results in completion order. Running out of file descriptors lowers the
    concurrency to what is open at that moment (counted in stats.fd_backoffs); with nothing
    in flight the job ends as ERROR EMFILE.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    if workers < 1:
        raise ValueError("workers must be at least 1")
    if on_refused is not None and workers > 1:
        raise ValueError("on_refused needs workers=1")
    st = stats if stats is not None else ConnectorStats()
    st.concurrency = st.lowest_concurrency = concurrency
    if not hasattr(select, "epoll"):  # pragma: no cover - non-Linux fallback
        yield from _run_connects_poll(jobs, concurrency, timeout_s, rate, hold_s, stop_at, st)
        return
    if workers > 1 and (not hasattr(os, "fork") or threading.active_count() > 1):
        workers = 1
    st.extra["workers"] = workers
    if workers == 1:
        run = _Run(concurrency, timeout_s, rate, hold_s, stop_at, abortive_close, st)
        run.on_refused = on_refused
        try:
            yield from run.iterate(iter(jobs))
        finally:
            run.close()
        return
    yield from _run_forked(
        jobs, workers, concurrency, timeout_s, rate, hold_s, stop_at, abortive_close, st
    )


_NO_FD = object()
# errno -> (state, name, plain): the same few codes come back tens of thousands of times in a
# scan. "plain" verdicts (not OPEN, not RESET) need nothing beyond closing the socket.
_VERDICTS: dict[int, tuple[ConnectState, str | None, bool]] = {}
_STREAM_NONBLOCK = socket.SOCK_STREAM | socket.SOCK_NONBLOCK
_EINPROGRESS = errno.EINPROGRESS
_AF_UNIX = getattr(socket, "AF_UNIX", -1)  # only TCP sockets are reused (the kernel path above)
_EALREADY = errno.EALREADY
_EISCONN = errno.EISCONN
_ECONNREFUSED = errno.ECONNREFUSED
_REFUSED = ConnectState.REFUSED
_OPEN = ConnectState.OPEN
_REFUSED_NAME = "ECONNREFUSED"
# On a reused socket, a first connect() answering one of these means the refusal did not
# reset it (Linux resets it: __inet_stream_connect's sock_error path calls disconnect).
_NOT_RESET = frozenset({errno.EALREADY, errno.EISCONN, errno.ECONNABORTED, errno.EINVAL})
_SOL_SOCKET = socket.SOL_SOCKET
_SO_ERROR = socket.SO_ERROR
_SO_LINGER = socket.SO_LINGER
_LINGER_ZERO = struct.pack("ii", 1, 0)  # struct linger {l_onoff 1, l_linger 0}: close sends RST


def _ephemeral_ports(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> tuple[int, int]:
    """The range the kernel picks local ports from; every port when it cannot be read."""
    try:
        with open(path, encoding="ascii") as handle:
            low, high = (int(word) for word in handle.read().split())
    except (OSError, ValueError):
        return 1, 65535
    return low, high


# A socket can meet itself (or another of ours) at any address of this host, not only on
# loopback (a scan of the ephemeral range of 10.9.9.9 and fd00::5, added to lo, found 1-4
# phantom open ports per run). Its two ends after the connect tell, so no address needs to
# be known as ours up front.
_IP_FAMILIES = (socket.AF_INET, socket.AF_INET6)


class _Run:
    """One process's epoll loop (see the module docstring for the strategy)."""

    def __init__(
        self,
        concurrency: int,
        timeout_s: float,
        rate: float | None,
        hold_s: float,
        stop_at: float | None,
        abortive_close: bool,
        st: ConnectorStats,
        on_idle: Callable[[], None] | None = None,
    ) -> None:
        self.limit = concurrency
        self.timeout_s = timeout_s
        self.interval = 1.0 / rate if rate else 0.0
        self.hold_s = hold_s
        self.stop_at = stop_at
        self.abortive = abortive_close
        self.st = st
        st.held_connect_times = self._held_connect_times
        self.on_idle = on_idle
        with _map_errors("epoll"):  # out of fds: LocalError, said as such (exit 6)
            self.poller = select.epoll()
        # The main thread's signal wake-up fd: a Ctrl-C just before epoll_wait would otherwise
        # wait for the next attempt's deadline (--timeout) first.
        self.wake = signal_wake_fd()
        if self.wake is not None:
            self.poller.register(self.wake, select.EPOLLIN)
        self.pending: dict[int, _Attempt] = {}  # fd -> connecting attempt
        self.held: dict[int, _Attempt] = {}  # fd -> established attempt being held
        self.order: collections.deque[_Attempt] = collections.deque()  # connecting, by start
        self.held_order: collections.deque[_Attempt] = collections.deque()  # held, by release
        # Pending attempts to ephemeral ports, by destination port: where to look for the
        # other end when one of our sockets "connects" to another of ours (simultaneous open).
        self.loop_pending: dict[int, dict[int, _Attempt]] = {}
        self.extra_fds: dict[int, Callable[[], None]] = {}  # worker pipes -> reader
        self.out: list[ConnectResult] = []
        self.reuse = True  # reuse refused sockets (see iterate); off if the kernel disagrees
        self.on_refused: Callable[[ConnectJob], None] | None = None
        # A socket can only meet itself (or another of ours) on a port the kernel could have
        # given it as its local port: outside this range the check costs nothing.
        self.ephemeral = _ephemeral_ports()

    def _held_connect_times(self) -> list[float]:
        # list() of the values is one C call under the GIL: the loop's thread cannot change
        # the dict in the middle of it.
        return [a.connected_at - a.started_at for a in list(self.held.values())]

    def close(self) -> None:
        for attempt in list(self.pending.values()) + list(self.held.values()):
            attempt.sock.close()
        self.pending.clear()
        self.held.clear()
        self.poller.close()

    def iterate(self, job_iter: Iterator[ConnectJob]) -> Iterator[ConnectResult]:
        st, out, pending, held = self.st, self.out, self.pending, self.held
        order, held_order, poller = self.order, self.held_order, self.poller
        monotonic = time.monotonic
        interval, stop_at = self.interval, self.stop_at
        exhausted = False
        next_start = monotonic()
        new_socket, out_append, on_refused = _socket.socket, out.append, self.on_refused
        eph_low, eph_high = self.ephemeral
        fast_open = self.hold_s <= 0  # an OPEN verdict is final at once: close and report
        abortive, loop_pending = self.abortive, self.loop_pending
        # Whether the last job's address could meet one of our own sockets (a flood reuses
        # one address object for all its jobs: worked out once).
        last_addr: Any = None
        addr_meets = False
        spare: _socket.socket | None = None  # refused last time: reusable for the next job
        spare_family = 0
        # A job handed back by a refusal streak (see _refusal_streak), with the socket its
        # connect already answered on (None: not connected yet) and that answer.
        carry: ConnectJob | None = None
        carry_sock: _socket.socket | None = None
        carry_code = -1
        carry_at = 0.0
        job: ConnectJob | None
        sock: _socket.socket | None
        # Counting refusals through on_refused (open-only scans) at full speed lets runs of
        # refused ports go through the streak loop; a rate cap paces every job instead.
        streaks = on_refused is not None and not interval
        try:
            while True:
                now = monotonic()
                stopping = stop_at is not None and now >= stop_at
                more_now = False
                # Start new attempts while there is room (and the rate allows).
                while not exhausted and not stopping and len(pending) + len(held) < self.limit:
                    if interval and now < next_start:
                        # Not this job's turn yet. Fetch it now (it waits as the carry) so a
                        # run whose jobs are all started ends at once instead of one rate
                        # interval later, when the slot opens onto an empty iterator.
                        if carry is None:
                            carry = next(job_iter, None)
                            if carry is None:
                                exhausted = True
                        break
                    if carry is not None:
                        job = carry
                        carry = None
                    else:
                        job = next(job_iter, None)
                        if job is None:
                            exhausted = True
                            break
                    # The hot path of a scan, inlined. A second connect() on a non-blocking socket
                    # reports how the first one ended: the refusal (ECONNREFUSED, which also
                    # resets the socket so the next port can reuse it: 2 syscalls a closed port
                    # instead of socket+connect+getsockopt+close), 0 once connected, EALREADY
                    # while the handshake still waits. Anything unusual (a source address, no
                    # socket, an OPEN or RESET verdict) takes the general path in _start/_verdict.
                    code = -1
                    if carry_sock is not None:  # connected by the streak: its answer is code
                        sock = carry_sock
                        carry_sock, code = None, carry_code
                        family, addr = job.family, job.sockaddr
                        now = carry_at  # its latency counts from its connect, not from here
                    elif job.source is None:
                        family = job.family
                        sock = spare
                        if sock is not None and spare_family != family:
                            sock.close()  # kept for the other family: no use for this job
                            sock = None
                        reused = sock is not None
                        spare = None
                        if sock is None:
                            try:
                                sock = new_socket(family, _STREAM_NONBLOCK)
                            except OSError:  # _start retries and sorts EMFILE out
                                sock = None
                        if sock is not None:
                            addr = job.sockaddr
                            try:
                                code = sock.connect_ex(addr)
                                if code == _EINPROGRESS:
                                    code = sock.connect_ex(addr)
                                elif reused and code in _NOT_RESET:
                                    # This kernel did not reset the socket after the refusal:
                                    # stop reusing sockets and redo this job on a fresh one.
                                    sock.close()
                                    self.reuse = False
                                    code = -1
                            except OSError as exc:
                                sock.close()
                                out_append(_failed(job, now, exc.errno))
                                code = -2
                    if code >= 0 and sock is not None:
                        if code == _ECONNREFUSED:
                            if on_refused is not None:
                                on_refused(job)
                            else:
                                out_append(
                                    ConnectResult(
                                        job, _REFUSED, _REFUSED_NAME, now, monotonic() - now
                                    )
                                )
                            if self.reuse and family != _AF_UNIX:
                                spare, spare_family = sock, family
                                if streaks and on_refused is not None:
                                    (
                                        spare,
                                        carry,
                                        carry_sock,
                                        carry_code,
                                        carry_at,
                                        exhausted,
                                        started,
                                    ) = self._refusal_streak(sock, family, job_iter, on_refused)
                                    st.started += started
                                    if exhausted or carry is None:  # done, or the stop time
                                        st.started += 1
                                        break
                            else:
                                sock.close()
                        elif code == _EALREADY:
                            self._wait_for(job, sock, now)
                        elif (code == _EISCONN or code == 0) and fast_open:
                            # Connected (a flood's common case), inlined: close and report,
                            # after the self-connect check where one is possible at all.
                            if addr is not last_addr:
                                last_addr = addr
                                addr_meets = (
                                    family in _IP_FAMILIES and eph_low <= addr[1] <= eph_high
                                )
                            # The verdict's time: the checks and the close below are ours.
                            done = monotonic()
                            met = False
                            if addr_meets:
                                try:
                                    local = sock.getsockname()
                                except OSError:
                                    local = None
                                # Meeting ourselves needs our port to be the destination's
                                # or a pending one's destination (ports are ints: no
                                # address spelling to compare here).
                                if local is not None and (
                                    local[1] == addr[1] or local[1] in loop_pending
                                ):
                                    met = self._met_ourselves(job, sock, now, done)
                            if not met:
                                if abortive:
                                    # try, not suppress(): no context object per connect
                                    try:  # noqa: SIM105
                                        sock.setsockopt(_SOL_SOCKET, _SO_LINGER, _LINGER_ZERO)
                                    except OSError:
                                        pass
                                sock.close()
                                out_append(ConnectResult(job, _OPEN, None, now, done - now))
                        else:
                            if code == _EISCONN:
                                code = 0
                            self._verdict(job, sock, now, code, monotonic())
                    if code == -1 and self._start(job, now) is _NO_FD:
                        if pending or held:
                            self.limit = max(1, len(pending) + len(held))
                            st.fd_backoffs += 1
                            st.lowest_concurrency = min(st.lowest_concurrency, self.limit)
                            job_iter = _prepend(job, job_iter)
                            break
                        out.append(_failed(job, now, errno.EMFILE))
                    st.started += 1
                    if interval:
                        next_start = max(next_start + interval, now - 1.0)
                    now = monotonic()
                    if len(out) >= _BATCH:
                        more_now = True
                        break
                if stopping:
                    exhausted = True
                st.in_flight, st.held = len(pending), len(held)
                if st.held > st.peak_held:
                    st.peak_held = st.held
                if out:
                    batch = out[:]
                    out.clear()
                    yield from batch
                if exhausted and not pending and not held and not self.extra_fds:
                    return
                # Sleep until the next event, the next deadline, the next release or start.
                if more_now:
                    timeout = 0.0
                else:
                    wake = []
                    if order:
                        wake.append(order[0].deadline)
                    if held_order:
                        wake.append(held_order[0].release_at)
                    if not exhausted and len(pending) + len(held) < self.limit:
                        wake.append(next_start)
                    if stop_at is not None and not stopping:
                        wake.append(stop_at)
                    timeout = min(max(0.0, min(wake) - monotonic()), POLL_MAX_S) if wake else -1.0
                    if timeout != 0.0 and self.on_idle is not None:
                        self.on_idle()
                for fd, _mask in poller.poll(timeout, 1024):
                    if fd == self.wake:
                        drain_signal_wake(fd)  # the handler runs (raises) on its own
                        continue
                    attempt = pending.pop(fd, None)
                    now = monotonic()
                    if attempt is not None:
                        self._unindex(attempt)
                        attempt.done = True  # the deadline deque drops it lazily
                        # Read SO_ERROR once: reading clears it.
                        code = attempt.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if self.hold_s > 0:
                            poller.unregister(fd)  # a held socket is registered again for input
                        self._verdict(attempt.job, attempt.sock, attempt.started_at, code, now)
                        continue
                    reader = self.extra_fds.get(fd)
                    if reader is not None:
                        reader()
                        continue
                    held_attempt = held.get(fd)
                    if held_attempt is None:
                        continue
                    how = _peer_ending(held_attempt.sock)
                    if how == "data":
                        continue  # drained; epoll wakes us again for more bytes or the end
                    del held[fd]
                    _end_hold(held_attempt, now, how, out)
                    held_attempt.sock.close()
                now = monotonic()
                stop_now = stop_at is not None and now >= stop_at
                while order and (order[0].done or order[0].deadline <= now or stop_now):
                    attempt = order.popleft()
                    if attempt.done:
                        continue
                    attempt.done = True
                    pending.pop(attempt.sock.fileno(), None)
                    self._unindex(attempt)
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
                    _close(attempt.sock, self.abortive)
        finally:
            if spare is not None:
                spare.close()
            if carry_sock is not None:  # the run stopped before its job's turn came
                carry_sock.close()

    def _refusal_streak(
        self,
        sock: _socket.socket,
        family: int,
        job_iter: Iterator[ConnectJob],
        on_refused: Callable[[ConnectJob], None],
    ) -> tuple[
        _socket.socket | None, ConnectJob | None, _socket.socket | None, int, float, bool, int
    ]:
        """Connect the next jobs on `sock`, just refused, for as long as they are refused too.

        Most of a scan is closed ports: this loop does for each only what a refusal needs
        (two connect_ex calls and on_refused), without the general loop's per-job checks. The
        first job it cannot finish goes back to that loop: with the socket its connect_ex
        already answered on and the answer, or, for another family or a source address, not
        connected at all. Returns (spare socket, that job, its socket or None, its answer, when
        its connect started, exhausted, jobs refused here); no job back and not exhausted means
        the stop time came.
        """
        connect_ex, stop_at, monotonic = sock.connect_ex, self.stop_at, time.monotonic
        refused = 0
        for job in job_iter:
            if job.source is not None or job.family != family:
                return sock, job, None, -1, 0.0, False, refused
            addr = job.sockaddr
            started_at = monotonic()
            try:
                code = connect_ex(addr)
                if code == _EINPROGRESS:
                    code = connect_ex(addr)
                elif code in _NOT_RESET:
                    # Not reset after the refusal (see iterate): no more reuse, and this job
                    # starts again on a fresh socket.
                    sock.close()
                    self.reuse = False
                    return None, job, None, -1, 0.0, False, refused
            except OSError:
                # The general path connects it again and reports the error with its errno.
                return sock, job, None, -1, 0.0, False, refused
            if code != _ECONNREFUSED:
                return None, job, sock, code, started_at, False, refused
            on_refused(job)
            refused += 1
            if stop_at is not None and not refused & 255 and monotonic() >= stop_at:
                return sock, None, None, -1, 0.0, False, refused
        return sock, None, None, -1, 0.0, True, refused

    def _start(self, job: ConnectJob, now: float) -> Any:
        """Create the socket and connect; a verdict known at once goes straight to out."""
        try:
            # The C socket type: probes need no makefile()/io machinery, and skipping the
            # Python wrapper's __init__ and close() is measurable over 65,535 ports.
            sock = _socket.socket(job.family, _STREAM_NONBLOCK)
        except OSError as exc:
            if exc.errno in _OUT_OF_FDS:
                return _NO_FD
            self.out.append(_failed(job, now, exc.errno))
            return None
        try:
            if job.source is not None:
                no_port = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", None)
                if no_port is not None and job.family != socket.AF_UNIX:
                    sock.setsockopt(socket.IPPROTO_IP, no_port, 1)
                sock.bind((job.source, 0))
            code = sock.connect_ex(job.sockaddr)
            # Only EINPROGRESS means "wait": EAGAIN is AF_UNIX's full queue (SOCKETS.md §3)
            # or, on old kernels, TCP's "no ephemeral port left"; both are verdicts.
            if code == errno.EINPROGRESS:
                # On loopback the handshake (or the RST) already happened inside connect():
                # SO_ERROR holds a refusal, and getpeername() works once connected.
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code == 0:
                    self._settle(job, sock, now)
                    return None
        except OSError as exc:
            sock.close()
            self.out.append(_failed(job, now, exc.errno))
            return None
        # Finished at once: loopback, AF_UNIX (never waits), or an immediate error.
        verdict = _VERDICTS.get(code)
        if verdict is not None and verdict[2]:  # the common refusal: no more checks to make
            sock.close()
            if verdict[0] is _REFUSED and self.on_refused is not None:
                self.on_refused(job)
            else:
                self.out.append(
                    ConnectResult(job, verdict[0], verdict[1], now, time.monotonic() - now)
                )
            return None
        self._verdict(job, sock, now, code, time.monotonic())
        return None

    def _settle(self, job: ConnectJob, sock: _socket.socket, now: float) -> None:
        """SO_ERROR was 0 after EINPROGRESS: connected already, or still waiting."""
        try:
            sock.getpeername()
        except OSError:
            self._wait_for(job, sock, now)
            return
        self._verdict(job, sock, now, 0, time.monotonic())

    def _wait_for(self, job: ConnectJob, sock: _socket.socket, now: float) -> None:
        attempt = _Attempt(job, sock, now, now + self.timeout_s)
        fd = sock.fileno()
        self.pending[fd] = attempt
        self.order.append(attempt)
        self.poller.register(fd, select.EPOLLOUT)
        low, high = self.ephemeral
        if job.family in _IP_FAMILIES and low <= job.sockaddr[1] <= high:
            attempt.loop_port = int(job.sockaddr[1])
            self.loop_pending.setdefault(attempt.loop_port, {})[fd] = attempt

    def _unindex(self, attempt: _Attempt) -> None:
        if attempt.loop_port:
            bucket = self.loop_pending.get(attempt.loop_port)
            if bucket is not None:
                bucket.pop(attempt.sock.fileno(), None)
                if not bucket:
                    del self.loop_pending[attempt.loop_port]

    def _verdict(
        self, job: ConnectJob, sock: _socket.socket, started: float, code: int, now: float
    ) -> None:
        verdict = _VERDICTS.get(code)
        if verdict is None:
            state = classify_connect_errno(code)
            plain = state not in (ConnectState.OPEN, ConnectState.RESET)
            verdict = _VERDICTS[code] = (state, errno_name(code), plain)
        state = verdict[0]
        if state is not ConnectState.OPEN:
            sock.close()
            if state is _REFUSED and self.on_refused is not None:
                self.on_refused(job)
                return
            # ECONNRESET here means the handshake completed and the peer aborted before we
            # looked (an accept-and-reset server is that fast on loopback).
            ended_by = "reset" if state is ConnectState.RESET else None
            self.out.append(
                ConnectResult(job, state, verdict[1], started, now - started, 0.0, ended_by)
            )
            return
        if job.family != socket.AF_UNIX and self._met_ourselves(job, sock, started, now):
            return
        if self.hold_s > 0:
            attempt = _Attempt(job, sock, started, started + self.timeout_s)
            attempt.connected_at = now
            attempt.release_at = now + self.hold_s
            fd = sock.fileno()
            # Watch the held socket for the peer's RST or FIN while we wait.
            self.poller.register(fd, select.EPOLLIN | select.EPOLLRDHUP)
            self.held[fd] = attempt
            self.held_order.append(attempt)
            return
        _close(sock, self.abortive)
        self.out.append(ConnectResult(job, state, None, started, now - started))

    def _met_ourselves(
        self, job: ConnectJob, sock: _socket.socket, started: float, now: float
    ) -> bool:
        """A connected socket that met itself or another of our pending sockets: True once
        it is closed and reported REFUSED (nothing listens there), else False."""
        if not self._connected_to_ourselves(job, sock, now):
            return False
        _close(sock, True)
        self.out.append(ConnectResult(job, ConnectState.REFUSED, None, started, now - started))
        return True

    def _connected_to_ourselves(self, job: ConnectJob, sock: _socket.socket, now: float) -> bool:
        """True for a self-connect or a connect to another of our pending sockets."""
        low, high = self.ephemeral
        if not (job.family in _IP_FAMILIES and low <= job.sockaddr[1] <= high):
            return False
        try:
            local = sock.getsockname()
            # A socket meets itself only on its own port, and another of ours only on the
            # port that one is connecting to: anything else needs no second look.
            if local[1] != job.sockaddr[1] and local[1] not in self.loop_pending:
                return False
            # Both ends as the kernel spells them (job.sockaddr may say "127.1").
            peer = sock.getpeername()
        except OSError:
            return False
        if local[:2] == peer[:2]:
            self.st.extra["self_connects"] = self.st.extra.get("self_connects", 0) + 1
            return True
        # The other end of a simultaneous open between two of our sockets is a pending
        # attempt whose destination is our local address and whose local address is our peer.
        for fd, other in list(self.loop_pending.get(int(local[1]), {}).items()):
            try:
                other_local = other.sock.getsockname()
            except OSError:
                continue
            if other_local[:2] != peer[:2]:
                continue
            self.pending.pop(fd, None)
            self._unindex(other)
            other.done = True
            _close(other.sock, True)
            self.out.append(
                ConnectResult(
                    other.job, ConnectState.REFUSED, None, other.started_at, now - other.started_at
                )
            )
            self.st.extra["self_connects"] = self.st.extra.get("self_connects", 0) + 2
            return True
        return False


def _prepend(first: ConnectJob, rest: Iterator[ConnectJob]) -> Iterator[ConnectJob]:
    yield first
    yield from rest


def _failed(job: ConnectJob, now: float, code: int | None) -> ConnectResult:
    return ConnectResult(job, classify_connect_errno(code), errno_name(code), now, 0.0)


def _peer_ending(sock: _socket.socket) -> str:
    """Drain what a held connection's peer sent: "eof", "reset", or "data" (still open).

    The bytes themselves (a banner, say) do not matter to a connect test, but they must be
    read: the socket is level-triggered, so unread bytes, or a FIN/RST queued behind them,
    would wake the loop again at once, forever. Bounded so one chatty peer cannot stall the
    loop; what is left wakes it again.
    """
    try:
        for _ in range(16):
            if not sock.recv(65536, socket.MSG_DONTWAIT):
                return "eof"
    except BlockingIOError:
        return "data"
    except ConnectionResetError:
        return "reset"
    except OSError:
        return "reset"
    return "data"


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


def _close(sock: _socket.socket, abortive: bool) -> None:
    if abortive:
        with contextlib.suppress(OSError):
            # Linux/BSD struct linger is two ints (this loop is epoll-only, so never Windows).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
    sock.close()


# ---------------------------------------------------------------------------------------------
# Worker processes: job i runs in process i % workers; results come back over pipes
# ---------------------------------------------------------------------------------------------

# index, state, ended_by, errno name, started_at, elapsed_s, held_s
_RECORD = struct.Struct("<IBB16sddd")
_STATES = list(ConnectState)
_STATE_CODE = {state: code for code, state in enumerate(_STATES)}
_ENDED_BY: list[str | None] = [None, "hold", "reset", "eof", "stop"]
_ENDED_CODE = {name: code for code, name in enumerate(_ENDED_BY)}


def _run_forked(
    jobs: Iterable[ConnectJob],
    workers: int,
    concurrency: int,
    timeout_s: float,
    rate: float | None,
    hold_s: float,
    stop_at: float | None,
    abortive_close: bool,
    st: ConnectorStats,
) -> Iterator[ConnectResult]:
    share = max(1, concurrency // workers)
    share_rate = rate / workers if rate else None
    pids: list[int] = []
    readers: list[int] = []
    owner: dict[int, tuple[int, int]] = {}  # pipe read end -> (worker, pid)
    failed: set[int] = set()  # workers that did not exit cleanly: their silence means lost
    # With a Sequence nothing else tells which of a worker's jobs got an answer.
    seq = jobs if isinstance(jobs, Sequence) else None
    answered = bytearray(len(seq)) if seq is not None else None
    try:
        for worker in range(1, workers):
            read_fd, write_fd = os.pipe()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - runs in the child, which never returns
                os.close(read_fd)
                for fd in readers:
                    os.close(fd)
                _child_main(
                    jobs,
                    worker,
                    workers,
                    write_fd,
                    (share, timeout_s, share_rate, hold_s, stop_at, abortive_close),
                )
            os.close(write_fd)
            pids.append(pid)
            readers.append(read_fd)
            owner[read_fd] = (worker, pid)
        run = _Run(share, timeout_s, share_rate, hold_s, stop_at, abortive_close, st)
        waiting: dict[int, ConnectJob] = {}  # child jobs not answered yet
        early: dict[int, tuple[Any, ...]] = {}  # child answers for jobs not walked yet
        buffers: dict[int, bytearray] = {}

        def own_jobs() -> Iterator[ConnectJob]:
            if seq is not None:
                # Random access: walk only our share; a worker's job is fetched on its answer.
                for index in range(0, len(seq), workers):
                    yield seq[index]
                return
            for index, job in enumerate(jobs):
                if index % workers == 0:
                    yield job
                    continue
                record = early.pop(index, None)
                if record is None:
                    waiting[index] = job
                else:
                    run.out.append(_decode(job, record))

        def make_reader(fd: int) -> Callable[[], None]:
            buffer = buffers.setdefault(fd, bytearray())

            def read() -> None:
                data = os.read(fd, 1 << 16)
                if not data:
                    run.poller.unregister(fd)
                    del run.extra_fds[fd]
                    # The pipe ends when the worker exits: how it exited tells whether its
                    # unanswered jobs were never due (a stop time) or lost with it.
                    worker, pid = owner[fd]
                    try:
                        clean = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
                    except ChildProcessError:
                        clean = False
                    # Reaped: its pid is free for any new process now, never to be killed.
                    pids.remove(pid)
                    if not clean:
                        failed.add(worker)
                    return
                buffer.extend(data)
                usable = len(buffer) - len(buffer) % _RECORD.size
                for record in _RECORD.iter_unpack(memoryview(buffer)[:usable]):
                    st.started += 1
                    if seq is not None and answered is not None:
                        answered[record[0]] = 1
                        run.out.append(_decode(seq[record[0]], record))
                        continue
                    job = waiting.pop(record[0], None)
                    if job is None:
                        early[record[0]] = record
                    else:
                        run.out.append(_decode(job, record))
                del buffer[:usable]

            return read

        for fd in readers:
            run.extra_fds[fd] = make_reader(fd)
            run.poller.register(fd, select.EPOLLIN)
        walk = own_jobs()
        try:
            yield from run.iterate(walk)
        finally:
            run.close()
        if early:
            # A stop time ended our share before the walk reached jobs a worker did answer:
            # walk on (our own jobs are not started now) to put those answers to their jobs.
            for _job in walk:
                if not early:
                    break
            yield from run.out
            run.out.clear()
        # A worker that died leaves jobs unanswered: report them, never drop them. A worker
        # that exited cleanly answered every job it started; the rest a stop time left out.
        now = time.monotonic()
        for index, job in waiting.items():
            if index % workers in failed:
                yield ConnectResult(job, ConnectState.ERROR, "ECHILD", now, 0.0)
        if seq is not None and answered is not None:
            for worker in sorted(failed):
                for index in range(worker, len(seq), workers):
                    if not answered[index]:
                        yield ConnectResult(seq[index], ConnectState.ERROR, "ECHILD", now, 0.0)
    finally:
        for fd in readers:
            with contextlib.suppress(OSError):
                os.close(fd)
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)  # no-op for a worker that already exited
            with contextlib.suppress(OSError):
                os.waitpid(pid, 0)


def _rekeyed(index: int, job: ConnectJob) -> ConnectJob:
    return ConnectJob(index, job.family, job.sockaddr, job.source)


def _decode(job: ConnectJob, record: tuple[Any, ...]) -> ConnectResult:
    _index, state, ended, name, started, elapsed, held = record
    text = name.rstrip(b"\0").decode("ascii")
    return ConnectResult(
        job, _STATES[state], text or None, started, elapsed, held, _ENDED_BY[ended]
    )


def _child_main(
    jobs: Iterable[ConnectJob],
    worker: int,
    workers: int,
    write_fd: int,
    params: tuple[int, float, float | None, float, float | None, bool],
) -> None:  # pragma: no cover - runs in a forked child
    code = 1
    try:
        # The parent's SIGINT handler would raise KeyboardInterrupt in here; the parent ends
        # the run and kills its workers, so the child just dies quietly with it.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        buffer = bytearray()

        def flush() -> None:
            view = memoryview(buffer)
            while view:
                written = os.write(write_fd, view)
                view = view[written:]
            view.release()
            buffer.clear()

        share, timeout_s, rate, hold_s, stop_at, abortive = params
        if isinstance(jobs, Sequence):
            own: Iterator[ConnectJob] = (
                _rekeyed(index, jobs[index]) for index in range(worker, len(jobs), workers)
            )
        else:
            own = (
                ConnectJob(index, job.family, job.sockaddr, job.source)
                for index, job in enumerate(jobs)
                if index % workers == worker
            )
        run = _Run(share, timeout_s, rate, hold_s, stop_at, abortive, ConnectorStats(), flush)
        pack = _RECORD.pack
        for result in run.iterate(own):
            name = (result.errno_name or "").encode("ascii", "replace")[:16]
            buffer += pack(
                result.job.key,
                _STATE_CODE[result.state],
                _ENDED_CODE.get(result.ended_by, 0),
                name,
                result.started_at,
                result.elapsed_s,
                result.held_s,
            )
            if len(buffer) >= 32768:
                flush()
        flush()
        code = 0
    except BaseException:
        code = 1
    finally:
        os._exit(code)


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

    next_start: float | None = None
    for job in jobs:
        # Paced before each attempt but the first: nothing waits after the last one.
        if rate and next_start is not None:
            wake = next_start if stop_at is None else min(next_start, stop_at)
            time.sleep(max(0.0, wake - time.monotonic()))
        if stop_at is not None and time.monotonic() >= stop_at:
            return
        st.started += 1
        start = time.monotonic()
        next_start = start + 1.0 / rate if rate else None
        outcome = connect_nonblocking(
            Resolved(job.family, job.sockaddr), deadline=start + timeout_s, source=job.source
        )
        yield ConnectResult(job, outcome.state, outcome.errno_name, start, outcome.elapsed_s)
