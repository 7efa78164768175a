"""Every benchmark script has a --smoke mode that runs in seconds and exits 0 (issue 8).

Peer tools (nmap, socat, ncat, nc, iperf3) are optional here: each script skips a missing peer
and says so, and still checks netprobe's own correctness (bytes echoed, open sets found).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHES = sorted(
    p.name
    for p in (ROOT / "scripts").glob("bench_*")
    if p.name != "bench_all.sh" and p.name.count("_") == 1 and p.suffix in {".sh", ".py"}
)


def test_every_job_of_the_report_is_here() -> None:
    expected = {
        "bench_startup.sh",
        "bench_portcheck.sh",
        "bench_echo.py",
        "bench_send.sh",
        "bench_backlog.sh",
        "bench_reset.sh",
        "bench_instructions.py",
    }
    assert set(BENCHES) == expected


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.parametrize("name", BENCHES)
def test_bench_smoke_mode_passes(name: str) -> None:
    script = ROOT / "scripts" / name
    argv = [sys.executable, str(script)] if name.endswith(".py") else ["bash", str(script)]
    proc = subprocess.run(
        [*argv, "--smoke"],
        cwd=ROOT,
        capture_output=True,
        timeout=140,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    output = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, output[-3000:]
    if name == "bench_echo.py":  # every server variant ran and each figure was reported
        report = proc.stdout.decode(errors="replace")
        assert "bulk MiB/s" in report
        assert "RSS KB per conn" in report
        assert "c-epoll" in report
    if name == "bench_instructions.py" and b"valgrind not available" not in proc.stderr:
        report = proc.stdout.decode(errors="replace")
        assert report.count("instructions/message") == 2, report


@pytest.mark.parametrize("loop", ["epoll", "uvloop", "splice"])
def test_minimal_reference_servers_echo(loop: str) -> None:
    # --smoke runs only the epoll one: each must still echo, or the full report is wrong.
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    if loop == "splice" and not hasattr(os, "splice"):
        pytest.skip("splice(2) is Linux-only")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = ROOT / "scripts" / "bench_echo_minimal.py"
    proc = subprocess.Popen([sys.executable, str(script), str(port), loop])
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                conn = socket.create_connection(("127.0.0.1", port), timeout=5)
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "the reference server never listened"
                time.sleep(0.05)
        with conn:
            payload = bytes(range(256)) * 64
            conn.sendall(payload)
            got = b""
            while len(got) < len(payload):
                chunk = conn.recv(65536)
                assert chunk, "closed early"
                got += chunk
            assert got == payload
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_bench_echo_tests_option_is_checked() -> None:
    # --tests picks what a round measures (a focused run of the 100-connection test has room
    # for more rounds); a name it does not know is refused before anything starts.
    script = ROOT / "scripts" / "bench_echo.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--tests", "multi,bogus"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert b"--tests: choose from bulk, pingpong, multi, pinned, idle" in proc.stderr


def test_reset_flush_script_measures_a_fast_reader() -> None:
    # scripts/bench_reset_flush.py measures the README's rst-flush figures; a reader far above
    # the cut-off rate gets every byte queued before the RST.
    script = ROOT / "scripts" / "bench_reset_flush.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--rates", "2000"],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    report = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, report + proc.stderr.decode(errors="replace")[-2000:]
    assert "2000 KB/s: got 400000 of 400000 bytes before ECONNRESET" in report, report
