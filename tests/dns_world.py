"""A world with a DNS server of the test's own, run inside `unshare -rnm` (see test_resolve.py):
/etc/resolv.conf there names 127.0.0.1, where this script answers on UDP port 53, and it
runs `python -m netprobe ARGV` against it. It prints one JSON object: netprobe's exit code,
stdout and stderr, and what the server saw.

    python -m tests.dns_world hold N -- ARGV...    hold every query until N names are asked
                                                   at once (or HOLD_S passed), then answer
    python -m tests.dns_world late T N -- ARGV...  NXDOMAIN for T seconds (and to the end of
                                                   the lookup round then), then as hold N
    python -m tests.dns_world silent [SIG|none] -- ARGV...
                                                   never answer; signal netprobe (SIGINT)
                                                   at the first query
    python -m tests.dns_world answer [MOVE_S] -- ARGV...
                                                   answer at once (mover.* moves at MOVE_S)
    python -m tests.dns_world once -- ARGV...      answer each question (name and type) the
                                                   first time it is asked, never again

Every name is answered with an IPv4 address (address_of) and, dual* names only, ::1 for
AAAA; IPv4 listeners on 127.0.0.1-41, one port (PORT in ARGV stands for it), take whatever
connects.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys
import threading
import time
from typing import Any

from tests.world_run import finish, start

HOLD_S = 5.0  # a hold mode's cap: past it, every query is answered at once
BURST_GAP_S = 0.2  # late mode: queries further apart than this begin a new lookup round
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


def address_of(name: str, moved: bool) -> str:
    """hostN.* is 127.0.0.(N+1) (each name its own address: port-check checks an address
    once); mover.* is 127.0.0.50 (no listener there) until it has moved, then 127.0.0.7; any
    other name is 127.0.0.1."""
    first = name.split(".", 1)[0]
    if first.startswith("host") and first[4:].isdigit():
        return f"127.0.0.{int(first[4:]) + 1}"
    if first == "mover":
        return "127.0.0.7" if moved else "127.0.0.50"
    return "127.0.0.1"


def nxdomain(packet: bytes) -> bytes:
    _name, _qtype, end = question(packet)
    return packet[:2] + struct.pack("!HHHHH", 0x8183, 1, 0, 0, 0) + packet[12:end]


def answer(packet: bytes, moved: bool = False) -> bytes:
    """A for every name (address_of); AAAA ::1 for dual* names only, none for the others."""
    name, qtype, end = question(packet)
    records = b""
    if qtype == 1:  # A, the name given by a pointer to the question's
        address = socket.inet_aton(address_of(name, moved))
        records = struct.pack("!HHHIH", 0xC00C, 1, 1, 60, 4) + address
    elif qtype == 28 and name.startswith("dual"):
        address = socket.inet_pton(socket.AF_INET6, "::1")
        records = struct.pack("!HHHIH", 0xC00C, 28, 1, 60, 16) + address
    header = packet[:2] + struct.pack("!HHHHH", 0x8180, 1, 1 if records else 0, 0, 0)
    return header + packet[12:end] + records


class Server:
    def __init__(
        self, mode: str, hold: int, unknown_s: float = 0.0, move_s: float = 3600.0
    ) -> None:
        self.mode, self.hold, self.unknown_s, self.move_s = mode, hold, unknown_s, move_s
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 53))
        self.held: list[tuple[bytes, Any]] = []
        self.outstanding: set[str] = set()
        self.most_at_once = 0
        self.names: set[str] = set()
        self.first_query = threading.Event()
        self.started = self.known_at = time.monotonic()
        self.holding = mode in ("hold", "late")
        self.nxdomains = 0
        self.known = mode != "late"
        self.last_query = 0.0
        self.asked: set[tuple[str, int]] = set()  # once mode: the questions answered
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        self.sock.settimeout(0.05)
        while True:
            if self.holding and self.known and time.monotonic() - self.known_at > HOLD_S:
                self.release()
            try:
                packet, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            name, qtype, _end = question(packet)
            self.names.add(name)
            self.first_query.set()
            if self.mode == "silent" or (self.mode == "once" and (name, qtype) in self.asked):
                continue
            self.asked.add((name, qtype))
            now = time.monotonic()
            if not self.known and now - self.started >= self.unknown_s:
                # Names become known only at the first query of a burst (a lookup round),
                # never within one: a round cut in two at the switch would never have all
                # its names asked at once again.
                self.known = now - self.last_query >= BURST_GAP_S
                self.known_at = now
            self.last_query = now
            if not self.known:
                self.sock.sendto(nxdomain(packet), peer)
                self.nxdomains += 1
                continue
            if not self.holding:
                self.sock.sendto(answer(packet, now - self.started >= self.move_s), peer)
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
    elif mode in ("answer", "once"):
        server = Server(mode, 0, move_s=float(rest[0]) if rest else 3600.0)
    else:
        server = Server(mode, int(rest[0]) if mode == "hold" else 0)
    listener = socket.create_server(("127.0.0.1", 0), backlog=512)
    port = str(listener.getsockname()[1])
    listeners = [listener] + [
        socket.create_server((f"127.0.0.{i}", int(port)), backlog=512) for i in range(2, 42)
    ]
    argv = [arg.replace("PORT", port) for arg in argv]
    proc = start(argv)
    signalled = False
    quiet = rest == ["none"]  # silent none: no signal, the run ends as it will
    while (
        mode == "silent"
        and not quiet
        and proc.poll() is None
        and time.monotonic() - server.started < RUN_S
    ):
        if server.first_query.wait(0.05):
            proc.send_signal(signal.Signals[rest[0]] if rest else signal.SIGINT)
            signalled = True
            break
    ended = finish(proc, RUN_S)
    report = {
        **ended,
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
