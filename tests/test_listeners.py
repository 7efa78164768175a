"""netprobe listeners: finds our own listeners with this pid; queue figures match `ss -ltn`."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import LONG, REAL_ROOT, SHORT, invoke

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")


def _rows(argv: list[str]) -> list[dict[str, Any]]:
    result = invoke(["listeners", "--json", *argv])
    assert result.exit_code == 0, result.stderr
    return [json.loads(line) for line in result.stdout.decode().splitlines()]


def test_finds_a_tcp_listener_with_this_pid() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(7)
        port = listener.getsockname()[1]
        rows = _rows(["--port", str(port), "--tcp"])
    assert len(rows) == 1
    row = rows[0]
    assert row["kind"] == "listeners"
    assert (row["proto"], row["address"], row["port"]) == ("tcp", "127.0.0.1", port)
    assert row["pid"] == os.getpid()
    assert row["process_known"] is True
    assert row["process"]
    assert row["user"]
    assert (row["recv_q"], row["send_q"]) == (0, 7)


def test_udp_and_unix_filters(tmp_path: Path) -> None:
    path = str(tmp_path / "l.sock")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        port = udp.getsockname()[1]
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix:
            unix.bind(path)
            unix.listen(3)
            udp_rows = _rows(["--udp", "--port", str(port)])
            unix_rows = [r for r in _rows(["--unix"]) if r["address"] == path]
    assert [(r["proto"], r["port"], r["pid"]) for r in udp_rows] == [("udp", port, os.getpid())]
    assert udp_rows[0]["recv_q"] is None
    assert len(unix_rows) == 1
    assert unix_rows[0]["pid"] == os.getpid()


def test_unix_path_with_spaces_is_shown_whole(tmp_path: Path) -> None:
    # /proc/net/unix was split on every blank, so "/tmp/x/my sock" showed as "/tmp/x/my"; and
    # read as ASCII, so any non-ASCII name on the host made listeners fail.
    paths = [str(tmp_path / "my sock"), str(tmp_path / "two  blanks and a trailing ")]
    paths.append(str(tmp_path / "caf\u00e9 sock"))
    abstract = f"netprobe test {os.getpid()} with blanks"
    listeners = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(4)]
    try:
        for listener, name in zip(listeners, [*paths, "\0" + abstract], strict=True):
            listener.bind(name)
            listener.listen(1)
        rows = _rows(["--unix"])
        text = invoke(["listeners", "--unix"])
    finally:
        for listener in listeners:
            listener.close()
    wanted = {*paths, "@" + abstract}
    mine = {r["address"]: r["pid"] for r in rows if r["address"] in wanted}
    assert mine == dict.fromkeys(wanted, os.getpid())
    assert text.exit_code == 0, text.stderr
    for name in wanted:
        assert f" {name} " in text.text


def test_no_match_exits_1(closed_port: int) -> None:
    result = invoke(["listeners", "--tcp", "--port", str(closed_port)])
    assert result.exit_code == 1
    assert result.stdout == b""


def test_bad_port_exits_2() -> None:
    result = invoke(["listeners", "--port", "0"])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize("kinds", [["--unix"], ["--tcp", "--unix"]])
def test_port_with_unix_exits_2_with_one_line(kinds: list[str]) -> None:
    # --port leaves out Unix sockets, so asking for both matched nothing (exit 1, silent).
    result = invoke(["listeners", "--port", "22", *kinds])
    assert result.exit_code == 2, result.stderr
    assert result.stdout == b""
    assert result.stderr == (
        "netprobe: listeners: --port 22 and --unix exclude each other: Unix sockets have no port\n"
    )


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
def test_queue_figures_match_ss() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(5)
        port = listener.getsockname()[1]
        clients = [socket.create_connection(("127.0.0.1", port), timeout=LONG) for _ in range(3)]
        try:
            deadline = time.monotonic() + LONG
            while True:
                ss = subprocess.run(
                    ["ss", "-Hltn", f"sport = :{port}"],
                    capture_output=True,
                    text=True,
                    timeout=LONG,
                    check=True,
                )
                fields = ss.stdout.split()
                if fields[1] == "3" or time.monotonic() > deadline:
                    break
                time.sleep(SHORT)
            rows = _rows(["--tcp", "--port", str(port)])
        finally:
            for client in clients:
                client.close()
    # ss -H: State Recv-Q Send-Q Local:Port Peer:Port
    assert (int(fields[1]), int(fields[2])) == (3, 5)
    assert (rows[0]["recv_q"], rows[0]["send_q"]) == (3, 5)


_LISTEN_AS_NOBODY = """
import os, socket, sys
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(1)
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
print(listener.getsockname()[1], flush=True)
sys.stdin.read()
"""


@pytest.mark.skipif(
    not REAL_ROOT or shutil.which("unshare") is None,
    reason="needs root (to start a process of another user) and unshare",
)
def test_hidden_owner_in_a_user_namespace_is_explained_as_such() -> None:
    # uid 0 of `unshare -r` is root of that namespace only: "no process holds them" (what
    # root was told) hid the real limit.
    probe = subprocess.run(["unshare", "-r", "true"], capture_output=True, check=False)
    if probe.returncode:
        pytest.skip("no user namespaces here")
    with subprocess.Popen(
        [sys.executable, "-c", _LISTEN_AS_NOBODY],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as owner:
        try:
            assert owner.stdout is not None
            port = owner.stdout.readline().strip()
            argv = ["unshare", "-r", sys.executable, "-m", "netprobe", "listeners", "--port", port]
            result = subprocess.run(
                argv, capture_output=True, text=True, timeout=LONG * 4, check=False
            )
        finally:
            owner.kill()
    assert result.returncode == 0, result.stderr
    assert "1 of 1 rows lack process data" in result.stderr
    assert "in a user namespace" in result.stderr


_OUT_OF_FDS = """
import os
import psutil  # noqa: F401  (imported before the descriptors run out, as the command's own)
import netprobe.cli.listeners, netprobe.engines.listeners, netprobe.render  # noqa: F401,E401
from netprobe.cli import build_app, main
build_app("listeners")
held = []
try:
    while True:  # every descriptor this process may have, in use
        held.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass
code = main(["listeners"])
for fd in held:
    os.close(fd)
print("exit", code)
"""


def test_out_of_fds_is_a_local_error_not_an_empty_list() -> None:
    # The kernel's tables could not be opened: listeners printed an empty list (nothing
    # listens), and doctor's self-test said our own listener was missing.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        proc = subprocess.run(
            [sys.executable, "-c", _OUT_OF_FDS], capture_output=True, timeout=LONG, check=False
        )
    assert proc.stdout.decode().split() == ["exit", "6"], proc.stderr
    assert proc.stderr.decode() == (
        "netprobe: listeners: local error: EMFILE: Too many open files (see ulimit -n)\n"
    )
