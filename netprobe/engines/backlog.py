"""`netprobe backlog`: a bounded connection flood with the kernel's own accept-queue truth.

Does I/O: the connects go through netprobe.connector.run_connects (in a worker thread),
an optional lab listener lives on loopback, and the server view comes from
netprobe.kernel (inet_diag queues, SYN-RECV counts, /proc/net/netstat deltas).
Never prints: it yields Preflight, Tick and BacklogSummary events.

Strategy: the worker thread only tallies results (cheap, under the GIL); the calling
thread samples the listener every 50 ms and cuts the per-second timeline. A connect that
completes on the client is never reported as accepted by the server (SOCKETS.md §1.3, §8).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import ipaddress
import itertools
import math
import os
import re
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from netprobe import kernel
from netprobe.connector import ConnectJob, ConnectorStats, ConnectResult, run_connects
from netprobe.errors import AddressError, LocalError, UsageError
from netprobe.results import ConnectState
from netprobe.sockets import (
    accept_and_close,
    address_range,
    errno_name,
    format_hostport,
    ignore_stop_signals,
    is_loopback,
    not_loopback_why,
    open_listener,
    parse_float,
    preferred,
    raise_nofile_limit,
    range_addresses,
    resolve,
    resolve_named,
    resolved_off_loopback,
)

__all__ = [
    "BacklogConfig",
    "BacklogSummary",
    "Gate",
    "LatencyHistogram",
    "Preflight",
    "Tick",
    "effective_connections",
    "parse_gate",
    "parse_ramp",
    "parse_sources",
    "run_backlog",
    "validate_config",
]

SAMPLE_INTERVAL_S = 0.05  # listener sampling period: a dump costs ~0.2 ms (SOCKETS.md §2)
SYN_RECV_INTERVAL_S = 0.25  # SYN-RECV dumps walk every socket: sampled less often
MAX_SOURCES = 4096  # a typo like 127.0.0.0/8 must not build a 16-million-entry list
_FD_RESERVE = 64  # descriptors kept free for stdio, netlink dumps, the lab listener
MAX_PROCESSES = 8  # connect processes when RLIMIT_NOFILE is the cap (see _ConnectProcesses)
# The slowest rate taken (the CLI's MIN_RATE): pacing waits 1/R seconds, and a far smaller R
# (1e-300) overflows threading and timer waits.
MIN_RATE = 0.001
MAX_BACKLOG = 2**31 - 1  # listen() takes a C int; the kernel clamps to somaxconn anyway

# ---------------------------------------------------------------------------------------------
# Latency histogram (HDR-style log buckets, bounded memory)
# ---------------------------------------------------------------------------------------------

_SUB_BITS = 7  # 128 linear sub-buckets per power of two: under 1.6% relative error
_SUB_COUNT = 1 << _SUB_BITS
_HALF = _SUB_COUNT // 2


class LatencyHistogram:
    """Counts of values in microseconds in log-linear buckets (as HdrHistogram does).

    Memory is at most about 64 * 64 buckets whatever the number of samples; the exact
    minimum and maximum are kept beside the buckets.
    """

    def __init__(self) -> None:
        self.counts: list[int] = []
        self.total = 0
        self.max_us = 0
        self.min_us: int | None = None
        self.sum_us = 0

    @staticmethod
    def index_of(value_us: int) -> int:
        """Bucket index of a value (exact below 128 us)."""
        if value_us < _SUB_COUNT:
            return value_us
        shift = value_us.bit_length() - _SUB_BITS
        return _SUB_COUNT + (shift - 1) * _HALF + ((value_us >> shift) - _HALF)

    @staticmethod
    def bounds_of(index: int) -> tuple[int, int]:
        """Lowest and highest value (us) that land in bucket `index`."""
        if index < _SUB_COUNT:
            return index, index
        k = index - _SUB_COUNT
        shift = k // _HALF + 1
        mantissa = k % _HALF + _HALF
        return mantissa << shift, ((mantissa + 1) << shift) - 1

    def record(self, seconds: float) -> None:
        """Add one latency given in seconds."""
        value = int(seconds * 1e6)
        if value < 0:
            value = 0
        if value < _SUB_COUNT:
            index = value
        else:
            shift = value.bit_length() - _SUB_BITS
            index = _SUB_COUNT + (shift - 1) * _HALF + ((value >> shift) - _HALF)
        counts = self.counts
        if index >= len(counts):
            counts.extend([0] * (index + 1 - len(counts)))
        counts[index] += 1
        self.total += 1
        self.sum_us += value
        if value > self.max_us:
            self.max_us = value
        if self.min_us is None or value < self.min_us:
            self.min_us = value

    def percentile_us(self, pct: float) -> int | None:
        """The value at or below which `pct` percent of samples fall (bucket's high end)."""
        if self.total == 0:
            return None
        rank = max(1, math.ceil(self.total * pct / 100.0))
        seen = 0
        for index, count in enumerate(self.counts):
            seen += count
            if seen >= rank:
                return min(self.bounds_of(index)[1], self.max_us)
        return self.max_us

    def summary_ms(self) -> dict[str, float | None]:
        """p50, p90, p99, p999 and max in milliseconds (None with no samples)."""

        def ms(value: int | None) -> float | None:
            return None if value is None else round(value / 1000.0, 3)

        return {
            "p50": ms(self.percentile_us(50)),
            "p90": ms(self.percentile_us(90)),
            "p99": ms(self.percentile_us(99)),
            "p999": ms(self.percentile_us(99.9)),
            "max": ms(self.max_us if self.total else None),
        }

    def coarse(self) -> list[dict[str, Any]]:
        """Counts per power-of-two band, for the text histogram and JSON (`le_ms` upper edge)."""
        bands: dict[int, int] = {}
        for index, count in enumerate(self.counts):
            if count:
                high = self.bounds_of(index)[1]
                bands[high.bit_length()] = bands.get(high.bit_length(), 0) + count
        return [
            {"le_ms": round(((1 << bits) - 1) / 1000.0, 3), "count": bands[bits]}
            for bits in sorted(bands)
        ]


# ---------------------------------------------------------------------------------------------
# Option parsing (no I/O)
# ---------------------------------------------------------------------------------------------


def parse_sources(text: str) -> list[str]:
    """Parse `127.0.0.2-127.0.0.20`, `127.0.0.2-20`, `127.0.0.0/28` or comma lists.

    Raises:
        UsageError: malformed, a range that runs backwards, or more than MAX_SOURCES.
    """
    out: list[str] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            raise UsageError(f"--source {text!r} has an empty item")
        try:
            if "/" in item:
                network = ipaddress.ip_network(item, strict=False)
                if network.num_addresses > MAX_SOURCES:
                    raise UsageError(
                        f"--source {item!r} holds {network.num_addresses} addresses "
                        f"(at most {MAX_SOURCES})"
                    )
                out.extend(str(a) for a in network)
            elif "-" in item:
                try:
                    span = address_range(item)
                except AddressError as exc:
                    raise UsageError(f"--source range {exc}") from None
                if span is None:
                    raise ValueError(item)
                low, count = span
                if count > MAX_SOURCES:
                    raise UsageError(
                        f"--source {item!r} holds {count} addresses (at most {MAX_SOURCES})"
                    )
                out.extend(range_addresses(low, count))
            else:
                out.append(str(ipaddress.ip_address(item)))
        except ValueError:
            raise UsageError(f"--source {item!r} is not an address, range or CIDR block") from None
    if len(out) > MAX_SOURCES:
        raise UsageError(f"--source {text!r} holds {len(out)} addresses (at most {MAX_SOURCES})")
    return list(dict.fromkeys(out))


def parse_ramp(text: str) -> list[float]:
    """Parse `100,200,400` into rates (new connections per second, each > 0).

    Raises:
        UsageError: an item is not a positive number.
    """
    rates: list[float] = []
    for raw in text.split(","):
        item = raw.strip()
        try:
            rate = parse_float(item)
        except ValueError:
            raise UsageError(f"--ramp item {item!r} is not a rate (use e.g. 100,200,400)") from None
        if not math.isfinite(rate):
            raise UsageError(f"--ramp rate {item!r} is not a finite number")
        if not rate > 0:
            raise UsageError(f"--ramp rate {item!r} must be above 0")
        if rate < MIN_RATE:
            raise UsageError(f"--ramp rate {item!r} is below the slowest rate, {MIN_RATE:g}/s")
        rates.append(rate)
    return rates


_GATE_RE = re.compile(r"^\s*([a-z_0-9]+)\s*(>=|<=|==|!=|>|<)\s*([0-9.]+)\s*(us|ms|s|%)?\s*$")
_LATENCY_KEYS = ("p50", "p90", "p99", "p999", "max")
_COUNT_KEYS = (
    "attempted",
    "established",
    "refused",
    "reset",
    "timed_out",
    "errors",
    "accept_queue_max",
    "syn_recv_max",
    "listener_drops_delta",
    "listen_overflows_delta",
)
_OPS: dict[str, Callable[[float, float], bool]] = {
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
}


@dataclass(frozen=True, slots=True)
class Gate:
    """A `--fail-if` condition: the run fails when `metric op threshold` is true.

    Attributes:
        text: the gate as the user wrote it (reports name it).
        metric: p50/p90/p99/p999/max (milliseconds) or a count field of the summary.
        op: one of > >= < <= == !=.
        threshold: in milliseconds for latencies, a plain number for counts.
    """

    text: str
    metric: str
    op: str
    threshold: float

    def value_in(self, summary: dict[str, Any]) -> float | None:
        """The metric's value in a summary record (None when the run did not measure it)."""
        if self.metric in _LATENCY_KEYS:
            value = summary["latency_ms"].get(self.metric)
        elif self.metric in summary:
            value = summary[self.metric]
        else:
            server = summary.get("server") or {}
            value = server.get(self.metric)
        return None if value is None else float(value)

    def failed(self, summary: dict[str, Any]) -> bool:
        """True when the condition holds, or when the run did not measure the metric (no
        server view off this host, no latency without a connection): a gate that cannot be
        checked must not pass a CI run."""
        value = self.value_in(summary)
        return value is None or _OPS[self.op](value, self.threshold)


def parse_gate(text: str) -> Gate:
    """Parse `p99>200ms`, `timed_out>0`, `established<129`.

    Raises:
        UsageError: unknown metric, operator or unit.
    """
    match = _GATE_RE.match(text.lower())
    if match is None:
        raise UsageError(
            f"--fail-if {text!r} is not METRIC OP VALUE (e.g. 'p99>200ms', 'timed_out>0')"
        )
    metric, op, number, unit = match.groups()
    try:
        value = float(number)
    except ValueError:
        raise UsageError(f"--fail-if {text!r}: {number!r} is not a number") from None
    if not math.isfinite(value):  # 400 digits make float() return inf
        raise UsageError(f"--fail-if {text!r}: {number!r} is not a finite number")
    if metric in _LATENCY_KEYS:
        scale = {None: 1.0, "ms": 1.0, "s": 1000.0, "us": 0.001}.get(unit)
        if scale is None:
            raise UsageError(f"--fail-if {text!r}: latency unit must be us, ms or s")
        value *= scale
    elif metric in _COUNT_KEYS:
        if unit is not None:
            raise UsageError(f"--fail-if {text!r}: {metric} is a count and takes no unit")
    else:
        known = ", ".join(_LATENCY_KEYS + _COUNT_KEYS)
        raise UsageError(f"--fail-if {text!r}: unknown metric {metric!r} (one of {known})")
    return Gate(text.strip(), metric, op, value)


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class BacklogConfig:
    """One backlog run, as parsed by the CLI (validate_config checks it before any traffic).

    Attributes:
        host, port: the target (ignored with lab=True).
        lab: start a loopback listener with listen(backlog) and flood it.
        backlog: the lab listener's listen() argument.
        accept_rate: lab listener accepts (and closes) this many connections per second.
        accept_delay_s: lab listener starts accepting after this long (with accept_rate, or
            alone: then it accepts as fast as it can).
        connections: total attempts (None: 200, or what a ramp needs).
        concurrency: attempts in flight (None: min(connections, 1000)).
        rate: new attempts per second (None: as fast as possible).
        duration_s: hard cap on the run.
        timeout_s: per-connect timeout.
        hold_s: keep established connections open this long.
        sources: source addresses, used in turn.
        family: 0, AF_INET or AF_INET6.
        allow_remote: permit a target outside loopback.
        ramp: rates of successive steps (each lasting step_s).
        gates: --fail-if conditions.
    """

    host: str | None = None
    port: int | None = None
    lab: bool = False
    backlog: int = 128
    accept_rate: float | None = None
    accept_delay_s: float | None = None
    connections: int | None = None
    concurrency: int | None = None
    rate: float | None = None
    duration_s: float = 30.0
    timeout_s: float = 3.0
    hold_s: float = 0.0
    sources: list[str] = field(default_factory=list)
    family: int = 0
    allow_remote: bool = False
    ramp: list[float] = field(default_factory=list)
    step_s: float = 5.0
    gates: list[Gate] = field(default_factory=list)
    processes_ok: bool = True  # may fork connect processes when one process's fds are too few


def validate_config(cfg: BacklogConfig) -> None:
    """Check every value before any socket is opened (one UsageError per problem).

    Raises:
        UsageError: bad numbers, TARGET with --lab or neither, a non-loopback target or
            source without allow_remote (no traffic is sent in that case).
    """
    if cfg.connections is not None and cfg.connections < 1:
        raise UsageError(f"--connections {cfg.connections}: must be at least 1")
    if cfg.concurrency is not None and cfg.concurrency < 1:
        raise UsageError(f"--concurrency {cfg.concurrency}: must be at least 1")
    if cfg.rate is not None and not cfg.rate > 0:
        raise UsageError(f"--rate {cfg.rate:g}: must be above 0 (omit it for as fast as possible)")
    if cfg.backlog < 0:
        raise UsageError(f"--backlog {cfg.backlog}: must be 0 or more")
    if cfg.backlog > MAX_BACKLOG:
        raise UsageError(f"--backlog {cfg.backlog}: must be at most {MAX_BACKLOG}")
    if cfg.accept_rate is not None and not cfg.accept_rate > 0:
        raise UsageError(f"--accept-rate {cfg.accept_rate:g}: must be above 0")
    for flag, value in (("--rate", cfg.rate), ("--accept-rate", cfg.accept_rate)):
        if value is not None and not MIN_RATE <= value < math.inf:
            raise UsageError(f"{flag} {value:g}: must be a finite rate of at least {MIN_RATE:g}/s")
    if not cfg.duration_s > 0:
        raise UsageError(f"--duration {cfg.duration_s:g}s: must be above 0")
    if not cfg.timeout_s > 0:
        raise UsageError(f"--timeout {cfg.timeout_s:g}s: must be above 0")
    if cfg.ramp and not cfg.step_s > 0:
        raise UsageError(f"--step {cfg.step_s:g}s: must be above 0")
    if cfg.ramp and cfg.rate is not None:
        raise UsageError("--ramp and --rate exclude each other (the ramp sets the rates)")
    if not cfg.lab and (cfg.accept_rate is not None or cfg.accept_delay_s is not None):
        raise UsageError("--accept-rate and --accept-delay shape the --lab listener; add --lab")
    if cfg.lab and cfg.host is not None:
        raise UsageError("give either TARGET or --lab, not both")
    if not cfg.lab and cfg.host is None:
        raise UsageError("missing TARGET (HOST:PORT), or use --lab")
    if cfg.host is not None and not cfg.allow_remote and not is_loopback(cfg.host):
        raise UsageError(
            f"{not_loopback_why(cfg.host)} are flooded unless --allow-remote is given; "
            "nothing was sent"
        )
    for source in cfg.sources:
        if not cfg.allow_remote and not is_loopback(source):
            raise UsageError(
                f"--source {not_loopback_why(source)} are used unless --allow-remote is given"
            )


def effective_connections(cfg: BacklogConfig) -> int:
    """Total attempts: --connections, else what the ramp needs (rate x step), else 200."""
    if cfg.connections is not None:
        return cfg.connections
    if cfg.ramp:
        return sum(math.ceil(rate * cfg.step_s) for rate in cfg.ramp)
    return 200


# ---------------------------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Preflight:
    """What the limits predict, known before the first SYN (text for the preflight line)."""

    text: str
    target: str
    limits: dict[str, Any]
    caps: list[str]


@dataclass(frozen=True, slots=True)
class Tick:
    """One second of the timeline (a partial last second has `span_s` below 1).

    `established` counts handshakes completed that second (held ones as they complete,
    later resets included); `failures` = refused + reset + timed_out + errors ended then.
    """

    t: int
    span_s: float
    step: int | None
    attempts: int
    established: int
    failures: int
    refused: int
    reset: int
    timed_out: int
    errors: int
    in_flight: int
    held: int
    accept_queue: int | None
    syn_recv: int | None
    accepted: int | None = None  # lab only: connections the lab server accepted this second
    # The second a Ctrl-C/SIGTERM cut short: the run's end, with stop signals ignored from
    # then on (a consumer must not let a write of it wait on a reader that stopped).
    interrupted: bool = False

    def as_record(self) -> dict[str, Any]:
        """JSON form (kind backlog.timeline)."""
        return {
            "kind": "backlog.timeline",
            "t": self.t,
            "span_s": round(self.span_s, 3),
            "step": self.step,
            "attempts": self.attempts,
            "established": self.established,
            "failures": self.failures,
            "refused": self.refused,
            "reset": self.reset,
            "timed_out": self.timed_out,
            "errors": self.errors,
            "in_flight": self.in_flight,
            "held": self.held,
            "accept_queue": self.accept_queue,
            "syn_recv": self.syn_recv,
            "accepted": self.accepted,
        }


@dataclass(slots=True)
class BacklogSummary:
    """The run's report: `record` is the final JSON object; `timeline` the ticks again."""

    record: dict[str, Any]
    timeline: list[Tick]
    histogram: LatencyHistogram
    failed_gates: list[str]


# ---------------------------------------------------------------------------------------------
# Tallying (worker thread) and sampling (calling thread)
# ---------------------------------------------------------------------------------------------


_OPEN = ConnectState.OPEN


class _Tally:
    """Client-view counts; written by the worker thread only."""

    def __init__(self) -> None:
        self.frozen = False  # a Ctrl-C has summed up the run: later results are not counted
        self.attempted = 0
        self.established = 0
        self.refused = 0
        self.reset = 0
        self.reset_after_established = 0
        self.timed_out = 0
        self.stopped_pending = 0
        self.timed_out_kernel = 0
        self.errors = 0
        self.errors_by_errno: dict[str, int] = {}
        self.handshakes = 0  # completed handshakes whose result has been yielded
        self.hist = LatencyHistogram()

    def add(self, result: ConnectResult) -> None:
        if self.frozen:
            return
        self.attempted += 1
        state = result.state
        if state is _OPEN and result.ended_by is None:
            # The common case of a fast flood, kept short: a plain completed handshake.
            self.handshakes += 1
            self.established += 1
            self.hist.record(result.elapsed_s)
            return
        # ECONNRESET on a connect means the SYN-ACK came (a refusal is ECONNREFUSED): the
        # handshake completed and the server, or its kernel, aborted afterwards.
        completed = state is ConnectState.OPEN or (
            state is ConnectState.RESET and result.errno_name in ("ECONNRESET", None)
        )
        if completed:
            self.handshakes += 1
            self.hist.record(result.elapsed_s)
        if state is ConnectState.OPEN:
            self.established += 1
        elif state is ConnectState.REFUSED:
            self.refused += 1
        elif state is ConnectState.RESET:
            self.reset += 1
            if completed:
                self.reset_after_established += 1
        elif state is ConnectState.TIMEOUT:
            self.timed_out += 1
            if result.errno_name == "ETIMEDOUT":
                # The kernel gave up (SYN retries exhausted), not our --timeout (errno None).
                self.timed_out_kernel += 1
            if result.ended_by == "stop":
                self.stopped_pending += 1
        else:
            self.errors += 1
            name = result.errno_name or state.value
            self.errors_by_errno[name] = self.errors_by_errno.get(name, 0) + 1

    def cut(self, pending: int, held: int, held_elapsed_s: Sequence[float] = ()) -> None:
        """A Ctrl-C ended the run: count what was under way as --duration counts it (a
        pending connect ended as timed out, a held one established, its connect time in the
        histogram), then take no more.

        `held_elapsed_s` are the connect times of the held connections: the connector hands
        a held connection over only at its release, so without them an interrupt during
        --hold reported established connections with no latency at all. Frozen from here,
        the tally never sees their release: nothing is counted twice.
        """
        self.frozen = True
        self.attempted += pending + held
        self.timed_out += pending
        self.stopped_pending += pending
        self.established += held
        self.handshakes += held
        for elapsed_s in held_elapsed_s[:held]:
            self.hist.record(elapsed_s)


@dataclass(slots=True)
class _RunEnd:
    """How the connect loop ended (for the summary)."""

    deadline_hit: bool  # the --duration deadline stopped attempts, not a ramp step's end
    step_shortfall: list[int | None]  # per ramp step; None: --duration cut the step
    slots_full: bool  # a 50 ms sample saw every concurrency slot busy
    interrupted: bool = False  # Ctrl-C/SIGTERM stopped attempts


@dataclass(slots=True)
class _ServerView:
    """Samples of the listener under test (None fields: no listener on this host)."""

    address: str
    port: int
    limit: int | None = None
    queue_max: int = 0
    queue_now: int | None = None
    syn_recv_max: int = 0
    syn_recv_now: int | None = None
    drops_start: int | None = None
    drops_end: int | None = None
    inode: int | None = None
    uid: int | None = None
    source: str | None = None
    seen: bool = False
    bound: str | None = None  # the listener's own address: 0.0.0.0 for a wildcard one
    syn_sampled_at: float = -math.inf
    members: int = 1  # SO_REUSEPORT sockets summed in the figures (kernel.find_listener)

    def sample(self, tick_max: dict[str, int]) -> None:
        row = kernel.find_listener(self.port, self.address)
        if row is None:
            self.queue_now = None
            return
        self.seen = True
        self.bound = row.address
        self.limit = row.limit
        self.members = max(self.members, row.members)
        self.queue_now = row.queue
        self.queue_max = max(self.queue_max, row.queue)
        self.inode, self.uid, self.source = row.inode, row.uid, row.source
        if self.drops_start is None:
            self.drops_start = row.drops
        self.drops_end = row.drops
        tick_max["queue"] = max(tick_max.get("queue", 0), row.queue)
        # The SYN-RECV dump walks the whole established hash (4-5 ms with thousands of
        # sockets, measured during a 20k/s flood), so take it every 250 ms, and at every
        # sample only while the accept queue is full (when request sockets pile up).
        now = time.monotonic()
        full = row.limit is not None and row.queue > row.limit
        if not full and now - self.syn_sampled_at < SYN_RECV_INTERVAL_S:
            return
        self.syn_sampled_at = now
        # Only the flooded listener's: another address on this port has its own SYN queue.
        syn = kernel.syn_recv_count(self.port, self.address)
        self.syn_recv_now = syn
        if syn is not None:
            self.syn_recv_max = max(self.syn_recv_max, syn)
            tick_max["syn"] = max(tick_max.get("syn", 0), syn)


# index, kind, state, ended_by, errno name, then three floats (see _ConnectProcesses)
_REC = struct.Struct("<BBB16sddd")
_KIND_RESULT, _KIND_STATS, _KIND_RSS = 0, 1, 2
_STATES = list(ConnectState)
_STATE_CODE = {state: code for code, state in enumerate(_STATES)}
_ENDED: list[str | None] = [None, "hold", "reset", "eof", "stop"]
_ENDED_CODE = {name: code for code, name in enumerate(_ENDED)}
_NO_JOB = ConnectJob(None, 0, None)


class _ConnectProcesses:
    """Connect processes for runs that need more sockets than one process may open.

    Used only when RLIMIT_NOFILE's soft limit is below the concurrency and cannot be raised
    (the hard limit needs CAP_SYS_RESOURCE). Job i goes to process i % n. Each child runs
    run_connects in a thread and, every 50 ms, sends its finished results and a stats
    snapshot (started, in flight, held) over a pipe, so the parent's timeline stays live.
    Quacks like the worker thread: start(), is_alive(), join(timeout).
    """

    def __init__(
        self,
        count: int,
        connections: int,
        concurrency: int,
        cfg: BacklogConfig,
        family: int,
        sockaddr: tuple[Any, ...],
        stop_at: float,
        tally: _Tally,
        stats: ConnectorStats,
    ) -> None:
        self.count = count
        self.connections = connections
        self.share = math.ceil(concurrency / count)
        self.cfg = cfg
        self.family = family
        self.sockaddr = sockaddr
        self.stop_at = stop_at
        self.tally = tally
        self.stats = stats
        self.failures: list[BaseException] = []
        self._children: dict[int, int] = {}  # read fd -> pid
        self._buffers: dict[int, bytearray] = {}
        self._snapshots: dict[int, tuple[int, int, int]] = {}
        self._rss_kb = 0

    def start(self) -> None:
        """Fork the connect processes. LocalError when the host refuses a pipe or a process
        (RLIMIT_NOFILE, RLIMIT_NPROC): the ones already started are killed first, so no child
        goes on connecting after the run has failed."""
        for index in range(self.count):
            try:
                read_fd, write_fd = os.pipe()
            except OSError as exc:
                self._kill_all()
                raise self._start_failed(index, "pipe()", exc) from exc
            try:
                pid = os.fork()
            except OSError as exc:
                os.close(read_fd)
                os.close(write_fd)
                self._kill_all()
                raise self._start_failed(index, "fork()", exc) from exc
            if pid == 0:  # pragma: no cover - the child never returns
                os.close(read_fd)
                for fd in self._children:
                    os.close(fd)
                self._child(index, write_fd)
            os.close(write_fd)
            os.set_blocking(read_fd, False)
            self._children[read_fd] = pid
            self._buffers[read_fd] = bytearray()

    def _start_failed(self, index: int, what: str, exc: OSError) -> LocalError:
        name = errno_name(exc.errno)
        limit = ""
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            import resource  # POSIX only, as fork is

            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            limit = f" (RLIMIT_NOFILE soft {soft}, hard {hard}: raise it with ulimit -n)"
        return LocalError(
            f"cannot start connect process {index + 1} of {self.count}: {what} failed with {name}"
            f"{limit}; the ones started were stopped",
            name,
        )

    def _child(self, index: int, write_fd: int) -> None:  # pragma: no cover - forked child
        code = 1
        try:
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # the parent ends the run
            cfg, n = self.cfg, self.count
            stats = ConnectorStats()
            pending: list[bytes] = []
            lock = threading.Lock()
            done = threading.Event()
            ok: list[bool] = []
            sources = cfg.sources
            n_sources = len(sources)

            def work() -> None:
                try:
                    jobs = (
                        ConnectJob(
                            j,
                            self.family,
                            self.sockaddr,
                            sources[j % n_sources] if n_sources else None,
                        )
                        for j in range(index, self.connections, n)
                    )
                    for r in run_connects(
                        jobs,
                        concurrency=self.share,
                        timeout_s=cfg.timeout_s,
                        rate=cfg.rate / n if cfg.rate else None,
                        hold_s=cfg.hold_s,
                        stop_at=self.stop_at,
                        stats=stats,
                    ):
                        name = (r.errno_name or "").encode("ascii", "replace")[:16]
                        ended = _ENDED_CODE.get(r.ended_by, 0)
                        record = _REC.pack(
                            _KIND_RESULT, _STATE_CODE[r.state], ended, name,
                            r.started_at, r.elapsed_s, r.held_s,
                        )  # fmt: skip
                        with lock:
                            pending.append(record)
                    ok.append(True)
                finally:
                    done.set()

            thread = threading.Thread(target=work, daemon=True)
            thread.start()
            while True:
                finished = done.wait(SAMPLE_INTERVAL_S)
                with lock:
                    batch = b"".join(pending)
                    pending.clear()
                snap = (float(stats.started), float(stats.in_flight), float(stats.held))
                batch += _REC.pack(_KIND_STATS, 0, 0, b"", *snap)
                _write_all(write_fd, batch)
                if finished:
                    break
            _write_all(
                write_fd, _REC.pack(_KIND_RSS, 0, 0, b"", float(_max_rss_kb() or 0), 0.0, 0.0)
            )
            code = 0 if ok else 1
        except BaseException:
            code = 1
        finally:
            os._exit(code)

    def is_alive(self) -> bool:
        self._pump()
        return bool(self._children)

    def _pump(self) -> None:
        for fd in list(self._children):
            buffer = self._buffers[fd]
            while True:
                try:
                    data = os.read(fd, 1 << 16)
                except BlockingIOError:
                    break
                if not data:
                    self._reap(fd)
                    break
                buffer.extend(data)
            usable = len(buffer) - len(buffer) % _REC.size
            for kind, state, ended, name, a, b, c in _REC.iter_unpack(memoryview(buffer)[:usable]):
                if kind == _KIND_RESULT:
                    text = name.rstrip(b"\0").decode("ascii") or None
                    self.tally.add(
                        ConnectResult(_NO_JOB, _STATES[state], text, a, b, c, _ENDED[ended])
                    )
                elif kind == _KIND_STATS:
                    self._snapshots[fd] = (int(a), int(b), int(c))
                else:
                    self._rss_kb += int(a)
            del buffer[:usable]
        snaps = self._snapshots.values()
        self.stats.started = sum(s[0] for s in snaps)
        self.stats.in_flight = sum(s[1] for s in snaps)
        self.stats.held = sum(s[2] for s in snaps)
        self.stats.peak_held = max(self.stats.peak_held, self.stats.held)

    def _reap(self, fd: int) -> None:
        pid = self._children.pop(fd)
        os.close(fd)
        _pid, status = os.waitpid(pid, 0)
        if status != 0:
            self.failures.append(RuntimeError(f"connect process {pid} failed (status {status})"))

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        self._kill_all()

    def _kill_all(self) -> None:
        for fd, pid in list(self._children.items()):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            self._reap(fd)

    @property
    def rss_kb_sum(self) -> int:
        """The sum of the connect processes' peak RSS (KiB)."""
        return self._rss_kb


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class _LabListener:
    """The --lab listener: listen(B) on loopback; never accepts, or accepts at a pace."""

    def __init__(self, cfg: BacklogConfig) -> None:
        # -6 puts the lab on ::1; resolve() of a literal does no I/O and gives its family.
        v6 = bool(cfg.family) and cfg.family == resolve("::1", 0)[0].family
        host = "::1" if v6 else "127.0.0.1"
        self.sock = open_listener(host, 0, backlog=cfg.backlog)
        self.host = host
        self.port = int(self.sock.getsockname()[1])
        self.accept_rate = cfg.accept_rate
        self.accept_delay_s = cfg.accept_delay_s
        self.accepted = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def accepts(self) -> bool:
        return self.accept_rate is not None or self.accept_delay_s is not None

    def start(self) -> None:
        if self.accepts:
            self._thread = threading.Thread(target=self._run, name="backlog-lab", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        if self.accept_delay_s and self._stop.wait(self.accept_delay_s):
            return
        interval = 1.0 / self.accept_rate if self.accept_rate else 0.0
        next_at = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if interval and now < next_at:
                self._stop.wait(next_at - now)
                continue
            peer = accept_and_close(self.sock, time.monotonic() + 0.05)
            if peer is None:
                continue
            self.accepted += 1
            if interval:
                # At most one accept of credit: a paced server does not catch up in bursts.
                next_at = max(next_at + interval, time.monotonic() - interval)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
        self.sock.close()


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def _jobs(
    family: int,
    sockaddr: tuple[Any, ...],
    sources: list[str],
    count: int,
    counter: itertools.count[int],
    until: float | None,
) -> Iterator[ConnectJob]:
    """Jobs for `count` attempts; sources used in turn; stops at `until` (ramp steps).

    Results are only counted, never matched back to their job, so one immutable job per
    source address is reused: no allocation per attempt on the hot path.
    """
    shared = [ConnectJob(i, family, sockaddr, src) for i, src in enumerate(sources or [None])]
    n_jobs = len(shared)
    monotonic = time.monotonic
    for _ in range(count):
        if until is not None and monotonic() >= until:
            return
        yield shared[next(counter) % n_jobs]


def run_backlog(cfg: BacklogConfig) -> Iterator[Preflight | Tick | BacklogSummary]:
    """Run the flood; yield Preflight, then a Tick per second, then the BacklogSummary.

    Raises:
        UsageError: invalid configuration (before any traffic).
        LocalError: the lab listener cannot bind.
        ResolveError: TARGET does not resolve.
    """
    validate_config(cfg)
    connections = effective_connections(cfg)
    limits_before = kernel.host_limits()
    lab = _LabListener(cfg) if cfg.lab else None
    try:
        yield from _run(cfg, connections, limits_before, lab)
    finally:
        if lab is not None:
            lab.close()


def _run(
    cfg: BacklogConfig,
    connections: int,
    limits: kernel.HostLimits,
    lab: _LabListener | None,
) -> Iterator[Preflight | Tick | BacklogSummary]:
    if lab is not None:
        host, port = lab.host, lab.port
    else:
        assert cfg.host is not None
        assert cfg.port is not None
        host, port = cfg.host, cfg.port
    resolved = preferred(resolve_named(host, port, family=cfg.family))
    address = resolved.host
    why = None if lab is not None or cfg.allow_remote else resolved_off_loopback(host, address)
    if why is not None:
        raise UsageError(f"{why}: it is flooded only with --allow-remote; nothing was sent")
    target = format_hostport(address, port)
    for source in cfg.sources:
        if (":" in source) != (":" in address):
            raise UsageError(f"--source {source} is not of the same family as {address}")
    on_host = is_loopback(address) or _is_local_address(address)

    caps: list[str] = []
    concurrency = cfg.concurrency if cfg.concurrency is not None else min(connections, 1000)
    concurrency = min(concurrency, connections)
    wanted_fds = concurrency + _FD_RESERVE
    nofile = raise_nofile_limit(wanted_fds)
    processes = 1
    if nofile.soft is not None and nofile.soft < wanted_fds:
        per_process = max(1, nofile.soft - _FD_RESERVE)
        wanted_processes = min(math.ceil(concurrency / per_process), MAX_PROCESSES)
        if cfg.processes_ok and not cfg.ramp and hasattr(os, "fork") and wanted_processes > 1:
            # The hard limit cannot be raised (no CAP_SYS_RESOURCE): each process has its
            # own RLIMIT_NOFILE, so several connect processes hold more sockets together.
            processes = wanted_processes
            caps.append(
                f"RLIMIT_NOFILE soft {nofile.soft} (hard {nofile.hard}) allows {per_process} "
                f"socket{'s' if per_process != 1 else ''} per process: the run used {processes} "
                "connect processes"
            )
            if processes * per_process < concurrency:
                caps.append(
                    f"RLIMIT_NOFILE soft {nofile.soft} (hard {nofile.hard}) per process x "
                    f"{processes} processes caps concurrency at {processes * per_process} "
                    f"(asked {concurrency})"
                )
                concurrency = processes * per_process
        else:
            caps.append(
                f"RLIMIT_NOFILE soft {nofile.soft} (hard {nofile.hard}) caps concurrency at "
                f"{per_process} (asked {concurrency})"
            )
            concurrency = per_process
    ports = limits.ports_per_source
    n_sources = max(1, len(cfg.sources))
    if ports is not None and limits.port_range is not None:
        low, high = limits.port_range
        # The lab listener bound port 0, which takes one port of the same range: connect()
        # skips a port any socket has bound, whatever its address, so from every source.
        ours = lab is not None and low <= lab.port <= high
        usable = (ports - 1 if ours else ports) * n_sources
        if concurrency > usable:
            own = f" (less the lab listener's own port {lab.port})" if ours and lab else ""
            caps.append(
                f"ip_local_port_range {low}-{high} gives {ports} ports per source address{own}: "
                f"{n_sources} source(s) cap concurrency at {usable} (asked {concurrency}); "
                "add --source addresses"
            )
            concurrency = usable

    server: _ServerView | None = None
    pid: int | None = None
    process: str | None = None
    if on_host:
        server = _ServerView(address, port)
        server.sample({})
        pid, process = _owner_of(server, lab)
    soft_now, hard_now = _nofile_now()
    limits_rec = limits.as_dict()
    limits_rec["nofile_soft"], limits_rec["nofile_hard"] = soft_now, hard_now
    limits_rec["nofile_raised_from"] = nofile.raised_from
    limits_rec["nofile_effective"] = soft_now  # the soft limit in force for this run
    prediction = _predict(cfg, connections, limits, server, lab)
    yield Preflight(prediction["text"], target, limits_rec, caps)

    counters_before = kernel.read_counters() if on_host else {}
    tally = _Tally()
    stats = ConnectorStats()
    steps: list[float | None] = list(cfg.ramp) if cfg.ramp else [cfg.rate]
    step_tallies: list[_Tally] = []
    step_server: list[dict[str, int]] = []
    step_index = [0]
    finished_at = [0.0]  # when the last connect ended (the worker sets it)
    # Whether the --duration deadline itself stopped attempts (the worker sets it): with a
    # ramp, the end of each step also stops them, and that is not the deadline.
    deadline_hit = [False]
    # Per ramp step: how many fewer attempts than its rate x --step (or than were left) it
    # started before it ended; None for a step --duration cut.
    step_shortfall: list[int | None] = []
    slots_full = [False]  # a 50 ms sample saw every concurrency slot busy
    failure: list[BaseException] = []
    started = time.monotonic()
    run_deadline = started + cfg.duration_s
    # Every run_connects call gets a stop_at no later than run_deadline; the margin only
    # covers releasing what is still open at that moment.
    hard_stop = run_deadline + 5.0

    def worker() -> None:
        counter = itertools.count()
        left = connections
        try:
            for index, rate in enumerate(steps):
                if left <= 0:
                    break
                if time.monotonic() >= run_deadline:
                    deadline_hit[0] = True
                    break
                step_index[0] = index
                # Steps are reported for ramps only; without one, a second tally of the same
                # results would only double the counting on the hot path.
                step_tally = _Tally() if cfg.ramp else tally
                step_tallies.append(step_tally)
                step_server.append({"queue": 0, "overflows_before": 0})
                if on_host:
                    step_server[-1]["overflows_before"] = kernel.read_counters().get(
                        "TcpExt.ListenOverflows", 0
                    )
                # The step's clock starts after the counter read, so that it does not eat
                # into the step's first interval.
                step_end = time.monotonic() + cfg.step_s
                quota = 0
                if cfg.ramp:
                    assert rate is not None
                    stop_at = min(step_end + cfg.timeout_s + cfg.hold_s, run_deadline)
                    until: float | None = min(step_end, run_deadline)
                    quota = min(math.ceil(rate * cfg.step_s), left)  # as effective_connections
                else:
                    stop_at, until = run_deadline, None
                stopped_before = tally.stopped_pending
                # A ramp step makes its rate x --step attempts and no more: paced at 1/rate
                # from the step's start, one more would fit just before `until` and belong,
                # by its start time, to the next step's second.
                jobs = _jobs(
                    resolved.family,
                    resolved.sockaddr,
                    cfg.sources,
                    quota if cfg.ramp else left,
                    counter,
                    until,
                )
                results = run_connects(
                    jobs,
                    concurrency=concurrency,
                    timeout_s=cfg.timeout_s,
                    rate=rate,
                    hold_s=cfg.hold_s,
                    stop_at=stop_at,
                    stats=stats,
                )
                add, add_step = tally.add, step_tally.add
                if step_tally is tally:
                    for result in results:
                        add(result)
                else:
                    for result in results:
                        add(result)
                        add_step(result)
                left = connections - tally.attempted
                finished_at[0] = time.monotonic()
                # Attempts end early only at stop_at and stop starting at `until` (None: only
                # stop_at); only those that are the run's deadline count as cut by --duration.
                cut_at_deadline = until is None or until >= run_deadline
                if (left > 0 and cut_at_deadline) or (
                    tally.stopped_pending > stopped_before and stop_at >= run_deadline
                ):
                    deadline_hit[0] = True
                if cfg.ramp:
                    step_shortfall.append(
                        None
                        if cut_at_deadline and left > 0
                        else max(0, quota - step_tally.attempted)
                    )
                if on_host:
                    after = kernel.read_counters().get("TcpExt.ListenOverflows", 0)
                    step_server[-1]["overflows"] = after - step_server[-1]["overflows_before"]
                if cfg.ramp and index + 1 < len(steps) and left > 0:
                    # Its quota made before its end, the step still lasts --step: the next
                    # rate starts on time, not early.
                    rest = min(step_end, run_deadline) - time.monotonic()
                    if rest > 0:
                        time.sleep(rest)
        except BaseException as exc:  # re-raised in the calling thread
            failure.append(exc)

    thread: threading.Thread | _ConnectProcesses
    # Fork (if at all) before the lab's accept thread exists: the children stay simple.
    if processes > 1:
        step_tallies.append(_Tally())
        step_server.append({"queue": 0})
        thread = _ConnectProcesses(
            processes, connections, concurrency, cfg, resolved.family, resolved.sockaddr,
            run_deadline, tally, stats,
        )  # fmt: skip
    else:
        thread = threading.Thread(target=worker, name="backlog-connects", daemon=True)
    thread.start()
    if lab is not None:
        lab.start()
    timeline: list[Tick] = []
    last = {"attempts": 0, "est": 0, "refused": 0, "reset": 0, "timed_out": 0, "errors": 0}
    tick_max: dict[str, int] = {}
    second = 1
    accepted_before = 0
    peak_seen, peak_at = 0, None
    interrupted_at: float | None = None
    last_tick: Tick | None = None  # an interrupted run's partial second
    try:
        while True:
            alive = thread.is_alive()
            now = time.monotonic()
            if stats.held > peak_seen:
                peak_seen, peak_at = stats.held, now - started
            if stats.in_flight + stats.held >= stats.concurrency > 0:
                slots_full[0] = True
            if server is not None:
                server.sample(tick_max)
                if step_server:
                    current = step_server[-1]
                    current["queue"] = max(current["queue"], server.queue_now or 0)
            boundary = started + second
            if now >= boundary or not alive:
                span = min(1.0, now - (boundary - 1.0))
                tick = _cut_tick(
                    second, span, tally, stats, last, tick_max, server, step_index, cfg
                )
                if lab is not None:
                    accepted_now = lab.accepted
                    tick = dataclasses.replace(tick, accepted=accepted_now - accepted_before)
                    accepted_before = accepted_now
                tick_max = {}
                second += 1  # before the yield: an interrupt thrown in there cuts the next one
                if tick.span_s > 0.001 or alive:
                    timeline.append(tick)
                    yield tick
            if not alive:
                break
            if now > hard_stop:
                # The connector should have ended by stop_at; never outlive the cap by more
                # than a few seconds even if it does not (the worker is a daemon thread).
                caps.append(
                    f"the connect loop did not end by the --duration cap; report cut at {now - started:.1f}s"
                )
                deadline_hit[0] = True
                break
            delay = max(0.0, min(SAMPLE_INTERVAL_S, started + second - time.monotonic()))
            if isinstance(thread, threading.Thread):
                thread.join(delay)  # wakes at once when the run ends
            else:
                time.sleep(delay)
    except KeyboardInterrupt:
        # Ctrl-C (SIGTERM too, in the CLI): stop, and report what was measured until now, as
        # tcpkali does; every figure was lost before. Connect processes are killed at once
        # (their results arrive every 50 ms); a worker thread is a daemon and ends with us.
        # First, no second signal may cut the report short (timeout(1) sends two, ms apart).
        ignore_stop_signals()
        interrupted_at = time.monotonic()
        if isinstance(thread, _ConnectProcesses):
            thread.join(0.0)
        pending, held = max(0, stats.in_flight), max(0, stats.held)
        held_times = stats.held_connect_times()
        tally.cut(pending, held, held_times)
        if cfg.ramp and step_tallies and step_tallies[-1] is not tally:
            step_tallies[-1].cut(pending, held, held_times)  # the step under way, as the totals
        # The second under way is reported as a run's last one is: the timeline then adds up
        # to the summary (its attempts were missing before: hundreds at a high --rate).
        span = min(1.0, max(0.0, interrupted_at - (started + second - 1)))
        tick = _cut_tick(
            second, span, tally, stats, last, tick_max, server, step_index, cfg, (pending, held)
        )
        if lab is not None:
            tick = dataclasses.replace(tick, accepted=lab.accepted - accepted_before)
        if tick.span_s > 0.001 or tick.attempts or tick.established or tick.failures:
            timeline.append(tick)
            last_tick = tick
    except BaseException:
        # A failure while sampling: do not wait for the run to finish.
        if isinstance(thread, _ConnectProcesses):
            thread.join(0.0)
        raise
    else:
        thread.join(max(0.0, hard_stop - time.monotonic()))
    if isinstance(thread, _ConnectProcesses):
        failure.extend(thread.failures)
    if failure and interrupted_at is None:
        raise failure[0]
    if last_tick is not None:
        yield last_tick
    elapsed = (interrupted_at or finished_at[0] or time.monotonic()) - started
    if interrupted_at is None and isinstance(thread, _ConnectProcesses):
        # No ramp there: attempts stop early only at the --duration deadline.
        deadline_hit[0] = tally.attempted < connections or tally.stopped_pending > 0
    # Sample once more before the lab listener closes (its queue still holds the clients).
    if server is not None:
        server.sample({})
    counters_after = kernel.read_counters() if on_host else {}
    deltas = kernel.counter_deltas(counters_before, counters_after, kernel.BACKLOG_COUNTERS)
    record = _summary_record(
        cfg,
        target,
        connections,
        concurrency,
        tally,
        stats,
        server,
        lab,
        pid,
        process,
        deltas if on_host else None,
        limits,
        limits_rec,
        caps,
        prediction,
        elapsed,
        steps,
        step_tallies,
        step_server,
        _RunEnd(deadline_hit[0], step_shortfall, slots_full[0], interrupted_at is not None),
    )
    # Sampled every 50 ms: when the most connections were held at once (for --hold runs).
    record["peak_held_at_s"] = None if peak_at is None else round(peak_at, 3)
    record["max_rss_kb"] = _max_rss_kb()
    record["processes"] = processes
    record["interrupted"] = interrupted_at is not None
    if interrupted_at is not None:
        record["interpretation"].insert(
            0,
            f"Interrupted after {elapsed:.1f} s: connects still pending then count as timed "
            "out (stopped_pending) and held ones as established, as at the --duration "
            "deadline; the prediction is not judged.",
        )
        record["prediction"]["held"] = None
        record["prediction"]["detail"] = "not judged: the run was interrupted"
    # Peak RSS of this process, and the sum of the peaks of it and its connect processes.
    record["rss_total_kb"] = record["max_rss_kb"]
    if isinstance(thread, _ConnectProcesses):
        record["rss_total_kb"] = (record["max_rss_kb"] or 0) + thread.rss_kb_sum
    # Gates judge a whole run: an interrupted one has them measured, not judged (failed null).
    judged = interrupted_at is None
    failed = [gate.text for gate in cfg.gates if judged and gate.failed(record)]
    record["gates"] = [
        {
            "gate": gate.text,
            "value": gate.value_in(record),
            "unit": "ms" if gate.metric in _LATENCY_KEYS else None,
            "failed": gate.text in failed if judged else None,
        }
        for gate in cfg.gates
    ]
    record["failed_gates"] = failed
    yield BacklogSummary(record, timeline, tally.hist, failed)


def _cut_tick(
    second: int,
    span: float,
    tally: _Tally,
    stats: ConnectorStats,
    last: dict[str, int],
    tick_max: dict[str, int],
    server: _ServerView | None,
    step_index: list[int],
    cfg: BacklogConfig,
    cut: tuple[int, int] | None = None,
) -> Tick:
    """The tick of the second ending now; `cut` is (pending, held) of an interrupted run,
    whose tally has counted those already (_Tally.cut)."""
    in_flight, held = stats.in_flight, stats.held
    if cut is None:
        # Held connections have completed their handshake but are reported only at release.
        # The connector updates `held` before the released results reach the tally, so the
        # sum can dip for a moment: keep the cumulative count monotonic (deltas never negative).
        established_now = max(last["est"], tally.handshakes + held)
        attempts_now = stats.started
    else:
        # The frozen tally is what the summary reports: counting from it makes the ticks add
        # up to the summary, while the worker thread may still be starting connects. The
        # connects still pending were counted ended (timed out) by the cut: none in flight.
        in_flight, held = 0, cut[1]
        established_now = max(last["est"], tally.handshakes)
        attempts_now = max(last["attempts"], tally.attempted)
    current = {
        "attempts": attempts_now,
        "est": established_now,
        "refused": tally.refused,
        "reset": tally.reset,
        "timed_out": tally.timed_out,
        "errors": tally.errors,
    }
    diff = {key: current[key] - last[key] for key in current}
    last.update(current)
    return Tick(
        t=second,
        span_s=span,
        step=step_index[0] if cfg.ramp else None,
        attempts=diff["attempts"],
        established=diff["est"],
        failures=diff["refused"] + diff["reset"] + diff["timed_out"] + diff["errors"],
        refused=diff["refused"],
        reset=diff["reset"],
        timed_out=diff["timed_out"],
        errors=diff["errors"],
        in_flight=in_flight,
        held=held,
        accept_queue=tick_max.get("queue") if server is not None else None,
        syn_recv=tick_max.get("syn", server.syn_recv_now) if server is not None else None,
        interrupted=cut is not None,
    )


def _is_local_address(address: str) -> bool:
    """True when `address` is one of this host's own (its listener is visible to us)."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is a dependency
        return False
    for addrs in psutil.net_if_addrs().values():
        for entry in addrs:
            if str(entry.address).split("%", 1)[0] == address:
                return True
    return False


def _max_rss_kb() -> int | None:
    """Peak resident memory of this process in KiB (None where getrusage is missing)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak // 1024) if sys.platform == "darwin" else int(peak)  # macOS: bytes


def _nofile_now() -> tuple[int | None, int | None]:
    from netprobe.sockets import nofile_limit

    return nofile_limit()


def _owner_of(server: _ServerView, lab: _LabListener | None) -> tuple[int | None, str | None]:
    if lab is not None:
        try:
            import psutil

            return os.getpid(), str(psutil.Process().name())
        except Exception:  # psutil refuses on some sandboxes: the pid is still ours
            return os.getpid(), None
    if server.inode is None:
        return None, None
    owner = kernel.socket_owners([server.inode]).get(server.inode)
    return (owner.pid, owner.process) if owner is not None else (None, None)


# ---------------------------------------------------------------------------------------------
# Prediction and interpretation (pure)
# ---------------------------------------------------------------------------------------------


def _queue_capacity(limit: int | None) -> int | None:
    # sk_acceptq_is_full uses ">": listen(N) holds N+1 (SOCKETS.md §1.2).
    return None if limit is None else limit + 1


def _predict(
    cfg: BacklogConfig,
    connections: int,
    limits: kernel.HostLimits,
    server: _ServerView | None,
    lab: _LabListener | None,
) -> dict[str, Any]:
    abort = limits.tcp_abort_on_overflow
    if lab is not None:
        limit = min(cfg.backlog, limits.somaxconn) if limits.somaxconn is not None else cfg.backlog
        if server is not None and server.limit is not None:
            limit = server.limit
        cap = limit + 1
        how = f"min(backlog {cfg.backlog}, somaxconn {limits.somaxconn}) + 1 = {cap}"
        if not lab.accepts:
            if connections <= cap:
                text = f"expect all {connections} established: the accept queue holds {how}"
                return {
                    "text": text,
                    "kind": "fits",
                    "capacity": cap,
                    "expect_established": connections,
                }
            text = (
                f"expect {cap} established ({how}), then SYN drops for the other "
                f"{connections - cap}: the listener never accepts, so they time out after "
                f"{cfg.timeout_s:g}s (tcp_abort_on_overflow={abort} does not matter for drops "
                "at SYN time)"
            )
            return {"text": text, "kind": "overflow", "capacity": cap, "expect_established": cap}
        pace = f"accepts {cfg.accept_rate:g}/s" if cfg.accept_rate else "accepts as fast as it can"
        delay = f" after {cfg.accept_delay_s:g}s" if cfg.accept_delay_s else ""
        text = (
            f"expect up to {cap} queued at once ({how}); the listener {pace}{delay}, so "
            "more connect as slots free up and dropped SYNs are retransmitted (about 1 s apart); "
            f"those still waiting after {cfg.timeout_s:g}s time out"
        )
        return {"text": text, "kind": "paced", "capacity": cap, "expect_established": None}
    if server is None:
        return {
            "text": "no server view: the target is not on this host; only the client view is measured",
            "kind": "remote",
            "capacity": None,
            "expect_established": None,
        }
    if not server.seen:
        return {
            "text": f"expect every attempt refused: nothing listens on {format_hostport(server.address, server.port)}",
            "kind": "refused",
            "capacity": None,
            "expect_established": 0,
        }
    qcap = _queue_capacity(server.limit)
    if qcap is None:
        return {
            "text": "listener found, but its queue limit is not readable here (no inet_diag)",
            "kind": "unknown",
            "capacity": None,
            "expect_established": None,
        }
    # Not `concurrency`: a connection stays in the accept queue until the server accepts it,
    # even after the client closed it, so only the run's total bounds what can pile up.
    room = (
        f"{server.members} SO_REUSEPORT listeners, each Send-Q + 1"
        if server.members > 1
        else f"Send-Q {server.limit} + 1"
    )
    # A group spreads connects by hash: one member may fill while the sum still has room.
    if server.members == 1 and connections <= qcap - (server.queue_now or 0):
        text = (
            f"expect no overflow: {connections} connects in all and the listener's queue holds "
            f"{qcap} ({room}, {server.queue_now or 0} queued now), even if it never accepts"
        )
        return {"text": text, "kind": "fits", "capacity": qcap, "expect_established": None}
    queued = server.queue_now or 0
    # Connections already waiting take their room: a queue found full (a listener that never
    # accepts, after an earlier run) has none left, and this run's connects all drop.
    now = f", {queued} queued now: room for {max(0, qcap - queued)}" if queued else ""
    text = (
        f"the listener's queue holds {qcap} ({room}{now}) and this run makes "
        f"{connections} connects; expect SYN drops (ListenOverflows) if it accepts slower than "
        "they arrive (a connection stays queued until accepted, even once the client closed "
        f"it; tcp_abort_on_overflow={abort})"
    )
    return {"text": text, "kind": "depends", "capacity": qcap, "expect_established": None}


def _queue_drops(server: dict[str, Any]) -> int | None:
    """The listener's drops that its queues caused, as far as the counters tell.

    sk_drops counts every packet the listener threw away, also a client's FIN or RST that
    meets a request socket whose final ACK was lost (a SYN-RECV ghost): that is no overflow.
    A full accept or SYN queue always counts TcpExt ListenDrops too (tcp_listendrop), so the
    smaller of the two is what the queues dropped; ListenDrops alone is system-wide (another
    listener's overflow would count), sk_drops alone is not only the queues.
    """
    drops: int | None = server.get("listener_drops_delta")
    listen_drops: int | None = server.get("listen_drops_delta")
    if drops is None or listen_drops is None:
        return drops
    return min(drops, listen_drops)


def _judge(prediction: dict[str, Any], rec: dict[str, Any]) -> tuple[bool | None, str]:
    kind = prediction["kind"]
    server = rec.get("server") or {}
    attempted = rec["attempted"]
    if kind == "refused":
        held = rec["refused"] == attempted
        return held, f"{rec['refused']} of {attempted} refused"
    if kind in ("fits", "overflow") and prediction["expect_established"] is not None:
        cap = prediction["capacity"]
        expected = min(prediction["expect_established"], attempted)
        queue_ok = server.get("accept_queue_max") is None or server["accept_queue_max"] == min(
            cap, attempted
        )
        est_ok = rec["established"] == expected
        held = queue_ok and est_ok
        return held, (
            f"established {rec['established']} (expected {expected}), accept queue peak "
            f"{server.get('accept_queue_max')} (expected {min(cap, attempted)})"
        )
    if kind == "fits":
        drops = server.get("listener_drops_delta")
        if drops is None:
            return None, "the listener's drop counter is not readable"
        queued = _queue_drops(server)
        if drops and not queued:
            return True, (
                f"listener drops +{drops}, none of them queue drops (TcpExt ListenDrops "
                f"+{server.get('listen_drops_delta')}): packets for handshakes that never "
                "completed, not an overflow"
            )
        return drops == 0, f"listener drops +{drops}"
    if kind == "paced":
        # "Up to cap": a peak below it holds too (the listener kept up).
        cap = prediction["capacity"]
        peak = server.get("accept_queue_max")
        if peak is None or attempted < cap:
            return None, "too few attempts to fill the queue"
        if peak > cap + 1:
            return False, f"accept queue peak {peak} (expected at most {cap})"
        if peak == cap + 1:
            # tcp_v4_syn_recv_sock tests the queue for room, and the child is added later
            # (inet_csk_reqsk_queue_add): two handshakes completing at once on two CPUs can
            # both pass the test. A listener that accepts meanwhile makes that likelier.
            return True, (
                f"accept queue peak {peak}: one over the {cap} the kernel's room test allows, "
                "as when two handshakes complete at once on two CPUs"
            )
        drops = _queue_drops(server)
        if peak < cap and drops:
            # The listener drops when its accept queue is full (SOCKETS.md 1.3), or, with
            # syncookies off, its SYN queue: it filled and drained between two samples.
            which = (
                "queue" if (rec.get("host") or {}).get("tcp_syncookies") else "accept or SYN queue"
            )
            return True, (
                f"accept queue peak {peak} in 50 ms samples (at most {cap} expected); the "
                f"listener dropped {drops} packets, so its {which} was full at times the "
                "sampling did not catch"
            )
        return True, f"accept queue peak {peak} (at most {cap} expected)"
    if kind == "depends":
        drops = _queue_drops(server)
        if drops is not None:
            how = "the server kept up" if drops == 0 else "the server fell behind"
            return None, f"conditional prediction; listener queue drops +{drops}: {how}"
    return None, "not checkable from this host's counters"


def _interpret(
    rec: dict[str, Any],
    cfg: BacklogConfig,
    limits: kernel.HostLimits,
    slots_full: bool = False,
    interrupted: bool = False,
) -> list[str]:
    lines: list[str] = []
    attempted = rec["attempted"]
    # `established` leaves out the connections the server reset after the handshake (they
    # are `reset`): "completed the handshake" would contradict the reset count beside it.
    parts = [
        f"{rec['established']} of {attempted} connects were established and ended normally "
        "(client view)"
    ]
    # timed_out counts the connects the run's end cut off too (stopped_pending): those are
    # not said to have timed out.
    cut_off = rec.get("stopped_pending") or 0
    for count, label in (
        (rec["timed_out"] - cut_off, "timed out"),
        (cut_off, "were still waiting when the run ended"),
        (rec["refused"], "were refused"),
        (rec["reset"], "were reset"),
        (rec["errors"], "failed locally"),
    ):
        if count:
            parts.append(f"{count} {label}")
    lines.append("; ".join(parts) + ".")
    # With tcp_abort_on_overflow=1 the kernel answers a final ACK that meets a full accept
    # queue with RST: those resets are the overflow, not the server's doing (nor ghosts).
    overflow_resets = limits.tcp_abort_on_overflow == 1
    if rec["reset_after_established"]:
        why = (
            " (tcp_abort_on_overflow=1: the kernel resets a handshake whose final ACK meets a "
            "full accept queue, so these are the overflow)"
            if overflow_resets
            else ""
        )
        lines.append(
            f"{rec['reset_after_established']} were reset by the server after the handshake "
            f"completed (ECONNRESET on an established connection){why}."
        )
    if rec["errors_by_errno"].get("EADDRNOTAVAIL"):
        lines.append(
            f"{rec['errors_by_errno']['EADDRNOTAVAIL']} got EADDRNOTAVAIL: no free local port "
            "(ip_local_port_range); add --source addresses."
        )
    if rec["errors_by_errno"].get("EMFILE"):
        lines.append("Some attempts hit EMFILE: out of file descriptors (RLIMIT_NOFILE).")
    server = rec.get("server")
    if server:
        limit, peak = server["backlog_limit"], server["accept_queue_max"]
        members = server.get("reuseport_members") or 1
        if members > 1:
            lines.append(
                f"{members} SO_REUSEPORT listeners share this address: the kernel spreads the "
                "connects over them, and the queue, limit and drop figures are their sums (the "
                "limit + 1 is the room of all of them, each Send-Q + 1); one member can be full "
                "while others have room."
            )
        if limit is not None and peak == limit + 1:
            if members > 1:
                why = f"the {members} listeners' Send-Q + 1 each"
            elif cfg.lab:
                why = f"min(backlog {cfg.backlog}, somaxconn {limits.somaxconn}) + 1"
            else:
                why = f"Send-Q {limit} + 1"
            lines.append(f"Accept queue full at {peak} = {why} (kernel's Recv-Q peak).")
        elif limit is not None and peak is not None and peak > limit + 1:
            # The room test and the queueing are not one step (two handshakes completing at
            # once can both pass it), and a listen() that lowered the backlog keeps what was
            # already queued: either way the kernel's own peak is the figure.
            lines.append(
                f"Accept queue peaked at {peak}, above its room of {limit + 1} (Send-Q {limit} "
                "+ 1): handshakes that completed at once on two CPUs, or a backlog lowered "
                "by a later listen() while connections were queued."
            )
        elif peak is not None:
            seen = "it was never seen full"
            if _queue_drops(server):
                seen += ", yet the listener dropped packets: it filled between samples"
            lines.append(
                f"Accept queue peaked at {peak} of a possible {None if limit is None else limit + 1} "
                f"in 50 ms samples: {seen}."
            )
        drops = server["listener_drops_delta"]
        if drops:
            lines.append(
                f"The listener itself dropped {drops} packets (its sk_drops counter; packets, not clients)."
            )
            if not _queue_drops(server):
                lines.append(
                    f"None of them were queue drops (TcpExt ListenDrops "
                    f"+{server['listen_drops_delta']}): packets its request sockets threw "
                    "away, such as a final ACK that TCP_DEFER_ACCEPT holds back or a client's "
                    "FIN or RST for a handshake whose final ACK was lost."
                )
        overflows = server["listen_overflows_delta"]
        if overflows:
            lines.append(
                f"TcpExt ListenOverflows +{overflows}: SYN or ACK packets dropped because an "
                "accept queue was full; packets, not clients (each retransmitted SYN counts "
                "again); system-wide, so other listeners may add to it."
            )
        # timed_out also counts the connects the run's end cut off (stopped_pending): those
        # did not wait out --timeout, and saying they timed out would claim what no
        # figure shows.
        ended = rec["stopped_pending"]
        timed_out = rec["timed_out"] - ended
        dropping = bool(_queue_drops(server) or overflows)
        if dropping and timed_out:
            lines.append(f"{timed_out} clients timed out while SYNs were being dropped.")
        if dropping and ended:
            by = (
                "the interrupt"
                if interrupted
                else f"--duration {cfg.duration_s:g}s"
                if rec["cut_by_duration"]
                else "the run's end"
            )
            lines.append(
                f"{ended} clients were still waiting while SYNs were being dropped when {by} "
                f"ended them, before their --timeout {cfg.timeout_s:g}s (counted in timed_out "
                "as stopped_pending)."
            )
        counters = rec.get("counters") or {}
        cookies = counters.get("TcpExt.SyncookiesSent")
        if cookies:
            lines.append(f"SYN cookies sent: +{cookies} (system-wide).")
        answered = counters.get("TcpExt.SyncookiesRecv")
        if answered and server.get("accepted") is None and rec["established"]:
            # The lab counts its ghosts below; a listener of someone else's cannot be asked.
            lines.append(
                f"Up to {min(answered, rec['established'])} of the {rec['established']} "
                f"connections counted established completed on a SYN cookie (SyncookiesRecv "
                f"+{answered}, system-wide) while the queue was full: a cookie's final ACK that "
                "meets a full accept queue is dropped, and the client, which counts itself "
                "connected, is not queued (a ghost until it sends)."
            )
        if server["syn_recv_max"]:
            lines.append(
                f"Up to {server['syn_recv_max']} request sockets sat in SYN-RECV: connections "
                "the client may count as connected that the server has not queued."
            )
        accepted = server.get("accepted")
        if accepted is not None and server.get("accept_queue_end") is not None:
            known = accepted + server["accept_queue_end"]
            resets = 0 if overflow_resets else rec["reset_after_established"]
            ghosts = rec["established"] + resets - known
            if ghosts > 0:
                lines.append(
                    f"{ghosts} clients reported connected that the server never queued or "
                    "accepted (SYN-RECV or syncookie ghosts)."
                )
    lines.extend(f"Limit: {cap}." for cap in rec["limits_hit"])
    if rec["cut_by_duration"]:
        lines.append(
            f"The run hit --duration {cfg.duration_s:g}s: {rec['stopped_pending']} pending "
            f"attempts were ended, {rec['not_started']} never started."
        )
    lines.extend(_ramp_shortfall_lines(rec, cfg, slots_full))
    return lines


def _ramp_shortfall_lines(rec: dict[str, Any], cfg: BacklogConfig, slots_full: bool) -> list[str]:
    # The end of each ramp step stops new attempts too: a step that cannot keep its rate
    # (too few slots, or a loop that falls behind) leaves attempts unstarted, and that is
    # not --duration.
    short = [s["step"] for s in rec.get("steps") or [] if s["rate_shortfall"]]
    left = rec["not_started_step_end"]
    concurrency = rec["concurrency"]
    if slots_full:
        remedy = "raise -c or shorten --hold" if cfg.hold_s else "raise -c"
        why = f"concurrency {concurrency}, all slots seen busy: {remedy}"
    else:
        why = f"concurrency {concurrency}, never seen all busy: the connect loop fell behind"
    if short and left:
        return [
            f"Ramp step rates not reached: {left} attempts never started before their step "
            f"ended ({why})."
        ]
    if short:
        names = ("step " if len(short) == 1 else "steps ") + ", ".join(map(str, short))
        return [
            f"Ramp step rates not reached in {names}: fewer attempts started than rate x "
            f"--step ({why})."
        ]
    if left:
        planned = sum(math.ceil(rate * cfg.step_s) for rate in cfg.ramp)
        return [
            f"The last ramp step ended with {left} attempts never started: -n "
            f"{rec['connections']} is more than the steps start at their rates ({planned})."
        ]
    return []


def _summary_record(
    cfg: BacklogConfig,
    target: str,
    connections: int,
    concurrency: int,
    tally: _Tally,
    stats: ConnectorStats,
    server: _ServerView | None,
    lab: _LabListener | None,
    pid: int | None,
    process: str | None,
    deltas: dict[str, int | None] | None,
    limits: kernel.HostLimits,
    limits_rec: dict[str, Any],
    caps: list[str],
    prediction: dict[str, Any],
    elapsed: float,
    steps: list[float | None],
    step_tallies: list[_Tally],
    step_server: list[dict[str, int]],
    end: _RunEnd,
) -> dict[str, Any]:
    not_started = connections - tally.attempted
    rec: dict[str, Any] = {
        "kind": "backlog",
        "target": target,
        "lab": cfg.lab,
        "attempted": tally.attempted,
        "established": tally.established,
        "refused": tally.refused,
        "reset": tally.reset,
        "timed_out": tally.timed_out,
        "errors": tally.errors,
        "errors_by_errno": dict(sorted(tally.errors_by_errno.items())),
        "reset_after_established": tally.reset_after_established,
        "stopped_pending": tally.stopped_pending,
        "timed_out_kernel": tally.timed_out_kernel,
        "not_started": not_started,
        # With a ramp, the attempts still left when the last step ended (not --duration).
        "not_started_step_end": (
            0 if end.deadline_hit or end.interrupted or not cfg.ramp else not_started
        ),
        "latency_ms": tally.hist.summary_ms(),
        "histogram": tally.hist.coarse(),
        "connections": connections,
        "concurrency": concurrency,
        "rate": cfg.rate,
        "hold_s": cfg.hold_s,
        "timeout_s": cfg.timeout_s,
        "duration_s": round(elapsed, 3),
        "connects_per_s": round(tally.attempted / elapsed, 1) if elapsed > 0 else None,
        "peak_held": stats.peak_held,
        "fd_backoffs": stats.fd_backoffs,
        "sources": len(cfg.sources) or 1,
        "cut_by_duration": end.deadline_hit,
        "limits_hit": list(caps),
        "host": limits_rec,
        "counters": deltas,
    }
    if server is not None:
        drops = None
        if server.drops_start is not None and server.drops_end is not None:
            drops = server.drops_end - server.drops_start
        rec["server"] = {
            "address": format_hostport(server.address, server.port),
            "bound": None if server.bound is None else format_hostport(server.bound, server.port),
            "listening": server.seen,
            "backlog_limit": server.limit,
            "accept_queue_max": server.queue_max if server.seen else None,
            "accept_queue_end": server.queue_now,
            "syn_recv_max": server.syn_recv_max if server.seen else None,
            "listener_drops_delta": drops,
            "listen_overflows_delta": (deltas or {}).get("TcpExt.ListenOverflows"),
            "listen_drops_delta": (deltas or {}).get("TcpExt.ListenDrops"),
            "syncookies_sent_delta": (deltas or {}).get("TcpExt.SyncookiesSent"),
            "pid": pid,
            "process": process,
            "accepted": lab.accepted if lab is not None else None,
            "queue_source": server.source,
            "reuseport_members": server.members,
            # ListenOverflows/ListenDrops count dropped packets (a retransmitted SYN counts
            # again), not clients; the TcpExt ones are system-wide (SOCKETS.md 1.5).
            "drop_counters_unit": "packets, not clients; TcpExt counters are system-wide",
        }
    else:
        rec["server"] = None
    if cfg.ramp:
        rec["steps"] = [
            {
                "step": i,
                "rate": steps[i],
                "attempted": t.attempted,
                "established": t.established,
                "refused": t.refused,
                "reset": t.reset,
                "timed_out": t.timed_out,
                "errors": t.errors,
                "latency_ms": t.hist.summary_ms(),
                "accept_queue_max": step_server[i].get("queue") if server is not None else None,
                "listen_overflows_delta": step_server[i].get("overflows")
                if server is not None
                else None,
                "rate_shortfall": end.step_shortfall[i] if i < len(end.step_shortfall) else None,
            }
            for i, t in enumerate(step_tallies)
        ]
    held, detail = _judge(prediction, rec)
    rec["prediction"] = {"text": prediction["text"], "held": held, "detail": detail}
    rec["interpretation"] = _interpret(rec, cfg, limits, end.slots_full, end.interrupted)
    return rec
