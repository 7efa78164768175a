"""`cat 50MB | netprobe send HOST:PORT > out` as real processes and pipes: identical bytes
through an echo server, with flat memory (RSS sampled with psutil while it runs); and
`--until-regex` over a 16 MB reply."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import LONG, ROOT, ServerThread, run_netprobe

SIZE = 50_000_000
RSS_LIMIT = 50 * 1024 * 1024  # the bound: well under 50 MB for a 50 MB stream


def _echo(conn: socket.socket) -> None:
    while data := conn.recv(262144):
        conn.sendall(data)


@pytest.mark.slow
def test_50mb_stream_round_trip_with_flat_memory(tmp_path: Path) -> None:
    payload = tmp_path / "in.bin"
    digest = hashlib.sha256()
    with payload.open("wb") as f:
        for _ in range(SIZE // 1_000_000):
            block = os.urandom(1_000_000)
            digest.update(block)
            f.write(block)
    srv = ServerThread(handler=_echo)
    try:
        # cat feeds a real pipe, so netprobe polls stdin like it would behind `head -c`.
        cat = subprocess.Popen(["cat", str(payload)], stdout=subprocess.PIPE)
        assert cat.stdout is not None
        send = subprocess.Popen(
            [sys.executable, "-m", "netprobe", "send", f"127.0.0.1:{srv.port}"],
            stdin=cat.stdout,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
        )
        cat.stdout.close()
        got = hashlib.sha256()
        count = 0

        def drain() -> None:
            nonlocal count
            assert send.stdout is not None
            while chunk := send.stdout.read(1 << 20):
                got.update(chunk)
                count += len(chunk)

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        proc = psutil.Process(send.pid)
        peak = 0
        deadline = time.monotonic() + 30
        while send.poll() is None and time.monotonic() < deadline:
            try:
                peak = max(peak, proc.memory_info().rss)
            except psutil.NoSuchProcess:
                break
            time.sleep(0.01)
        code = send.wait(LONG)
        reader.join(LONG)
        assert not reader.is_alive()
        cat.wait(LONG)
        assert send.stderr is not None
        err = send.stderr.read().decode()
        send.stderr.close()
        assert send.stdout is not None
        send.stdout.close()
    finally:
        srv.stop()
    assert code == 0, err
    assert count == SIZE
    assert got.hexdigest() == digest.hexdigest()
    assert 0 < peak < RSS_LIMIT, f"peak RSS {peak / 1e6:.1f} MB"


def test_until_regex_over_a_16mb_reply_stops_at_the_match_as_it_arrives() -> None:
    # The old code searched its whole 16 MiB window on every chunk: this took ~10 s. The
    # server keeps the connection open after the match, and the idle timeout is off, so
    # only a match found as it arrives ends the run before --timeout (exit 3).
    line = b"0123456789 the quick brown fox jumps over the lazy dog, 42 times DONE\r\n"
    body = line * (16_000_000 // len(line))
    reply = body + b"DONE 42\r\nnot this\r\nDONE 43\r\n"

    def serve(conn: socket.socket) -> None:
        conn.recv(64)
        conn.sendall(reply)
        while conn.recv(65536):  # until the client closes (or the LONG socket timeout)
            pass

    srv = ServerThread(handler=serve)
    try:
        proc = run_netprobe(
            [
                "send",
                f"127.0.0.1:{srv.port}",
                "x",
                "--until-regex",
                r"(?m)^DONE \d+\r$",
                "--idle-timeout",
                "0",
                "--timeout",
                "20",
            ],
            timeout=30,
        )
    finally:
        srv.stop()
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == body + b"DONE 42\r"
