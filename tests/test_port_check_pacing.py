"""Latency mode paces each target on its own (tcping, paping): a silent target does not stretch
an answering one's interval to the timeout. Real loopback listeners; the silent one is a full
accept queue (its SYNs are dropped, so connects time out)."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import pytest

from netprobe.engines import port_check_modes
from netprobe.engines.port_check import CheckConfig, Expect, PortState, build_hosts, parse_targets
from netprobe.engines.port_check_modes import LatencySummary, Probe, run_latency
from tests.helpers import LONG, ServerThread, invoke

# A silent probe takes TIMEOUT_S; the answering target's third probe starts 2 * INTERVAL_S in.
# The gap between the two (1.1 s) is the slack a loaded machine gets.
INTERVAL_S = 0.2
TIMEOUT_S = 1.5
COUNT = 3


def test_an_answering_target_is_not_paced_by_a_silent_one(
    server: ServerThread, full_queue_port: int
) -> None:
    # Before: rounds. Each waited for its slowest probe, so the open port was probed once per
    # timeout (1.5 s apart, not 0.2 s), its second probe only after the silent one's first
    # had timed out.
    targets = [f"127.0.0.1:{server.port}", f"127.0.0.1:{full_queue_port}"]
    hosts = build_hosts(
        parse_targets(targets), ports=None, family=socket.AF_INET, expect=Expect.OPEN
    )
    config = CheckConfig(timeout_s=TIMEOUT_S)
    started = time.monotonic()
    seen = [
        (time.monotonic() - started, event)
        for event in run_latency(hosts, config, count=COUNT, interval_s=INTERVAL_S)
    ]
    probes = [(at, e) for at, e in seen if isinstance(e, Probe)]
    fast = [(at, e) for at, e in probes if e.port == server.port]
    slow = [(at, e) for at, e in probes if e.port == full_queue_port]
    assert [(e.seq, e.state) for _at, e in fast] == [(k, PortState.OPEN) for k in (1, 2, 3)]
    assert [(e.seq, e.state) for _at, e in slow] == [(k, PortState.FILTERED) for k in (1, 2, 3)]
    # Every probe of the open port ended before the silent port's first timeout ...
    first_timeout = slow[0][0]
    assert all(at < first_timeout for at, _e in fast), [round(at, 3) for at, _e in fast]
    # ... yet they were paced, not fired back to back: probe k starts (k-1) intervals in.
    for k, (at, _e) in enumerate(fast):
        assert at >= k * INTERVAL_S, [round(at, 3) for at, _e in fast]
    # The summaries still come after every probe, one per target, in the targets' order.
    summaries = [e for _at, e in seen[len(probes) :] if isinstance(e, LatencySummary)]
    assert len(summaries) == len(seen) - len(probes)
    assert [(s.port, s.state, s.sent, s.received) for s in summaries] == [
        (server.port, PortState.OPEN, COUNT, COUNT),
        (full_queue_port, PortState.FILTERED, COUNT, 0),
    ]


def _rows(stdout: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.decode().splitlines() if line.strip()]


def test_cli_latency_lines_of_an_answering_target_come_before_a_silent_ones_timeout(
    server: ServerThread, full_queue_port: int
) -> None:
    # `port-check OPEN SILENT -c 3 --interval 200ms`: before, the open port's probes 2 and 3
    # came after each of the silent port's timeouts.
    open_t, silent_t = f"127.0.0.1:{server.port}", f"127.0.0.1:{full_queue_port}"
    argv = ["port-check", open_t, silent_t, "-c", str(COUNT), "--json"]
    result = invoke([*argv, "--interval", "200ms", "--timeout", "1500ms"])
    assert result.exit_code == 3, result.stderr  # only timeouts fail: the silent port
    rows = _rows(result.stdout)
    kinds = [r["kind"] for r in rows]
    assert kinds == ["port-check.probe"] * (2 * COUNT) + ["port-check.latency"] * 2
    order = [(r["port"], r["seq"]) for r in rows[: 2 * COUNT]]
    # The open port's three probes, then the silent port's: its first ends at the timeout.
    assert order == [(server.port, k) for k in (1, 2, 3)] + [
        (full_queue_port, k) for k in (1, 2, 3)
    ]
    assert [(r["target"], r["state"], r["received"]) for r in rows[2 * COUNT :]] == [
        (open_t, "open", COUNT),
        (silent_t, "filtered", 0),
    ]


def test_probes_that_end_together_start_again_as_one_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 20 closed ports, refused at once, probed 5 times with no interval: one batch (a thread,
    # an epoll set) a round. A version that woke the caller per answer started the next batch
    # on the first answer in: 15 to 33 batches for these 100 probes.
    listeners = []
    try:
        for _ in range(20):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))  # bound, not listening: refused, and nobody's port
            listeners.append(sock)
        targets = [f"127.0.0.1:{sock.getsockname()[1]}" for sock in listeners]
        hosts = build_hosts(
            parse_targets(targets), ports=None, family=socket.AF_INET, expect=Expect.OPEN
        )
        sizes: list[int] = []
        run_batch = port_check_modes._run_batch

        def counted(*args: Any) -> None:  # each batch's thread
            sizes.append(len(args[1]))
            run_batch(*args)

        monkeypatch.setattr(port_check_modes, "_run_batch", counted)
        events = list(run_latency(hosts, CheckConfig(timeout_s=LONG), count=5, interval_s=0.0))
    finally:
        for sock in listeners:
            sock.close()
    assert sum(isinstance(e, Probe) and e.state is PortState.CLOSED for e in events) == 100
    # A thread preempted for milliseconds mid-hand-over may split a round: slack for that
    # (with three CPU hogs on 2 cores: 5 to 10 batches in 100 runs).
    assert len(sizes) <= 12, sizes


def _two_targets(server: ServerThread, closed_port: int) -> Any:
    targets = [f"127.0.0.1:{server.port}", f"127.0.0.1:{closed_port}"]
    return build_hosts(
        parse_targets(targets), ports=None, family=socket.AF_INET, expect=Expect.OPEN
    )


def test_a_ctrl_c_while_the_summaries_go_out_keeps_the_rest_of_them(
    server: ServerThread, closed_port: int
) -> None:
    # The consumer (the CLI printing the first summary) hands the interrupt back, as
    # cli/port_check does. Before, the final summaries were outside the engine's try: the
    # generator ended there, and the second target's summary was lost.
    notified: list[bool] = []
    events = run_latency(
        _two_targets(server, closed_port),
        CheckConfig(timeout_s=LONG),
        count=2,
        interval_s=0.0,
        on_interrupt=lambda: notified.append(True),
    )
    first = next(e for e in events if isinstance(e, LatencySummary))
    rest = [events.throw(KeyboardInterrupt())]
    with pytest.raises(KeyboardInterrupt):
        rest.extend(events)
    assert notified == [True]
    summaries = [s for s in [first, *rest] if isinstance(s, LatencySummary)]
    assert [(s.port, s.sent) for s in summaries] == [(server.port, 2), (closed_port, 2)]
    assert len(rest) == 1


def test_a_ctrl_c_between_probes_sums_up_the_probes_made(
    server: ServerThread, closed_port: int
) -> None:
    events = run_latency(
        _two_targets(server, closed_port), CheckConfig(timeout_s=LONG), count=5, interval_s=LONG
    )
    probes = [next(events), next(events)]  # the first of each target; the next is LONG away
    assert all(isinstance(p, Probe) for p in probes)
    rest = [events.throw(KeyboardInterrupt())]
    with pytest.raises(KeyboardInterrupt):
        rest.extend(events)
    summaries = [s for s in rest if isinstance(s, LatencySummary)]
    assert [(s.port, s.sent) for s in summaries] == [(server.port, 1), (closed_port, 1)]
    assert len(rest) == 2


def _lock_error_from_a_ctrl_c() -> RuntimeError:
    """What threading's Condition.wait gives when a Ctrl-C lands between its lock's release
    and its try: the `with` around it fails to release, the interrupt as the context."""
    try:
        try:
            raise KeyboardInterrupt
        finally:
            raise RuntimeError("release unlocked lock")
    except RuntimeError as exc:
        return exc


def test_a_ctrl_c_that_threading_turned_into_an_error_is_still_a_ctrl_c(
    server: ServerThread, closed_port: int
) -> None:
    events = run_latency(
        _two_targets(server, closed_port), CheckConfig(timeout_s=LONG), count=5, interval_s=LONG
    )
    assert all(isinstance(next(events), Probe) for _ in range(2))
    rest = [events.throw(_lock_error_from_a_ctrl_c())]
    with pytest.raises(KeyboardInterrupt):
        rest.extend(events)
    summaries = [s for s in rest if isinstance(s, LatencySummary)]
    assert [(s.port, s.sent) for s in summaries] == [(server.port, 1), (closed_port, 1)]
    # Elsewhere the command line takes it for the interrupt it was: exit 130, not 70.
    from netprobe.errors import from_an_interrupt

    assert from_an_interrupt(_lock_error_from_a_ctrl_c())
    assert not from_an_interrupt(RuntimeError("release unlocked lock"))


def test_the_command_line_exits_130_for_a_ctrl_c_turned_into_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def interrupted(*_args: Any, **_kwargs: Any) -> Any:
        raise _lock_error_from_a_ctrl_c()

    monkeypatch.setattr(port_check_modes, "run_latency", interrupted)
    result = invoke(["port-check", "127.0.0.1:1", "-c", "2", "--json"])
    assert result.exit_code == 130, result.stderr
    assert "internal error" not in result.stderr
