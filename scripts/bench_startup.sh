#!/usr/bin/env bash
# Start-up cost of the netprobe CLI against the floor of importing Typer at all.
#
#   scripts/bench_startup.sh [--smoke] [--runs N]
#
# Times `netprobe --version`, `netprobe --help` and a one-port check (a loopback listener
# started here) against `python -c 'import typer'` with the same .venv python: median wall time
# of N runs each (default 15; --smoke: 1) and the ratio to the Typer floor. Then checks with
# `python -X importtime` that --help and a one-port check import neither asyncio nor psutil, and
# prints the largest imports of each, so a dominating Typer/rich import shows up with figures.
# Exits 1 if asyncio or psutil is imported.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
source "$here/_venv.sh" ""
runs=15
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) runs=1 ;;
    --runs) runs="$2"; shift ;;
    *) echo "usage: $0 [--smoke] [--runs N]" >&2; exit 2 ;;
  esac
  shift
done
exec "$root/.venv/bin/python" - "$root" "$runs" <<'PY'
import os
import socket
import statistics
import subprocess
import sys
import time

root, runs = sys.argv[1], int(sys.argv[2])
py = os.path.join(root, ".venv", "bin", "python")
netprobe = os.path.join(root, ".venv", "bin", "netprobe")
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(1024)
port = listener.getsockname()[1]
cases = {
    "import typer (floor)": [py, "-c", "import typer"],
    "netprobe --version": [netprobe, "--version"],
    "netprobe --help": [netprobe, "--help"],
    "port-check one port": [netprobe, "port-check", f"127.0.0.1:{port}", "-q"],
}


def wall(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - start


print(f"start-up, median of {runs} runs (load average {os.getloadavg()[0]:.2f}):")
medians = {}
for name, argv in cases.items():
    wall(argv)  # warm the page cache and .pyc files
    medians[name] = statistics.median(wall(argv) for _ in range(runs))
floor = medians["import typer (floor)"]
for name, seconds in medians.items():
    print(f"  {name:<22} {seconds * 1000:7.1f} ms   {seconds / floor:5.2f}x the Typer import")

bad = False
probes = {
    "--help": ["--help"],
    "one-port check": ["port-check", f"127.0.0.1:{port}", "-q"],
}
for name, args in probes.items():
    code = f"import sys; from netprobe.cli import main; sys.exit(main({args!r}))"
    proc = subprocess.run([py, "-X", "importtime", "-c", code], capture_output=True, text=True)
    rows = []
    selfs: dict[str, int] = {}
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        own, cumulative, module = line[len("import time:"):].split("|")
        if cumulative.strip().isdigit():
            # importtime indents a module by two spaces per nesting level.
            depth = (len(module) - len(module.lstrip()) - 1) // 2
            rows.append((int(cumulative), depth, module.strip()))
            package = module.strip().split(".")[0]
            selfs[package] = selfs.get(package, 0) + int(own)
    heavy = sorted({m for _c, _d, m in rows if m.split(".")[0] in ("asyncio", "psutil")})
    total = sum(c for c, d, _m in rows if d == 0)
    verdict = "IMPORTED: " + ", ".join(heavy) if heavy else "not imported"
    print(f"\nimports for {name}: {total / 1000:.1f} ms in all; asyncio/psutil {verdict}")
    for cumulative, _depth, module in sorted((r for r in rows if r[1] <= 1), reverse=True)[:8]:
        share = 100.0 * cumulative / total if total else 0.0
        print(f"  {module:<36} {cumulative / 1000:7.1f} ms  {share:5.1f}%")
    biggest = sorted(selfs.items(), key=lambda item: -item[1])[:8]
    print("  by package (own import time): " + ", ".join(f"{p} {t / 1000:.1f} ms" for p, t in biggest))
    bad = bad or bool(heavy)
listener.close()
sys.exit(1 if bad else 0)
PY
