"""Machinery of the reliability suite: netprobe servers as subprocesses, a client fleet driven
by one selector loop, and the scenarios themselves (returning their figures). Does I/O
(loopback only); every loop is bounded in count and time.

Strategy: the servers run as real processes (`python -m netprobe ...`), so their RSS and fd
counts can be read with psutil and signals are real. The clients are plain non-blocking
sockets in ONE selector loop in this process, never a thread per client: 2,000 connections
cost 2,000 fds and a few objects each. Payloads come from a seeded `random.Random`, and every
byte echoed back is compared with what was sent, in order.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import resource
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil

from tests.helpers import LONG, ROOT

__all__ = [
    "BulkClient",
    "Client",
    "EchoClient",
    "Fleet",
    "IdleClient",
    "ResetClient",
    "ServerProc",
    "UdpResult",
    "raise_fd_limit",
    "run_limited",
    "run_udp",
    "wait_baseline",
]

_LINGER_ZERO = struct.pack("ii", 1, 0)
# Server start-up includes a Python interpreter start on a loaded 2-core machine.
STARTUP_S = 20.0
RECV_SIZE = 65536
# psutil reads of the server are cheap but not free: sample at most this often.
SAMPLE_EVERY_S = 0.25


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:  # closed between listdir and readlink
        return ""


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards `wanted` (never above hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- server subprocesses -------------------------------------------------------------------


class ServerProc:
    """`python -m netprobe ARGV` (a server that announces itself as JSON on stdout).

    Use as a context manager: it starts the process, waits for the `listening` line, and
    on exit always terminates and reaps it. JSON lines on stdout are collected in `records`;
    stderr lines in `stderr_lines`.
    """

    def __init__(self, argv: Sequence[str], *, nofile: int | None = None) -> None:
        self.argv = list(argv)
        self.nofile = nofile
        self.records: list[dict[str, Any]] = []
        self.stdout_other: list[str] = []
        self.stderr_lines: list[str] = []
        self.announce: dict[str, Any] = {}
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.ps: psutil.Process | None = None
        self.returncode: int | None = None
        self.peak_rss = 0
        self.peak_fds = 0

    # lifecycle

    def __enter__(self) -> ServerProc:
        self.proc = subprocess.Popen(
            _python_argv(self.argv, self.nofile),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
        )
        self.ps = psutil.Process(self.proc.pid)
        assert self.proc.stdout is not None
        assert self.proc.stderr is not None
        for target, stream in (
            (self._read_stdout, self.proc.stdout),
            (self._read_stderr, self.proc.stderr),
        ):
            thread = threading.Thread(target=target, args=(stream,), daemon=True)
            thread.start()
            self._threads.append(thread)
        try:
            if not self._ready.wait(STARTUP_S):
                raise AssertionError(
                    f"{self.argv}: no listening line; stderr: {self.stderr_text()}"
                )
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(LONG)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(LONG)
        self.returncode = proc.returncode
        for thread in self._threads:
            thread.join(LONG)
        assert not any(t.is_alive() for t in self._threads), "pipe reader did not stop"
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = LONG) -> float:
        """Send `sig` and wait for the process to exit; returns the seconds it took."""
        assert self.proc is not None
        started = time.monotonic()
        self.proc.send_signal(sig)
        self.returncode = self.proc.wait(timeout)
        took = time.monotonic() - started
        for thread in self._threads:
            thread.join(LONG)
        return took

    # readings

    @property
    def port(self) -> int:
        return int(self.announce["port"])

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss(self) -> int:
        assert self.ps is not None
        return int(self.ps.memory_info().rss)

    def fds(self) -> int:
        """Open descriptors, less the event loop's EMFILE reserve: libuv (uvloop, which echo
        runs on and says so in its announce) opens /dev/null once, at the first accept, to
        shed connections when out of descriptors. One per process, not a connection's: at
        most that one is counted apart, so a leak of /dev/null descriptors would still show."""
        assert self.ps is not None
        count = int(self.ps.num_fds())
        if self.announce.get("event_loop") == "uvloop":
            with contextlib.suppress(OSError):
                fd_dir = f"/proc/{self.ps.pid}/fd"
                reserve = any(
                    int(name) > 2 and _readlink(f"{fd_dir}/{name}") == "/dev/null"
                    for name in os.listdir(fd_dir)
                )
                count -= int(reserve)
        return count

    def sample(self) -> None:
        """Fold the current RSS and fd count into peak_rss / peak_fds."""
        with contextlib.suppress(psutil.Error):
            self.peak_rss = max(self.peak_rss, self.rss())
            self.peak_fds = max(self.peak_fds, self.fds())

    def events(self, event: str, reason: str | None = None) -> list[dict[str, Any]]:
        """The JSON records with this `event` (and `reason`, if given)."""
        with self._lock:
            records = list(self.records)
        return [
            r
            for r in records
            if r.get("event") == event and (reason is None or r.get("reason") == reason)
        ]

    def totals(self) -> dict[str, Any]:
        """The final totals record (after the process stopped)."""
        final = [r for r in self.events("totals") if r.get("final", True)]
        assert final, f"no final totals; stdout: {self.stdout_other[-5:]}"
        return final[-1]

    def stderr_text(self) -> str:
        with self._lock:
            return "".join(self.stderr_lines)[-2000:]

    def _read_stdout(self, stream: Any) -> None:
        for raw in stream:
            line = raw.decode("utf-8", "replace").strip()
            try:
                record = json.loads(line)
            except ValueError:
                with self._lock:
                    self.stdout_other.append(line)
                continue
            with self._lock:
                self.records.append(record)
            if record.get("event") == "listening" and not self._ready.is_set():
                self.announce = record
                self._ready.set()

    def _read_stderr(self, stream: Any) -> None:
        for raw in stream:
            with self._lock:
                self.stderr_lines.append(raw.decode("utf-8", "replace"))


def _python_argv(argv: Sequence[str], nofile: int | None) -> list[str]:
    if nofile is None:
        return [sys.executable, "-m", "netprobe", *argv]
    # Lower the fd limit inside the child before netprobe starts (no preexec_fn: this
    # process has threads). The hard limit drops too, so netprobe cannot raise it back.
    code = (
        "import resource, runpy, sys\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({nofile}, {nofile}))\n"
        "sys.argv = ['netprobe', *sys.argv[1:]]\n"
        "runpy.run_module('netprobe', run_name='__main__', alter_sys=True)\n"
    )
    return [sys.executable, "-c", code, *argv]


def run_limited(
    argv: Sequence[str], *, nofile: int, timeout: float
) -> subprocess.CompletedProcess[bytes]:
    """Run `netprobe ARGV` with RLIMIT_NOFILE lowered to `nofile`; never waits past timeout."""
    return subprocess.run(
        _python_argv(argv, nofile),
        capture_output=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def wait_baseline(
    server: ServerProc, fds: int, rss: int, *, rss_slack: int, within_s: float
) -> tuple[int, int, float]:
    """Poll until the server's fd count is back to `fds` and RSS within `rss_slack` of `rss`.

    Returns (fds, rss, seconds waited) at the last reading, whether or not it got there.
    """
    started = time.monotonic()
    while True:
        now_fds, now_rss = server.fds(), server.rss()
        waited = time.monotonic() - started
        if (now_fds <= fds and now_rss <= rss + rss_slack) or waited >= within_s:
            return now_fds, now_rss, waited
        time.sleep(0.05)


# -- the client fleet --------------------------------------------------------------------------


class Client:
    """One client socket in a Fleet. Subclasses override start/on_readable/on_writable."""

    fleet: Fleet
    sock: socket.socket

    def __init__(self) -> None:
        self.connected_at: float | None = None
        self.done = False
        self.error: str | None = None
        self.local_port = 0

    def wants_write(self) -> bool:
        return False

    def wants_read(self) -> bool:
        return True

    def start(self) -> None:
        """The connect succeeded."""

    def on_readable(self) -> None:
        """The socket is readable."""

    def on_writable(self) -> None:
        """The socket is writable (only while wants_write())."""

    def tick(self, now: float) -> None:
        """Called about every 50 ms."""

    def fail(self, why: str) -> None:
        if self.error is None:
            self.error = why
        self.fleet.finish(self)


class Fleet:
    """Many non-blocking client sockets driven by one selector loop (this thread only)."""

    def __init__(self, connect_timeout_s: float = 30.0) -> None:
        self.sel = selectors.DefaultSelector()
        self.active: set[Client] = set()
        self.finished: list[Client] = []
        self.connect_timeout_s = connect_timeout_s
        self._connecting: dict[Client, float] = {}
        self._masks: dict[Client, int] = {}

    def close(self) -> None:
        for client in list(self.active):
            self.finish(client)
        self.sel.close()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, client: Client, address: tuple[str, int] | str) -> None:
        """Start a non-blocking connect for `client`."""
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        client.fleet = self
        client.sock = sock
        self.active.add(client)
        rc = sock.connect_ex(address)
        if rc not in (0, errno.EINPROGRESS):
            client.fail(f"connect: {errno.errorcode.get(rc, rc)}")
            return
        self._connecting[client] = time.monotonic()
        self._masks[client] = selectors.EVENT_WRITE
        self.sel.register(sock, selectors.EVENT_WRITE, client)

    def update(self, client: Client) -> None:
        """Re-arm the selector for client (read always; write while it has bytes to send)."""
        if client.done or client in self._connecting:
            return
        mask = (selectors.EVENT_READ if client.wants_read() else 0) | (
            selectors.EVENT_WRITE if client.wants_write() else 0
        )
        old = self._masks.get(client, 0)
        if old == mask:
            return
        self._masks[client] = mask
        if not mask:  # nothing to wait for (selectors refuse an empty mask)
            self.sel.unregister(client.sock)
        elif not old:
            self.sel.register(client.sock, mask, client)
        else:
            self.sel.modify(client.sock, mask, client)

    def finish(self, client: Client, *, rst: bool = False) -> None:
        """Close client's socket (with RST if asked) and move it to `finished`."""
        if client.done:
            return
        client.done = True
        self.active.discard(client)
        self._connecting.pop(client, None)
        if self._masks.pop(client, 0):
            self.sel.unregister(client.sock)
        if rst:
            with contextlib.suppress(OSError):
                client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
        client.sock.close()
        self.finished.append(client)

    def run(
        self,
        until: Callable[[], bool],
        deadline: float,
        on_tick: Callable[[float], None] | None = None,
    ) -> None:
        """Drive every client until `until()` holds or `deadline` (monotonic) passes."""
        last_tick = 0.0
        while not until():
            now = time.monotonic()
            if now >= deadline:
                return
            for key, mask in self.sel.select(0.05):
                client: Client = key.data
                if client.done:
                    continue
                if client in self._connecting:
                    self._connected(client)
                    continue
                try:
                    if mask & selectors.EVENT_READ:
                        client.on_readable()
                    if mask & selectors.EVENT_WRITE and not client.done:
                        client.on_writable()
                except OSError as exc:
                    client.fail(errno.errorcode.get(exc.errno or 0, type(exc).__name__))
                    continue
                if not client.done:
                    self.update(client)
            now = time.monotonic()
            if now - last_tick >= 0.05:
                last_tick = now
                for client, since in list(self._connecting.items()):
                    if now - since > self.connect_timeout_s:
                        client.fail("connect: timeout")
                for client in list(self.active):
                    if not client.done and client not in self._connecting:
                        client.tick(now)
                        if not client.done:
                            self.update(client)
                if on_tick is not None:
                    on_tick(now)

    def _connected(self, client: Client) -> None:
        rc = client.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        del self._connecting[client]
        if rc:
            client.fail(f"connect: {errno.errorcode.get(rc, rc)}")
            return
        client.connected_at = time.monotonic()
        with contextlib.suppress(OSError, TypeError, IndexError):
            client.local_port = int(client.sock.getsockname()[1])
        self._masks[client] = selectors.EVENT_READ
        self.sel.modify(client.sock, selectors.EVENT_READ, client)
        client.start()
        if not client.done:
            self.update(client)


class EchoClient(Client):
    """Sends random payloads one at a time and checks each echoed byte, in order.

    After `stop_at` (or `max_rounds` round trips) it finishes the payload in flight,
    half-closes, and waits for the server's FIN, so the server logs a clean close. Any mismatch, early EOF or socket error
    is recorded in `error`.
    """

    def __init__(
        self,
        rng: random.Random,
        stop_at: float,
        max_payload: int = 8192,
        max_rounds: int | None = None,
    ) -> None:
        super().__init__()
        self.rng = rng
        self.stop_at = stop_at
        self.max_rounds = max_rounds
        self.max_payload = max_payload
        self.expected = bytearray()  # sent, not yet echoed back
        self.out = b""
        self.out_pos = 0
        self.sent = 0
        self.verified = 0
        self.rounds = 0
        self.closing = False

    def wants_write(self) -> bool:
        return self.out_pos < len(self.out)

    def start(self) -> None:
        self.next_payload()

    def next_payload(self) -> None:
        payload = self.rng.randbytes(self.rng.randint(1, self.max_payload))
        self.out, self.out_pos = payload, 0
        self.expected += payload

    def on_writable(self) -> None:
        try:
            n = self.sock.send(memoryview(self.out)[self.out_pos :])
        except BlockingIOError:
            return
        self.out_pos += n
        self.sent += n

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        if not data:
            if self.closing and not self.expected:
                self.fleet.finish(self)
            else:
                self.fail(f"early EOF with {len(self.expected)} bytes outstanding")
            return
        n = len(data)
        if self.expected[:n] != data:
            self.fail("corrupt echo")
            return
        del self.expected[:n]
        self.verified += n
        if not self.expected and not self.closing:
            self.rounds += 1
            self.round_done()

    def round_done(self) -> None:
        enough = self.max_rounds is not None and self.rounds >= self.max_rounds
        if enough or time.monotonic() >= self.stop_at:
            self.closing = True
            self.sock.shutdown(socket.SHUT_WR)
        else:
            self.next_payload()


class ResetClient(EchoClient):
    """Exchanges 1-3 verified payloads, then resets (SO_LINGER 0) at a random point: right
    after a round, or with a fresh payload half sent and its echo in flight."""

    def __init__(self, rng: random.Random, stop_at: float, max_payload: int = 8192) -> None:
        super().__init__(rng, stop_at, max_payload)
        self.target_rounds = rng.randint(1, 3)
        self.mid_payload = rng.random() < 0.5

    def round_done(self) -> None:
        if self.rounds < self.target_rounds:
            self.next_payload()
            return
        if self.mid_payload:
            self.next_payload()
            cut = self.rng.randint(1, len(self.out))
            with contextlib.suppress(BlockingIOError):
                self.sent += self.sock.send(memoryview(self.out)[:cut])
        self.fleet.finish(self, rst=True)


class IdleClient(Client):
    """Connects and sends nothing (slowloris); records when the server drops it."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped_at: float | None = None
        self.how = ""

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except ConnectionResetError:
            self.dropped_at, self.how = time.monotonic(), "rst"
            self.fleet.finish(self)
            return
        if data:
            self.fail("idle client got data")
            return
        self.dropped_at, self.how = time.monotonic(), "fin"
        self.fleet.finish(self)


class BulkClient(Client):
    """Streams `total` bytes of a seeded pattern to an echo server in two phases.

    Phase "stall": send as fast as the socket takes it and never read, until sending has been
    blocked for `stall_s` (the server's back-pressure reached us). Phase "drain": read and
    verify every echoed byte (in order) while sending the rest, then half-close and wait for
    the server's FIN. `stalled_at` marks the switch; `stall_sent` is what got out unread.
    """

    _BLOCK = 1_000_003  # a prime, so the pattern never lines up with power-of-two chunks

    def __init__(self, rng: random.Random, total: int, stall_s: float, stall_max_s: float) -> None:
        super().__init__()
        block = rng.randbytes(self._BLOCK)
        self.pattern = memoryview(block + block[: 2 * RECV_SIZE])
        self.total = total
        self.stall_s = stall_s
        self.stall_max_s = stall_max_s
        self.phase = "stall"
        self.sent = 0
        self.verified = 0
        self.progress_at: float | None = None
        self.stalled_at: float | None = None
        self.stall_sent = 0
        self.shut = False

    def wants_read(self) -> bool:
        return self.phase == "drain"

    def wants_write(self) -> bool:
        return self.sent < self.total

    def on_writable(self) -> None:
        n = min(RECV_SIZE, self.total - self.sent)
        offset = self.sent % self._BLOCK
        try:
            sent = self.sock.send(self.pattern[offset : offset + n])
        except BlockingIOError:
            sent = 0
        if sent:
            self.sent += sent
            self.progress_at = time.monotonic()
        if self.sent >= self.total and self.phase == "drain" and not self.shut:
            self.shut = True
            self.sock.shutdown(socket.SHUT_WR)

    def tick(self, now: float) -> None:
        if self.phase != "stall" or self.connected_at is None:
            return
        # While stalling the socket is always armed for writing, so "no progress for
        # stall_s" means the kernel send buffer is full: back-pressure reached us. Give up
        # waiting for it after stall_max_s (the caller then sees stall_sent == total).
        quiet = now - (self.progress_at or self.connected_at)
        if (self.sent and quiet >= self.stall_s) or now - self.connected_at >= self.stall_max_s:
            self.phase = "drain"
            self.stalled_at = now
            self.stall_sent = self.sent

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        if not data:
            if self.verified == self.total and self.shut:
                self.fleet.finish(self)
            else:
                self.fail(f"early EOF after {self.verified} of {self.total} bytes")
            return
        offset = self.verified % self._BLOCK
        if self.pattern[offset : offset + len(data)] != data:
            self.fail(f"corrupt echo at byte {self.verified}")
            return
        self.verified += len(data)


def errors_of(clients: Iterable[Client]) -> Counter[str]:
    """How many clients ended with each error."""
    return Counter(c.error for c in clients if c.error is not None)


# -- UDP -----------------------------------------------------------------------------------------

_UDP_FILL = bytes(range(48))
_TAG_MUL = 0x9E3779B97F4A7C15  # any odd 64-bit constant: the tag must depend on the sequence


@dataclass
class UdpResult:
    """What a UDP run sent and got back, every reply matched to its sequence number."""

    sent: int = 0
    received: int = 0
    duplicates: int = 0
    corrupt: int = 0
    send_errors: Counter[str] = field(default_factory=Counter)
    elapsed_s: float = 0.0


def _udp_datagram(seq: int) -> bytes:
    return struct.pack("!QQ", seq, (seq * _TAG_MUL) & 0xFFFFFFFFFFFFFFFF) + _UDP_FILL


def run_udp(port: int, count: int, rate: float, drain_s: float = 1.0) -> UdpResult:
    """Send `count` numbered datagrams to 127.0.0.1:port at `rate` per second (never faster)
    and count exactly which came back. Bounded: count/rate plus the drain time plus slack."""
    result = UdpResult()
    seen = bytearray(count)  # one flag per sequence number
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    started = time.monotonic()
    hard_stop = started + count / rate * 3 + drain_s + 10.0
    last_rx = started
    try:
        while True:
            now = time.monotonic()
            if now >= hard_stop:
                break
            due = min(count, int((now - started) * rate) + 1)
            while result.sent < due:
                try:
                    sock.send(_udp_datagram(result.sent))
                except BlockingIOError:
                    break
                except OSError as exc:  # ECONNREFUSED from an earlier ICMP: count, go on
                    result.send_errors[errno.errorcode.get(exc.errno or 0, "?")] += 1
                result.sent += 1
            while True:
                try:
                    data = sock.recv(2048)
                except BlockingIOError:
                    break
                except OSError as exc:
                    result.send_errors[errno.errorcode.get(exc.errno or 0, "?")] += 1
                    break
                last_rx = time.monotonic()
                _account(result, seen, data)
            if result.sent >= count and time.monotonic() - max(last_rx, started) >= drain_s:
                break
            sel.select(0.002 if result.sent < count else 0.05)
    finally:
        sel.close()
        sock.close()
    result.elapsed_s = time.monotonic() - started
    return result


def _account(result: UdpResult, seen: bytearray, data: bytes) -> None:
    if len(data) != 16 + len(_UDP_FILL):
        result.corrupt += 1
        return
    seq, tag = struct.unpack_from("!QQ", data)
    if seq >= result.sent or tag != (seq * _TAG_MUL) & 0xFFFFFFFFFFFFFFFF or data[16:] != _UDP_FILL:
        result.corrupt += 1
        return
    if seen[seq]:
        result.duplicates += 1
        return
    seen[seq] = 1
    result.received += 1


# -- small helpers --------------------------------------------------------------------------------


def sampler(servers: Sequence[ServerProc]) -> Callable[[float], None]:
    """An on_tick callback for Fleet.run that records each server's peak RSS and fds."""
    last = [0.0]

    def tick(now: float) -> None:
        if now - last[0] >= SAMPLE_EVERY_S:
            last[0] = now
            for server in servers:
                server.sample()

    return tick
