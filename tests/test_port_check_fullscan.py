"""Full-range (1-65535) scans of 127.0.0.1 report open exactly the ports that have a listener.

The scan runs in a private network namespace (`unshare -rn`) when the host allows it, so no
other process's short-lived listeners can appear mid-scan: there the open set must equal the
LISTEN rows of /proc/net/tcp{,6} exactly, on every round. Listeners sit inside the ephemeral
range too, where the scanner's own source ports live (a self-connect must not count as open).
Without namespaces the check is limited to the ports this test owns.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from typing import Any

import pytest

from tests.helpers import ROOT

ROUNDS = 3


def _listening_ports() -> set[int]:
    """Ports with a LISTEN row reachable on 127.0.0.1 (127.0.0.1, 0.0.0.0 or dual-stack ::)."""
    found: set[int] = set()
    reachable = {
        "/proc/net/tcp": {"0100007F", "00000000"},
        "/proc/net/tcp6": {"00000000000000000000000000000000"},
    }
    for path, addresses in reachable.items():
        try:
            with open(path, encoding="ascii") as table:
                rows = table.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            address, _, port_hex = fields[1].partition(":")
            if fields[3] == "0A" and address in addresses:  # 0A = TCP_LISTEN
                found.add(int(port_hex, 16))
    return found


def _ephemeral_range() -> tuple[int, int]:
    with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as sysctl:
        low, high = sysctl.read().split()
    return int(low), int(high)


def _start_listeners(rng: random.Random) -> tuple[list[socket.socket], list[socket.socket]]:
    """~40 listeners (most inside the ephemeral range) and ~10 bound-but-closed ports."""
    listeners: list[socket.socket] = []
    closed: list[socket.socket] = []
    low, high = _ephemeral_range()
    wanted = [0] * 25 + rng.sample(range(low, high + 1), 10) + rng.sample(range(1024, low), 5)
    for port in wanted:
        sock = socket.socket()
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            sock.close()
            continue
        sock.listen(64)
        listeners.append(sock)
    if socket.has_ipv6:
        dual = socket.socket(socket.AF_INET6)
        try:
            dual.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            dual.bind(("::", 0))
            dual.listen(16)
            listeners.append(dual)
        except OSError:
            dual.close()
    for _ in range(10):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        closed.append(sock)
    return listeners, closed


def _scan_cli() -> tuple[set[int], dict[str, Any]]:
    """The CLI as users run it (two worker processes on a multi-core host)."""
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "netprobe", "port-check", "127.0.0.1", "-p", "1-65535"),
            *("--open-only", "--json", "--timeout", "2s"),
        ],
        capture_output=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    rows = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    return {r["port"] for r in rows}, {"rc": proc.returncode, "stderr": proc.stderr.decode()}


def _scan_engine(workers: int) -> tuple[set[int], dict[str, Any]]:
    from netprobe.connector import ConnectorStats
    from netprobe.engines.port_check import (
        CheckConfig,
        Expect,
        Tally,
        build_hosts,
        parse_targets,
        run_checks,
    )

    hosts = build_hosts(
        parse_targets(["127.0.0.1"]),
        ports=tuple(range(1, 65536)),
        family=0,
        expect=Expect.OPEN,
    )
    stats = ConnectorStats()
    tally = Tally()
    config = CheckConfig(timeout_s=2.0, workers=workers)
    found = {r.port for r in run_checks(hosts, config, stats, tally=tally, open_only=True)}
    return {p for p in found if p is not None}, {"total": tally.total, **stats.extra}


def netns_main() -> None:
    """Runs inside the namespace: listeners, ROUNDS full scans, a JSON report on stdout."""
    rng = random.Random(int(os.environ.get("SEED", "1")))
    listeners, closed = _start_listeners(rng)
    try:
        ours = {s.getsockname()[1] for s in listeners}
        report: dict[str, Any] = {"ours": sorted(ours), "closed": [], "rounds": []}
        report["closed"] = sorted(s.getsockname()[1] for s in closed)
        for index in range(ROUNDS):
            before = _listening_ports()
            # The CLI as shipped, then the engine in one process and split over two.
            if index == 0:
                found, info = _scan_cli()
            else:
                found, info = _scan_engine(workers=index)
            after = _listening_ports()
            report["rounds"].append(
                {"found": sorted(found), "before": sorted(before), "after": sorted(after), **info}
            )
        print(json.dumps(report))
    finally:
        for sock in listeners + closed:
            sock.close()


def self_connect_main() -> None:
    """Runs inside the namespace: with the ephemeral range cut to two ports, scan exactly
    those ports, where every connect that "succeeds" met one of our own sockets."""
    from netprobe.connector import ConnectJob, ConnectorStats, run_connects

    low = 40000
    with open("/proc/sys/net/ipv4/ip_local_port_range", "w", encoding="ascii") as sysctl:
        sysctl.write(f"{low} {low + 1}")
    states: dict[str, int] = {}
    stats = ConnectorStats()
    # However the caller spells the loopback address: the kernel's own spelling is compared.
    spellings = [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET, "127.1")]
    if socket.has_ipv6:
        spellings += [(socket.AF_INET6, "::1"), (socket.AF_INET6, "0:0:0:0:0:0:0:1")]
    for family, host in spellings:
        for concurrency in (1, 2):
            jobs = [ConnectJob(port, family, (host, port)) for port in (low, low + 1)]
            for _ in range(10):
                for result in run_connects(
                    jobs, concurrency=concurrency, timeout_s=2.0, stats=stats
                ):
                    key = f"{host} {result.state.value}"
                    states[key] = states.get(key, 0) + 1
    print(json.dumps({"states": states, "self_connects": stats.extra.get("self_connects", 0)}))


def _run_in_netns(code: str = "") -> dict[str, Any] | None:
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if unshare is None or ip is None or not sys.platform.startswith("linux"):
        return None
    probe = subprocess.run(
        [unshare, "-rn", ip, "link", "set", "lo", "up"],
        capture_output=True,
        timeout=10,
        check=False,
    )
    if probe.returncode != 0:
        return None
    code = code or "from tests.test_port_check_fullscan import netns_main; netns_main()"
    proc = subprocess.run(
        [
            unshare,
            "-rn",
            "sh",
            "-c",
            f'{ip} link set lo up && exec "$0" -c "$1"',
            sys.executable,
            code,
        ],
        capture_output=True,
        timeout=120,
        cwd=ROOT,
        env=dict(os.environ, SEED=str(int(time.time()))),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


@pytest.mark.slow
def test_full_range_scan_matches_proc_net_tcp_every_round() -> None:
    report = _run_in_netns()
    if report is None:
        pytest.skip("no private network namespace here (unshare -rn); see the host-mode test")
    ours = set(report["ours"])
    assert len(ours) >= 30
    low, high = _ephemeral_range()
    assert len({p for p in ours if low <= p <= high}) >= 20  # inside the ephemeral range
    for number, scan in enumerate(report["rounds"]):
        before, after, found = set(scan["before"]), set(scan["after"]), set(scan["found"])
        assert before == after == ours, f"round {number}: listeners changed"
        assert found == before, (
            f"round {number}: missed {sorted(before - found)}, extra {sorted(found - before)}"
        )
        assert not found & set(report["closed"])
        if "rc" in scan:
            assert scan["rc"] == 1, scan["stderr"]  # closed ports exist, so "all open" fails
            assert "65535 ports" in scan["stderr"]
        else:
            assert scan["total"] == 65535


@pytest.mark.slow
def test_full_range_scan_in_the_host_namespace_finds_our_ports() -> None:
    """One round in the shared namespace, judged only on the ports this test owns."""
    rng = random.Random(7)
    listeners, closed = _start_listeners(rng)
    try:
        ours = {s.getsockname()[1] for s in listeners}
        mine_closed = {s.getsockname()[1] for s in closed}
        found, info = _scan_engine(workers=1)
        assert ours <= found
        assert not found & mine_closed
        assert info["total"] == 65535
    finally:
        for sock in listeners + closed:
            sock.close()


def test_a_socket_that_meets_itself_is_not_an_open_port() -> None:
    # Linux lets a connect to a free port of the ephemeral range pick that very port as its
    # source: the socket "connects" to itself (TCP simultaneous open). Nothing listens there.
    report = _run_in_netns(
        "from tests.test_port_check_fullscan import self_connect_main; self_connect_main()"
    )
    if report is None:
        pytest.skip("no private network namespace here (unshare -rn)")
    hosts = {key.split()[0] for key in report["states"]}
    assert hosts >= {"127.0.0.1", "127.1"}, report
    assert report["states"] == {f"{host} refused": 40 for host in hosts}, report
    assert report["self_connects"] > 0, report  # the case really happened
