"""netprobe backlog --lab: the kernel's accept queue holds exactly B+1 (Linux), slow accepts."""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest

from netprobe import kernel
from tests.helpers import invoke, run_in_own_netns

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux queue rules")


def _run(argv: list[str]) -> list[dict[str, Any]]:
    result = invoke(["backlog", "--lab", "--json", *argv])
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.decode().splitlines()]
    summary = records[-1]
    assert summary["kind"] == "backlog"
    parts = ("established", "refused", "reset", "timed_out", "errors")
    assert sum(summary[k] for k in parts) == summary["attempted"]
    return records


@pytest.mark.parametrize("backlog", [4, 8, 16])
def test_lab_queue_fills_at_backlog_plus_one(backlog: int) -> None:
    somaxconn = kernel.host_limits().somaxconn or backlog
    capacity = min(backlog, somaxconn) + 1
    extra = 10
    argv = ["--backlog", str(backlog), "-n", str(capacity + extra), "--timeout", "300ms"]
    summary = _run([*argv, "--duration", "5s"])[-1]
    server = summary["server"]
    assert server["backlog_limit"] == min(backlog, somaxconn)
    assert server["accept_queue_max"] == capacity
    assert server["accepted"] == 0
    assert server["pid"] is not None
    # A never-accepting listener frees no slot: no ghost connections, the rest time out.
    assert summary["established"] == capacity
    assert summary["timed_out"] == extra
    # Each dropped SYN counts once at least; the counters are system-wide, so only >=.
    assert server["listener_drops_delta"] >= extra
    assert server["listen_overflows_delta"] >= extra
    assert summary["prediction"]["held"] is True
    assert any(f"Accept queue full at {capacity}" in line for line in summary["interpretation"])


@pytest.mark.slow
def test_slow_accepting_server_grows_at_the_accept_rate() -> None:
    rate = 20
    argv = ["--backlog", "4", "--accept-rate", str(rate), "--rate", "200", "-n", "600"]
    records = _run([*argv, "--timeout", "1s", "--duration", "3s"])
    timeline, summary = records[:-1], records[-1]
    full = [t for t in timeline if t["span_s"] >= 0.99]
    assert len(full) >= 2
    for tick in full:
        # New SYNs arrive 10x faster than accepts, so the queue stays full and the server
        # accepts about `rate` per second; loose bounds (shared CPU).
        assert rate * 0.25 <= tick["accepted"] <= rate * 1.5 + 5
        assert tick["established"] >= 1
    established = [t["established"] for t in timeline]
    assert sum(established) == summary["established"] + summary["reset_after_established"]
    assert summary["server"]["accept_queue_max"] == 5
    assert summary["established"] < summary["attempted"] / 2
    assert summary["server"]["listen_overflows_delta"] > 0


def test_lab_on_ipv6_loopback() -> None:
    from tests.conftest import HAS_IPV6

    if not HAS_IPV6:
        pytest.skip("no ::1")
    summary = _run(["-6", "--backlog", "2", "-n", "6", "--timeout", "300ms"])[-1]
    assert summary["target"].startswith("[::1]:")
    assert summary["server"]["accept_queue_max"] == 3
    assert summary["established"] == 3


def test_no_overflow_is_not_claimed() -> None:
    summary = _run(["--backlog", "64", "-n", "10", "--timeout", "1s"])[-1]
    assert summary["established"] == 10
    assert summary["server"]["accept_queue_max"] == 10
    assert summary["prediction"]["held"] is True
    text = " ".join(summary["interpretation"])
    assert "never seen full" in text
    # ListenOverflows is system-wide: only mention it when it moved during this run (another
    # test's listener in the same network namespace can move it), and then as not ours.
    if summary["server"]["listen_overflows_delta"]:
        assert "system-wide, so other listeners may add to it" in text
        text = text[: text.index("ListenOverflows")]
    assert "ListenOverflows" not in text
    assert "dropped" not in text


def test_ramp_reports_each_step() -> None:
    argv = ["--backlog", "2", "--ramp", "20,40", "--step", "300ms", "--timeout", "200ms"]
    records = _run(argv)
    summary = records[-1]
    steps = summary["steps"]
    assert [s["rate"] for s in steps] == [20.0, 40.0]
    assert sum(s["attempted"] for s in steps) == summary["attempted"]
    assert steps[0]["established"] == 3  # the queue fills in the first step and stays full
    assert steps[1]["established"] == 0
    assert {r["step"] for r in records[:-1]} <= {0, 1}


def test_each_ramp_step_makes_its_rate_times_step_attempts_and_lasts_its_step() -> None:
    # Before: 3, 5 and 0 attempts (the one paced at the step's very end was still started in
    # it, and -n ran out before the last step), and the steps came early. Each attempt has a
    # whole pacing interval (250 ms or more) before its step ends.
    argv = ["--backlog", "100", "--ramp", "2,4,1", "--step", "1s", "--timeout", "1s"]
    summary = _run(argv)[-1]
    steps = summary["steps"]
    assert [(s["rate"], s["attempted"]) for s in steps] == [(2.0, 2), (4.0, 4), (1.0, 1)]
    assert all(s["rate_shortfall"] == 0 for s in steps)
    # Two whole steps before the last one's only attempt (timed by the run's own clock).
    assert summary["duration_s"] >= 2.0


def test_ramp_step_short_of_its_rate_is_not_cut_by_duration() -> None:
    # 2 slots, each held 400 ms: about 5 connects/s, far below the steps' 20/s and 40/s, so
    # each step ends with attempts unstarted. The 30 s --duration is never reached.
    argv = ["--backlog", "100", "--ramp", "20,40", "--step", "500ms", "-c", "2"]
    summary = _run([*argv, "--hold", "400ms", "--timeout", "1s"])[-1]
    assert summary["connections"] == 30
    assert summary["duration_s"] < 30
    assert summary["not_started"] > 0
    assert summary["cut_by_duration"] is False
    assert summary["not_started_step_end"] == summary["not_started"]
    assert all(s["rate_shortfall"] > 0 for s in summary["steps"])
    text = " ".join(summary["interpretation"])
    assert "--duration" not in text
    assert f"Ramp step rates not reached: {summary['not_started']} attempts never started" in text
    assert "concurrency 2" in text


def test_ramp_cut_by_duration_is_still_reported() -> None:
    argv = ["--backlog", "100", "--ramp", "20,20", "--step", "500ms", "--duration", "700ms"]
    summary = _run([*argv, "--timeout", "1s"])[-1]
    assert summary["cut_by_duration"] is True
    assert summary["not_started"] > 0
    assert summary["not_started_step_end"] == 0
    assert summary["steps"][-1]["rate_shortfall"] is None  # --duration cut that step
    assert any(line.startswith("The run hit --duration 0.7s") for line in summary["interpretation"])


def test_paced_prediction_holds_when_the_listener_keeps_up() -> None:
    # The preflight says "expect up to 65 queued at once"; accepting 1000/s against 200
    # connects/s keeps the queue near empty, and a peak below the cap is what "up to" means.
    argv = ["--backlog", "64", "--accept-rate", "1000", "-n", "80", "--rate", "200"]
    summary = _run([*argv, "--timeout", "1s"])[-1]
    assert "expect up to 65 queued at once" in summary["prediction"]["text"]
    assert summary["server"]["accept_queue_max"] <= 65
    assert summary["prediction"]["held"] is True
    assert "at most 65 expected" in summary["prediction"]["detail"]


_SMALL_PORT_RANGE = 'echo "40000 40015" > /proc/sys/net/ipv4/ip_local_port_range || exit 99'


@pytest.mark.parametrize(
    "sources",
    [[], ["--source", "127.0.0.2", "--source", "127.0.0.3"]],
    ids=["one-source", "two-other-sources"],
)
def test_the_port_range_cap_leaves_out_the_lab_listeners_own_port(sources: list[str]) -> None:
    # In a network namespace of the test's own, with 16 ephemeral ports: the lab listener's
    # port 0 takes one of them, from every source address (connect() skips a port any socket
    # has bound). Before, the cap said 16 per source, the connects beyond 15 per source failed
    # EADDRNOTAVAIL and an `errors>0` gate failed the run; now every connect gets a port.
    count = 16 * max(1, len(sources) // 2)
    argv = ["backlog", "--lab", "--backlog", "100", "-n", str(count), "--hold", "300ms", "--json"]
    result = run_in_own_netns(_SMALL_PORT_RANGE, [*argv, *sources, "--fail-if", "errors>0"])
    assert result.returncode == 0, result.stderr.decode()
    summary = json.loads(result.stdout.decode().splitlines()[-1])
    assert (summary["established"], summary["errors"]) == (count, 0)
    assert any("less the lab listener's own port" in cap for cap in summary["limits_hit"])


_ABORT_ON_OVERFLOW = """
echo 1 > /proc/sys/net/ipv4/tcp_abort_on_overflow || exit 99
echo 0 > /proc/sys/net/ipv4/tcp_syncookies || exit 99
"""


def test_resets_from_tcp_abort_on_overflow_are_the_overflow_not_ghosts() -> None:
    # In a network namespace of the test's own with tcp_abort_on_overflow=1: the kernel
    # resets handshakes whose final ACK meets the full queue. The report called those
    # clients "SYN-RECV or syncookie ghosts", with syncookies off.
    argv = ["backlog", "--lab", "--backlog", "4", "--accept-rate", "20", "-n", "100",
            "--rate", "200", "--hold", "500ms", "-t", "1500ms", "--json"]  # fmt: skip
    result = run_in_own_netns(_ABORT_ON_OVERFLOW, argv)
    assert result.returncode == 0, result.stderr.decode()
    summary = json.loads(result.stdout.decode().splitlines()[-1])
    lines = summary["interpretation"]
    assert summary["reset_after_established"] > 0, lines
    assert not [line for line in lines if "ghosts" in line], lines
    assert any("tcp_abort_on_overflow=1" in line for line in lines), lines
