"""Issue 9, load: 1,000 connections to echo and 1,000 through reset proxy for 20 s with every
byte verified, and 100,000 UDP datagrams counted exactly; resources return to baseline."""

from __future__ import annotations

import pytest

from tests.reliability.scenarios import RSS_SLACK, run_load

CONNS = 1000
DURATION_S = 20.0
UDP_COUNT = 100_000
UDP_RATE = 5000.0  # per second: the datagrams go out during the TCP load


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_load_echo_proxy_and_udp_lose_nothing() -> None:
    figures = run_load(CONNS, DURATION_S, UDP_COUNT, UDP_RATE)
    print("\n" + "\n".join(figures.lines()))

    for path in ("echo", "reset proxy"):
        assert figures.connections[path] == CONNS, path
        assert figures.errors[path] == {}, path
        assert figures.bytes_verified[path] > 0
    assert figures.held_s >= DURATION_S - 0.01  # (float rounding of stop_at - started)

    # The servers' own logs agree with what the clients verified, byte for byte. (Only our
    # clients' records: a concurrent port scan by another test may add empty connections.)
    for name, verified in (
        ("echo", figures.bytes_verified["echo"]),
        ("upstream echo", figures.bytes_verified["reset proxy"]),
        ("reset proxy", figures.bytes_verified["reset proxy"]),
    ):
        tally = figures.closes[name]
        assert tally.count == CONNS, (name, tally.line())
        assert tally.reasons == {"eof": CONNS}, (name, tally.line())
        assert tally.bytes_in == tally.bytes_out == verified, (name, tally.line())
        totals = figures.totals[name]
        assert totals["connections"] == CONNS + tally.strangers, (name, totals)
        assert totals["bytes_in"] >= verified, (name, totals)

    # Within 2 s of the clients leaving, every fd is closed and the memory is back.
    for server in figures.servers:
        assert server.fds_peak >= server.fds_before + CONNS, server.line()
        assert server.fds_after == server.fds_before, server.line()
        assert server.rss_after <= server.rss_before + RSS_SLACK, server.line()

    # UDP may drop, but the count must be honest: every reply matched to a sequence number.
    udp = figures.udp
    assert udp is not None
    assert udp.sent == UDP_COUNT
    assert udp.duplicates == 0
    assert udp.corrupt == 0
    assert 0 < udp.received <= figures.udp_server["datagrams_out"]
    assert figures.udp_server["datagrams_out"] <= figures.udp_server["datagrams_in"] <= UDP_COUNT
