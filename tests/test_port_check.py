"""`netprobe port-check` against real loopback listeners: states, output, exit codes, bad input."""

from __future__ import annotations

import csv
import io
import json
import os
import random
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import HAS_IPV6
from tests.helpers import (
    LONG,
    ROOT,
    ServerThread,
    bad_input_line,
    invoke,
    netprobe_process,
    run_in_own_netns,
    run_netprobe,
    udp_echo_thread,
)


def _json_lines(stdout: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.decode().splitlines() if line.strip()]


def _closed_sockets(count: int) -> list[socket.socket]:
    """Ports that are certainly closed: bound, never listening (nobody else can take them)."""
    socks = []
    for _ in range(count):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        socks.append(sock)
    return socks


def test_open_and_closed_among_random_listeners() -> None:
    rng = random.Random(3)
    servers = [ServerThread() for _ in range(rng.randint(4, 7))]
    closed = _closed_sockets(5)
    try:
        open_ports = {s.port for s in servers}
        closed_ports = {c.getsockname()[1] for c in closed}
        order = sorted(open_ports | closed_ports, key=lambda _p: rng.random())
        result = invoke(["port-check", "127.0.0.1", "-p", ",".join(map(str, order)), "--json"])
        rows = _json_lines(result.stdout)
        assert {r["port"] for r in rows if r["state"] == "open"} == open_ports
        assert {r["port"] for r in rows if r["state"] == "closed"} == closed_ports
        assert all(r["errno_name"] == "ECONNREFUSED" for r in rows if r["state"] == "closed")
        assert result.exit_code == 1  # some refused
        assert "open" in result.stderr
        assert "closed" in result.stderr
        assert "ports/s" in result.stderr
    finally:
        for sock in closed:
            sock.close()
        for srv in servers:
            srv.stop()


def test_slow_set_up_without_names_is_called_set_up(
    server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only addresses given: the time before the first probe went into listing them, not into
    # name lookups (which the line named before). Any set-up is "slow" at a threshold of 0.
    from netprobe.cli import port_check

    monkeypatch.setattr(port_check, "_LOOKUPS_SHOWN_S", 0.0)
    result = invoke(["port-check", f"127.0.0.1:{server.port}"])
    assert result.exit_code == 0, result.stderr
    assert re.search(r"ports/s\), after \d+\.\d\d s of set-up\n$", result.stderr), result.stderr


def test_json_fields_and_service_names(server: ServerThread) -> None:
    result = invoke(["port-check", f"127.0.0.1:{server.port},1", "--json"])
    rows = {r["port"]: r for r in _json_lines(result.stdout)}
    assert set(rows[server.port]) == {
        "kind",
        "target",
        "address",
        "port",
        "proto",
        "state",
        "errno_name",
        "latency_ms",
        "service",
        "expect",
        "ok",
        "attempts",
    }
    row = rows[server.port]
    assert row["kind"] == "port-check"
    assert row["target"] == f"127.0.0.1:{server.port},1"
    assert (row["address"], row["proto"], row["state"], row["ok"]) == (
        "127.0.0.1",
        "tcp",
        "open",
        True,
    )
    assert row["latency_ms"] >= 0
    assert rows[1]["service"] == socket.getservbyport(1, "tcp")
    assert rows[1]["state"] == "closed"


def test_all_open_exits_0_and_plain_output(server: ServerThread) -> None:
    result = invoke(["port-check", f"127.0.0.1:{server.port}"])
    assert result.exit_code == 0
    fields = result.text.split()
    assert fields[:5] == [f"127.0.0.1:{server.port}", "127.0.0.1", str(server.port), "tcp", "open"]


def test_one_refused_exits_1(server: ServerThread, closed_port: int) -> None:
    result = invoke(["port-check", f"127.0.0.1:{server.port}", f"127.0.0.1:{closed_port}"])
    assert result.exit_code == 1


def test_only_timeouts_exit_3_as_filtered(full_queue_port: int) -> None:
    result = invoke(["port-check", f"127.0.0.1:{full_queue_port}", "--timeout", "0.3", "--json"])
    rows = _json_lines(result.stdout)
    assert [r["state"] for r in rows] == ["filtered"]
    assert rows[0]["latency_ms"] is None
    assert result.exit_code == 3


def test_retries_repeat_timeouts(full_queue_port: int) -> None:
    result = invoke(
        ["port-check", f"127.0.0.1:{full_queue_port}", "-t", "0.2", "--retries", "1", "--json"]
    )
    rows = _json_lines(result.stdout)
    assert [(r["state"], r["attempts"]) for r in rows] == [("filtered", 2)]


def test_expect_closed_on_a_closed_port_exits_0(closed_port: int, server: ServerThread) -> None:
    assert invoke(["port-check", f"127.0.0.1:{closed_port}", "--expect", "closed"]).exit_code == 0
    per_target = invoke(
        ["port-check", f"127.0.0.1:{closed_port}=closed", f"127.0.0.1:{server.port}"]
    )
    assert per_target.exit_code == 0
    violated = invoke(["port-check", f"127.0.0.1:{server.port}=closed", "--json"])
    assert violated.exit_code == 1
    assert _json_lines(violated.stdout)[0]["ok"] is False


def test_require_any_and_count(server: ServerThread, closed_port: int) -> None:
    other = ServerThread()
    try:
        targets = [f"127.0.0.1:{p}" for p in (server.port, closed_port, other.port)]
        assert invoke(["port-check", *targets, "--require", "any", "-q"]).exit_code == 0
        assert invoke(["port-check", *targets, "--require", "2", "-q"]).exit_code == 0
        assert invoke(["port-check", *targets, "--require", "all", "-q"]).exit_code == 1
        over = invoke(["port-check", *targets, "--require", "4"])
        assert over.exit_code == 2
        assert over.stdout == b""
    finally:
        other.stop()


def test_quiet_prints_nothing(closed_port: int) -> None:
    result = invoke(["port-check", f"127.0.0.1:{closed_port}", "-q"])
    assert (result.exit_code, result.stdout, result.stderr) == (1, b"", "")


def test_open_only_and_csv(server: ServerThread, closed_port: int) -> None:
    ports = f"{server.port},{closed_port}"
    only = invoke(["port-check", "127.0.0.1", "-p", ports, "--open-only", "--json"])
    assert [r["port"] for r in _json_lines(only.stdout)] == [server.port]
    assert "1 open, 1 closed" in only.stderr  # the summary still counts everything
    csv_out = invoke(["port-check", "127.0.0.1", "-p", ports, "--csv"]).text.splitlines()
    # The shared columns first, in their old places; then what only JSON used to carry.
    assert csv_out[0] == (
        "target,address,port,proto,state,errno_name,latency_ms,service,expect,ok,attempts"
    )
    assert len(csv_out) == 3


@pytest.mark.parametrize("mode", [[], ["--count", "2", "--interval", "1ms"]])
def test_csv_has_every_field_json_has(
    server: ServerThread, closed_port: int, mode: list[str]
) -> None:
    # Before: CSV had no expect/ok (check rows) and no proto/received/expect/ok/errno_name
    # (latency rows), so a spreadsheet could not tell which `=closed` rows passed.
    targets = [f"127.0.0.1:{server.port}", f"127.0.0.1:{closed_port}=closed"]
    rows = [
        r for r in _json_lines(invoke(["port-check", *targets, *mode, "--json"]).stdout)
        if r["kind"] != "port-check.probe"
    ]  # fmt: skip
    csv_text = invoke(["port-check", *targets, *mode, "--csv"]).text
    table = {row["target"]: row for row in csv.DictReader(io.StringIO(csv_text))}
    assert len(table) == len(rows) == 2
    for record in rows:
        row = table[record["target"]]
        assert set(row) == set(record) - {"kind"}
        assert (row["ok"], row["expect"]) == ("yes", record["expect"])


def test_targets_file_and_stdin(tmp_path: Any, server: ServerThread, closed_port: int) -> None:
    listing = tmp_path / "targets.txt"
    listing.write_text(f"# web\n127.0.0.1:{server.port}\n\n127.0.0.1:{closed_port}=closed # fw\n")
    from_file = invoke(["port-check", "--targets-file", str(listing), "--json"])
    assert from_file.exit_code == 0
    assert len(_json_lines(from_file.stdout)) == 2
    piped = invoke(
        ["port-check", "--targets-file", "-", "--json"], stdin=f"127.0.0.1:{server.port}\n".encode()
    )
    assert piped.exit_code == 0
    assert [r["port"] for r in _json_lines(piped.stdout)] == [server.port]
    missing = invoke(["port-check", "--targets-file", str(tmp_path / "nope")])
    assert missing.exit_code == 2


def test_targets_file_bom_and_the_line_of_a_bad_target(
    tmp_path: Path, server: ServerThread, closed_port: int
) -> None:
    both = f"\ufeff127.0.0.1:{server.port}\n127.0.0.1:{closed_port} =closed\n"
    piped = invoke(["port-check", "--targets-file", "-", "--json"], stdin=both.encode())
    assert piped.exit_code == 0, piped.stderr
    assert sorted(r["port"] for r in _json_lines(piped.stdout)) == sorted(
        [server.port, closed_port]
    )
    listing = tmp_path / "targets.txt"
    listing.write_text(f"127.0.0.1:{server.port}\n# a comment\n127.0.0.1:99999\n")
    line = bad_input_line(["port-check", "--targets-file", str(listing)])
    assert f"--targets-file {str(listing)!r} line 3: '127.0.0.1:99999'" in line
    listing.write_text("127.0.0.1:1 127.0.0.1:2\n")
    line = bad_input_line(["port-check", "--targets-file", str(listing)])
    assert line.startswith(f"netprobe: port-check: --targets-file {str(listing)!r} line 1: ")
    assert line.endswith(" (one target per line)")


def test_hostname_localhost(server: ServerThread) -> None:
    result = invoke(["port-check", f"localhost:{server.port}", "-4", "--json"])
    rows = _json_lines(result.stdout)
    assert [(r["target"], r["address"], r["state"]) for r in rows] == [
        (f"localhost:{server.port}", "127.0.0.1", "open")
    ]
    assert result.exit_code == 0


@pytest.mark.skipif(not HAS_IPV6, reason="no IPv6 loopback (::1) on this host")
def test_ipv6_loopback() -> None:
    srv = ServerThread(family=socket.AF_INET6, host="::1")
    closed = socket.socket(socket.AF_INET6)
    closed.bind(("::1", 0))
    try:
        closed_port = closed.getsockname()[1]
        result = invoke(["port-check", f"[::1]:{srv.port},{closed_port}", "--json"])
        rows = {r["port"]: r for r in _json_lines(result.stdout)}
        assert rows[srv.port]["state"] == "open"
        assert rows[srv.port]["address"] == "::1"
        assert rows[closed_port]["state"] == "closed"
        v6 = invoke(["port-check", "::1", "-p", str(srv.port), "-6", "-q"])
        assert v6.exit_code == 0
    finally:
        closed.close()
        srv.stop()


@pytest.fixture
def udp_echo() -> Iterator[int]:
    """A UDP echo on 127.0.0.1."""
    with udp_echo_thread() as port:
        yield port


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_udp_open_and_closed(udp_echo: int) -> None:
    closed = _free_udp_port()
    result = invoke(
        ["port-check", "--udp", f"127.0.0.1:{udp_echo},{closed}", "--payload", "ping", "--json"]
    )
    rows = {r["port"]: r for r in _json_lines(result.stdout)}
    assert rows[udp_echo]["state"] == "open"
    assert rows[udp_echo]["proto"] == "udp"
    assert rows[closed]["state"] == "closed"
    assert rows[closed]["errno_name"] == "ECONNREFUSED"
    hex_payload = invoke(["port-check", "--udp", f"127.0.0.1:{udp_echo}", "--payload-hex", "00ff"])
    assert hex_payload.exit_code == 0


def test_udp_silence_is_open_filtered() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))  # bound, never answers: no ICMP either
        port = silent.getsockname()[1]
        result = invoke(["port-check", "--udp", f"127.0.0.1:{port}", "-t", "0.2", "--json"])
    assert [r["state"] for r in _json_lines(result.stdout)] == ["open|filtered"]
    assert result.exit_code == 3


@pytest.mark.parametrize(
    ("proto", "host", "last"),
    [
        (["--udp"], "127.0.0.1", 40000),
        (["--udp"], "127.0.0.1", 40003),
        (["--udp"], "0.0.0.0", 40003),
        (["--udp"], "[::ffff:127.0.0.1]", 40000),
        ([], "0.0.0.0", 40001),
        ([], "[::]", 40001),
    ],
)
def test_probes_never_answer_each_other(proto: list[str], host: str, last: int) -> None:
    # In a network namespace of the test's own whose ephemeral range is the ports probed, the
    # kernel gives a probe socket the very port it probes (or another probe's): its datagram
    # came back from us and the port read "open" (a --wait ran its command). nmap: closed.
    # 0.0.0.0 and :: are this host too (TCP connected to itself there), and ::ffff:7f00:1 is
    # spelled ::ffff:127.0.0.1 by the kernel.
    setup = f'echo "40000 {last}" > /proc/sys/net/ipv4/ip_local_port_range || exit 99'
    argv = ["port-check", *proto, f"{host}:40000-{last}", "-t", "300ms", "--json"]
    result = run_in_own_netns(setup, argv)
    rows = _json_lines(result.stdout)
    assert sorted(r["port"] for r in rows) == list(range(40000, last + 1)), result.stderr
    assert {r["state"] for r in rows} == {"closed"}, rows
    assert result.returncode == 1, result.stderr


@pytest.mark.parametrize("proto", [[], ["--udp"]], ids=["tcp", "udp"])
@pytest.mark.parametrize("host", ["10.9.9.9", "[fd00::5]"])
def test_probes_never_answer_each_other_at_this_hosts_other_addresses(
    proto: list[str], host: str
) -> None:
    # Any address of this host's interfaces routes back to us as 127.0.0.1 does: a connect
    # there from the port it probes met itself. Before, only loopback addresses were checked,
    # and every TCP run here found a phantom open port (scans of the ephemeral range of an
    # address of one's own: 1-4 per run). Here the range is the two ports probed.
    setup = (
        'echo "40000 40001" > /proc/sys/net/ipv4/ip_local_port_range || exit 99\n'
        "ip addr add 10.9.9.9/32 dev lo || exit 99\n"
        "ip -6 addr add fd00::5/128 dev lo nodad || exit 99"
    )
    argv = ["port-check", *proto, f"{host}:40000-40001", "-t", "300ms", "--json"]
    result = run_in_own_netns(setup, argv)
    rows = _json_lines(result.stdout)
    assert sorted(r["port"] for r in rows) == [40000, 40001], result.stderr
    assert {r["state"] for r in rows} == {"closed"}, rows
    assert result.returncode == 1, result.stderr


@pytest.mark.parametrize("proto", [[], ["--udp"]], ids=["tcp", "udp"])
def test_a_blackhole_route_is_unreachable_not_a_local_error(proto: list[str]) -> None:
    # Linux answers connect() through `ip route add blackhole` with EINVAL: it was `error`,
    # exit 6 ("your machine is broken"), where nmap says filtered. The route is in a network
    # namespace of the test's own, and a blackhole sends nothing anywhere.
    setup = "ip route add blackhole 198.51.100.0/24 || exit 99"
    result = run_in_own_netns(setup, ["port-check", *proto, "198.51.100.7:80", "--json"])
    rows = _json_lines(result.stdout)
    assert [(r["state"], r["errno_name"]) for r in rows] == [("unreachable", "EINVAL")], rows
    assert result.returncode == 1, result.stderr


def test_latency_summary_of_a_name_that_never_resolved_sent_nothing() -> None:
    # It said "sent": 3, "loss_pct": 100.0: three probes lost, where none was sent.
    result = invoke(["port-check", "-6", "127.0.0.1:80", "-c", "3", "--interval", "10ms", "--json"])
    rows = _json_lines(result.stdout)
    assert [(r["kind"], r["errno_name"]) for r in rows] == [("port-check.latency", "EAI_FAMILY")]
    assert (rows[0]["sent"], rows[0]["received"], rows[0]["loss_pct"]) == (0, 0, None)
    assert result.exit_code == 5


def test_resolution_failure_is_a_per_target_error_exit_5(server: ServerThread) -> None:
    # -6 with an IPv4 literal fails inside the resolver without any DNS traffic.
    result = invoke(["port-check", "-6", "127.0.0.1:80", "--json"])
    rows = _json_lines(result.stdout)
    assert [(r["state"], r["errno_name"], r["port"]) for r in rows] == [("error", "EAI_FAMILY", 80)]
    assert result.exit_code == 5
    assert "Traceback" not in result.stderr


def test_latency_mode_reports_statistics(server: ServerThread, closed_port: int) -> None:
    result = invoke(
        [
            "port-check",
            f"127.0.0.1:{server.port}",
            f"127.0.0.1:{closed_port}",
            "--count",
            "3",
            "--interval",
            "0.05",
            "--json",
        ]
    )
    rows = _json_lines(result.stdout)
    probes = [r for r in rows if r["kind"] == "port-check.probe"]
    summaries = {r["port"]: r for r in rows if r["kind"] == "port-check.latency"}
    assert len(probes) == 6
    assert sorted(p["seq"] for p in probes) == [1, 1, 2, 2, 3, 3]
    up = summaries[server.port]
    assert (up["sent"], up["received"], up["loss_pct"], up["state"]) == (3, 3, 0.0, "open")
    assert up["min_ms"] <= up["p50_ms"] <= up["max_ms"]
    down = summaries[closed_port]
    assert (down["received"], down["loss_pct"], down["state"]) == (0, 100.0, "closed")
    assert down["avg_ms"] is None
    assert result.exit_code == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["127.0.0.1:1", "--count", "0"],
        ["127.0.0.1:1", "--concurrency", "0"],
        ["127.0.0.1:1", "--rate", "-5"],
        ["192.0.2.0/8", "-p", "80"],
        ["127.0.0.1"],
        ["127.0.0.1:99999"],
        ["127.0.0.1:1", "--require", "most"],
        ["127.0.0.1:1", "--expect", "maybe"],
        ["127.0.0.1:1", "--payload", "x"],
        ["127.0.0.1:1", "--udp", "--payload-hex", "zz"],
        ["127.0.0.1:1", "--timeout", "fast"],
        ["a..b:1"],
        ["127.0.0.1:1", "--wait", "--require", "2"],
        ["127.0.0.1:1", "--wait", "--count", "2"],
        ["127.0.0.1:1", "--until", "gone", "--wait"],
        # Options the mode would silently ignore:
        ["127.0.0.1:1", "--interval", "10ms"],
        ["127.0.0.1:1", "-c", "2", "--retries", "1"],
        ["127.0.0.1:1", "--wait", "--retries", "1"],
        ["127.0.0.1:1", "--udp", "--payload", "x" * 65508],
        [],
    ],
)
def test_bad_input_is_one_line_exit_2(argv: list[str]) -> None:
    result = invoke(["port-check", *argv])
    assert result.exit_code == 2, result.stderr
    assert result.stdout == b""
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("netprobe: port-check: ")


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_exits_130_with_a_partial_summary(signum: int, code: int) -> None:
    # SIGTERM as Ctrl-C, then 143: killed outright, a scan split over two processes left the
    # second one scanning on its own (the engine's cleanup never ran).
    argv = ["port-check", "127.0.0.1", "-p", "1-65535", "--rate", "200", "--json"]
    with netprobe_process(argv) as proc:
        # Interrupt only once results flow (start-up can take a second on a busy machine).
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], LONG * 2)
        assert ready, "no result within the time limit"
        first = proc.stdout.readline()
        time.sleep(0.2)
        proc.send_signal(signum)
        rest, err = proc.communicate(timeout=LONG)
        out = first + rest
    assert proc.returncode == code
    assert b"port-check: interrupted:" in err
    assert all(json.loads(line)["kind"] == "port-check" for line in out.splitlines())


class _Terminal(io.TextIOWrapper):
    """A captured stream that claims to be a terminal (so the table format is chosen)."""

    def isatty(self) -> bool:
        return True


def test_terminal_table_sorted_and_collapses_many_closed_ports(server: ServerThread) -> None:
    from netprobe.cli import main

    out_raw, err_raw = io.BytesIO(), io.BytesIO()
    out = _Terminal(out_raw, encoding="utf-8", write_through=True)
    err = _Terminal(err_raw, encoding="utf-8", write_through=True)
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        small = main(["port-check", f"127.0.0.1:{server.port},3,1,2"])
        small_out = out_raw.getvalue().decode()
        out_raw.seek(0)
        out_raw.truncate()
        big = main(["port-check", "127.0.0.1", "-p", f"1-1100,{server.port}"])
    finally:
        sys.stdout, sys.stderr = saved
    lines = small_out.splitlines()
    assert lines[0].split()[:5] == ["TARGET", "ADDRESS", "PORT", "PROTO", "STATE"]
    assert [int(line.split()[2]) for line in lines[1:]] == [1, 2, 3, server.port]
    assert small == 1
    big_out = out_raw.getvalue().decode()
    assert "closed" not in big_out  # more than 1000 closed ports: left out of the table
    assert str(server.port) in big_out
    assert "not shown:" in err_raw.getvalue().decode()
    assert big == 1


# ---------------------------------------------------------------------------------------------
# unix:/PATH targets (nc -zU): connect(2) on a Unix stream socket
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def unix_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # A short directory: sun_path holds 107 bytes, and pytest's tmp_path can be longer.
    import tempfile

    with tempfile.TemporaryDirectory(prefix="np-") as path:
        yield path


def test_unix_targets_open_refused_missing_and_full(unix_dir: str) -> None:
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(f"{unix_dir}/up.sock")
    listening.listen(8)
    bound_only = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound_only.bind(f"{unix_dir}/stale.sock")  # a file, nobody listening: ECONNREFUSED
    full = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    full.bind(f"{unix_dir}/full.sock")
    full.listen(0)
    fillers = []
    try:
        while True:  # fill the never-accepted queue until connect says EAGAIN
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.setblocking(False)
            fillers.append(client)
            if client.connect_ex(f"{unix_dir}/full.sock") != 0:
                break
            assert len(fillers) < 64, "the queue never filled"
        names = ["up", "stale", "missing", "full"]
        result = invoke(["port-check", "--json", *(f"unix:{unix_dir}/{n}.sock" for n in names)])
        rows = {r["address"].rsplit("/", 1)[1]: r for r in _json_lines(result.stdout)}
        got = {
            name: (rows[f"{name}.sock"]["state"], rows[f"{name}.sock"]["errno_name"])
            for name in names
        }
        assert got == {
            "up": ("open", None),
            "stale": ("closed", "ECONNREFUSED"),
            "missing": ("closed", "ENOENT"),
            "full": ("open", "EAGAIN"),  # a full queue still proves a listener
        }
        probes = invoke(["port-check", "--json", "-c", "2", "--interval", "10ms",
                         f"unix:{unix_dir}/full.sock"])  # fmt: skip
        summary = _json_lines(probes.stdout)[-1]
        assert (summary["state"], summary["errno_name"]) == ("open", "EAGAIN")
        for row in rows.values():
            assert row["proto"] == "unix"
            assert row["port"] is None
            assert row["service"] is None
        assert result.exit_code == 1  # stale and missing are not open
    finally:
        for sock in (listening, bound_only, full, *fillers):
            sock.close()


def test_unix_target_expectations_latency_and_wait(unix_dir: str) -> None:
    path = f"{unix_dir}/app.sock"
    assert invoke(["port-check", f"unix:{path}=closed"]).exit_code == 0
    late = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # wait-for-it for a socket file that appears later (a service starting up).
        def appear() -> None:
            late.bind(path)
            late.listen(4)

        timer = threading.Timer(0.3, appear)
        timer.start()
        try:
            waited = invoke(["port-check", "--wait", "--deadline", "10s", f"unix:{path}"])
        finally:
            timer.join()
        assert waited.exit_code == 0, waited.stderr
        probes = invoke(["port-check", "--json", "-c", "3", "--interval", "10ms", f"unix:{path}"])
        assert probes.exit_code == 0
        summary = _json_lines(probes.stdout)[-1]
        assert summary["kind"] == "port-check.latency"
        assert (summary["proto"], summary["port"], summary["received"]) == ("unix", None, 3)
    finally:
        late.close()


@pytest.mark.parametrize("flag", ["-4", "-6"])
def test_unix_target_with_a_family_is_bad_input(flag: str) -> None:
    # As send refuses it: the flag changes nothing for a Unix socket. Before: accepted, silently.
    result = invoke(["port-check", "127.0.0.1:9", "unix:/run/x.sock", flag])
    assert result.exit_code == 2
    assert result.stdout == b""
    assert result.stderr.strip().splitlines() == [
        f"netprobe: port-check: {flag} has no effect with 'unix:/run/x.sock': "
        "a Unix socket has no IP family"
    ]


def test_unix_target_with_udp_is_bad_input() -> None:
    result = invoke(["port-check", "--udp", "unix:/run/x.sock"])
    assert result.exit_code == 2
    assert "unix:/run/x.sock" in result.stderr
    assert "--udp" in result.stderr


@pytest.mark.parametrize("mode", [[], ["--wait", "--deadline", "1s"], ["-c", "1"]])
def test_unix_path_too_long_for_a_socket_is_bad_input(mode: list[str]) -> None:
    # Such a path used to come back `open` (an errno-less OSError), and --wait ran its command.
    path = "/tmp/" + "y" * 103  # 108 bytes: one more than sun_path holds
    result = invoke(["port-check", *mode, f"unix:{path}"])
    assert result.exit_code == 2
    assert result.stdout == b""
    assert "108 bytes" in result.stderr
    assert result.stderr.count("\n") == 1


def test_latency_open_only_and_ctrl_c(server: ServerThread, closed_port: int) -> None:
    ports = f"{server.port},{closed_port}"
    argv = ["port-check", f"127.0.0.1:{ports}", "-c", "2", "--interval", "10ms", "--json"]
    result = invoke([*argv, "--open-only"])
    assert result.exit_code == 1  # the closed port still counts
    rows = _json_lines(result.stdout)
    assert rows
    assert {r["port"] for r in rows} == {server.port}
    assert {r["kind"] for r in rows} == {"port-check.probe", "port-check.latency"}
    # Ctrl-C after the first probe (the next is 10 s away): exit 130 and a line saying what
    # was measured, in words that fit one probe (it said "1 probes").
    slow = ["-c", "100", "--interval", "10s", "--json"]
    with netprobe_process(["port-check", f"127.0.0.1:{server.port}", *slow]) as proc:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())
        assert first["kind"] == "port-check.probe"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=LONG)
    assert proc.returncode == 130
    assert b"port-check: interrupted: 1 probe ended, 1 answered, 1 open\n" in err
    # As ping's statistics: the summary of the probes made (it printed none before).
    summaries = [r for r in _json_lines(out) if r["kind"] == "port-check.latency"]
    assert [(r["port"], r["state"]) for r in summaries] == [(server.port, "open")]
    assert 1 <= summaries[0]["sent"] < 100
    assert summaries[0]["received"] == summaries[0]["sent"]


_SPLIT_SCAN = """
import sys
import typer
from netprobe.cli._run import sigterm_exits_143
from netprobe.cli.port_check import _checks
from netprobe.engines.port_check import CheckConfig, Expect, build_hosts, parse_targets
from netprobe.render import OutputFormat

ports = tuple(int(p) for p in sys.argv[1].split(","))
hosts = build_hosts(parse_targets(["127.0.0.1"]), ports=ports, family=0, expect=Expect.OPEN)
# Two processes as a large scan on an idle host gets them; paced, so it runs for seconds.
config = CheckConfig(timeout_s=2.0, workers=2, rate=1000.0)
try:
    with sigterm_exits_143():
        sys.exit(_checks(hosts, config, OutputFormat.JSON, True, False, None, len(ports)))
except KeyboardInterrupt:
    sys.exit(130)
except typer.Exit as exc:  # SIGTERM
    sys.exit(exc.exit_code)
"""


def _split_scan(
    fillers: int, act: Callable[[subprocess.Popen[bytes]], None], wait_s: float = 1.0
) -> tuple[int, list[int], list[dict[str, Any]], bytes]:
    """Run _SPLIT_SCAN over six open ports (listed first: keys alternate between the two
    processes, three each) and `fillers` closed ones; `act` runs `wait_s` after the first row.
    Each process is paced at 1000 ports/s: its half takes fillers / 2000 s at least.
    Returns (exit status, the open ports, every row, stderr)."""
    listeners = []
    try:
        for _ in range(6):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sock.listen(8)
            listeners.append(sock)
        open_ports = [sock.getsockname()[1] for sock in listeners]
        closed = [p for p in range(20000, 20000 + fillers + 6) if p not in open_ports][:fillers]
        proc = subprocess.Popen(
            [sys.executable, "-c", _SPLIT_SCAN, ",".join(map(str, open_ports + closed))],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            start_new_session=True,  # a process group of its own, for killpg
        )
        try:
            assert proc.stdout is not None
            assert proc.stderr is not None
            first = json.loads(proc.stdout.readline())  # one of this process's three
            time.sleep(wait_s)  # the worker finds its three as early, in its first ms
            act(proc)
            # Not communicate(): it reads the pipe itself and would miss the rows readline()
            # took into the reader's buffer with the first one.
            out = proc.stdout.read()
            err = proc.stderr.read()
            proc.wait(LONG)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
    finally:
        for sock in listeners:
            sock.close()
    rows = [first, *(json.loads(line) for line in out.decode().splitlines())]
    return proc.returncode, open_ports, rows, err


@pytest.mark.skipif(not hasattr(os, "fork"), reason="split scans fork")
@pytest.mark.parametrize(
    ("how", "code"),
    [("SIGINT", 130), ("SIGTERM", 143), ("SIGTERM to the group", 143)],
)
def test_an_interrupted_split_scan_still_shows_what_its_worker_found(how: str, code: int) -> None:
    # An open-only scan split over two processes: the worker sent its results only at its
    # end, so an interrupt lost them. Its open ports, found in the first milliseconds, never
    # showed, and the counts covered half the ports checked. A SIGTERM to the whole group
    # (systemd, timeout(1)) reaches the worker too, and the parent's stop then came on top.
    def act(proc: subprocess.Popen[bytes]) -> None:
        if how == "SIGTERM to the group":
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(getattr(signal, how))

    status, open_ports, rows, err = _split_scan(20000, act)
    assert status == code, err
    assert sorted(row["port"] for row in rows) == sorted(open_ports), (rows, err)
    assert re.search(rb"interrupted: \d+ ports: 6 open, \d+ closed", err), err
    assert b"Traceback" not in err, err
    assert b"race condition" not in err, err


@pytest.mark.skipif(not hasattr(os, "fork"), reason="split scans fork")
def test_a_split_scan_whose_worker_alone_is_stopped_checks_its_share_itself() -> None:
    # A worker stopped by a signal of its own sends what it has; the run goes on, so that
    # share is checked again here rather than counted as done.
    import psutil

    def act(proc: subprocess.Popen[bytes]) -> None:
        (worker,) = psutil.Process(proc.pid).children()
        worker.send_signal(signal.SIGTERM)

    # Stopped 0.1 s in, its 1.5 s of paced checks far from done.
    status, open_ports, rows, err = _split_scan(3000, act, wait_s=0.1)
    assert status == 1, err  # finished: the closed ports are the failures
    assert sorted(row["port"] for row in rows) == sorted(open_ports), (rows, err)
    assert re.search(rb"port-check: 3006 ports: 6 open, 3000 closed", err), err


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_two_signals_ms_apart_still_leave_the_latency_summaries(
    server: ServerThread, signum: int, code: int
) -> None:
    # timeout(1) signals the command and then its process group: two signals, ms apart.
    # The second must not cut the report of the first (it is bounded, so no second signal is
    # needed to end it): a version that did lost the summaries in 1 of 20 runs.
    slow = ["-c", "100", "--interval", "10s", "--json"]
    with netprobe_process(["port-check", f"127.0.0.1:{server.port}", *slow]) as proc:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["kind"] == "port-check.probe"
        proc.send_signal(signum)
        time.sleep(0.002)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=LONG)
    assert proc.returncode == code, err
    summaries = [r for r in _json_lines(out) if r["kind"] == "port-check.latency"]
    assert [(r["port"], r["state"]) for r in summaries] == [(server.port, "open")]


def test_latency_probes_are_lines_in_a_pipe_too(server: ServerThread) -> None:
    # As ping and tcping: `-c 100 | tee log` showed nothing until the end.
    proc = run_netprobe(["port-check", f"127.0.0.1:{server.port}", "-c", "2", "--interval", "1ms"])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.decode().splitlines()
    assert lines[0].startswith(f"127.0.0.1:{server.port} tcp seq=1 open ")
    assert lines[1].startswith(f"127.0.0.1:{server.port} tcp seq=2 open ")
    assert len(lines) == 3  # then the summary row


@pytest.mark.parametrize("udp", [False, True])
def test_rate_ends_with_the_last_attempt(closed_port: int, udp: bool) -> None:
    # Regression: --rate waited one more interval after the last attempt (5 s at --rate 0.2
    # for one port), so the process must be done well before that.
    argv = ["port-check", f"127.0.0.1:{closed_port}", "--rate", "0.2", "--timeout", "300ms"]
    start = time.monotonic()
    proc = run_netprobe([*argv, "--udp", "--json"] if udp else [*argv, "--json"], timeout=4.5)
    took = time.monotonic() - start
    rows = _json_lines(proc.stdout)
    assert [row["port"] for row in rows] == [closed_port]
    assert proc.returncode in (0, 1), proc.stderr
    assert took < 4.5


@pytest.mark.parametrize("rate", ["1e-300", "5e-324", "inf", "-inf", "nan", "0.0005", "0"])
def test_rate_must_be_a_finite_pace_of_at_least_min_rate(closed_port: int, rate: str) -> None:
    # --rate 1e-300 used to be accepted and never ended (a wait of 1e300 s after the last
    # attempt); inf was accepted too. A subprocess with a timeout: the old code hangs.
    proc = run_netprobe(
        ["port-check", f"127.0.0.1:{closed_port}", "--rate", rate], timeout=LONG * 2
    )
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert proc.stdout == b""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("netprobe: port-check: ")
    assert "--rate" in err


def test_a_closed_probe_has_the_latency_of_its_rst(closed_port: int) -> None:
    # An RST is an answer: a check gives its time, and so does a latency probe now (before:
    # null, though the README says null only when no answer came). The summary's min/avg/...
    # stay those of completed handshakes: none here.
    argv = ["port-check", f"127.0.0.1:{closed_port}", "-c", "2", "--interval", "0", "--json"]
    rows = _json_lines(invoke(argv).stdout)
    probes = [r for r in rows if r["kind"] == "port-check.probe"]
    assert [p["state"] for p in probes] == ["closed", "closed"]
    assert all(isinstance(p["latency_ms"], float) for p in probes), probes
    (summary,) = [r for r in rows if r["kind"] == "port-check.latency"]
    assert (summary["received"], summary["min_ms"]) == (0, None)
    check = _json_lines(invoke(["port-check", f"127.0.0.1:{closed_port}", "--json"]).stdout)
    assert isinstance(check[0]["latency_ms"], float)


def test_rate_holds_across_latency_rounds(closed_port: int) -> None:
    # Three probes of one target at --rate 2 cannot take less than a second: each batch of
    # probes gets a new limiter, so the pace between batches is kept by the latency loop.
    argv = ["port-check", f"127.0.0.1:{closed_port}", "--rate", "2", "-c", "3", "--interval", "0"]
    start = time.monotonic()
    proc = run_netprobe([*argv, "--json"], timeout=LONG * 2)
    took = time.monotonic() - start
    assert proc.returncode == 1, proc.stderr
    probes = [r for r in _json_lines(proc.stdout) if r.get("kind") == "port-check.probe"]
    assert len(probes) == 3
    assert took >= 1.0  # probes at 0, 0.5 and 1.0 s at the least


def test_rate_holds_across_retries() -> None:
    # A silent UDP port: every attempt times out and is retried. Before, each retry pass
    # started at once, 50 ms (the timeout) after the last: 3 attempts in 0.1 s at --rate 2.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{silent.getsockname()[1]}"
        argv = ["port-check", "--udp", target, "--timeout", "50ms", "--retries", "2"]
        started = time.monotonic()
        result = invoke([*argv, "--rate", "2", "--json"])
        took = time.monotonic() - started
    assert result.exit_code == 3, result.stderr
    (row,) = _json_lines(result.stdout)
    assert (row["state"], row["attempts"]) == ("open|filtered", 3)
    assert took >= 1.0  # attempts at 0, 0.5 and 1.0 s at the least


def test_rate_holds_across_wait_rounds(closed_port: int) -> None:
    # At --rate 1 one port may be tried every second: within a 1.5 s deadline that is two
    # rounds (at 0 and 1 s), not the five the doubling pause alone would make (50 ms, 100 ms, ...).
    argv = ["port-check", "--wait", "--deadline", "1500ms", "--rate", "1", "--timeout", "100ms"]
    proc = run_netprobe([*argv, f"127.0.0.1:{closed_port}", "--json"], timeout=LONG * 2)
    assert proc.returncode == 124, proc.stderr
    rows = _json_lines(proc.stdout)
    assert rows
    assert rows[-1]["attempts"] <= 2


def test_targets_file_with_a_byte_order_mark(tmp_path: Path, closed_port: int) -> None:
    path = tmp_path / "targets.txt"
    path.write_bytes(b"\xef\xbb\xbf" + f"127.0.0.1:{closed_port}\n".encode())
    result = invoke(["port-check", "--targets-file", str(path), "--json"])
    assert result.exit_code == 1, result.stderr  # closed, not a bad target
    assert [row["port"] for row in _json_lines(result.stdout)] == [closed_port]


def test_quiet_wait_prints_nothing_even_on_a_terminal(closed_port: int) -> None:
    # -q: no progress lines either (they go to stderr only on a terminal: `script` gives one).
    script = shutil.which("script")
    if script is None:
        pytest.skip("script(1) not installed")
    argv = [sys.executable, "-m", "netprobe", "port-check", "--wait", "--deadline", "700ms", "-q",
            f"127.0.0.1:{closed_port}"]  # fmt: skip
    proc = subprocess.run(
        [script, "-qec", shlex.join(argv), "/dev/null"],
        capture_output=True,
        timeout=LONG * 2,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 124
    assert b"waiting" not in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("argv", "status"),
    [
        # CSV writes its header at the end when no row was shown: before, that write met the
        # closed pipe outside the check and the run exited 0.
        (["--csv", "--open-only"], 1),
        (["--count", "2", "--interval", "1ms", "--csv", "--open-only"], 1),
        # Wait mode prints its rows once the outcome is final (before: exit 0, no stderr line).
        (["--wait", "--deadline", "300ms"], 124),
    ],
)
def test_a_reader_gone_before_the_first_row_changes_no_verdict(
    closed_port: int, argv: list[str], status: int
) -> None:
    proc = _port_check_into_a_closed_pipe([f"127.0.0.1:{closed_port}", *argv])
    assert proc.returncode == status, proc.stderr
    assert b"Traceback" not in proc.stderr


def _port_check_into_a_closed_pipe(argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    """`port-check ARGV` with stdout a pipe nobody reads: the first write fails with EPIPE."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, "-m", "netprobe", "port-check", *argv],
            stdout=write_end,
            stderr=subprocess.PIPE,
            timeout=LONG * 2,
            cwd=ROOT,
            check=False,
        )
    finally:
        os.close(write_end)


def _cut_after_one_line(argv: list[str]) -> tuple[int, str]:
    """Run `netprobe ARGV`, read one stdout line, close stdout (as `| head -1` does); the exit
    status and stderr."""
    with netprobe_process(argv) as proc:
        assert proc.stdout is not None
        assert proc.stderr is not None
        assert proc.stdout.readline()
        proc.stdout.close()
        status = proc.wait(timeout=LONG)
        return status, proc.stderr.read().decode()


@pytest.mark.parametrize(
    ("extra", "status", "verdict"),
    [
        # Every check must hold, and all so far did: nobody knows about the rest.
        (["--expect", "closed"], 141, "verdict unknown"),
        (["--expect", "closed", "--json"], 141, "verdict unknown"),
        # A failure settles it: more results cannot make the run pass.
        ([], 1, "verdict settled"),
        # --require 1 held with the first result.
        (["--expect", "closed", "--require", "1"], 0, "verdict settled"),
        # Latency rows: the summaries that settle it never came.
        (
            ["--expect", "closed", "--count", "2", "--interval", "1ms", "--json"],
            141,
            "verdict unknown",
        ),
    ],
)
def test_a_reader_that_leaves_early_gets_no_false_success(
    tmp_path: Path, extra: list[str], status: int, verdict: str
) -> None:
    # Before: exit 0 whatever the results (`port-check ... | head` passed a gate that failed).
    # Unix paths nobody listens on: each is closed (ENOENT), with no traffic at all, and 5,000
    # rows are more than a pipe holds, so the writer meets the closed pipe.
    targets = tmp_path / "targets"
    targets.write_text("".join(f"unix:{tmp_path}/none-{i}\n" for i in range(5000)))
    code, stderr = _cut_after_one_line(["port-check", "--targets-file", str(targets), *extra])
    assert code == status, stderr
    assert f"port-check: output closed ({verdict}" in stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize(
    ("targets", "extra", "status", "said"),
    [
        # One probe came back open: the summary will say open, whatever the others do.
        (["open"], [], 0, "settled"),
        (["open", "closed"], ["--require", "any"], 0, "settled"),
        (["open", "closed"], [], 141, "unknown"),
        (["closed"], [], 141, "unknown"),
    ],
)
def test_latency_probes_cut_by_the_reader_keep_a_settled_verdict(
    server: ServerThread,
    closed_port: int,
    targets: list[str],
    extra: list[str],
    status: int,
    said: str,
) -> None:
    # Before: 141 "verdict unknown: 0 ports: nothing checked" after a probe had found the one
    # target open (`port-check HOST:PORT -c 5 | head -1`): only summaries were tallied.
    ports = {"open": server.port, "closed": closed_port}
    # -c 50: the run must still be going when the reader leaves, however slow the machine.
    argv = ["port-check", *(f"127.0.0.1:{ports[t]}" for t in targets), "-c", "50"]
    code, stderr = _cut_after_one_line([*argv, "--interval", "200ms", *extra])
    assert code == status, stderr
    # With the probes' counts (how many ended before the reader left varies), not "0 ports:
    # nothing checked".
    assert re.search(rf"output closed \(verdict {said}\): \d+ probes? ended, \d+ answered", stderr)


def test_a_reader_gone_at_the_last_row_keeps_the_verdict(server: ServerThread) -> None:
    # The one check had passed (it is tallied before its row is written): exit 0, not 141
    # "verdict unknown" (`port-check HOST:PORT | true`).
    proc = _port_check_into_a_closed_pipe([f"127.0.0.1:{server.port}"])
    assert proc.returncode == 0, proc.stderr
    assert b"output closed (verdict settled)" in proc.stderr


def test_wait_for_open_while_expecting_closed_is_a_contradiction(closed_port: int) -> None:
    # Before: "condition held after 0.00 s" on a closed port, exit 0.
    line = bad_input_line(["port-check", f"127.0.0.1:{closed_port}", "--wait", "--expect",
                           "closed", "--until", "open", "--deadline", "1s"])  # fmt: skip
    assert "--expect closed and --until open contradict each other" in line


def test_port_check_scans_an_address_range() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.2", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        result = invoke(["port-check", "127.0.0.1-3", "-p", str(port), "--json"])
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["address"], r["state"]) for r in rows] == [
        ("127.0.0.1", "closed"),
        ("127.0.0.2", "open"),
        ("127.0.0.3", "closed"),
    ]


@pytest.mark.unix
def test_an_abstract_unix_target_is_checked_as_one() -> None:
    # Before: `unix:@name` looked for a file named `@name`: a live listener reported `closed`,
    # ENOENT, though `listeners --unix` shows it as `@name`.
    name = f"@netprobe-check-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listening:
        listening.bind("\0" + name[1:])
        listening.listen(4)
        result = invoke(["port-check", "--json", f"unix:{name}", f"unix:{name}-none"])
    rows = {row["address"]: row for row in _json_lines(result.stdout)}
    assert (rows[name]["state"], rows[name]["errno_name"], rows[name]["proto"]) == (
        "open",
        None,
        "unix",
    )
    assert (rows[f"{name}-none"]["state"], rows[f"{name}-none"]["errno_name"]) == (
        "closed",
        "ECONNREFUSED",
    )
