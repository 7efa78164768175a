#!/usr/bin/env python3
"""Benchmark `netprobe echo` against socat and ncat (and iperf3 as the loopback reference).

Measures, for each server on 127.0.0.1, several rounds each, medians reported:
  (1) bulk: one connection, BULK bytes through and back, MiB/s of payload;
  (2) ping-pong: one connection, 64-byte messages, round trips/s;
  (3) 100 concurrent connections ping-pong, aggregate messages/s;
  (4) RSS of the server holding N idle connections -> KB per connection.
Besides wall-clock rates it reports the server's own CPU time per unit of work (read from
/proc via psutil), which stays meaningful when other processes share the CPU.

The load generator is scripts/bench_echo_client.c, compiled with gcc into a cache directory
(the same client drives every server). Every echoed byte is compared; the script exits 1 if
any server returned different bytes, 2 if it could not run at all.

    python3 scripts/bench_echo.py                 # full run (about 8-9 minutes on 2 cores)
    python3 scripts/bench_echo.py --smoke         # seconds, tiny sizes, peers optional
    python3 scripts/bench_echo.py --install       # apt-get install socat ncat iperf3 first

Peers are started on loopback only: `socat TCP-LISTEN:P,reuseaddr,fork,bind=127.0.0.1 PIPE`
and `ncat -l -k -m 20000 --exec /bin/cat 127.0.0.1 P` (ncat's default of 100 connections
is raised so the idle test can run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CLIENT_SRC = ROOT / "scripts" / "bench_echo_client.c"
# The pauses that let CPU and RSS figures settle (a forked child reaped, a probe connection
# gone) scale with this: --smoke checks correctness only, and shortens them.
SETTLE = 1.0
CEILING_SRC = ROOT / "scripts" / "bench_echo_ceiling.c"
MIB = 1024 * 1024


class BenchError(Exception):
    """The benchmark could not run (exit 2)."""


class Stalled(Exception):
    """The server stopped moving bytes (ncat --exec deadlocks when both directions are busy)."""


class EchoMismatch(Exception):
    """A server returned bytes that differ from what was sent (exit 1)."""


# ---------------------------------------------------------------------------------------------
# Client and helpers
# ---------------------------------------------------------------------------------------------


def build_c(source: Path) -> Path:
    """Compile scripts/NAME.c into a cache directory (once per change) and return the binary."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise BenchError("gcc not found: the load generator is C (apt-get install gcc)")
    cache = Path(tempfile.gettempdir()) / "netprobe-bench"
    cache.mkdir(exist_ok=True)
    binary = cache / source.stem
    if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
        # Build under a private name, then rename: concurrent runs never see half a binary.
        partial = cache / f"{source.stem}.{os.getpid()}"
        subprocess.run([gcc, "-O2", "-pthread", "-o", str(partial), str(source)], check=True)
        os.replace(partial, binary)
    return binary


def build_client() -> Path:
    return build_c(CLIENT_SRC)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"server exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise BenchError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def process_tree(pid: int) -> list[Any]:
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_cpu(pid: int) -> float:
    """User+system CPU seconds of the server and its children (socat/ncat fork per client)."""
    user, system = tree_cpu_split(pid)
    return user + system


def tree_cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of the server and its children."""
    import psutil

    time.sleep(0.1 * SETTLE)  # a forked child that just finished is reaped (and counted) by then

    user = system = 0.0
    for proc in process_tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            times = proc.cpu_times()
            user += times.user + times.children_user
            system += times.system + times.children_system
    return user, system


def pin_tree(pid: int, cpus: set[int]) -> None:
    """Move the server and its children to CPUS; a forking server's later children inherit it."""
    import psutil

    for proc in process_tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
            os.sched_setaffinity(proc.pid, cpus)


def children_cpu() -> float:
    """User+system CPU seconds of this script's finished children (the load generator)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def split_cpus() -> tuple[set[int], set[int]] | None:
    """(server CPUs, client CPUs): one core for each side, or None when that is not possible."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    return {cpus[-1]}, {cpus[0]}


def tree_rss(pid: int) -> int:
    import psutil

    total = 0
    for proc in process_tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += proc.memory_info().rss
    return total


def run_client(
    client: Path, *args: str, timeout: float = 120.0, cpus: set[int] | None = None
) -> tuple[float, float]:
    def pin() -> None:
        if cpus is not None:
            os.sched_setaffinity(0, cpus)

    result = subprocess.run(
        [str(client), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        preexec_fn=pin if cpus is not None else None,
    )
    if result.returncode == 1:
        raise EchoMismatch(result.stderr.strip())
    if result.returncode == 3:
        raise Stalled(result.stderr.strip())
    if result.returncode != 0:
        raise BenchError(f"client {' '.join(args)} failed: {result.stderr.strip()}")
    count, seconds = result.stdout.split()
    return float(count), float(seconds)


# ---------------------------------------------------------------------------------------------
# Servers
# ---------------------------------------------------------------------------------------------


@dataclass
class ServerSpec:
    name: str
    argv: Callable[[int], list[str]]
    forks: bool = False  # one process per client (idle test uses fewer connections)
    idle: bool = True  # take part in the idle-RSS test
    reference: bool = False  # not a product: a yardstick (reported apart, no goals)
    env: dict[str, str] = field(default_factory=dict)  # added to the server's environment


def netprobe_argv(port: int) -> list[str]:
    return [sys.executable, "-m", "netprobe", "echo", "--port", str(port), "--backlog", "4096"]


def _minimal(name: str, mode: str) -> ServerSpec:
    """A yardstick of scripts/bench_echo_minimal.py in `mode`."""
    script = str(ROOT / "scripts" / "bench_echo_minimal.py")
    return ServerSpec(
        name, lambda p: [sys.executable, script, str(p), mode], idle=False, reference=True
    )


SERVERS = {
    "netprobe": ServerSpec("netprobe", netprobe_argv),
    "netprobe-w2": ServerSpec(
        "netprobe-w2", lambda p: [*netprobe_argv(p), "--workers", "2"], idle=False
    ),
    # Without busy polling (the default polls a lone client 50 us after each message).
    "netprobe-no-poll": ServerSpec(
        "netprobe-no-poll", lambda p: [*netprobe_argv(p), "--busy-poll", "0"], idle=False
    ),
    # Raw echo in Python instead of C (netprobe._pump): what a build without a C compiler runs.
    "netprobe-python": ServerSpec(
        "netprobe-python", netprobe_argv, idle=False, env={"NETPROBE_NATIVE_ECHO": "0"}
    ),
    # The portable path: asyncio's own loop instead of uvloop (what the choice is worth).
    "netprobe-asyncio": ServerSpec(
        "netprobe-asyncio", netprobe_argv, idle=False, env={"NETPROBE_EVENT_LOOP": "asyncio"}
    ),
    "socat": ServerSpec(
        "socat",
        lambda p: ["socat", f"TCP-LISTEN:{p},reuseaddr,fork,bind=127.0.0.1,backlog=4096", "PIPE"],
        forks=True,
    ),
    "ncat": ServerSpec(
        "ncat",
        lambda p: ["ncat", "-l", "-k", "-m", "20000", "--exec", "/bin/cat", "127.0.0.1", str(p)],
        forks=True,
    ),
    # Yardsticks: what one process on one event loop reaches here at all, in C and in plain
    # Python (no asyncio, no features). A goal that even the C one misses is out of reach of
    # any one-process server on this machine.
    "c-epoll": ServerSpec(
        "c-epoll",
        lambda p: [str(build_c(CEILING_SRC)), str(p)],
        idle=False,
        reference=True,
    ),
    "py-epoll": _minimal("py-epoll", "epoll"),
    # Linux splice(2): bytes echoed inside the kernel, a thread per client (bulk; with 100
    # clients it runs 100 threads, as socat runs 100 processes).
    "splice-min": _minimal("splice-min", "splice"),
    "uvloop-min": _minimal("uvloop-min", "uvloop"),
}
# --smoke checks that the script works, not the figures: one server of each kind (netprobe, a
# forking peer, a yardstick). The netprobe variants differ only by a flag or the loop, and
# tests/test_bench_smoke.py runs the minimal Python servers on their own.
SMOKE_SERVERS = "netprobe,socat,c-epoll"


@contextlib.contextmanager
def running(spec: ServerSpec) -> Iterator[tuple[int, int]]:
    port = free_port()
    proc = subprocess.Popen(
        spec.argv(port),
        env={**os.environ, **spec.env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
        start_new_session=True,  # so the whole forked tree can be stopped
    )
    try:
        wait_port(port, proc)
        time.sleep(0.2 * SETTLE)  # let the probe connection's child (forking servers) go away
        yield port, proc.pid
    finally:
        stop_group(proc)


def stop_group(proc: subprocess.Popen[bytes], wait_s: float = 5.0) -> None:
    """SIGTERM to a server started in a session of its own (a forking one's children too),
    then SIGKILL if it is still there after wait_s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


@dataclass
class Figures:
    bulk_mib_s: list[float] = field(default_factory=list)
    bulk_cpu_s_per_gib: list[float] = field(default_factory=list)
    pingpong_rt_s: list[float] = field(default_factory=list)
    pingpong_cpu_us: list[float] = field(default_factory=list)
    multi_msgs_s: list[float] = field(default_factory=list)
    multi_cpu_us: list[float] = field(default_factory=list)
    multi_client_cpu_us: list[float] = field(default_factory=list)
    # Of the server's CPU time, the part spent in the kernel (system calls, TCP): what no
    # user-space change can take away.
    multi_kernel_share: list[float] = field(default_factory=list)
    # The same test with the server (all its processes) on one core, the client on another.
    pinned_msgs_s: list[float] = field(default_factory=list)
    pinned_cpu_us: list[float] = field(default_factory=list)
    pinned_client_cpu_us: list[float] = field(default_factory=list)
    idle_conns: int = 0
    idle_rss_kb_per_conn: float | None = None
    idle_rss_delta_kb_per_conn: float | None = None
    idle_rss_total_mib: float | None = None
    notes: list[str] = field(default_factory=list)

    def median(self, name: str) -> float | None:
        values: list[float] = getattr(self, name)
        return statistics.median(values) if values else None


def measure_round(
    client: Path, port: int, pid: int, args: argparse.Namespace, fig: Figures
) -> None:
    host = "127.0.0.1"
    tests = args.tests
    if "bulk" in tests:
        cpu0 = tree_cpu(pid)
        try:
            count, seconds = run_client(client, "bulk", host, str(port), str(args.bulk))
        except Stalled as exc:
            fig.notes.append(f"bulk stalled: {exc}")
        else:
            cpu1 = tree_cpu(pid)
            fig.bulk_mib_s.append(count / MIB / seconds)
            fig.bulk_cpu_s_per_gib.append((cpu1 - cpu0) / (count / (1024 * MIB)))

    if "pingpong" in tests:
        cpu1 = tree_cpu(pid)
        count, seconds = run_client(client, "pingpong", host, str(port), "64", str(args.seconds))
        cpu2 = tree_cpu(pid)
        fig.pingpong_rt_s.append(count / seconds)
        fig.pingpong_cpu_us.append((cpu2 - cpu1) / count * 1e6)

    multi = (client, "multi", host, str(port), str(args.conns), "64", str(args.seconds))
    if "multi" in tests:
        user2, sys2 = tree_cpu_split(pid)
        own0 = children_cpu()
        count, seconds = run_client(*multi)
        own1 = children_cpu()
        user3, sys3 = tree_cpu_split(pid)
        fig.multi_msgs_s.append(count / seconds)
        fig.multi_cpu_us.append((user3 + sys3 - user2 - sys2) / count * 1e6)
        if user3 + sys3 > user2 + sys2:
            fig.multi_kernel_share.append((sys3 - sys2) / (user3 + sys3 - user2 - sys2) * 100)
        fig.multi_client_cpu_us.append((own1 - own0) / count * 1e6)

    split = split_cpus()
    if split is None or "pinned" not in tests:
        return
    # On a small machine the client and the server share the cores: the figure above is what
    # both together reach. With one core each, it is what the server does with one core.
    server_cpus, client_cpus = split
    cpu3 = tree_cpu(pid)
    pin_tree(pid, server_cpus)
    try:
        own0 = children_cpu()
        count, seconds = run_client(*multi, cpus=client_cpus)
        own1 = children_cpu()
    finally:
        pin_tree(pid, set(os.sched_getaffinity(0)))
    cpu4 = tree_cpu(pid)
    fig.pinned_msgs_s.append(count / seconds)
    fig.pinned_cpu_us.append((cpu4 - cpu3) / count * 1e6)
    fig.pinned_client_cpu_us.append((own1 - own0) / count * 1e6)


def measure_idle(client: Path, port: int, pid: int, conns: int, fig: Figures) -> None:
    # Give forking servers time to reap the children of earlier rounds.
    time.sleep(0.5 * SETTLE)
    before = tree_rss(pid)
    proc = subprocess.Popen(
        [str(client), "idle", "127.0.0.1", str(port), str(conns)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("ready"):
            err = proc.stderr.read() if proc.stderr else ""
            raise BenchError(f"idle client did not get ready: {line!r} {err.strip()}")
        time.sleep(0.5 * SETTLE)
        held = tree_rss(pid)
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(30)
    fig.idle_conns = conns
    fig.idle_rss_total_mib = held / MIB
    fig.idle_rss_kb_per_conn = held / conns / 1024
    fig.idle_rss_delta_kb_per_conn = (held - before) / conns / 1024


def iperf3_mib_s(seconds: float) -> float | None:
    if shutil.which("iperf3") is None:
        return None
    port = free_port()
    server = subprocess.Popen(
        ["iperf3", "-s", "-1", "-B", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.3)
        result = subprocess.run(
            ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-J"],
            capture_output=True,
            text=True,
            timeout=seconds + 20,
            check=False,
        )
        if result.returncode != 0:
            return None
        data = json.loads(result.stdout)
        bits = data["end"]["sum_received"]["bits_per_second"]
        return float(bits) / 8 / MIB
    finally:
        server.kill()
        server.wait(5)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

GOALS = (
    # (label, figure, goal ratio to socat, higher is better)
    ("bulk MiB/s", "bulk_mib_s", 2.5),
    ("ping-pong round trips/s", "pingpong_rt_s", 1.2),
    ("100-conn msgs/s", "multi_msgs_s", 2.5),
    ("100-conn msgs/s, 1 core each", "pinned_msgs_s", 2.5),
)


# What a round measures, in this order (--tests picks some); "idle" runs once, after the rounds.
TESTS = ("bulk", "pingpong", "multi", "pinned", "idle")


def fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _busy(fig: Figures) -> str:
    """How busy each side's core was in the 1-core-each test: the one near 100% set the rate."""
    rate = fig.median("pinned_msgs_s")
    server, client = fig.median("pinned_cpu_us"), fig.median("pinned_client_cpu_us")
    if rate is None or server is None or client is None:
        return "-"
    return f"{server * rate / 1e4:.0f}/{client * rate / 1e4:.0f}"


def report(results: dict[str, Figures], iperf: list[float], args: argparse.Namespace) -> None:
    names = list(results)
    rows: list[tuple[str, list[str]]] = [
        ("bulk MiB/s (median)", [fmt(results[n].median("bulk_mib_s")) for n in names]),
        (
            "  server CPU s per GiB",
            [fmt(results[n].median("bulk_cpu_s_per_gib"), 2) for n in names],
        ),
        ("ping-pong round trips/s", [fmt(results[n].median("pingpong_rt_s")) for n in names]),
        (
            "  server CPU us per round trip",
            [fmt(results[n].median("pingpong_cpu_us"), 1) for n in names],
        ),
        (f"{args.conns}-conn msgs/s", [fmt(results[n].median("multi_msgs_s")) for n in names]),
        ("  server CPU us per msg", [fmt(results[n].median("multi_cpu_us"), 1) for n in names]),
        (
            "  of which in the kernel %",
            [fmt(results[n].median("multi_kernel_share")) for n in names],
        ),
        (
            "  client CPU us per msg",
            [fmt(results[n].median("multi_client_cpu_us"), 1) for n in names],
        ),
        (
            f"{args.conns}-conn msgs/s, 1 core each",
            [fmt(results[n].median("pinned_msgs_s")) for n in names],
        ),
        ("  server CPU us per msg", [fmt(results[n].median("pinned_cpu_us"), 1) for n in names]),
        (
            "  client CPU us per msg",
            [fmt(results[n].median("pinned_client_cpu_us"), 1) for n in names],
        ),
        ("  busy: server/client core %", [_busy(results[n]) for n in names]),
        ("idle conns held", [str(results[n].idle_conns or "-") for n in names]),
        ("  RSS total MiB", [fmt(results[n].idle_rss_total_mib, 1) for n in names]),
        ("  RSS KB per conn (total/N)", [fmt(results[n].idle_rss_kb_per_conn, 1) for n in names]),
        (
            "  RSS KB per conn (delta/N)",
            [fmt(results[n].idle_rss_delta_kb_per_conn, 1) for n in names],
        ),
    ]
    width = max(len(label) for label, _ in rows)
    cols = [max(12, len(n)) for n in names]
    print(f"{'':{width}}  " + "  ".join(f"{n:>{w}}" for n, w in zip(names, cols, strict=True)))
    for label, cells in rows:
        print(
            f"{label:{width}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cells, cols, strict=True))
        )
    for name in names:
        for note in sorted(set(results[name].notes)):
            print(f"note: {name}: {note}")
    print(f"rounds: {args.rounds}; bulk {args.bulk // MIB} MiB; {args.seconds} s per rate test")
    split = split_cpus()
    if split is not None:
        print(
            f"1 core each: the server and all its processes on CPU {min(split[0])}, the client"
            f" on CPU {min(split[1])}; otherwise both share all {os.cpu_count()} CPUs"
        )
    iperf_med = statistics.median(iperf) if iperf else None
    print(f"iperf3 one loopback stream: {fmt(iperf_med)} MiB/s (median of {len(iperf)})")
    socat = results.get("socat")
    for variant in ("netprobe", "netprobe-no-poll", "netprobe-w2", "netprobe-asyncio"):
        nets = results.get(variant)
        if nets is None:
            continue
        print(f"goals ({variant}):")
        for label, name, goal in GOALS:
            mine = nets.median(name)
            theirs = socat.median(name) if socat else None
            if mine is None or not theirs:
                continue
            ratio = mine / theirs
            verdict = "met" if ratio >= goal else "MISSED"
            print(f"  {label}: {ratio:.2f}x socat (goal {goal}x) {verdict}")
        mine_bulk = nets.median("bulk_mib_s")
        if iperf_med and mine_bulk:
            share = mine_bulk / iperf_med
            verdict = "met" if share >= 0.5 else "MISSED"
            print(f"  bulk: {share:.0%} of iperf3 one stream (goal 50%) {verdict}")
    nets = results.get("netprobe")
    if socat is not None and nets is not None:
        # Each round measures the servers one after another within seconds: a ratio taken
        # within a round is spared most of the drift of a shared host between rounds.
        ours, peers = nets.multi_msgs_s, socat.multi_msgs_s
        if len(ours) > 1 and len(ours) == len(peers):
            per_round = [rate / peer for rate, peer in zip(ours, peers, strict=True)]
            print(
                f"{args.conns}-conn msgs/s, netprobe/socat round by round: "
                + ", ".join(f"{ratio:.2f}" for ratio in per_round)
                + f" (median {statistics.median(per_round):.2f}x)"
            )
    for other, title in (
        ("netprobe-asyncio", "event loop: netprobe on uvloop vs on asyncio's loop"),
        ("netprobe-no-poll", "busy poll: netprobe (50 us, the default) vs --busy-poll 0"),
    ):
        fast, slow = results.get("netprobe"), results.get(other)
        if fast is None or slow is None:
            continue
        gains = []
        for label, figure, _goal in GOALS:
            mine, theirs = fast.median(figure), slow.median(figure)
            if mine is not None and theirs:
                gains.append(f"{label} {mine / theirs:.2f}x")
        print(f"{title}: " + "; ".join(gains))
    references = [n for n in names if SERVERS[n].reference]
    if socat is not None and references:
        print("yardsticks (not netprobe; what one process reaches here):")
        for name in references:
            ratios = []
            for label, figure, goal in GOALS:
                mine, theirs = results[name].median(figure), socat.median(figure)
                if mine is not None and theirs:
                    ratios.append(f"{label} {mine / theirs:.2f}x socat (goal {goal}x)")
            print(f"  {name}: " + "; ".join(ratios))
            nets = results.get("netprobe")
            if nets is None:
                continue
            shares = []
            for label, figure, _goal in GOALS:
                mine, theirs = nets.median(figure), results[name].median(figure)
                if mine is not None and theirs:
                    shares.append(f"{label} {mine / theirs:.0%}")
            # How far netprobe is from this yardstick, apart from socat's own noise.
            print(f"    netprobe as a share of {name}: " + "; ".join(shares))
    nets = results.get("netprobe")
    if nets is not None and nets.idle_rss_kb_per_conn is not None:
        kb = nets.idle_rss_kb_per_conn
        verdict = "met" if kb < 20 else "MISSED"
        print(f"  idle: {kb:.1f} KB RSS per connection, total/N (goal < 20 KB) {verdict}")


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; runs in seconds")
    # Five: on a shared 2-core VM one 2 s sample of the same server ranged over 1.5x; the
    # median of five is steadier than of three, for every server alike.
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--bulk", type=int, default=512 * MIB, help="bytes per bulk round")
    parser.add_argument("--seconds", type=float, default=2.0, help="per rate test")
    parser.add_argument("--conns", type=int, default=100)
    parser.add_argument("--idle", type=int, default=10_000, help="idle connections (netprobe)")
    parser.add_argument(
        "--peer-idle", type=int, default=500, help="idle connections for forking peers"
    )
    parser.add_argument(
        "--servers",
        default=None,
        help="comma-separated (default: all; --smoke: " + SMOKE_SERVERS + ")",
    )
    parser.add_argument(
        "--tests",
        default=",".join(TESTS),
        help="comma-separated, from: " + ", ".join(TESTS) + " (default: all)",
    )
    parser.add_argument("--install", action="store_true", help="apt-get install missing peers")
    parser.add_argument("--json", action="store_true", help="also print all figures as JSON")
    args = parser.parse_args(argv)
    args.tests = {name.strip() for name in args.tests.split(",") if name.strip()}
    if not args.tests or not args.tests <= set(TESTS):
        parser.error(f"--tests: choose from {', '.join(TESTS)}")
    if args.servers is None:
        args.servers = SMOKE_SERVERS if args.smoke else ",".join(SERVERS)
    if args.smoke:
        global SETTLE
        SETTLE = 0.2
        args.rounds = 1
        args.bulk = 8 * MIB
        args.seconds = 0.15
        args.conns = 10
        args.idle = 200
        args.peer_idle = 20
    return args


def install_peers() -> None:
    missing = [tool for tool in ("socat", "ncat", "iperf3") if shutil.which(tool) is None]
    if not missing:
        return
    print(f"installing {' '.join(missing)} with apt-get", file=sys.stderr)
    subprocess.run(["apt-get", "update", "-qq"], check=False)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=False)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.install:
        install_peers()
    try:
        client = build_client()
        wanted = [name.strip() for name in args.servers.split(",") if name.strip()]
        specs = []
        for name in wanted:
            if name not in SERVERS:
                raise BenchError(f"unknown server {name!r}")
            exe = SERVERS[name].argv(0)[0]
            ours = name.startswith("netprobe") or SERVERS[name].reference
            if not ours and shutil.which(exe) is None:
                print(f"skipping {name}: not installed (use --install)", file=sys.stderr)
                continue
            specs.append(SERVERS[name])
        with contextlib.suppress(ImportError):
            import resource

            _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it
        results = {spec.name: Figures() for spec in specs}
        iperf: list[float] = []
        # Rounds are interleaved across servers so that noise from other load on the machine
        # hits every server alike, and rotated so that no server always goes first.
        for round_no in range(args.rounds):
            # Each round starts with a different server: measured first after iperf3 (or the
            # build), a server came out up to a fifth slower, whichever server it was.
            shift = round_no % len(specs)
            for spec in specs[shift:] + specs[:shift]:
                print(f"round {round_no + 1}/{args.rounds}: {spec.name}", file=sys.stderr)
                with running(spec) as (port, pid):
                    measure_round(client, port, pid, args, results[spec.name])
            if not args.smoke and "bulk" in args.tests:
                value = iperf3_mib_s(3.0)
                if value is not None:
                    iperf.append(value)
        for spec in specs:
            if not spec.idle or "idle" not in args.tests:
                continue
            conns = args.peer_idle if spec.forks else args.idle
            print(f"idle: {spec.name} with {conns} connections", file=sys.stderr)
            with running(spec) as (port, pid):
                measure_idle(client, port, pid, conns, results[spec.name])
    except EchoMismatch as exc:
        print(f"bench_echo: ECHO MISMATCH: {exc}", file=sys.stderr)
        return 1
    except (BenchError, Stalled, subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        print(f"bench_echo: {exc}", file=sys.stderr)
        return 2
    report(results, iperf, args)
    if args.json:
        print(json.dumps({name: fig.__dict__ for name, fig in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
