"""Test helpers: run the CLI in-process with byte-exact stdio, and threaded loopback servers."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SHORT = 0.05  # seconds: "a moment" in tests
LONG = 5.0  # seconds: the most any single blocking step in a test may take

ROOT = Path(__file__).resolve().parent.parent


def _in_the_initial_user_namespace() -> bool:
    try:
        with open("/proc/self/uid_map") as uid_map:
            return uid_map.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return True  # no user namespaces at all


# Root of the host, not uid 0 of a user namespace (`unshare -r`, where scripts/test may run
# the suite): only the first may start processes of other users or mount a /proc.
REAL_ROOT = (
    sys.platform.startswith("linux") and os.geteuid() == 0 and _in_the_initial_user_namespace()
)


@dataclass
class CliResult:
    exit_code: int
    stdout: bytes
    stderr: str

    @property
    def text(self) -> str:
        return self.stdout.decode("utf-8", "replace")


class _Stream(io.TextIOWrapper):
    """A text stream over BytesIO that, like a pipe, is not a terminal."""

    def isatty(self) -> bool:
        return False


def invoke(argv: Sequence[str], stdin: bytes = b"") -> CliResult:
    """Run `netprobe ARGV` in this process; stdout is captured as bytes (binary-safe)."""
    from netprobe.cli import main

    out_raw, err_raw = io.BytesIO(), io.BytesIO()
    out = _Stream(out_raw, encoding="utf-8", write_through=True)
    err = _Stream(err_raw, encoding="utf-8", write_through=True)
    inp = _Stream(io.BytesIO(stdin), encoding="utf-8")
    saved = sys.stdin, sys.stdout, sys.stderr
    sys.stdin, sys.stdout, sys.stderr = inp, out, err
    try:
        code = main(list(argv))
    finally:
        out.flush()
        err.flush()
        sys.stdin, sys.stdout, sys.stderr = saved
    return CliResult(int(code), out_raw.getvalue(), err_raw.getvalue().decode())


def bad_input_line(argv: Sequence[str]) -> str:
    """Run `netprobe ARGV`, which must be refused as bad input: exit 2, nothing on stdout and
    exactly one line on stderr, which is returned."""
    result = invoke(argv)
    assert result.exit_code == 2, result.stderr
    assert result.stdout == b""
    (line,) = result.stderr.splitlines()
    return line


def run_netprobe(
    argv: Sequence[str], *, stdin: bytes = b"", timeout: float = 30.0
) -> subprocess.CompletedProcess[bytes]:
    """Run `python -m netprobe ARGV` as a real process (for signals, pipes and exit codes)."""
    return subprocess.run(
        [sys.executable, "-m", "netprobe", *argv],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )


@contextlib.contextmanager
def netprobe_process(argv: Sequence[str]) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m netprobe ARGV` running with stdout and stderr piped (for signals sent
    mid-run); killed at exit if it still runs."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "netprobe", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=LONG)


def wait_until(check: Callable[[], bool], what: str, timeout: float = LONG) -> None:
    """Return once `check()` is true; fail the test after `timeout` seconds, naming `what`."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


# System call numbers /proc/PID/syscall shows, for the waits tests signal a process in.
_SYSCALLS = {
    "x86_64": {"write": 1, "poll": 7},
    "aarch64": {"write": 64, "poll": 73},  # poll(2) is ppoll there
}


def in_syscall(pid: int, name: str, first_arg: int | None = None) -> bool:
    """Whether a thread of process `pid` is blocked in system call `name` now (with
    `first_arg`, an fd for write(2), if given). A test that signals a process "once it waits
    on X" waits for this, not for a fixed time: under load the start-up alone can take longer."""
    import platform

    import pytest

    numbers = _SYSCALLS.get(platform.machine())
    if numbers is None:
        pytest.skip(f"no system call table for {platform.machine()} in tests/helpers.py")
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False  # gone: the wait fails, naming what it waited for
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/syscall") as state:
                fields = state.read().split()
        except PermissionError:
            pytest.skip("/proc/PID/syscall is not readable here (ptrace_scope)")
        except OSError:
            continue  # the thread ended
        called = fields[0] if fields else ""
        if (
            called.isdigit()
            and int(called) == numbers[name]
            and (first_arg is None or int(fields[1], 16) == first_arg)
        ):
            return True
    return False


def wait_in_syscall(pid: int, name: str, first_arg: int | None = None) -> None:
    """Until process `pid` is blocked in `name` (see in_syscall)."""
    wait_until(lambda: in_syscall(pid, name, first_arg), f"pid {pid} waits in {name}(2)")


def wait_connecting(pid: int) -> None:
    """Until process `pid` has a TCP connect waiting for its answer (a socket in SYN_SENT)."""
    import psutil

    def connecting() -> bool:
        conns = psutil.Process(pid).net_connections("tcp")
        return any(conn.status == psutil.CONN_SYN_SENT for conn in conns)

    wait_until(connecting, f"pid {pid} is connecting")


def run_in_own_netns(
    setup: str, argv: Sequence[str], *, module: str | None = "netprobe"
) -> subprocess.CompletedProcess[bytes]:
    """`python -m netprobe ARGV` (or another `module`; None: `python ARGV`) in a network
    namespace of the test's own (`unshare -rn`), its loopback up, after `setup`: shell lines
    that set that namespace's sysctls or addresses, each ending in `|| exit 99`. Skips the
    test where no such namespace can be made."""
    import shutil

    import pytest

    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare")
    script = f'{setup.strip()}\nip link set lo up 2>/dev/null || exit 99\nexec "$@"\n'
    result = subprocess.run(
        [unshare, "-rn", "sh", "-c", script, "sh", sys.executable,
         *(["-m", module] if module else []), *argv],
        capture_output=True, timeout=60, cwd=ROOT, check=False,
    )  # fmt: skip
    if result.returncode == 99 or b"unshare:" in result.stderr:
        pytest.skip("no private network namespace with writable sysctls here")
    return result


class ServerThread:
    """A listener bound *before* the thread starts (no readiness race), always stopped.

    `handler(conn)` runs for each accepted connection in the server thread; the default
    accepts and closes at once.
    """

    def __init__(
        self,
        family: int = socket.AF_INET,
        host: str = "127.0.0.1",
        backlog: int = 128,
        handler: Callable[[socket.socket], None] | None = None,
    ) -> None:
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, 0))
        self.listener.listen(backlog)
        self.listener.settimeout(SHORT)
        self.host = host
        self.port: int = self.listener.getsockname()[1]
        self.handler = handler
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            with conn:
                conn.settimeout(LONG)
                if self.handler is not None:
                    with contextlib.suppress(OSError):
                        self.handler(conn)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(LONG)
        self.listener.close()
        assert not self._thread.is_alive(), "server thread did not stop"


@contextlib.contextmanager
def udp_server_thread(
    answer: Callable[[bytes], Sequence[bytes]], gap_s: float = 0.0
) -> Iterator[tuple[int, list[int]]]:
    """A UDP server on 127.0.0.1 in a thread: each datagram gets the datagrams answer(data)
    back, `gap_s` apart; yields its port and the sizes of the datagrams it got.

    The socket is bound before the thread starts; on exit the thread is stopped and joined.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(SHORT)
    stop = threading.Event()
    got: list[int] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                data, peer = sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            got.append(len(data))
            for reply in answer(data):
                if gap_s and stop.wait(gap_s):
                    return
                sock.sendto(reply, peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1], got
    finally:
        stop.set()
        thread.join(LONG)
        sock.close()
        assert not thread.is_alive(), "UDP server thread did not stop"


@contextlib.contextmanager
def udp_echo_thread(prefix: bytes = b"") -> Iterator[int]:
    """A UDP echo on 127.0.0.1 in a thread (each reply is prefix + datagram); yields its port."""
    with udp_server_thread(lambda data: [prefix + data]) as (port, _got):
        yield port


def flood_without_reading(sock: socket.socket, seconds: float) -> None:
    """Send 64 KiB chunks on `sock` (made non-blocking) for `seconds`, reading nothing: the
    peer's replies, or what it does not read, pile up in the kernel queues."""
    sock.setblocking(False)
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        try:
            sock.send(b"k" * 65536)
        except BlockingIOError:
            time.sleep(0.01)


def stuff_then_read(port: int, *, stuffing_s: float = 0.4, quiet_s: float = 1.0) -> int:
    """A client of 127.0.0.1:PORT that sends for `stuffing_s` without reading (so an echoing
    server's replies pile up in the kernel queues), stays quiet for `quiet_s`, then reads until
    EOF or reset: the byte count it received."""
    with socket.create_connection(("127.0.0.1", port), timeout=LONG) as client:
        client.setblocking(False)
        chunk = b"k" * 65536
        until = time.monotonic() + stuffing_s
        while time.monotonic() < until:
            try:
                client.send(chunk)
            except BlockingIOError:
                time.sleep(0.02)
            except ConnectionResetError:
                break  # the server already reset it: what it sent is still readable
        time.sleep(quiet_s)
        client.setblocking(True)
        client.settimeout(LONG)
        received = 0
        with contextlib.suppress(ConnectionResetError):
            while data := client.recv(65536):
                received += len(data)
        return received


class PeerReadsBeforeTheReset:
    """Stands in for sockets._LIBC, whose connect() is the RST of sockets.reset_counting_unsent
    (AF_UNSPEC). At the first one the peer (`peer()`, asked for then) takes what it can first,
    as a peer reading on another CPU does while netprobe is between its count of what it has
    not sent and its RST: the window that opens lets the kernel send more (on loopback, inside
    the peer's own recv call)."""

    def __init__(self, peer: Callable[[], socket.socket]) -> None:
        import ctypes

        self.libc = ctypes.CDLL(None, use_errno=True)
        self.peer = peer
        self.read = 0  # what the peer took here
        self.unsent_at_call: int | None = None
        self.reset = threading.Event()  # the first RST went

    def connect(self, fd: int, *args: object) -> object:
        import fcntl

        from netprobe.sockets import _SIOCOUTQNSD

        if not self.reset.is_set():
            raw = fcntl.ioctl(fd, _SIOCOUTQNSD, b"\0\0\0\0")
            self.unsent_at_call = int.from_bytes(raw, sys.byteorder)
            peer = self.peer()
            peer.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                for _ in range(10_000):  # bounded: until it has to wait
                    data = peer.recv(1 << 20)
                    if not data:
                        break
                    self.read += len(data)
        try:
            return self.libc.connect(fd, *args)
        finally:
            self.reset.set()


def read_until_reset(sock: socket.socket) -> int:
    """Bytes read until ECONNRESET or EOF (blocking, LONG at most per read)."""
    sock.setblocking(True)
    sock.settimeout(LONG)
    got = 0
    for _ in range(100_000):  # bounded
        try:
            data = sock.recv(1 << 20)
        except ConnectionResetError:
            break
        if not data:
            break
        got += len(data)
    return got


# fe80::1 on lo, for run_in_own_netns: a link-local address, which needs its zone (%lo).
LINK_LOCAL_SETUP = "ip -6 addr add fe80::1/64 dev lo nodad || exit 99"


def serve_one_link_local_client(
    argv: Sequence[str], *, announced_on: str = "stdout", proto: str = "tcp", ready: str = ""
) -> dict[str, Any]:
    """Run `netprobe ARGV` (a server on fe80::1%lo that ends after one client) in a network
    namespace of its own, connect one client to the address it announces, and return what
    tests/link_local_driver.py saw (see there)."""
    import json

    options = [announced_on, proto, ready, "--", *argv]
    result = run_in_own_netns(LINK_LOCAL_SETUP, options, module="tests.link_local_driver")
    assert result.returncode == 0, result.stderr.decode()
    seen = json.loads(result.stdout)
    assert isinstance(seen, dict)
    return seen


def in_name_world(
    tmp_path: Path, world: Path, argv: Sequence[str], files: dict[str, str]
) -> dict[str, Any]:
    """Run `python -m tests.WORLD ARGV` (world: tests/WORLD.py) in a user, mount and network
    namespace of its own (`unshare -rnm`), its loopback up, each /etc file of `files`
    replaced by the text given and nscd's socket directories hidden, so names are answered
    there alone (no nss module or nscd of the host's takes a lookup out of it). A world prints one JSON object: it is returned.
    Skips the test where no such namespace can be made."""
    import json
    import shutil

    import pytest

    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare")
    lines = ["ip link set lo up 2>/dev/null || exit 99"]
    sources = []
    for number, (target, text) in enumerate(files.items(), 1):
        source = tmp_path / Path(target).name
        source.write_text(text)
        sources.append(str(source))
        lines.append(f'mount --bind "${number}" {target} 2>/dev/null || exit 99')
    lines += [
        "for dir in /run/nscd /var/run/nscd; do",
        '  [ -d "$dir" ] && { mount -t tmpfs none "$dir" 2>/dev/null || exit 99; }',
        "done",
        f"shift {len(files)}",
        'exec "$@"',
    ]
    script = "\n".join(lines) + "\n"
    proc = subprocess.run(
        [unshare, "-rnm", "sh", "-c", script, "sh", *sources, sys.executable, "-m", f"tests.{world.stem}", *argv],
        capture_output=True, timeout=90, cwd=ROOT, check=False,
    )  # fmt: skip
    if proc.returncode == 99 or b"unshare:" in proc.stderr:
        pytest.skip("cannot make a user, mount and network namespace here")
    assert proc.returncode == 0, proc.stderr.decode()
    report: dict[str, Any] = json.loads(proc.stdout)
    return report
