"""port-check's repeated modes: latency probes (tcping/paping: --count) and wait-until-open
(wait-for-it: --wait), both built on the one-pass checks of netprobe.engines.port_check.

Kept apart from the scan so a scan's start-up does not define what only these modes use. Never
prints; the statistics are pure functions, tested without sockets.
"""

from __future__ import annotations

import collections
import functools
import heapq
import math
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum

from netprobe.engines.port_check import (
    _TCP_STATE,
    _UDP_STATE,
    CheckConfig,
    Expect,
    HostSpec,
    PortCheckResult,
    PortState,
    TargetSpec,
    _all_keys,
    _probe,
    _result,
    _unresolved,
    answered,
    build_hosts,
    expectation_met,
    plan_concurrency,
    resolve_again,
)
from netprobe.errors import UsageError, from_an_interrupt
from netprobe.results import ConnectState
from netprobe.sockets import Resolved, WakePipe, format_hostport
from netprobe.sockets import sleep as sockets_sleep

__all__ = [
    "LatencyStats",
    "LatencySummary",
    "Probe",
    "WaitOutcome",
    "WaitProgress",
    "latency_stats",
    "percentile",
    "run_latency",
    "run_wait",
]


@dataclass(frozen=True, slots=True)
class LatencyStats:
    """Aggregates of one target's probes; times in ms, None when no probe got an answer."""

    sent: int
    received: int
    loss_pct: float
    min_ms: float | None
    avg_ms: float | None
    max_ms: float | None
    stddev_ms: float | None
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Linear-interpolated percentile of sorted values (numpy's default "linear" method).

    Raises:
        ValueError: no values, or pct outside 0-100.
    """
    if not sorted_values:
        raise ValueError("percentile of no values")
    if not 0.0 <= pct <= 100.0:
        raise ValueError(f"percentile {pct} outside 0-100")
    rank = (len(sorted_values) - 1) * pct / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(sorted_values) - 1)
    fraction = rank - low
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * fraction


def latency_stats(samples_ms: Sequence[float], sent: int) -> LatencyStats:
    """Aggregate answered probes' latencies; `sent` counts every probe (for loss %).

    stddev is the population standard deviation (as ping's mdev); percentiles interpolate
    linearly between ranks.

    Raises:
        ValueError: more samples than probes sent.
    """
    received = len(samples_ms)
    if received > sent:
        raise ValueError(f"{received} answers for {sent} probes")
    loss = 0.0 if sent == 0 else round(100.0 * (sent - received) / sent, 3)
    if not samples_ms:
        return LatencyStats(
            sent, 0, loss if sent else 0.0, None, None, None, None, None, None, None
        )
    ordered = sorted(samples_ms)
    mean = math.fsum(ordered) / received
    variance = math.fsum((x - mean) ** 2 for x in ordered) / received
    return LatencyStats(
        sent,
        received,
        loss,
        round(ordered[0], 3),
        round(mean, 3),
        round(ordered[-1], 3),
        round(math.sqrt(variance), 3),
        round(percentile(ordered, 50), 3),
        round(percentile(ordered, 90), 3),
        round(percentile(ordered, 99), 3),
    )


@dataclass(frozen=True, slots=True)
class Probe:
    """One latency probe (kind "port-check.probe" in JSON)."""

    target: str
    address: str | None
    port: int | None
    proto: str
    seq: int
    state: PortState
    errno_name: str | None
    latency_ms: float | None


@dataclass(frozen=True, slots=True)
class LatencySummary:
    """All probes of one address:port (kind "port-check.latency" in JSON).

    `state` is open when any probe was answered "open", else the last probe's state; `ok`
    applies the expectation to that state.
    """

    target: str
    address: str | None
    port: int | None
    proto: str
    state: PortState
    errno_name: str | None
    expect: Expect
    ok: bool
    sent: int
    received: int
    loss_pct: float | None  # None: nothing was sent (a name that did not resolve)
    min_ms: float | None
    avg_ms: float | None
    max_ms: float | None
    stddev_ms: float | None
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None

    def as_result(self) -> PortCheckResult:
        """The summary as a plain result, for the tally and the exit status."""
        return PortCheckResult(
            self.target,
            self.address,
            self.port,
            self.proto,
            self.state,
            self.errno_name,
            self.avg_ms,
            None,
            self.expect,
            self.ok,
            self.sent,
        )


def _paced_until(round_start: float, probes: int, rate: float | None) -> float:
    """When a round of `probes` attempts started at round_start is done under `rate` per
    second (no rate: at once)."""
    return round_start + probes / rate if rate else round_start


class _Batch(Enum):
    """Sentinel a batch's thread queues last: it is done (its sockets are closed)."""

    DONE = "done"


# What a batch's thread hands over: one probe's answer (key, state, errno_name, elapsed_s), an
# exception it raised, or DONE.
_BatchItem = tuple[int, ConnectState, str | None, float] | BaseException | _Batch


def _run_batch(
    hosts: Sequence[HostSpec],
    keys: list[int],
    config: CheckConfig,
    out: Callable[[_BatchItem], None],
    stop: threading.Event,
) -> None:
    # A thread of its own, so that a batch's slowest probe holds up no other target's next one.
    try:
        results = _probe(hosts, keys, config, concurrency=len(keys), timeout_s=config.timeout_s)
        try:
            for item in results:
                out(item)
                if stop.is_set():
                    break  # the run is over (Ctrl-C, an error): nobody reads the rest
        finally:
            if isinstance(results, Generator):
                results.close()  # the sockets still waiting are closed now, not at GC
    except BaseException as exc:  # raised by the caller's thread, as if the probe were there
        out(exc)
    finally:
        out(_Batch.DONE)


# How long answers of one batch that came in together are waited for before the next batch
# starts (see _latency_probes): a thread hands over a burst of them in microseconds.
_GATHER_S = 0.002


def run_latency(
    hosts: Sequence[HostSpec],
    config: CheckConfig,
    *,
    count: int,
    interval_s: float,
    sleep: Callable[[float], None] = sockets_sleep,
    on_interrupt: Callable[[], None] | None = None,
) -> Generator[Probe | LatencySummary, None, None]:
    """Probe every address:port `count` times, each on its own pace: a target's next probe
    starts `interval_s` after its last one started, or as that one ends if it took longer,
    whatever the other targets' probes do (as tcping and paping pace each target).

    Yields each Probe as it ends, then one LatencySummary per address:port. A Ctrl-C
    (KeyboardInterrupt) mid-run yields the summaries of the probes made so far, as ping
    prints its statistics, then raises again: the next call to the iterator raises it.
    `sleep` is how it waits while no probe is out; `on_interrupt` is called before the
    summaries of an interrupted run are yielded (a consumer that must not wait on a reader
    now, as a CLI writing to a pipe, learns it there).
    """
    proto = "udp" if config.udp else "tcp"
    keys = list(_all_keys(hosts))
    samples: dict[int, list[float]] = {key: [] for key in keys}
    made: dict[int, int] = dict.fromkeys(keys, 0)  # probes ended, per address:port
    last: dict[int, tuple[PortState, str | None]] = {}
    stop = threading.Event()
    wake = WakePipe()
    final: list[LatencySummary] = []  # the summaries of a run whose probes are all made
    handed = 0  # how many of them the consumer has (or is being given)
    try:
        try:
            # The loop runs in a frame of its own, with no try around it there: CPython
            # (3.11 to 3.13) can raise a KeyboardInterrupt that lands on a loop's jump back
            # to its head as if outside the try the loop begins (gh-108214), and this run
            # then ended without its summaries, about one Ctrl-C in a few hundred. Raised in
            # the probes' frame, it reaches this one through the `yield from`, which the try
            # covers.
            yield from _latency_probes(
                hosts, config, keys, count, interval_s, sleep, samples, made, last, stop, wake
            )
        finally:
            stop.set()  # after an error, or a consumer gone: the batches still out end early
            wake.close()
        final = list(_latency_summaries(hosts, keys, samples, made, last, proto, False))
        for summary in final:
            handed += 1
            yield summary
    except BaseException as exc:
        if not from_an_interrupt(exc):
            raise
        stop.set()
        wake.close()
        if on_interrupt is not None:
            on_interrupt()
        if final:
            # Every probe was made: the summaries the consumer does not have yet (the one it
            # was being given when the interrupt came is its own).
            yield from final[handed:]
        else:
            yield from _latency_summaries(hosts, keys, samples, made, last, proto, True)
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise KeyboardInterrupt from exc  # as the caller handles a Ctrl-C


def _latency_probes(
    hosts: Sequence[HostSpec],
    config: CheckConfig,
    keys: list[int],
    count: int,
    interval_s: float,
    sleep: Callable[[float], None],
    samples: dict[int, list[float]],
    made: dict[int, int],
    last: dict[int, tuple[PortState, str | None]],
    stop: threading.Event,
    wake: WakePipe,
) -> Iterator[Probe]:
    """run_latency's probes, each yielded as it ends; `samples`, `made` and `last` are kept
    up to date for the summaries."""
    proto = "udp" if config.udp else "tcp"
    concurrency = plan_concurrency(config.concurrency, len(keys)) if keys else 1
    states = _UDP_STATE if config.udp else _TCP_STATE
    # Plan: no rounds. Rounds waited for their slowest probe, so one target that never
    # answers stretched every other target's interval to --timeout. Instead each target has
    # its own due time; the probes due at one moment start together as a batch, in a thread
    # of its own, and every batch's answers come back here (a deque, and a byte on `wake`),
    # so the Probes are still yielded from the caller's thread, in the order they ended.
    # Sockets out over all batches stay within `concurrency`. --rate holds over all of them
    # too: a batch of n starts no sooner than n / rate seconds after the one before it.
    position = {key: index for index, key in enumerate(keys)}  # ties keep the targets' order
    start = time.monotonic()
    due = [(start, index, key) for index, key in enumerate(keys)]  # a heap, soonest first
    began: dict[int, float] = {}  # the keys with a probe out: when its batch started
    answers: collections.deque[tuple[int, _BatchItem]] = collections.deque()

    def hand_over(batch_id: int, item: _BatchItem) -> None:  # in a batch's thread
        answers.append((batch_id, item))
        wake.wake()

    running = 0  # batch threads not done yet
    started_batches = 0
    outstanding: dict[int, int] = {}  # per batch still out: the answers not in yet
    rate_free = start  # when --rate lets the next batch start
    # The batch whose answers are coming in, and until when the rest of them is waited for.
    burst: int | None = None
    burst_until = 0.0
    held_since: float | None = None  # when a due batch was first held back for a burst
    while due or began or running:
        if not answers:
            now = time.monotonic()
            room = concurrency - len(began)
            if due and room > 0 and max(due[0][0], rate_free) <= now:
                if burst is not None and now < burst_until:
                    # Probes that end together (refusals, a timeout shared by many targets)
                    # start again as one batch. Their thread hands them over one at a time,
                    # and each wake-up lets this thread in before the next: wait for the
                    # rest (until all of that batch's are in) first, _GATHER_S at most in
                    # all, however many batches answer meanwhile.
                    if held_since is None:
                        held_since = now
                    if now < held_since + _GATHER_S:
                        wake.wait(answers.__len__, min(burst_until, held_since + _GATHER_S))
                        continue
                held_since = None
                batch: list[int] = []
                while due and due[0][0] <= now and len(batch) < room:
                    batch.append(heapq.heappop(due)[2])
                began.update(dict.fromkeys(batch, now))
                if config.rate:
                    rate_free = max(rate_free, now) + len(batch) / config.rate
                threading.Thread(
                    target=_run_batch,
                    args=(
                        hosts,
                        batch,
                        config,
                        functools.partial(hand_over, started_batches),
                        stop,
                    ),
                    name="port-check-latency",
                    daemon=True,  # an interrupted run does not wait for its probes out
                ).start()
                outstanding[started_batches] = len(batch)
                started_batches += 1
                running += 1
                continue
            next_at = max(due[0][0], rate_free) if due and room > 0 else None
            if not running:
                # Nothing out (so there is room): only the next probe's time to wait for.
                sleep(max(0.0, (next_at or now) - now))
                continue
            # The socket core's wait: it polls the signal wake-up fd too, so a Ctrl-C acts
            # at once wherever it lands (a queue's lock wait slept through one that came
            # just before it, and could fail on one that came inside it).
            wake.wait(answers.__len__, next_at)
            continue
        batch_id, item = answers.popleft()
        if item is _Batch.DONE:
            running -= 1
            outstanding.pop(batch_id, None)
            if burst == batch_id:
                burst = None
            continue
        if burst != batch_id:
            burst, burst_until = batch_id, time.monotonic() + _GATHER_S
        left = outstanding.get(batch_id, 0) - 1
        outstanding[batch_id] = left
        if left <= 0 and burst == batch_id:
            burst = None  # all of its answers are in: nothing more to wait for
        if isinstance(item, BaseException):
            raise item
        key, state, errno_name, elapsed = item
        ended = time.monotonic()
        mapped = states[state]
        host = hosts[key >> 16]
        # As a check's latency_ms: an RST is an answer too. The summary's figures
        # stay those of completed handshakes.
        latency = round(elapsed * 1000.0, 3) if answered(mapped) else None
        made[key] += 1
        if mapped is PortState.OPEN:
            samples[key].append(elapsed * 1000.0)
            last[key] = (mapped, errno_name)  # EAGAIN: open, its accept queue full
        elif last.get(key, (None,))[0] is not PortState.OPEN:
            last[key] = (mapped, errno_name)
        started = began.pop(key)
        if made[key] < count:
            heapq.heappush(due, (max(started + interval_s, ended), position[key], key))
        yield Probe(
            host.target,
            host.address,
            *_port_proto(host, key, proto),
            made[key],  # one probe of a target is out at a time: this is its number
            mapped,
            errno_name,
            latency,
        )


def _latency_summaries(
    hosts: Sequence[HostSpec],
    keys: list[int],
    samples: dict[int, list[float]],
    made: dict[int, int],
    last: dict[int, tuple[PortState, str | None]],
    proto: str,
    interrupted: bool,
) -> Iterator[LatencySummary]:
    """One summary per address:port over the probes made (and per unresolved host: none
    sent)."""
    for host in hosts:
        if host.error is not None:
            result = _unresolved(host, proto)
            yield LatencySummary(
                host.target,
                None,
                result.port,
                proto,
                PortState.ERROR,
                host.error,
                host.expect,
                False,
                0,  # no probe was sent: the name never gave an address
                0,
                None,
                None,
                None,
                None,
                None,
                None,
                None,
                None,
            )
    for key in keys:
        if interrupted and not made[key]:
            continue  # no probe of it ended: nothing to sum up
        host = hosts[key >> 16]
        agg = latency_stats(samples[key], made[key])
        final, final_errno = last.get(key, (PortState.FILTERED, None))
        yield LatencySummary(
            host.target,
            host.address,
            *_port_proto(host, key, proto),
            final,
            final_errno,
            host.expect,
            expectation_met(final, host.expect),
            agg.sent,
            agg.received,
            agg.loss_pct,
            agg.min_ms,
            agg.avg_ms,
            agg.max_ms,
            agg.stddev_ms,
            agg.p50_ms,
            agg.p90_ms,
            agg.p99_ms,
        )


# ---------------------------------------------------------------------------------------------
# Wait mode (wait-for-it, for many targets in parallel)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WaitProgress:
    """After each round: how many checks hold, how many are needed, who is still waited for."""

    round: int
    satisfied: int
    needed: int
    total: int
    left_s: float
    waiting: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class WaitOutcome:
    """How the wait ended: `held` True when the requirement held before the deadline."""

    held: bool
    elapsed_s: float
    rounds: int
    results: tuple[PortCheckResult, ...]  # the latest result of every check
    never: tuple[str, ...]  # checks whose condition never held (host:port as given)


def _label(host: HostSpec, port: int) -> str:
    if host.unix:
        return host.target
    return format_hostport(host.name, port)  # as given: "db:5432", not the address of db


def _port_proto(host: HostSpec, key: int, proto: str) -> tuple[int | None, str]:
    if host.unix:
        return None, "unix"
    return key & 0xFFFF, proto


def run_wait(
    specs: Sequence[TargetSpec],
    config: CheckConfig,
    *,
    ports: tuple[int, ...] | None,
    family: int,
    expect: Expect,
    required: int | None,
    deadline_s: float,
    interval_s: float,
    resolver: Callable[[str, int], list[Resolved]] | None = None,
) -> Iterator[WaitProgress | WaitOutcome]:
    """Retry the checks until the requirement holds or `deadline_s` passes.

    A check that held stays held (it is not probed again). The names of the checks still to
    hold are looked up again each round (a container's name may appear late, or at another
    address); a lookup still out at the deadline ends as EAI_AGAIN, unless an earlier round
    answered that check (its answer stands: the cut lookup learnt nothing). The pause between
    rounds starts at 50 ms and doubles, capped at `interval_s`. Yields a WaitProgress after
    each round and the WaitOutcome last.
    """
    start = time.monotonic()
    end = start + deadline_s
    proto = "udp" if config.udp else "tcp"
    hosts = build_hosts(
        specs, ports=ports, family=family, expect=expect, resolver=resolver, deadline=end
    )
    # Units of the requirement: every address:port (an unresolvable name counts per port).
    units = [(i, port) for i, host in enumerate(hosts) for port in host.ports]
    needed = len(units) if required is None else required
    if needed > len(units):
        raise UsageError(f"--require {needed} is more than the {len(units)} checks given")
    latest: dict[tuple[int, int], PortCheckResult] = {}
    done: set[tuple[int, int]] = set()
    pause = 0.05
    rounds = 0
    last_round = False  # the pause ran into the deadline: one more probe, no new lookup
    while True:
        rounds += 1
        round_start = time.monotonic()
        probes = 0
        left = end - round_start
        if rounds > 1 and not last_round:
            # Every name with a check still to hold, not only those that did not resolve:
            # a container made anew comes back under its name at another address.
            waiting_on = {i for (i, p) in units if (i, p) not in done}
            again = resolve_again(hosts, family, resolver, which=waiting_on, deadline=end)
            left = end - time.monotonic()
            if left <= 0:
                # The lookups took the time that was left: one the deadline cut short is an
                # EAI_AGAIN that says nothing of the name, so the last round's verdicts stand.
                rounds -= 1
                break
            hosts = again
        todo = [(i, p) for (i, p) in units if (i, p) not in done and hosts[i].error is None]
        for i, p in units:
            if hosts[i].error is not None:
                latest[(i, p)] = _result(
                    hosts[i], p, proto, PortState.ERROR, hosts[i].error, None, rounds
                )
        if todo:
            probes = len(todo)
            timeout = max(0.001, min(config.timeout_s, left))
            keyed = [(i << 16) | p for i, p in todo]
            concurrency = plan_concurrency(config.concurrency, len(keyed))
            states = _UDP_STATE if config.udp else _TCP_STATE
            for key, state, errno_name, elapsed in _probe(
                hosts, keyed, config, concurrency=concurrency, timeout_s=timeout
            ):
                unit = (key >> 16, key & 0xFFFF)
                result = _result(
                    hosts[unit[0]], unit[1], proto, states[state], errno_name, elapsed, rounds
                )
                latest[unit] = result
                if result.ok:
                    done.add(unit)
        now = time.monotonic()
        waiting = tuple(_label(hosts[i], p) for i, p in units if (i, p) not in done)
        if len(done) >= needed:
            yield WaitOutcome(True, now - start, rounds, _ordered(latest, units), waiting)
            return
        if now >= end:
            yield WaitOutcome(False, now - start, rounds, _ordered(latest, units), waiting)
            return
        yield WaitProgress(rounds, len(done), needed, len(units), end - now, waiting)
        # --rate holds across rounds too: the next round starts no sooner than this one's
        # probes were allowed to take.
        paced = _paced_until(round_start, probes, config.rate)
        if paced >= end:
            # The rate allows no more rounds before the deadline: wait it out, then report.
            sockets_sleep(max(0.0, end - time.monotonic()))
            now = time.monotonic()
            yield WaitOutcome(False, now - start, rounds, _ordered(latest, units), waiting)
            return
        until = max(time.monotonic() + pause, paced)
        # A pause that runs into the deadline still ends in a probe (a service up in the last
        # interval is found), but with the last answers: a lookup then would be cut at once.
        last_round = until >= end
        sockets_sleep(max(0.0, min(until, end) - time.monotonic()))
        pause = min(pause * 2, max(interval_s, 0.05))
    now = time.monotonic()
    yield WaitOutcome(False, now - start, rounds, _ordered(latest, units), waiting)


def _ordered(
    latest: dict[tuple[int, int], PortCheckResult], units: Sequence[tuple[int, int]]
) -> tuple[PortCheckResult, ...]:
    return tuple(latest[unit] for unit in units if unit in latest)
