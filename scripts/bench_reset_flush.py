#!/usr/bin/env python3
"""How much of what `reset serve --action rst` queued a slow reader gets before the RST, and
how often the kernel acknowledges what such a reader takes: the figures of README's `rst`
row (reset section) and of echo's `--idle-timeout` row.

For each reading rate, `netprobe reset serve --mode send --after-bytes-out 400000` queues
400 KB and then resets; its RST waits while the peer keeps taking bytes (the server's
SIOCOUTQ going down) and gives up after 2 s in which it took nothing. A reader takes 4 KiB
pieces at that rate (KB = 1000 bytes) and counts what it got before the RST. After each piece
it reads the server socket's send queue (/proc/net/tcp `tx_queue`: the server's SIOCOUTQ,
what netprobe polls) and notes how many bytes it had read when that queue went down: the
spacing of those points is how much a reader of small pieces reads between the window
updates that acknowledge more data.

Loopback only, in a network namespace of its own; about 20 s, at most 15 s per rate:

    scripts/_in_netns .venv/bin/python scripts/bench_reset_flush.py [--rates 40,60,80,120]
"""

from __future__ import annotations

import argparse
import itertools
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUEUED = 400_000  # bytes the server sends before its trigger fires
PIECE = 4096  # bytes per read
CAP_S = 15.0  # per rate: 400 KB at 40 KB/s is 10 s


def _queues(server_port: int, client_port: int) -> tuple[int, int] | None:
    """(tx_queue of the server's end, rx_queue of the reader's end); None: gone."""
    server_tx = client_rx = None
    with open("/proc/net/tcp", encoding="ascii") as table:
        next(table)
        for row in table:
            fields = row.split()
            local = int(fields[1].rsplit(":", 1)[1], 16)
            remote = int(fields[2].rsplit(":", 1)[1], 16)
            tx, rx = (int(q, 16) for q in fields[4].split(":"))
            if (local, remote) == (server_port, client_port):
                server_tx = tx
            elif (local, remote) == (client_port, server_port):
                client_rx = rx
    if server_tx is None or client_rx is None:
        return None
    return server_tx, client_rx


def measure(rate_kb: float) -> dict[str, object]:
    rate = rate_kb * 1000.0
    argv = [sys.executable, "-m", "netprobe", "reset", "serve", "--port", "0", "--mode", "send",
            "--after-bytes-out", str(QUEUED), "--action", "rst", "--count", "1",
            "--duration", f"{CAP_S + 5:g}s", "--json"]  # fmt: skip
    server = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert server.stdout is not None
        announce = json.loads(server.stdout.readline())
        port = int(announce["port"])
        sock = socket.create_connection(("127.0.0.1", port), timeout=CAP_S)
        client_port = sock.getsockname()[1]
        got, ending, acks = 0, "cap", []
        flushing = False  # the server wrote all QUEUED bytes: only the RST's wait is left
        last_queue = None
        start = time.monotonic()
        with sock:
            while time.monotonic() - start < CAP_S:
                wait = start + got / rate - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                try:
                    piece = sock.recv(PIECE)
                except ConnectionResetError:
                    ending = "ECONNRESET"
                    break
                except TimeoutError:
                    break
                if not piece:
                    ending = "eof"
                    break
                got += len(piece)
                queues = _queues(port, client_port)
                queue = None if queues is None else queues[0]
                # Everything written is read, waiting to be, or queued at the server (a
                # delayed ACK can make the sum larger for a while, so the first match counts:
                # nothing more is written after it).
                was_flushing = flushing
                flushing = flushing or (queues is not None and got + sum(queues) == QUEUED)
                dropped = last_queue is not None and queue is not None and queue < last_queue
                if was_flushing and dropped:
                    acks.append(got)
                if flushing and not was_flushing:
                    acks.append(-got)  # where the flush began (negative: a mark, not an ACK)
                last_queue = queue
        elapsed = time.monotonic() - start
        server.wait(timeout=10)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    return {"rate_kb": rate_kb, "got": got, "ending": ending, "elapsed": elapsed, "acks": acks}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="40,60,80,120", help="KB/s, comma-separated")
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    if len(rates) > 8 or any(not 1 <= r <= 10_000 for r in rates):
        parser.error("--rates: at most 8 rates, each 1 to 10000 KB/s")
    spacings: list[int] = []
    firsts: list[int] = []
    print(f"reset serve --action rst after {QUEUED} bytes queued; reader of {PIECE}-byte pieces")
    for rate in rates:
        r = measure(rate)
        marks = [int(a) for a in r["acks"]]  # type: ignore[attr-defined]
        began = -marks[0] if marks and marks[0] <= 0 else None
        acks = [a for a in marks if a > 0]
        gaps = [b - a for a, b in itertools.pairwise(acks)]
        spacings += gaps
        if began is not None and acks:
            firsts.append(acks[0])
        print(
            f"  {rate:g} KB/s: got {r['got']} of {QUEUED} bytes before {r['ending']} "
            f"({r['elapsed']:.1f} s); all {QUEUED} written by {began} read; the server's "
            f"send queue went down after reading {acks} (steps {gaps})"
        )
        sys.stdout.flush()
    if firsts:
        print(
            f"first window update after {min(firsts) / 1024:.0f}-{max(firsts) / 1024:.0f} KiB read"
        )
    if spacings:
        print(
            f"then one every {min(spacings) / 1024:.0f} to {max(spacings) / 1024:.0f} KiB read "
            f"(median {statistics.median(spacings) / 1024:.0f} KiB, {len(spacings)} steps)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
