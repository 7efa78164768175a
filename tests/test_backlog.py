"""netprobe backlog: parsing, histogram, safety checks and client-side classification."""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netprobe.engines.backlog import (
    BacklogConfig,
    LatencyHistogram,
    parse_gate,
    parse_ramp,
    parse_sources,
    validate_config,
)
from netprobe.errors import UsageError
from netprobe.kernel import read_counters
from tests.helpers import (
    LONG,
    ROOT,
    SHORT,
    ServerThread,
    invoke,
    netprobe_process,
    wait_in_syscall,
    wait_until,
)

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux counters")


def _records(stdout: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.decode().splitlines() if line.strip()]


def _summary(stdout: bytes) -> dict[str, Any]:
    records = _records(stdout)
    assert records, "no JSON output"
    assert all(r["kind"] == "backlog.timeline" for r in records[:-1])
    summary = records[-1]
    assert summary["kind"] == "backlog"
    parts = ("established", "refused", "reset", "timed_out", "errors")
    assert sum(summary[k] for k in parts) == summary["attempted"]
    return summary


# --- histogram ------------------------------------------------------------------------------


@given(st.integers(min_value=0, max_value=10**11))
def test_histogram_bucket_holds_its_value(value: int) -> None:
    index = LatencyHistogram.index_of(value)
    low, high = LatencyHistogram.bounds_of(index)
    assert low <= value <= high
    assert high - low <= max(0, low) / 64


def test_histogram_percentiles_within_bucket_error() -> None:
    hist = LatencyHistogram()
    for ms in range(1, 1001):  # 1..1000 ms
        hist.record(ms / 1000.0)
    summary = hist.summary_ms()
    assert summary["max"] == pytest.approx(1000.0)
    for key, want in (("p50", 500.0), ("p90", 900.0), ("p99", 990.0), ("p999", 999.0)):
        value = summary[key]
        assert value is not None
        assert want <= value <= want * 1.02
    assert len(hist.counts) < 4096
    assert sum(b["count"] for b in hist.coarse()) == 1000


def test_histogram_empty() -> None:
    assert LatencyHistogram().summary_ms() == dict.fromkeys(("p50", "p90", "p99", "p999", "max"))


# --- option parsing -------------------------------------------------------------------------


def test_parse_sources_forms() -> None:
    assert parse_sources("127.0.0.2-127.0.0.4") == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    assert parse_sources("127.0.0.2-3,127.0.0.9") == ["127.0.0.2", "127.0.0.3", "127.0.0.9"]
    assert parse_sources("127.0.0.0/30") == ["127.0.0.0", "127.0.0.1", "127.0.0.2", "127.0.0.3"]
    assert parse_sources("fe80::1-fe80::2%lo") == ["fe80::1%lo", "fe80::2%lo"]  # zone kept


@pytest.mark.parametrize("bad", ["127.0.0.9-127.0.0.2", "nope", "127.0.0.1,", "10.0.0.0/8"])
def test_parse_sources_rejects(bad: str) -> None:
    with pytest.raises(UsageError):
        parse_sources(bad)


def test_parse_gate_and_units() -> None:
    gate = parse_gate("p99>200ms")
    assert (gate.metric, gate.op, gate.threshold) == ("p99", ">", 200.0)
    assert parse_gate("p50 >= 1s").threshold == 1000.0
    assert parse_gate("timed_out>0").failed({"timed_out": 1, "latency_ms": {}})
    assert not parse_gate("timed_out>0").failed({"timed_out": 0, "latency_ms": {}})
    assert parse_gate("accept_queue_max<5").failed(
        {"latency_ms": {}, "server": {"accept_queue_max": 3}}
    )


@pytest.mark.parametrize("bad", ["p99", "p98>1ms", "timed_out>5ms", "p99>1h", "x==1"])
def test_parse_gate_rejects(bad: str) -> None:
    with pytest.raises(UsageError):
        parse_gate(bad)


def test_parse_ramp() -> None:
    assert parse_ramp("100, 200,400") == [100.0, 200.0, 400.0]
    with pytest.raises(UsageError):
        parse_ramp("100,0")
    with pytest.raises(UsageError):
        parse_ramp("fast")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("nan", "'nan' is not a finite number"),
        ("100,inf", "'inf' is not a finite number"),
        ("1e-300", "'1e-300' is below the slowest rate, 0.001/s"),
    ],
)
def test_parse_ramp_refuses_non_finite_and_tiny_rates(text: str, words: str) -> None:
    with pytest.raises(UsageError, match=re.escape(words)):
        parse_ramp(text)


def test_parse_gate_refuses_a_threshold_float_makes_infinite() -> None:
    with pytest.raises(UsageError, match="not a finite number"):
        parse_gate("p99>" + "9" * 400)


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("accept_rate", 1e-300, "--accept-rate 1e-300"),
        ("accept_rate", math.inf, "--accept-rate inf"),
        ("rate", 1e-300, "--rate 1e-300"),
        ("rate", math.inf, "--rate inf"),
        ("backlog", 2**31, "--backlog 2147483648: must be at most 2147483647"),
        # Before: "--timeout must be above 0", not naming the value.
        ("timeout_s", 0.0, "--timeout 0s: must be above 0"),
        ("duration_s", -1.0, "--duration -1s: must be above 0"),
    ],
)
def test_validate_refuses_overflowing_values(field: str, value: float, words: str) -> None:
    cfg = BacklogConfig(lab=True, **{field: value})  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=re.escape(words)):
        validate_config(cfg)


def test_validate_rejects_remote_sources() -> None:
    cfg = BacklogConfig(host="127.0.0.1", port=9, sources=["192.0.2.1"])
    with pytest.raises(UsageError, match="loopback"):
        validate_config(cfg)


# --- CLI: bad input and safety --------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["backlog", "--lab", "--connections", "0"],
        ["backlog", "--lab", "--rate", "0"],
        ["backlog", "--lab", "--backlog", "-1"],
        ["backlog"],
        ["backlog", "--lab", "127.0.0.1:80"],
        ["backlog", "--lab", "--fail-if", "p42>1ms"],
        ["backlog", "--lab", "--source", "127.0.0.9-127.0.0.1"],
        ["backlog", "127.0.0.1:0"],
        ["backlog", "--lab", "--duration", "-1s"],
        # Review fixes: each of these used to run (exit 0, or 70 for the backlog).
        ["backlog", "--lab", "-q", "-n", "3", "--timeout", "100ms", "--accept-rate", "1e-300"],
        ["backlog", "--lab", "-n", "3", "--timeout", "100ms", "--accept-rate", "inf"],
        ["backlog", "--lab", "-n", "3", "--timeout", "100ms", "--rate", "inf"],
        ["backlog", "--lab", "-n", "3", "--timeout", "100ms", "--rate", "1e-300"],
        ["backlog", "--lab", "-n", "3", "--timeout", "100ms", "--ramp", "1e-300"],
        ["backlog", "--lab", "-n", "3", "--timeout", "100ms", "--backlog", "99999999999"],
        ["backlog", "--lab", "-n", "3", "--timeout", "100ms", "--json", "-q"],
        # Options that changed nothing, silently (exit 0) before.
        ["backlog", "127.0.0.1:1", "-n", "3", "--timeout", "100ms", "--backlog", "5"],
        ["backlog", "--lab", "-n", "3", "--timeout", "100ms", "--step", "1s"],
    ],
)
def test_bad_input_exits_2_with_one_line(argv: list[str]) -> None:
    result = invoke(argv)
    assert result.exit_code == 2, result.stderr
    assert result.stdout == b""
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


def test_remote_target_refused_without_allow_remote() -> None:
    # 192.0.2.0/24 is TEST-NET-1: parsed here, never sent to.
    started = time.monotonic()
    result = invoke(["backlog", "192.0.2.10:80", "--connections", "5", "--timeout", "100ms"])
    assert result.exit_code == 2
    assert result.stdout == b""
    assert "not a loopback address" in result.stderr
    assert "--allow-remote" in result.stderr
    assert "nothing was sent" in result.stderr
    assert time.monotonic() - started < LONG


# --- CLI: classification against real loopback servers -------------------------------------


def test_refused_when_nothing_listens(closed_port: int) -> None:
    result = invoke(
        ["backlog", f"127.0.0.1:{closed_port}", "-n", "20", "--timeout", "1s", "--json"]
    )
    assert result.exit_code == 0, result.stderr
    summary = _summary(result.stdout)
    assert summary["refused"] == 20
    assert summary["server"]["listening"] is False
    assert summary["server"]["bound"] is None
    assert summary["prediction"]["held"] is True


def test_a_wildcard_listener_is_reported_where_it_is_bound() -> None:
    # A listener on 0.0.0.0 takes the flood to 127.0.0.1: `address` is what was flooded,
    # `bound` is where the kernel lists the listener (`ss -ltn` shows 0.0.0.0:P).
    srv = ServerThread(host="0.0.0.0")  # accepts and closes; nothing is sent beyond loopback
    try:
        argv = ["backlog", f"127.0.0.1:{srv.port}", "-n", "5", "--timeout", "1s", "--json"]
        result = invoke(argv)
    finally:
        srv.stop()
    assert result.exit_code == 0, result.stderr
    server = _summary(result.stdout)["server"]
    assert (server["address"], server["bound"]) == (
        f"127.0.0.1:{srv.port}",
        f"0.0.0.0:{srv.port}",
    )


def _reset_handler(conn: socket.socket) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def test_reset_by_server_is_classified_reset() -> None:
    srv = ServerThread(handler=_reset_handler)
    try:
        # A long hold: the resets end it early; it only has to outlast a starved server thread.
        argv = ["backlog", f"127.0.0.1:{srv.port}", "-n", "10", "-c", "10", "--hold", "8s"]
        result = invoke([*argv, "--timeout", "2s", "--duration", "10s", "--json"])
    finally:
        srv.stop()
    assert result.exit_code == 0, result.stderr
    summary = _summary(result.stdout)
    assert summary["reset"] == 10
    assert summary["reset_after_established"] == 10
    assert summary["established"] == 0
    assert summary["server"]["pid"] is not None
    # The reading says so without contradicting itself (before: "0 of 10 connects completed
    # the handshake", then "10 were reset by the server after the handshake completed").
    text = " ".join(summary["interpretation"])
    assert "0 of 10 connects were established and ended normally (client view); 10 were reset" in (
        text
    )
    assert "10 were reset by the server after the handshake completed" in text


def test_sources_spread_connections() -> None:
    peers: list[str] = []
    lock = threading.Lock()

    def record_peer(conn: socket.socket) -> None:
        with lock:
            peers.append(conn.getpeername()[0])

    srv = ServerThread(handler=record_peer)
    try:
        argv = ["backlog", f"127.0.0.1:{srv.port}", "-n", "12", "--hold", "1s"]
        result = invoke([*argv, "--source", "127.0.0.2-127.0.0.4", "--json", "--timeout", "1s"])
        deadline = time.monotonic() + LONG
        while srv.accepted < 12 and time.monotonic() < deadline:
            time.sleep(SHORT)
    finally:
        srv.stop()
    assert result.exit_code == 0, result.stderr
    summary = _summary(result.stdout)
    assert summary["established"] == 12
    assert summary["sources"] == 3
    assert sorted(set(peers)) == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    assert all(peers.count(p) == 4 for p in set(peers))


@linux
def test_gate_failure_exits_1_and_names_the_gate() -> None:
    argv = ["backlog", "--lab", "--backlog", "2", "-n", "6", "--timeout", "200ms"]
    result = invoke([*argv, "--fail-if", "timed_out>0", "--fail-if", "p99>10s"])
    assert result.exit_code == 1
    assert "gate failed: timed_out>0" in result.stderr
    assert "p99>10s" not in result.stderr
    assert b"gate timed_out>0: FAILED" in result.stdout
    quiet = invoke([*argv, "--fail-if", "timed_out>0", "-q"])
    assert quiet.exit_code == 1  # the exit code is all -q leaves
    assert (quiet.stdout, quiet.stderr) == (b"", "")


@linux
@pytest.mark.parametrize(("count", "fits"), [(8, True), (30, False)])
def test_the_prediction_for_a_listener_that_never_accepts_counts_every_connect(
    count: int, fits: bool
) -> None:
    # Closed connections stay in the accept queue until accepted: -c 5 does not bound it.
    # Before: "expect no overflow: at most 5 connects at once" for 30, then 19 timed out.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(10)  # holds 11
    try:
        port = listener.getsockname()[1]
        argv = ["backlog", f"127.0.0.1:{port}", "-n", str(count), "-c", "5", "--timeout", "300ms"]
        result = invoke([*argv, "--json"])
    finally:
        listener.close()
    assert result.exit_code == 0, result.stderr
    prediction = _summary(result.stdout)["prediction"]
    assert prediction["text"].startswith("expect no overflow") is fits, prediction
    assert prediction["held"] is (True if fits else None), prediction


@linux
def test_a_queue_above_its_room_is_read_as_such() -> None:
    # listen(5) with 6 queued, then listen(2): the kernel keeps the 6, above the new room of 3.
    # Before: "peaked at 6 of a possible 3 ...: it was never seen full", which contradicts itself.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    port = listener.getsockname()[1]
    clients = [socket.create_connection(("127.0.0.1", port), timeout=LONG) for _ in range(6)]
    try:
        listener.listen(2)
        argv = ["backlog", f"127.0.0.1:{port}", "-n", "1", "--timeout", "300ms", "--json"]
        result = invoke(argv)
    finally:
        for client in clients:
            client.close()
        listener.close()
    assert result.exit_code == 0, result.stderr
    summary = _summary(result.stdout)
    assert (summary["server"]["accept_queue_max"], summary["server"]["backlog_limit"]) == (6, 2)
    text = " ".join(summary["interpretation"])
    assert "Accept queue peaked at 6, above its room of 3 (Send-Q 2 + 1)" in text
    assert "never seen full" not in text


def test_a_gate_on_a_metric_the_run_did_not_measure_fails(closed_port: int) -> None:
    # Every connect is refused: no latency was measured. Before: "passed (measured -)", exit 0,
    # so a CI gate on p99 passed a run that never connected.
    argv = ["backlog", f"127.0.0.1:{closed_port}", "-n", "5", "--timeout", "500ms"]
    result = invoke([*argv, "--fail-if", "p99>1s"])
    assert result.exit_code == 1, result.stderr
    assert "gate failed: p99>1s (not measured in this run: the gate cannot pass)" in result.stderr


def test_target_of_the_other_family_than_asked_is_bad_input() -> None:
    result = invoke(["backlog", "-4", "[::1]:80", "-n", "2"])
    assert result.exit_code == 2
    assert "-4 and TARGET [::1]:80 contradict each other" in result.stderr


@linux
def test_text_report_has_preflight_and_prediction() -> None:
    result = invoke(["backlog", "--lab", "--backlog", "1", "-n", "4", "--timeout", "200ms"])
    assert result.exit_code == 0, result.stderr
    text = result.text
    assert text.splitlines()[1].startswith("preflight: expect 2 established")
    assert "prediction held" in text
    assert "packets, not clients" in text
    assert result.stderr == ""  # progress only on a terminal


# --- limits that cap the run ----------------------------------------------------------------


def _lab_summary(argv: list[str]) -> dict[str, Any]:
    result = invoke(["backlog", "--lab", "--json", *argv])
    assert result.exit_code == 0, result.stderr
    return _summary(result.stdout)


@linux
def test_port_range_cap_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    from netprobe import kernel

    real = kernel.host_limits()
    tiny = kernel.HostLimits(
        real.somaxconn,
        real.tcp_max_syn_backlog,
        real.tcp_syncookies,
        real.tcp_abort_on_overflow,
        (40000, 40003),
        real.nofile_soft,
        real.nofile_hard,
    )
    monkeypatch.setattr(kernel, "host_limits", lambda: tiny)
    summary = _lab_summary(["--backlog", "64", "-n", "8", "-c", "8", "--timeout", "1s"])
    assert summary["concurrency"] == 4
    assert summary["established"] == 8
    assert any("ip_local_port_range 40000-40003 gives 4 ports" in c for c in summary["limits_hit"])
    assert any(line.startswith("Limit: ip_local_port_range") for line in summary["interpretation"])


@linux
def test_fd_limit_cap_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    from netprobe.engines import backlog as engine
    from netprobe.sockets import NofileLimit

    monkeypatch.setattr(engine, "raise_nofile_limit", lambda wanted: NofileLimit(100, 100))
    monkeypatch.setattr(engine, "MAX_PROCESSES", 1)  # no fork inside the test process
    summary = _lab_summary(["--backlog", "64", "-n", "50", "-c", "500", "--timeout", "1s"])
    assert summary["concurrency"] == 36  # 100 minus the 64 kept in reserve
    assert summary["established"] == 50
    assert any("RLIMIT_NOFILE soft 100 (hard 100)" in c for c in summary["limits_hit"])


class _KeepServer:
    """Accepts and keeps every connection until stopped (for held-connection runs)."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1024)
        self.listener.settimeout(SHORT)
        self.port: int = self.listener.getsockname()[1]
        self.conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.conns.append(conn)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(LONG)
        self.listener.close()
        for conn in self.conns:
            conn.close()
        assert not self._thread.is_alive()


@linux
@pytest.mark.slow
def test_fd_limit_spreads_over_connect_processes() -> None:
    import subprocess

    srv = _KeepServer()
    try:
        argv = ["backlog", f"127.0.0.1:{srv.port}", "-n", "600", "-c", "600", "--hold", "2s"]
        # A shell lowers soft and hard RLIMIT_NOFILE, as an unprivileged user would have it.
        shell = ["/bin/sh", "-c", 'ulimit -n 300 && exec "$0" "$@"', sys.executable]
        proc = subprocess.run(
            [*shell, "-m", "netprobe", *argv, "--timeout", "2s", "--json"],
            capture_output=True,
            timeout=30,
            check=False,
        )
    finally:
        srv.stop()
    assert proc.returncode == 0, proc.stderr
    summary = _summary(proc.stdout)
    assert summary["processes"] == 3  # 236 sockets each under a 300-fd limit
    assert summary["established"] == 600
    assert summary["peak_held"] == 600
    assert any("the run used 3 connect processes" in c for c in summary["limits_hit"])


@linux
def test_too_few_fds_for_the_connect_processes_is_a_local_error() -> None:
    # Before: os.pipe() raised EMFILE out of the engine: exit 70 (internal error), and the
    # connect processes already forked went on connecting.
    import subprocess

    srv = _KeepServer()
    try:
        shell = ["/bin/sh", "-c", 'ulimit -n 8 && exec "$0" "$@"', sys.executable]
        argv = ["backlog", f"127.0.0.1:{srv.port}", "-n", "20", "--timeout", "300ms", "--json"]
        proc = subprocess.run(
            [*shell, "-m", "netprobe", *argv],
            capture_output=True,
            timeout=30,
            check=False,
        )
    finally:
        srv.stop()
    stderr = proc.stderr.decode()
    assert proc.returncode == 6, stderr
    assert proc.stdout == b""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "pipe() failed with EMFILE" in lines[0]
    assert "RLIMIT_NOFILE soft 8, hard 8" in lines[0]


# --- judging the "paced" prediction -------------------------------------------------------


def _paced(peak: int, drops: int | None) -> tuple[bool | None, str]:
    from netprobe.engines.backlog import _judge

    prediction = {"text": "expect up to 17 queued at once", "kind": "paced", "capacity": 17}
    server = {"accept_queue_max": peak, "listener_drops_delta": drops}
    return _judge(prediction, {"attempted": 50, "server": server, "host": {"tcp_syncookies": 1}})


def test_paced_prediction_is_an_upper_bound() -> None:
    assert _paced(0, 0)[0] is True  # the listener kept up: "up to 17" held
    assert _paced(17, 5)[0] is True
    assert _paced(18, 0)[0] is True  # one over: two handshakes passed the room test at once
    assert "one over the 17" in _paced(18, 0)[1]
    assert _paced(19, 0)[0] is False
    assert _paced(0, 0)[1] == "accept queue peak 0 (at most 17 expected)"


def test_paced_drops_below_the_sampled_peak_mean_a_missed_full_queue() -> None:
    # Drops while the 50 ms samples never saw the queue full: it filled between samples.
    held, detail = _paced(3, 4)
    assert held is True
    assert "dropped 4 packets" in detail
    assert "full at times the sampling did not catch" in detail


@linux
def test_drops_that_are_no_overflow_do_not_fail_the_prediction() -> None:
    # sk_drops counts every packet the listener throws away. TCP_DEFER_ACCEPT drops each bare
    # final ACK (the connection stays in SYN-RECV until data comes), as a lost final ACK
    # leaves a client's FIN or RST to a request socket: the listener drops packets while its
    # queue never fills, and TcpExt ListenDrops stays put. "Expect no overflow" held; it was
    # judged from sk_drops alone and reported "did NOT hold: listener drops +20".
    listener = socket.socket()
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 5)
    listener.bind(("127.0.0.1", 0))
    listener.listen(50)
    try:
        port = listener.getsockname()[1]
        result = invoke(["backlog", f"127.0.0.1:{port}", "-n", "10", "-t", "2s", "--json"])
    finally:
        listener.close()
    assert result.exit_code == 0, result.stderr
    record = _summary(result.stdout)
    server = record["server"]
    assert server["listener_drops_delta"] >= 10, server
    if server["listen_drops_delta"] is None:
        pytest.skip("TcpExt counters are not readable here")
    assert server["listen_drops_delta"] == 0, server
    assert record["prediction"]["held"] is True, record["prediction"]
    assert "none of them queue drops" in record["prediction"]["detail"]


# --- reading the syncookie counters ---------------------------------------------------------


@linux
def test_cookie_connections_to_a_listener_of_this_host_are_read_as_possible_ghosts() -> None:
    # A cookie's final ACK that meets a full accept queue is dropped, and that client counts
    # itself connected. Before, only --lab (which knows what it accepted) said so; a listener
    # of someone else's on this host got "200 of 200 established" with SyncookiesRecv +191.
    from netprobe import kernel
    from netprobe.engines.backlog import BacklogConfig, _interpret

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    try:
        port = listener.getsockname()[1]
        result = invoke(["backlog", f"127.0.0.1:{port}", "-n", "4", "--json"])
    finally:
        listener.close()
    assert result.exit_code == 0, result.stderr
    record = _summary(result.stdout)
    cfg = BacklogConfig(host="127.0.0.1", port=port)
    record["counters"] = {**(record["counters"] or {}), "TcpExt.SyncookiesRecv": 3}
    text = " ".join(_interpret(record, cfg, kernel.host_limits()))
    assert (
        "Up to 3 of the 4 connections counted established completed on a SYN cookie "
        "(SyncookiesRecv +3, system-wide)"
    ) in text
    record["counters"]["TcpExt.SyncookiesRecv"] = 0
    assert "SYN cookie" not in " ".join(_interpret(record, cfg, kernel.host_limits()))


@pytest.mark.parametrize(
    ("signum", "code", "hold", "twice"),
    [(signal.SIGINT, 130, [], True), (signal.SIGTERM, 143, ["--hold", "30s"], False)],
)
def test_an_interrupted_flood_still_reports_what_it_measured(
    signum: int, code: int, hold: list[str], twice: bool
) -> None:
    # Before: Ctrl-C (or SIGTERM) printed nothing after the ticks: every figure was lost.
    # tcpkali prints its totals. Held connections count as established, as at --duration's
    # end (they were "not started" in a first version), and no gate is judged.
    argv = ["backlog", "--lab", "--backlog", "512", "-n", "400", "--rate", "50", "--json"]
    argv += [*hold, "--fail-if", "established<400"]
    with netprobe_process(argv) as proc:
        assert proc.stdout is not None
        ticks = 0
        deadline = time.monotonic() + LONG * 2
        while ticks < 1:  # a tick: a second of connects has been made
            assert time.monotonic() < deadline, "no ticks"
            line = proc.stdout.readline()
            assert line, "backlog ended early"
            ticks += json.loads(line).get("kind") == "backlog.timeline"
        proc.send_signal(signum)
        if twice:  # as timeout(1) does: a second one ms later cut the report short
            time.sleep(0.002)
            proc.send_signal(signum)
        rest, err = proc.communicate(timeout=LONG)
    assert proc.returncode == code, err
    summary = json.loads(rest.decode().splitlines()[-1])
    assert summary["interrupted"] is True
    assert 25 <= summary["attempted"] < 400
    assert summary["established"] == summary["attempted"]
    assert summary["not_started"] == 400 - summary["attempted"]
    assert summary["interpretation"][0].startswith("Interrupted after ")
    assert summary["prediction"]["held"] is None
    assert b"gate failed" not in err
    assert [g["failed"] for g in summary["gates"]] == [None]  # measured, not judged
    assert summary["failed_gates"] == []


def test_the_preflight_counts_what_already_waits_in_the_queue() -> None:
    # A listener that never accepts, its queue partly full from earlier connects: the
    # prediction said the queue "holds 3" as if empty, and the run's drops looked surprising.
    listener = socket.socket()
    waiting: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(2)  # holds 3
        port = listener.getsockname()[1]
        waiting.extend(socket.create_connection(("127.0.0.1", port), timeout=LONG) for _ in "ab")
        result = invoke(["backlog", f"127.0.0.1:{port}", "-n", "3", "-t", "300ms", "--json"])
    finally:
        for sock in waiting:
            sock.close()
        listener.close()
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout.decode().splitlines()[-1])
    assert "2 queued now: room for 1" in summary["prediction"]["text"]


def test_an_interrupted_ramp_keeps_its_steps_in_line_with_the_totals() -> None:
    argv = ["backlog", "--lab", "--backlog", "8", "--ramp", "200,400", "--step", "2s",
            "--timeout", "3s", "--json"]  # fmt: skip
    with netprobe_process(argv) as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the first tick: a second of the first step
        assert json.loads(line)["kind"] == "backlog.timeline"
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=LONG)
    assert proc.returncode == 130, err
    summary = json.loads(rest.decode().splitlines()[-1])
    step = summary["steps"][0]
    # Before: the step said 9 attempted while the totals said 400 (its pending connects were
    # counted in the totals only), and not_started_step_end claimed the steps ended early.
    assert step["attempted"] == summary["attempted"]
    assert step["timed_out"] == summary["timed_out"]
    assert summary["not_started_step_end"] == 0


def _interrupted_run(argv: list[str], after_first_tick_s: float) -> list[dict[str, Any]]:
    """Run `netprobe backlog ARGV --json`, SIGINT it `after_first_tick_s` after its first
    tick, and return its JSON records (the summary last)."""
    with netprobe_process([*argv, "--json"]) as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # a second of connects has been made
        assert json.loads(line)["kind"] == "backlog.timeline", line
        time.sleep(after_first_tick_s)
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=LONG)
    assert proc.returncode == 130, err
    records = _records(line + rest)
    assert all(r["kind"] == "backlog.timeline" for r in records[:-1])
    assert records[-1]["interrupted"] is True
    parts = ("established", "refused", "reset", "timed_out", "errors")
    assert sum(records[-1][k] for k in parts) == records[-1]["attempted"]
    return records


@linux
def test_an_interrupt_during_hold_reports_the_held_connections_connect_times() -> None:
    # Before: `established 9`, `peak_held 9`, but every latency null and the histogram empty:
    # held connections reach the tally only at their release, which --hold 30s puts far
    # beyond the Ctrl-C. A run ended by --duration reported them.
    argv = ["backlog", "--lab", "--backlog", "8", "-n", "20", "--timeout", "300ms"]
    summary = _interrupted_run([*argv, "--hold", "30s"], 0.0)[-1]
    assert summary["established"] >= 1
    assert summary["peak_held"] == summary["established"]  # all still held at the interrupt
    assert summary["latency_ms"]["p50"] is not None
    assert summary["latency_ms"]["max"] is not None
    # One connect time per handshake, each counted once.
    assert sum(band["count"] for band in summary["histogram"]) == summary["established"]


def test_an_interrupted_timeline_adds_up_to_the_summary() -> None:
    # Before: the second under way at Ctrl-C had no timeline object, so the ticks' attempts
    # summed to 400 (one second at --rate 400) while the summary said about 600.
    argv = ["backlog", "--lab", "--backlog", "16", "-n", "4000", "--rate", "400"]
    records = _interrupted_run([*argv, "--timeout", "300ms"], 0.5)
    ticks, summary = records[:-1], records[-1]
    assert ticks[-1]["span_s"] < 1.0  # the partial last second
    assert sum(tick["attempts"] for tick in ticks) == summary["attempted"]
    failures = ("refused", "reset", "timed_out", "errors")
    assert sum(tick["failures"] for tick in ticks) == sum(summary[key] for key in failures)
    # The connects the interrupt cut off are among the failures (timed out): the partial
    # second counted them in flight too.
    assert ticks[-1]["in_flight"] == 0


@linux
def test_connects_the_duration_cut_off_are_not_said_to_have_timed_out() -> None:
    # A listener that never accepts drops the SYNs of all but 5; the 35 others wait on their
    # 3 s timeout when --duration 1s ends them. Before: "35 clients timed out while SYNs were
    # being dropped.", though none reached its timeout (timed_out counts them, as documented).
    argv = ["backlog", "--lab", "--backlog", "4", "-n", "40", "--timeout", "3s"]
    result = invoke([*argv, "--duration", "1s", "--json"])
    assert result.exit_code == 0, result.stderr
    summary = _summary(result.stdout)
    ended = summary["stopped_pending"]
    assert ended > 0
    assert summary["timed_out"] == ended  # they are part of timed_out in the JSON
    text = "\n".join(summary["interpretation"])
    assert "timed out" not in text  # the first line said "35 timed out" too
    assert f"; {ended} were still waiting when the run ended" in text
    assert (
        f"{ended} clients were still waiting while SYNs were being dropped when --duration 1s "
        "ended them, before their --timeout 3s"
    ) in text


@linux
def test_an_interrupt_while_a_tick_is_written_still_reports_the_partial_second() -> None:
    # Ctrl-C landing in the CLI while it wrote a tick to a slow stdout lost the partial
    # second's timeline object: the timeline summed to 100 of 238 attempts.
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, 1031, 4096)  # F_SETPIPE_SZ: a small pipe, then nearly fill it
    os.write(write_end, b"#" * 4000 + b"\n")
    argv = ["backlog", "--lab", "-n", "1000", "--rate", "100", "--json"]
    # stdout buffered, as Python sets it up for a pipe by default. (Unbuffered, python -u or
    # PYTHONUNBUFFERED, a Ctrl-C inside the blocked write of a line loses that line: the
    # write of one short line to a pipe is all or nothing; known, not fixed.)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "netprobe", *argv],
        stdout=write_end,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
        env=env,
    )
    os.close(write_end)
    try:
        wait_in_syscall(proc.pid, "write", 1)  # the first tick's line (at 1 s) waits on the pipe
        # The run goes on meanwhile: once it made attempts beyond the first tick's (counted by
        # this worker's own namespace, where nothing else connects now), the signal.
        opened = read_counters()["Tcp.ActiveOpens"]
        wait_until(
            lambda: read_counters()["Tcp.ActiveOpens"] >= opened + 5, "attempts after a tick"
        )
        proc.send_signal(signal.SIGINT)
        data = b""
        while chunk := os.read(read_end, 65536):
            data += chunk
        assert proc.wait(LONG) == 130
    finally:
        os.close(read_end)
        if proc.poll() is None:
            proc.kill()
            proc.wait(LONG)
    records = [json.loads(line) for line in data.decode().splitlines()[1:]]
    ticks = [r for r in records if r["kind"] == "backlog.timeline"]
    (summary,) = [r for r in records if r["kind"] == "backlog"]
    assert summary["interrupted"] is True
    assert sum(t["attempts"] for t in ticks) == summary["attempted"] > ticks[0]["attempts"]


def test_the_text_timeline_marks_a_partial_last_second() -> None:
    # A run cut short (an interrupt, --duration 1.5s) ends on a second that covers less:
    # shown as any other row, its counts read as a full second's.
    import io

    from netprobe.cli.backlog import _timeline
    from netprobe.engines.backlog import Tick

    def tick(t: int, span_s: float) -> Tick:
        return Tick(t, span_s, None, 100, 90, 10, 0, 0, 10, 0, 5, 0, 3, 0)

    out = io.StringIO()
    _timeline(out, [tick(1, 1.0), tick(2, 0.5)])
    rows = out.getvalue().splitlines()[2:]
    assert "last" not in rows[0]
    assert rows[1].endswith("(last 0.50 s only)")
