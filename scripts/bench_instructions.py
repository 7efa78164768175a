#!/usr/bin/env python3
"""User-space instructions per echoed message (valgrind's callgrind): netprobe echo against
the minimal echo servers of bench_echo.py, in its 100-connection ping-pong test.

On a shared machine a wall-clock rate swings 10-30% from run to run, and so does CPU time per
message; an instruction count does not (the same code and inputs give the same count within
about 1%). So this is how a change to the echo's per-message path is measured. It counts user
space only: the kernel's share of a message, most of the server's CPU time (bench_echo.py's
CPU columns), is not in it, and nothing here says how fast a server is.

Each server runs under callgrind; once it listens (start-up is not counted) the C load
generator drives CONNS connections of 64-byte messages for SECONDS, and the server's
instruction count over that window is divided by the messages echoed. The servers are
bench_echo.py's: `netprobe echo` (uvloop), `uvloop-min` (a one-line uvloop Protocol: the
floor of the loop netprobe runs on), `py-epoll` (a plain epoll loop) and `c-epoll`.

    python3 scripts/bench_instructions.py            # all four (about 2 minutes)
    python3 scripts/bench_instructions.py --smoke    # the two small yardsticks, 1 s each

Loopback only. valgrind is installed with apt-get when missing (the full run); without it the
smoke run says so and exits 0, the full run exits 2.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_echo  # the servers, the load generator and its build

SERVERS = ("netprobe", "uvloop-min", "py-epoll", "c-epoll")
SMOKE_SERVERS = ("py-epoll", "c-epoll")
# Python under callgrind starts 20-50x slower: `netprobe echo` takes ~20 s to listen here.
START_TIMEOUT_S = 180.0


def have_valgrind(install: bool) -> bool:
    if shutil.which("valgrind") and shutil.which("callgrind_control"):
        return True
    if install and shutil.which("apt-get"):
        print("installing valgrind with apt-get", file=sys.stderr)
        if subprocess.run(["apt-get", "install", "-y", "-qq", "valgrind"], check=False).returncode:
            subprocess.run(["apt-get", "update", "-qq"], check=False)
            subprocess.run(["apt-get", "install", "-y", "-qq", "valgrind"], check=False)
    return bool(shutil.which("valgrind") and shutil.which("callgrind_control"))


def dumped_instructions(path: Path) -> int:
    for line in path.read_text().splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
    raise bench_echo.BenchError(f"no summary line in {path}")


def instructions_per_message(
    name: str, client: Path, conns: int, seconds: float, out: Path
) -> tuple[float, float]:
    """(instructions per message, messages) for one server under callgrind."""
    port = bench_echo.free_port()
    spec = bench_echo.SERVERS[name]
    proc = subprocess.Popen(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}/{name}.%p",
            *spec.argv(port),
        ],
        env={**os.environ, **spec.env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=bench_echo.ROOT,
        start_new_session=True,
    )
    try:
        bench_echo.wait_port(port, proc, START_TIMEOUT_S)
        time.sleep(1.0)  # the probe connection's close, and whatever start-up left to run
        control = ["callgrind_control"]
        subprocess.run([*control, "-z", str(proc.pid)], check=True, capture_output=True)
        count, _seconds = bench_echo.run_client(
            client, "multi", "127.0.0.1", str(port), str(conns), "64", str(seconds)
        )
        subprocess.run([*control, "-d", str(proc.pid)], check=True, capture_output=True)
    finally:
        bench_echo.stop_group(proc, 30.0)  # valgrind writes its last dump on the way out
    if count <= 0:
        raise bench_echo.BenchError(f"{name}: no message was echoed")
    dump = out / f"{name}.{proc.pid}.1"  # the first dump: the window between -z and -d
    return dumped_instructions(dump) / count, count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="two small yardsticks, 1 s each")
    parser.add_argument(
        "--servers", default=None, help="comma-separated, from: " + ", ".join(SERVERS)
    )
    parser.add_argument("--seconds", type=float, default=6.0, help="traffic per server")
    parser.add_argument("--conns", type=int, default=100)
    args = parser.parse_args(argv)
    names = (
        args.servers.split(",") if args.servers else list(SMOKE_SERVERS if args.smoke else SERVERS)
    )
    if args.smoke:
        args.seconds, args.conns = 1.0, 10
    unknown = [name for name in names if name not in SERVERS]
    if unknown:
        print(f"bench_instructions: unknown server {unknown[0]!r}", file=sys.stderr)
        return 2
    if not have_valgrind(install=not args.smoke):
        print("bench_instructions: valgrind not available", file=sys.stderr)
        return 0 if args.smoke else 2
    print(
        f"user-space instructions per echoed 64-byte message, {args.conns} connections, "
        f"{args.seconds:g} s each (callgrind; start-up not counted)"
    )
    results: dict[str, float] = {}
    try:
        client = bench_echo.build_client()
        with tempfile.TemporaryDirectory(prefix="netprobe-callgrind-") as tmp:
            for name in names:
                print(f"measuring {name} under callgrind", file=sys.stderr)
                per_message, count = instructions_per_message(
                    name, client, args.conns, args.seconds, Path(tmp)
                )
                results[name] = per_message
                print(
                    f"  {name:<11} {per_message:>8,.0f} instructions/message ({count:,.0f} messages)"
                )
    except bench_echo.EchoMismatch as exc:
        print(f"bench_instructions: ECHO MISMATCH: {exc}", file=sys.stderr)
        return 1
    except (bench_echo.BenchError, bench_echo.Stalled, subprocess.SubprocessError, OSError) as exc:
        print(f"bench_instructions: {exc}", file=sys.stderr)
        return 2
    floor = results.get("uvloop-min")
    if "netprobe" in results and floor:
        extra = results["netprobe"] - floor
        print(
            f"netprobe / uvloop-min: {results['netprobe'] / floor:.2f}x "
            f"({extra:,.0f} instructions a message are netprobe's own code)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
