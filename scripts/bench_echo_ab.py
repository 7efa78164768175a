#!/usr/bin/env python3
"""Paired A/B of `netprobe echo` between this tree and another checkout (another commit), in
bench_echo.py's 100-connection ping-pong test.

A shared machine drifts by more than a small change is worth from one minute to the next, so
one run of each side says little. This alternates the two servers (ABBA order) for many short
pairs and reports the geometric mean of the per-pair rate ratios with a 95% interval, how many
pairs the new side won, and per message: the server's user and system CPU, the load
generator's CPU and how often it went to sleep waiting for replies.

    git worktree add /tmp/np-old HEAD~1
    python3 scripts/bench_echo_ab.py /tmp/np-old             # 30 pairs of 2 s (~3 min)
    python3 scripts/bench_echo_ab.py /tmp/np-old --pairs 60 --conns 100 --seconds 2

Both servers run with this script's Python (the same venv, the same uvloop); each side's code
is the `netprobe` package of its tree. Loopback only.
"""

from __future__ import annotations

import argparse
import math
import resource
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_echo  # the load generator, its build, and the server helpers


def proc_cpu(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of one process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = 100.0  # USER_HZ
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def one_run(tree: Path, client: Path, conns: int, seconds: float) -> dict[str, float]:
    port = bench_echo.free_port()
    argv = [sys.executable, "-m", "netprobe", "echo", "--port", str(port), "--backlog", "4096"]
    # cwd puts the tree's own netprobe package first on sys.path (python -m).
    proc = subprocess.Popen(
        argv,
        cwd=tree,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        bench_echo.wait_port(port, proc)
        user0, sys0 = proc_cpu(proc.pid)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        count, took = bench_echo.run_client(
            client, "multi", "127.0.0.1", str(port), str(conns), "64", str(seconds)
        )
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        user1, sys1 = proc_cpu(proc.pid)
    finally:
        bench_echo.stop_group(proc)
    client_cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {
        "rate": count / took,
        "server_user_us": (user1 - user0) / count * 1e6,
        "server_sys_us": (sys1 - sys0) / count * 1e6,
        "client_us": client_cpu / count * 1e6,
        "client_sleeps": (after.ru_nvcsw - before.ru_nvcsw) / count,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", type=Path, help="the other tree (a checkout with netprobe/)")
    parser.add_argument("--pairs", type=int, default=30)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--conns", type=int, default=100)
    args = parser.parse_args(argv)
    new = bench_echo.ROOT
    if not (args.old / "netprobe" / "server.py").is_file():
        print(f"bench_echo_ab: {args.old}: no netprobe/server.py there", file=sys.stderr)
        return 2
    try:
        client = bench_echo.build_client()
        runs: dict[str, list[dict[str, float]]] = {"new": [], "old": []}
        logs: list[float] = []
        for pair in range(args.pairs):
            order = ("new", "old") if pair % 2 == 0 else ("old", "new")
            got = {}
            for side in order:
                got[side] = one_run(
                    new if side == "new" else args.old, client, args.conns, args.seconds
                )
                runs[side].append(got[side])
            logs.append(math.log(got["new"]["rate"] / got["old"]["rate"]))
            print(
                f"pair {pair + 1}: new {got['new']['rate']:,.0f}/s old {got['old']['rate']:,.0f}/s"
                f" ratio {got['new']['rate'] / got['old']['rate']:.3f}",
                file=sys.stderr,
            )
    except (bench_echo.BenchError, bench_echo.Stalled, bench_echo.EchoMismatch) as exc:
        print(f"bench_echo_ab: {exc}", file=sys.stderr)
        return 2
    print(f"{args.pairs} pairs of {args.seconds:g} s, {args.conns} connections, 64-byte ping-pong")
    print(f"{'median per message':<28}{'new':>10}{'old':>10}")
    for key, label in (
        ("rate", "msgs/s"),
        ("server_user_us", "server user CPU us"),
        ("server_sys_us", "server system CPU us"),
        ("client_us", "load generator CPU us"),
        ("client_sleeps", "load generator sleeps"),
    ):
        cells = [statistics.median(run[key] for run in runs[side]) for side in ("new", "old")]
        digits = 0 if key == "rate" else 3
        print(f"{label:<28}" + "".join(f"{value:>10,.{digits}f}" for value in cells))
    mean = statistics.mean(logs)
    spread = 2 * statistics.stdev(logs) / math.sqrt(len(logs)) if len(logs) > 1 else math.inf
    won = sum(value > 0 for value in logs)
    print(
        f"new/old rate: {math.exp(mean):.3f}x (95% interval {math.exp(mean - spread):.3f}-"
        f"{math.exp(mean + spread):.3f}), new faster in {won} of {len(logs)} pairs"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
