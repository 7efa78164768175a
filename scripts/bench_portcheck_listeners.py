"""Benchmark helper: listen on N random high TCP ports of 127.0.0.1 until stdin closes.

Prints the ports (one JSON list on stdout) once every listener is up, then accepts and closes
whatever connects, so repeated scans never fill a queue. Stops by itself when stdin reaches EOF
(the benchmark ended) or after --max-seconds, whichever comes first.
"""

from __future__ import annotations

import argparse
import json
import random
import selectors
import socket
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--low", type=int, default=1024, help="lowest port to pick from")
    parser.add_argument("--high", type=int, default=65535, help="highest port to pick from")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--max-seconds", type=float, default=900.0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    selector = selectors.DefaultSelector()
    listeners: list[socket.socket] = []
    tries = 0
    with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as sysctl:
        eph_low, eph_high = (int(x) for x in sysctl.read().split())
    ephemeral_fits = args.low <= eph_low and eph_high <= args.high
    while len(listeners) < args.count and tries < args.count * 20:
        tries += 1
        # Half on kernel-chosen (ephemeral-range) ports when they fall inside the scanned
        # range, the rest anywhere in low-high.
        kernel_picks = ephemeral_fits and len(listeners) % 2 == 1
        port = 0 if kernel_picks else rng.randint(args.low, args.high)
        sock = socket.socket()
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            sock.close()
            continue
        sock.listen(512)
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        listeners.append(sock)
    selector.register(sys.stdin, selectors.EVENT_READ)
    stdin_fd = sys.stdin.fileno()
    print(json.dumps(sorted(s.getsockname()[1] for s in listeners)), flush=True)
    end = time.monotonic() + args.max_seconds
    try:
        while time.monotonic() < end:
            for key, _mask in selector.select(timeout=1.0):
                if key.fd == stdin_fd:
                    if not sys.stdin.readline():
                        return 0
                    continue
                listener = key.fileobj
                assert isinstance(listener, socket.socket)
                try:
                    conn, _peer = listener.accept()
                except OSError:
                    continue
                conn.close()
    finally:
        for sock in listeners:
            sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
