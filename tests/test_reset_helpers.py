"""Shared helpers for the reset tests (no tests here): reset servers in threads, always stopped."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

from netprobe.engines.reset import ResetOptions, make_proxy, make_serve
from netprobe.engines.reset_faults import Action, FaultSchedule, Trigger, TriggerKind
from netprobe.server import Server, ServerConfig
from tests.helpers import LONG, ROOT


def options(
    kind: TriggerKind | None = None,
    value: float | None = None,
    *,
    action: Action = Action.RST,
    **extra: Any,
) -> ResetOptions:
    trigger = None if kind is None else Trigger(kind, value, extra.pop("framing", None))
    schedule = FaultSchedule.build(
        action=action,
        plan=extra.pop("plan", None),
        probability=extra.pop("probability", None),
        seed=extra.pop("seed", 1),
    )
    return ResetOptions(trigger=trigger, schedule=schedule, **extra)


@contextlib.contextmanager
def running(server: Server) -> Iterator[int]:
    """Listen, serve in a thread, yield the port; stop and join (asserting the thread ended)."""
    bound = server.listen()
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield int(bound.port or 0)
    finally:
        server.stop()
        thread.join(LONG)
        assert not thread.is_alive(), "reset server thread did not stop"


@contextlib.contextmanager
def serve(opts: ResetOptions, **config: Any) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """A `reset serve` on 127.0.0.1:0 in a thread; yields (port, connection records)."""
    records: list[dict[str, Any]] = []
    server, _totals, _control = make_serve(
        ServerConfig(port=0, handle_signals=False, **config), opts, on_record=records.append
    )
    with running(server) as port:
        yield port, records


@contextlib.contextmanager
def proxy(opts: ResetOptions) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """A `reset proxy` on 127.0.0.1:0 in a thread; yields (port, connection records)."""
    records: list[dict[str, Any]] = []
    server, _totals, _control = make_proxy(
        ServerConfig(port=0, handle_signals=False), opts, on_record=records.append
    )
    with running(server) as port:
        yield port, records


def connect(port: int, timeout: float = LONG) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def connect_and_read_until_end(port: int, timeout: float = LONG) -> tuple[bytes, str]:
    """connect() then read_until_end(). A reset right after the accept can beat connect()'s
    own wake-up: SO_ERROR then reads ECONNRESET and connect() raises it (more often on a busy
    machine): that is the same ending, with nothing read."""
    try:
        sock = connect(port, timeout)
    except ConnectionResetError:
        return b"", "ECONNRESET"
    with sock:
        return read_until_end(sock)


def read_until_end(sock: socket.socket) -> tuple[bytes, str]:
    """Read until EOF, reset or timeout: (bytes, "eof" | "ECONNRESET" | "timeout")."""
    chunks: list[bytes] = []
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return b"".join(chunks), "eof"
            chunks.append(data)
    except ConnectionResetError:
        return b"".join(chunks), "ECONNRESET"
    except TimeoutError:
        return b"".join(chunks), "timeout"


@contextlib.contextmanager
def subprocess_server(argv: list[str]) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, Any]]]:
    """`python -m netprobe ARGV --json` as a process; yields it and its announce record."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "netprobe", *argv, "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read().decode() if proc.stderr else "no announce line"
        yield proc, json.loads(line)
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=LONG)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=LONG)
