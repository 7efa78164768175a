"""Run inside a network namespace by tests.helpers.serve_one_link_local_client:

    python -m tests.link_local_driver stdout|stderr tcp|udp|udp-send READY_FILE|"" -- ARGS

Starts `netprobe ARGS` (a server that ends after one client), reads its JSON announce line
from the stream named first (and the ready file, if one is named, while it exists), connects
one client to the very host and port announced, sends `zone` and reads the reply (but for
`udp-send`: a datagram sent, no reply expected, then the server is stopped with SIGTERM once
its next line, the peer's, is out), and prints one JSON object:
`announce`, `ready`, `connect_error` (the errno name, or null), `reply`, `code` and the other
JSON `events` of both streams. Every wait is bounded; a server still running is killed.
"""

from __future__ import annotations

import errno
import json
import socket
import subprocess
import sys
from typing import Any

_WAIT_S = 10.0


def _client(host: str, port: int, proto: str) -> bytes:
    udp = proto != "tcp"
    # getaddrinfo, as any client of the announced address does: `fe80::1` alone fails (EINVAL).
    family, kind, _proto, _name, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
    )[0]
    with socket.socket(family, kind) as sock:
        sock.settimeout(_WAIT_S)
        sock.connect(sockaddr)
        sock.sendall(b"zone")
        if udp:
            return sock.recv(100) if proto == "udp" else b""
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(100):
            reply += chunk
        return reply


def _records(text: bytes) -> list[Any]:
    lines = text.decode(errors="replace").splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def main(args: list[str]) -> int:
    stream, proto, ready_path, dash, *argv = args
    assert dash == "--"
    proc = subprocess.Popen(
        [sys.executable, "-m", "netprobe", *argv],
        stdin=subprocess.DEVNULL,
        bufsize=0,  # readline() takes the announce line and not a byte more
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    seen: dict[str, Any] = {"connect_error": None, "reply": None, "ready": None}
    try:
        pipe = proc.stdout if stream == "stdout" else proc.stderr
        assert pipe is not None
        line = pipe.readline()  # ends at the announce, or at EOF if netprobe failed
        seen["announce"] = json.loads(line) if line.startswith(b"{") else line.decode()
        if ready_path:
            with open(ready_path, encoding="utf-8") as ready:
                seen["ready"] = json.load(ready)
        announce = seen["announce"]
        if isinstance(announce, dict):
            try:
                seen["reply"] = _client(announce["host"], announce["port"], proto).decode()
            except OSError as exc:
                seen["connect_error"] = errno.errorcode.get(exc.errno or 0, str(exc))
        first = b""
        if seen["reply"] is None:
            proc.kill()  # nobody got through: it would wait for its client
        elif proto == "udp-send":
            first = pipe.readline()  # the peer's event: the datagram is in
            proc.terminate()
        out, err = proc.communicate(timeout=_WAIT_S * 2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(_WAIT_S)
    seen["code"] = proc.returncode
    seen["events"] = _records(first) + _records(out) + _records(err)
    print(json.dumps(seen))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
