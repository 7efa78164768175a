"""A world whose /etc/hosts the test wrote, run inside `unshare -rnm` (see test_one_address.py):
an IPv4-only echo server (TCP and UDP) on 127.0.0.1 at one port (PORT in ARGV stands for it),
and `python -m netprobe ARGV` against it. It prints one JSON object: netprobe's exit code,
stdout and stderr, and the first address the C library gives for `localhost` here.

    python -m tests.hosts_world run -- ARGV...     run netprobe to its end
    python -m tests.hosts_world proxy -- ARGV...   netprobe serves (reset proxy): connect to
                                                   the address its first line announces, send
                                                   "hi", read the reply to EOF, then SIGTERM it
    python -m tests.hosts_world proxy6 -- ARGV...  as proxy, the echo server on ::1 instead
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading

from tests.world_run import finish, start

RUN_S = 30.0  # netprobe's run, and each wait on it: killed (and reported so) past this


def echo_tcp(listener: socket.socket) -> None:
    while True:
        conn, _peer = listener.accept()
        threading.Thread(target=echo_one, args=(conn,), daemon=True).start()


def echo_one(conn: socket.socket) -> None:
    with conn:
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
        except OSError:
            pass  # reset client's RST


def echo_udp(sock: socket.socket) -> None:
    while True:
        data, peer = sock.recvfrom(65536)
        sock.sendto(data, peer)


def through_proxy(proc: subprocess.Popen[bytes]) -> str:
    """Send "hi" through the proxy whose first stdout line names its address (127.0.0.1); its
    reply."""
    assert proc.stdout is not None
    first = proc.stdout.readline().decode()
    found = re.search(r"127\.0\.0\.1:(\d+)", first)  # or --json's `"port": P`
    port = found.group(1) if found else json.loads(first).get("port") if first[:1] == "{" else None
    if port is None:
        return f"no address announced: {first!r}"
    with socket.create_connection(("127.0.0.1", int(port)), timeout=RUN_S) as conn:
        conn.sendall(b"hi")
        conn.shutdown(socket.SHUT_WR)
        reply = b""
        try:
            while chunk := conn.recv(65536):
                reply += chunk
        except OSError as exc:
            return f"{reply.decode()}<{exc}>"
    return reply.decode()


def main() -> int:
    split = sys.argv.index("--")
    mode = sys.argv[1]
    family = socket.AF_INET6 if mode.endswith("6") else socket.AF_INET
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    listener = socket.create_server((host, 0), family=family)
    port = listener.getsockname()[1]
    udp = socket.socket(family, socket.SOCK_DGRAM)
    udp.bind((host, port))
    threading.Thread(target=echo_tcp, args=(listener,), daemon=True).start()
    threading.Thread(target=echo_udp, args=(udp,), daemon=True).start()
    argv = [arg.replace("PORT", str(port)) for arg in sys.argv[split + 1 :]]
    proc = start(argv)
    reply = None
    if mode.startswith("proxy"):
        reply = through_proxy(proc)
        proc.send_signal(signal.SIGTERM)
    ended = finish(proc, RUN_S)
    first = socket.getaddrinfo("localhost", port, 0, socket.SOCK_STREAM)[0][4][0]
    report = {
        **ended,
        "reply": reply,
        "localhost_first": first,
    }
    print(json.dumps(report))
    os._exit(0)  # the server threads are still in accept and recvfrom


if __name__ == "__main__":
    raise SystemExit(main())
