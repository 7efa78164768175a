#!/usr/bin/env bash
# Throughput and added latency of `netprobe reset proxy` (no faults active), against the same
# transfer direct and through `socat TCP-LISTEN:P,fork TCP:127.0.0.1:UP`, all in one run.
#   ./scripts/bench_reset.sh           full run (about a minute; installs socat with apt-get if missing)
#   ./scripts/bench_reset.sh --smoke   seconds: tiny sizes, one round; socat optional
# Measures: 1-connection bulk MB/s, 50-connection aggregate MB/s (medians over rounds), and the
# median 64-byte round trip (µs) each path adds to the direct one. Every received stream is
# checked (CRC-32 against what the upstream sent); any difference exits 1.
# Goals (issue 7): proxy >= socat, proxy >= 50% of direct, < 100 µs added median round trip.
# The goals are judged on the default proxy (splice(2) relay on Linux); the portable
# event-loop path (--no-splice) is measured alongside for reference.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$here/.."
source "$here/_venv.sh" ""
mode="${1:-}"
case "$mode" in
  ""|--smoke) ;;
  *) echo "usage: $0 [--smoke]" >&2; exit 2 ;;
esac
if ! command -v socat >/dev/null 2>&1; then
  if [ "$mode" = "--smoke" ]; then
    echo "bench_reset: socat not installed: its column is skipped in smoke mode" >&2
  elif command -v apt-get >/dev/null 2>&1; then
    echo "bench_reset: installing socat with apt-get" >&2
    apt-get install -y socat >&2 || { apt-get update >&2 && apt-get install -y socat >&2; } \
      || echo "bench_reset: could not install socat; its column is skipped" >&2
  fi
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cat > "$tmp/bench_reset.py" <<'PY'
"""Driver for bench_reset.sh: an upstream (source + echo), three paths, clients in threads."""

import os
import random
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import zlib

SMOKE = "--smoke" in sys.argv
BLOCK = random.Random(1234).randbytes(1 << 20)  # the upstream streams this block, repeated
MIB = 1 << 20
if SMOKE:
    ROUNDS, BULK, CONNS, PER_CONN, PINGS = 1, 16 * MIB, 50, 1 * MIB, 300
else:
    ROUNDS, BULK, CONNS, PER_CONN, PINGS = 5, 512 * MIB, 50, 16 * MIB, 5000
TIMEOUT = 60.0


# -- the upstream: "S" + u64 -> stream that many bytes; "E" + u64 -> echo until EOF ----------

def upstream_main() -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(512)
    print(listener.getsockname()[1], flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve_one, args=(conn,), daemon=True).start()


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("EOF")
        buf += chunk
    return bytes(buf)


def serve_one(conn: socket.socket) -> None:
    try:
        serve_command(conn)
    except OSError:
        pass  # readiness probes connect and leave at once


def serve_command(conn: socket.socket) -> None:
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cmd, size = struct.unpack("!cQ", recv_exactly(conn, 9))
        if cmd == b"S":
            view = memoryview(BLOCK)
            left = size
            while left:
                n = min(left, len(view))
                conn.sendall(view[:n])
                left -= n
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(65536):
                pass
        else:
            while data := conn.recv(65536):
                conn.sendall(data)


# -- clients -------------------------------------------------------------------------------

def expected_crc(size: int) -> int:
    crc, left = 0, size
    while left:
        n = min(left, len(BLOCK))
        crc = zlib.crc32(BLOCK[:n] if n < len(BLOCK) else BLOCK, crc)
        left -= n
    return crc


def pull(port: int, size: int, results: list, index: int) -> None:
    """Receive `size` bytes from the source through `port`; record (bytes, crc)."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(struct.pack("!cQ", b"S", size))
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        crc, got = 0, 0
        while True:
            n = sock.recv_into(view)
            if not n:
                break
            crc = zlib.crc32(view[:n], crc)
            got += n
        results[index] = (got, crc)


def transfer(port: int, conns: int, size: int) -> float:
    """Aggregate MB/s for `conns` parallel pulls of `size` bytes each; checks the bytes."""
    results: list = [None] * conns
    threads = [threading.Thread(target=pull, args=(port, size, results, i)) for i in range(conns)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    elapsed = time.perf_counter() - start
    want = (size, CRC[size])
    bad = [r for r in results if r != want]
    if bad:
        raise SystemExit(f"bench_reset: BYTES DIFFER on port {port}: {len(bad)} of {conns} streams")
    return conns * size / elapsed / 1e6


def rtt_us(port: int, pings: int) -> float:
    """Median 64-byte round trip in microseconds (after a warm-up)."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(struct.pack("!cQ", b"E", 0))
        msg = bytes(range(64))
        samples = []
        for i in range(pings + 100):
            start = time.perf_counter()
            sock.sendall(msg)
            if recv_exactly(sock, 64) != msg:
                raise SystemExit(f"bench_reset: BYTES DIFFER in the round trip on port {port}")
            if i >= 100:
                samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_listening(port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"bench_reset: nothing listens on {port}")


CRC = {}


def main() -> int:
    for size in {BULK, PER_CONN}:
        CRC[size] = expected_crc(size)
    procs = []
    try:
        up = subprocess.Popen([sys.executable, __file__, "--upstream"], stdout=subprocess.PIPE)
        procs.append(up)
        up_port = int(up.stdout.readline())
        netprobe = [sys.executable, "-m", "netprobe"]
        proxy_port = free_port()
        proxy = subprocess.Popen(
            [*netprobe, "reset", "proxy", "--listen", f"127.0.0.1:{proxy_port}",
             "--upstream", f"127.0.0.1:{up_port}", "--quiet"],
        )
        procs.append(proxy)
        loop_port = free_port()
        procs.append(subprocess.Popen(
            [*netprobe, "reset", "proxy", "--listen", f"127.0.0.1:{loop_port}",
             "--upstream", f"127.0.0.1:{up_port}", "--quiet", "--no-splice"],
        ))
        paths = {"direct": up_port, "reset proxy": proxy_port, "--no-splice": loop_port}
        cmds = {
            "reset proxy": f"netprobe reset proxy --listen 127.0.0.1:{proxy_port} "
            f"--upstream 127.0.0.1:{up_port}",
            "--no-splice": f"netprobe reset proxy --listen 127.0.0.1:{loop_port} "
            f"--upstream 127.0.0.1:{up_port} --no-splice (portable event-loop path)",
        }
        socat = shutil.which("socat")
        if socat:
            socat_port = free_port()
            args = [socat, f"TCP-LISTEN:{socat_port},bind=127.0.0.1,reuseaddr,fork",
                    f"TCP:127.0.0.1:{up_port}"]
            procs.append(subprocess.Popen(args))
            paths["socat"] = socat_port
            cmds["socat"] = " ".join(args[1:])
        for port in paths.values():
            wait_listening(port)
        for name, cmd in cmds.items():
            print(f"# {name}: {cmd}")
        print(f"# rounds {ROUNDS}; bulk {BULK // MIB} MiB on 1 connection; "
              f"{CONNS} connections x {PER_CONN // MIB} MiB; {PINGS} round trips of 64 B; "
              f"{os.cpu_count()} CPUs (shared: other work on the host skews figures)")
        bulk = {name: [] for name in paths}
        many = {name: [] for name in paths}
        for _ in range(ROUNDS):
            for name, port in paths.items():  # interleaved, so noise hits every path alike
                bulk[name].append(transfer(port, 1, BULK))
                many[name].append(transfer(port, CONNS, PER_CONN))
        rtt = {name: rtt_us(port, PINGS) for name, port in paths.items()}
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def med(values: list) -> float:
        return statistics.median(values)

    print(f"{'path':<12} {'bulk MB/s':>10} {'50-conn MB/s':>13} {'rtt µs':>8} {'added µs':>9}")
    for name in paths:
        added = rtt[name] - rtt["direct"]
        print(f"{name:<12} {med(bulk[name]):>10.0f} {med(many[name]):>13.0f} "
              f"{rtt[name]:>8.1f} {added if name != 'direct' else 0:>9.1f}")
    p_bulk, p_many = med(bulk["reset proxy"]), med(many["reset proxy"])
    print(f"proxy/direct: bulk {p_bulk / med(bulk['direct']):.2f}, "
          f"50-conn {p_many / med(many['direct']):.2f}")
    goals = [
        ("proxy >= 50% of direct (bulk)", p_bulk >= 0.5 * med(bulk["direct"])),
        ("proxy >= 50% of direct (50-conn)", p_many >= 0.5 * med(many["direct"])),
        ("added round trip < 100 µs", rtt["reset proxy"] - rtt["direct"] < 100),
    ]
    if "socat" in paths:
        print(f"proxy/socat: bulk {p_bulk / med(bulk['socat']):.2f}, "
              f"50-conn {p_many / med(many['socat']):.2f}")
        goals += [
            ("proxy >= socat (bulk)", p_bulk >= med(bulk["socat"])),
            ("proxy >= socat (50-conn)", p_many >= med(many["socat"])),
        ]
    for goal, met in goals:
        print(f"goal {'met' if met else 'MISSED'}: {goal}")
    print("bytes verified: every stream matched (CRC-32)")
    return 0


if __name__ == "__main__":
    if "--upstream" in sys.argv:
        upstream_main()
    else:
        sys.exit(main())
PY
cd "$root" && "$root/.venv/bin/python" "$tmp/bench_reset.py" $mode
