"""A world with a DNS server of the test's own, run inside `unshare -rnm` (see test_resolve.py):
/etc/resolv.conf there names 127.0.0.1, where this script answers on UDP port 53, and it
runs `python -m netprobe ARGV` against it. It prints one JSON object: netprobe's exit code,
stdout and stderr, and what the server saw.

    python tests/dns_world.py hold N -- ARGV...    hold every query until N names are asked
                                                   at once (or HOLD_S passed), then answer
    python tests/dns_world.py late T N -- ARGV...  NXDOMAIN for T seconds, then as hold N
    python tests/dns_world.py silent [SIG] -- ARGV...
                                                   never answer; signal netprobe (SIGINT)
                                                   at the first query

Every name is answered with an IPv4 address (address_of) and nothing for AAAA; listeners on
127.0.0.1-41, one port (PORT in ARGV stands for it), take whatever connects.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HOLD_S = 5.0  # a hold mode's cap: past it, every query is answered at once
RUN_S = 30.0  # netprobe's run: killed (and reported so) past this


def question(packet: bytes) -> tuple[str, int, int]:
    """The first question's name, its type, and where the question ends."""
    labels, at = [], 12
    while packet[at]:
        size = packet[at]
        labels.append(packet[at + 1 : at + 1 + size].decode())
        at += 1 + size
    qtype = struct.unpack("!H", packet[at + 1 : at + 3])[0]
    return ".".join(labels).lower(), qtype, at + 5


def address_of(name: str) -> str:
    """hostN.* is 127.0.0.(N+1) (each name its own address: port-check checks an address
    once); any other name is 127.0.0.1."""
    first = name.split(".", 1)[0]
    if first.startswith("host") and first[4:].isdigit():
        return f"127.0.0.{int(first[4:]) + 1}"
    return "127.0.0.1"


def nxdomain(packet: bytes) -> bytes:
    _name, _qtype, end = question(packet)
    return packet[:2] + struct.pack("!HHHHH", 0x8183, 1, 0, 0, 0) + packet[12:end]


def answer(packet: bytes) -> bytes:
    name, qtype, end = question(packet)
    records = b""
    if qtype == 1:  # A, the name given by a pointer to the question's
        records = struct.pack("!HHHIH", 0xC00C, 1, 1, 60, 4) + socket.inet_aton(address_of(name))
    header = packet[:2] + struct.pack("!HHHHH", 0x8180, 1, 1 if records else 0, 0, 0)
    return header + packet[12:end] + records


class Server:
    def __init__(self, mode: str, hold: int, unknown_s: float = 0.0) -> None:
        self.mode, self.hold, self.unknown_s = mode, hold, unknown_s
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 53))
        self.held: list[tuple[bytes, Any]] = []
        self.outstanding: set[str] = set()
        self.most_at_once = 0
        self.names: set[str] = set()
        self.first_query = threading.Event()
        self.started = time.monotonic()
        self.holding = mode in ("hold", "late")
        self.nxdomains = 0
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        self.sock.settimeout(0.05)
        while True:
            if self.holding and time.monotonic() - self.started > self.unknown_s + HOLD_S:
                self.release()
            try:
                packet, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            name, _qtype, _end = question(packet)
            self.names.add(name)
            self.first_query.set()
            if self.mode == "silent":
                continue
            if time.monotonic() - self.started < self.unknown_s:
                self.sock.sendto(nxdomain(packet), peer)
                self.nxdomains += 1
                continue
            if not self.holding:
                self.sock.sendto(answer(packet), peer)
                continue
            self.held.append((packet, peer))
            self.outstanding.add(name)
            self.most_at_once = max(self.most_at_once, len(self.outstanding))
            if len(self.outstanding) >= self.hold:
                self.release()

    def release(self) -> None:
        self.holding = False
        for packet, peer in self.held:
            self.sock.sendto(answer(packet), peer)
        self.held.clear()


def main() -> int:
    split = sys.argv.index("--")
    mode, *rest = sys.argv[1:split]
    argv = sys.argv[split + 1 :]
    if mode == "late":
        server = Server(mode, int(rest[1]), float(rest[0]))
    else:
        server = Server(mode, int(rest[0]) if mode == "hold" else 0)
    listener = socket.create_server(("127.0.0.1", 0), backlog=512)
    port = str(listener.getsockname()[1])
    listeners = [listener] + [
        socket.create_server((f"127.0.0.{i}", int(port)), backlog=512) for i in range(2, 42)
    ]
    argv = [arg.replace("PORT", port) for arg in argv]
    proc = subprocess.Popen(
        [sys.executable, "-m", "netprobe", *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        # Whoever started us may ignore SIGINT (a shell's background job): netprobe must not.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    signalled = False
    while mode == "silent" and proc.poll() is None and time.monotonic() - server.started < RUN_S:
        if server.first_query.wait(0.05):
            proc.send_signal(signal.Signals[rest[0]] if rest else signal.SIGINT)
            signalled = True
            break
    try:
        out, err = proc.communicate(timeout=RUN_S)
        code: int | str = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        code = "killed"
    report = {
        "code": code,
        "stdout": out.decode(errors="replace"),
        "stderr": err.decode(errors="replace"),
        "names": sorted(server.names),
        "most_at_once": server.most_at_once,
        "nxdomains": server.nxdomains,
        "signalled": signalled,
        "seconds": round(time.monotonic() - server.started, 3),
        "listeners": len(listeners),
    }
    print(json.dumps(report))
    os._exit(0)  # the server thread may still be in recvfrom


if __name__ == "__main__":
    raise SystemExit(main())
