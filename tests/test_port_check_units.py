"""port-check's pure parts: latency aggregation, target parsing, policy and exit statuses."""

from __future__ import annotations

import io
import math
import socket
import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netprobe.engines.port_check import (
    Expect,
    PortState,
    Tally,
    build_hosts,
    expectation_met,
    parse_require,
    parse_targets,
    read_targets,
    read_targets_numbered,
    sort_key,
    status_for,
)
from netprobe.engines.port_check_modes import latency_stats, percentile
from netprobe.errors import ResolveError, UsageError
from netprobe.exitcodes import ExitStatus
from netprobe.sockets import Resolved


def test_latency_stats_known_values() -> None:
    agg = latency_stats([1.0, 2.0, 3.0, 4.0], sent=5)
    assert (agg.sent, agg.received) == (5, 4)
    assert agg.loss_pct == 20.0
    assert (agg.min_ms, agg.avg_ms, agg.max_ms) == (1.0, 2.5, 4.0)
    assert agg.stddev_ms == round(math.sqrt(1.25), 3)  # population stddev
    assert agg.p50_ms == 2.5
    assert agg.p90_ms == 3.7
    assert agg.p99_ms == 3.97


def test_latency_stats_single_sample_and_no_answer() -> None:
    one = latency_stats([7.5], sent=1)
    assert (one.min_ms, one.avg_ms, one.max_ms, one.stddev_ms) == (7.5, 7.5, 7.5, 0.0)
    assert one.p50_ms == one.p99_ms == 7.5
    assert one.loss_pct == 0.0
    lost = latency_stats([], sent=3)
    assert lost.loss_pct == 100.0
    assert lost.received == 0
    assert lost.min_ms is None
    assert lost.p99_ms is None


def test_latency_stats_rejects_more_answers_than_probes() -> None:
    with pytest.raises(ValueError, match="answers"):
        latency_stats([1.0, 2.0], sent=1)


@given(st.lists(st.floats(min_value=0.001, max_value=10_000.0), min_size=1, max_size=60))
def test_latency_stats_properties(samples: list[float]) -> None:
    agg = latency_stats(samples, sent=len(samples) + 1)
    assert agg.min_ms is not None
    assert agg.max_ms is not None
    assert agg.avg_ms is not None
    assert agg.p50_ms is not None
    assert agg.p90_ms is not None
    assert agg.p99_ms is not None
    assert agg.stddev_ms is not None
    assert agg.min_ms <= agg.p50_ms <= agg.p90_ms <= agg.p99_ms <= agg.max_ms
    assert agg.min_ms <= agg.avg_ms <= agg.max_ms
    assert agg.avg_ms == pytest.approx(statistics.fmean(samples), abs=1e-3)
    assert agg.stddev_ms == pytest.approx(statistics.pstdev(samples), abs=2e-3)
    assert agg.p50_ms == pytest.approx(statistics.median(samples), abs=1e-3)
    assert 0 < agg.loss_pct < 100


def test_percentile_interpolates_and_checks_input() -> None:
    values = [10.0, 20.0, 30.0]
    assert percentile(values, 0) == 10.0
    assert percentile(values, 100) == 30.0
    assert percentile(values, 25) == 15.0
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match="outside"):
        percentile(values, 101)


def test_parse_targets_forms_and_expectations() -> None:
    specs = parse_targets(["localhost:22", "[::1]:80,443=closed", "192.0.2.0/30", "h:1-3=open"])
    assert [(s.host, s.ports, s.expect) for s in specs] == [
        ("localhost", (22,), None),
        ("::1", (80, 443), Expect.CLOSED),
        ("192.0.2.0/30", None, None),
        ("h", (1, 2, 3), Expect.OPEN),
    ]
    assert specs[1].text == "[::1]:80,443"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("host:22=maybe", "'open' or 'closed'"),
        # It said "'80=closed' is not a port number".
        ("host:80=closed=open", "one expectation at most"),
        ("host:0", "out of range"),
        ("host:", "missing port"),
        ("unix:", "socket path"),
        ("[::1", "closing"),
    ],
)
def test_parse_targets_rejects(text: str, fragment: str) -> None:
    with pytest.raises(UsageError, match=fragment):
        parse_targets([text])


def test_parse_targets_unix_paths_keep_their_equals_signs() -> None:
    specs = parse_targets(["unix:/run/a.sock", "unix:/run/b=c.sock", "unix:/run/d.sock=closed"])
    assert [(s.host, s.unix, s.expect) for s in specs] == [
        ("/run/a.sock", True, None),
        ("/run/b=c.sock", True, None),  # not an expectation: part of the path
        ("/run/d.sock", True, Expect.CLOSED),
    ]


def test_read_targets_skips_comments_and_blanks() -> None:
    text = "# hosts\n127.0.0.1:22\n\n  localhost:80  # web\r\n[::1]:1"
    assert read_targets(io.StringIO(text)) == ["127.0.0.1:22", "localhost:80", "[::1]:1"]


def test_read_targets_numbers_lines_and_drops_a_leading_bom() -> None:
    # Before: a BOM on stdin made the first target bad. Blanks stay inside a target: one line,
    # one target (`HOST:PORT =closed` keeps working; `localhost 5432` is not two hosts).
    text = "\ufeff127.0.0.1:1 =closed # c\nunix:/tmp/a b.sock\n\n  localhost 5432\n"
    assert read_targets_numbered(io.StringIO(text)) == [
        (1, "127.0.0.1:1 =closed"),
        (2, "unix:/tmp/a b.sock"),
        (4, "localhost 5432"),
    ]
    assert read_targets(io.StringIO("a\ufeff")) == ["a\ufeff"]  # only a leading BOM goes


# The longest --targets-file line, as the README gives it.
MAX_TARGET_LINE = 4096


def test_read_targets_takes_lines_up_to_the_limit() -> None:
    longest = "#" + "x" * (MAX_TARGET_LINE - 1)
    text = f"{longest}\n{longest}\r\n127.0.0.1:1\n{longest}"
    assert read_targets(io.StringIO(text)) == ["127.0.0.1:1"]


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("127.0.0.1:1\n" + "x" * (MAX_TARGET_LINE + 1) + "\n", 2),
        ("#" * (MAX_TARGET_LINE + 1), 1),  # no newline at all
        ("\n\n" + "x" * (MAX_TARGET_LINE + 1) + "\r\n", 3),
    ],
)
def test_read_targets_refuses_a_line_over_the_limit(text: str, line: int) -> None:
    with pytest.raises(UsageError, match=f"^line {line} is longer than {MAX_TARGET_LINE} "):
        read_targets(io.StringIO(text))


class _Endless:
    """/dev/zero as a text stream: no newline ever comes."""

    def __init__(self) -> None:
        self.read = 0

    def readline(self, size: int = -1, /) -> str:
        assert size >= 0, "an unbounded readline() of an endless line never returns"
        self.read += size
        return "\0" * size


def test_read_targets_stops_reading_a_line_without_end() -> None:
    stream = _Endless()
    with pytest.raises(UsageError, match="line 1 is longer than"):
        read_targets(stream)  # type: ignore[arg-type]
    assert stream.read <= MAX_TARGET_LINE + 2


def test_parse_require() -> None:
    assert parse_require("all") is None
    assert parse_require("ANY") == 1
    assert parse_require("2") == 2
    assert parse_require("0" * 5000 + "2") == 2
    for bad in ("0", "-1", "most", "", "0" * 5000):
        with pytest.raises(UsageError, match="--require"):
            parse_require(bad)


@pytest.mark.parametrize("text", ["9" * 5000, "1" + "0" * 18])
def test_parse_require_refuses_a_count_no_run_holds(text: str) -> None:
    # int() refuses strings over 4300 digits: this was `internal error: ValueError`.
    with pytest.raises(UsageError, match="is more checks than any run holds"):
        parse_require(text)


def test_expectation_and_status() -> None:
    assert expectation_met(PortState.OPEN, Expect.OPEN)
    assert not expectation_met(PortState.OPEN_FILTERED, Expect.OPEN)
    for state in (PortState.CLOSED, PortState.FILTERED, PortState.UNREACHABLE):
        assert expectation_met(state, Expect.CLOSED)
        assert not expectation_met(state, Expect.OPEN)
    assert not expectation_met(PortState.ERROR, Expect.CLOSED)
    assert status_for(PortState.CLOSED, "ECONNREFUSED", False) is ExitStatus.NOT_OPEN
    assert status_for(PortState.OPEN, None, False) is ExitStatus.NOT_OPEN  # expected closed
    assert status_for(PortState.FILTERED, None, False) is ExitStatus.TIMEOUT
    assert status_for(PortState.OPEN_FILTERED, None, False) is ExitStatus.TIMEOUT
    assert status_for(PortState.ERROR, "EAI_NONAME", False) is ExitStatus.RESOLVE
    assert status_for(PortState.ERROR, "EADDRNOTAVAIL", False) is ExitStatus.LOCAL
    assert status_for(PortState.CLOSED, None, True) is ExitStatus.OK


def test_tally_requirements_and_worst_status() -> None:
    tally = Tally()
    tally.count(PortState.OPEN, None, True)
    tally.count(PortState.FILTERED, None, False)
    assert not tally.holds()
    assert tally.exit_status() is ExitStatus.TIMEOUT
    tally.count(PortState.CLOSED, "ECONNREFUSED", False)
    assert tally.exit_status() is ExitStatus.NOT_OPEN  # worse than a timeout
    assert "1 open, 1 closed, 1 filtered" in tally.summary()
    anyone = Tally(required=1)
    anyone.count(PortState.CLOSED, "ECONNREFUSED", False)
    assert anyone.exit_status() is ExitStatus.NOT_OPEN
    anyone.count(PortState.OPEN, None, True)
    assert anyone.exit_status() is ExitStatus.OK
    assert Tally().exit_status() is ExitStatus.NOT_OPEN  # nothing checked never "holds"


def test_tally_decided_only_when_more_results_cannot_change_the_verdict() -> None:
    every = Tally()
    assert every.decided() is None
    every.count(PortState.OPEN, None, True)
    assert every.decided() is None  # a later closed port would still fail the run
    every.count(PortState.FILTERED, None, False)
    assert every.decided() is ExitStatus.TIMEOUT
    every.count(PortState.CLOSED, "ECONNREFUSED", False)
    assert every.decided() is ExitStatus.NOT_OPEN
    two = Tally(required=2)
    two.count(PortState.CLOSED, "ECONNREFUSED", False)
    two.count(PortState.OPEN, None, True)
    assert two.decided() is None  # the second open one may still come
    two.count(PortState.OPEN, None, True)
    assert two.decided() is ExitStatus.OK


def test_build_hosts_resolution_failure_is_a_result_not_an_exception() -> None:
    def resolver(host: str, family: int) -> list[Resolved]:
        if host == "gone.example":
            raise ResolveError("resolve", -2, "EAI_NONAME", "Name or service not known")
        return [Resolved(2, (host if host[0].isdigit() else "127.0.0.1", 0))]

    specs = parse_targets(["gone.example:80", "ok.example:22=closed", "192.0.2.0/30:1"])
    hosts = build_hosts(specs, ports=None, family=0, expect=Expect.OPEN, resolver=resolver)
    assert [(h.name, h.error, h.expect) for h in hosts[:2]] == [
        ("gone.example", "EAI_NONAME", Expect.OPEN),
        ("ok.example", None, Expect.CLOSED),
    ]
    assert [h.name for h in hosts[2:]] == [f"192.0.2.{i}" for i in range(4)]


def test_build_hosts_checks_each_address_port_once() -> None:
    def resolver(host: str, family: int) -> list[Resolved]:
        return [Resolved(2, ("127.0.0.1" if host == "localhost" else host, 0))]

    texts = [
        "127.0.0.1:1",
        "127.0.0.1:1,2",
        "localhost:2,3",
        "127.0.0.0/31:1",
        "unix:/x",
        "unix:/x",
    ]
    hosts = build_hosts(
        parse_targets(texts), ports=None, family=0, expect=Expect.OPEN, resolver=resolver
    )
    checks = [(h.target, h.address, port) for h in hosts for port in h.ports]
    assert checks == [  # the first target naming an address:port keeps it; order kept
        ("127.0.0.1:1", "127.0.0.1", 1),
        ("127.0.0.1:1,2", "127.0.0.1", 2),
        ("localhost:2,3", "127.0.0.1", 3),
        ("127.0.0.0/31:1", "127.0.0.0", 1),
        ("unix:/x", "/x", 0),
    ]
    # A socket path has no port: it said "/x:0 is checked twice".
    with pytest.raises(UsageError, match=r"^unix:/x is checked twice"):
        build_hosts(
            parse_targets(["unix:/x", "unix:/x=closed"]), ports=None, family=0, expect=Expect.OPEN
        )
    with pytest.raises(UsageError, match=r"127\.0\.0\.1:1 is checked twice"):
        build_hosts(
            parse_targets(["127.0.0.1:1", "localhost:1=closed"]),
            ports=None,
            family=0,
            expect=Expect.OPEN,
            resolver=resolver,
        )


def test_build_hosts_needs_a_port_and_caps_cidr() -> None:
    with pytest.raises(UsageError, match="no port"):
        build_hosts(parse_targets(["127.0.0.1"]), ports=None, family=0, expect=Expect.OPEN)
    with pytest.raises(UsageError, match="above the cap"):
        build_hosts(parse_targets(["192.0.2.0/15"]), ports=(1,), family=0, expect=Expect.OPEN)


def test_sort_key_orders_numerically_v4_before_v6_names_last() -> None:
    rows = [
        ("10.0.0.10", 1, "a"),
        (None, 5, "name"),
        ("::1", 1, "b"),
        ("10.0.0.9", 80, "c"),
        ("10.0.0.9", 22, "d"),
    ]
    ordered = sorted(rows, key=lambda r: sort_key(r[0], r[1], r[2]))
    assert [(r[0], r[1]) for r in ordered] == [
        ("10.0.0.9", 22),
        ("10.0.0.9", 80),
        ("10.0.0.10", 1),
        ("::1", 1),
        (None, 5),
    ]


def _udp_loopback_port() -> int:
    """A UDP port on 127.0.0.1 that was free a moment ago (bound once, then closed)."""
    import socket

    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port: int = probe.getsockname()[1]
    probe.close()
    return port


def test_udp_probes_end_with_the_last_probe_under_a_rate() -> None:
    # Regression: the loop learned that no item was left only when the next rate slot opened,
    # so one probe at --rate 0.2 took 5 s (and --rate 1e-300 never ended).
    import socket
    import time

    from netprobe.sockets import udp_probe_many

    target = Resolved(socket.AF_INET, ("127.0.0.1", _udp_loopback_port()))
    start = time.monotonic()
    results = list(udp_probe_many([("only", target)], b"", timeout_s=0.3, rate=0.2))
    took = time.monotonic() - start
    assert [key for key, *_rest in results] == ["only"]
    assert took < 2.5, f"one probe took {took:.2f} s at --rate 0.2"


def test_udp_latency_is_not_the_time_spent_starting_the_other_probes() -> None:
    # Regression: every probe was started (up to the concurrency) before any answer was read,
    # so the first probes' latency_ms held the time it took to start the others (44 ms for
    # port 1 of 3000 on loopback, 0.09 ms alone). Compared within one run, so a slow or busy
    # machine slows both sides: the old code's median was about half the run.
    import resource
    import socket
    import time

    from netprobe.sockets import udp_probe_many

    count = 2000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < count + 200:
        wanted = count + 200 if hard == resource.RLIM_INFINITY else min(count + 200, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    try:
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        concurrency = count if limit == resource.RLIM_INFINITY else min(count, limit - 200)
        items = [
            (port, Resolved(socket.AF_INET, ("127.0.0.1", port))) for port in range(20001, 22001)
        ]
        start = time.monotonic()
        answered: list[tuple[float, float]] = []  # (latency s, when it was handed over)
        for _key, state, _name, elapsed in udp_probe_many(
            items, b"", timeout_s=2.0, concurrency=concurrency
        ):
            if state.name == "REFUSED":  # ICMP port unreachable: an answer, not a timeout
                answered.append((elapsed, time.monotonic() - start))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert len(answered) >= count // 2, "too few ports answered ICMP port unreachable"
    span = max(when for _latency, when in answered)  # the run, up to its last answer
    median = statistics.median(latency for latency, _when in answered)
    assert median < 0.1 * span, (
        f"median latency {median * 1000:.2f} ms in a {span * 1000:.1f} ms run"
    )


def test_ipv6_literals_spelled_differently_are_one_address() -> None:
    # "[0::1]" and "[::1]" are one socket: they were two checks (and two rows, the address
    # shown as typed), so the same port expected open and closed was not caught.
    texts = ["[::1]:5", "[0::1]:5", "[0:0:0:0:0:0:0:1]:5,6"]
    hosts = build_hosts(parse_targets(texts), ports=None, family=0, expect=Expect.OPEN)
    checks = [(h.address, port) for h in hosts for port in h.ports]
    assert checks == [("::1", 5), ("::1", 6)]
    with pytest.raises(UsageError, match=r"\[::1\]:5 is checked twice"):
        build_hosts(
            parse_targets(["[::1]:5=closed", "[0::1]:5"]),
            ports=None,
            family=0,
            expect=Expect.OPEN,
        )


@pytest.mark.parametrize("family", [0, socket.AF_INET])
def test_block_members_are_what_resolve_answers_for_them(family: int) -> None:
    # A block's IPv4 members skip resolve() (a /12 spent 19 s there before the first probe):
    # the host records must be the ones the lookup gives.
    from netprobe.sockets import resolve

    specs = parse_targets(["127.0.0.0/28:1", "127.0.1.250-127.0.2.3:2,3", "127.0.0.9:4"])
    fast = build_hosts(specs, ports=None, family=family, expect=Expect.OPEN)
    slow = build_hosts(
        specs,
        ports=None,
        family=family,
        expect=Expect.OPEN,
        resolver=lambda host, fam: resolve(host, 0, family=fam),
    )
    assert len(fast) == 16 + 10 + 1
    assert fast == slow
