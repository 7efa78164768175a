"""netprobe.kernel: counters parsing, sysctls, inet_diag listener queues against /proc."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from netprobe import kernel
from tests.conftest import HAS_IPV6
from tests.helpers import LONG, SHORT

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc and netlink")

NETSTAT = """TcpExt: SyncookiesSent ListenOverflows ListenDrops
TcpExt: 3 10 12
IpExt: InNoRoutes
IpExt: 7
"""


def test_counter_pairs_are_zipped_by_prefix() -> None:
    counters = kernel.parse_counter_pairs(NETSTAT)
    assert counters == {
        "TcpExt.SyncookiesSent": 3,
        "TcpExt.ListenOverflows": 10,
        "TcpExt.ListenDrops": 12,
        "IpExt.InNoRoutes": 7,
    }


def test_counter_pairs_out_of_step_are_skipped() -> None:
    assert kernel.parse_counter_pairs("TcpExt: A B\nIpExt: 1 2\n") == {}


def test_counter_deltas_mark_missing_names() -> None:
    deltas = kernel.counter_deltas({"a": 1, "b": 5}, {"a": 4, "c": 1}, ["a", "b"])
    assert deltas == {"a": 3, "b": None}


def test_proc_address_decodes_host_order_words() -> None:
    if sys.byteorder != "little":
        pytest.skip("sample is little-endian")
    assert kernel._proc_address("0100007F:1F90") == (4, "127.0.0.1", 8080)
    six = "00000000000000000000000001000000:0016"
    assert kernel._proc_address(six) == (6, "::1", 22)


@linux
def test_host_limits_read_the_sysctls() -> None:
    limits = kernel.host_limits()
    assert limits.somaxconn is not None
    assert limits.somaxconn >= 1
    assert limits.port_range is not None
    assert limits.ports_per_source == limits.port_range[1] - limits.port_range[0] + 1
    assert limits.tcp_syncookies in (0, 1, 2)
    assert set(limits.as_dict()) >= {"somaxconn", "ip_local_port_range", "nofile_soft"}


def _wait_queue(port: int, want: int) -> kernel.ListenerQueue:
    deadline = time.monotonic() + LONG
    while True:
        row = kernel.find_listener(port, "127.0.0.1")
        assert row is not None
        if row.queue == want or time.monotonic() > deadline:
            return row
        time.sleep(SHORT)


@linux
def test_listener_queue_and_limit_via_diag_and_proc() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(5)
        port = listener.getsockname()[1]
        clients = [socket.create_connection(("127.0.0.1", port), timeout=LONG) for _ in range(3)]
        try:
            row = _wait_queue(port, 3)
            assert (row.queue, row.limit) == (3, 5)
            assert row.source == "inet_diag"
            assert row.drops == 0
            proc = [r for r in kernel._listeners_via_proc(port) if r.address == "127.0.0.1"]
            assert len(proc) == 1
            assert proc[0].queue == 3
            assert proc[0].inode == row.inode
            assert kernel.syn_recv_count(port) == 0
            owners = kernel.socket_owners([row.inode])
            assert owners[row.inode].pid == os.getpid()
        finally:
            for client in clients:
                client.close()


@contextlib.contextmanager
def _listening(address: str, v6only: int | None = None) -> Iterator[int]:
    """A TCP listener on address, port 0 (IPv6 with IPV6_V6ONLY set as given); yields the port."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family) as listener:
        if v6only is not None:
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
        listener.bind((address, 0))
        listener.listen(2)
        yield listener.getsockname()[1]


@linux
def test_find_listener_falls_back_to_the_wildcard() -> None:
    with _listening("0.0.0.0") as port:
        row = kernel.find_listener(port, "127.0.0.1")
        assert row is not None
        assert row.address == "0.0.0.0"
        assert kernel.find_listener(port, "::1") is None


@linux
@pytest.mark.skipif(not HAS_IPV6, reason="no IPv6 loopback")
def test_find_listener_knows_mapped_and_v6only_sockets() -> None:
    # An IPv6 socket bound to ::ffff:127.0.0.1 is what an IPv4 client on 127.0.0.1 reaches,
    # and it is shown as ss shows it; a v6only `::` takes no IPv4 client, a dual-stack one does.
    with _listening("::ffff:127.0.0.1", v6only=0) as port:
        row = kernel.find_listener(port, "127.0.0.1")
        assert row is not None
        assert row.address == "::ffff:127.0.0.1"
    for v6only in (1, 0):
        with _listening("::", v6only=v6only) as port:
            v6_row = kernel.find_listener(port, "::1")
            assert v6_row is not None
            if v6_row.source == "inet_diag":
                assert v6_row.v6only is bool(v6only)
                found = kernel.find_listener(port, "127.0.0.1")
                assert (found is None) is bool(v6only)


@linux
def test_unix_listeners_keep_every_blank_of_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The kernel writes one blank before the path and the path as is: blanks inside, at the
    # end, and (for a relative bind) at the start all belong to it. Bytes that are not UTF-8
    # show as backslash escapes.
    monkeypatch.chdir(tmp_path)
    names: list[str | bytes] = [str(tmp_path / "a b"), str(tmp_path / "x  y "), " lead", b"n\xff"]
    listeners = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in names]
    try:
        for listener, name in zip(listeners, names, strict=True):
            listener.bind(name)
            listener.listen(1)
        inodes = {
            os.fstat(listener.fileno()).st_ino: name if isinstance(name, str) else "n\\xff"
            for listener, name in zip(listeners, names, strict=True)
        }
        rows = {r.inode: r.address for r in kernel.unix_listeners() if r.inode in inodes}
    finally:
        for listener in listeners:
            listener.close()
    assert rows == inodes


def test_kernel_facts_summary_keys() -> None:
    facts = kernel.kernel_facts()
    assert set(facts) == {"platform", "limits", "tcp_listeners", "inet_diag", "counters"}
    assert set(facts["counters"]) == set(kernel.BACKLOG_COUNTERS)


def test_read_sysctl_missing_is_none() -> None:
    assert kernel.read_sysctl("net.core.no_such_sysctl_here") is None


def test_runnable_tasks_reads_the_instant_count(tmp_path: Path) -> None:
    fake = tmp_path / "loadavg"
    fake.write_text("5.35 0.61 0.88 3/79 2863\n")
    assert kernel.runnable_tasks(str(fake)) == 3  # the 1-minute load (5.35) is not it
    fake.write_text("garbage\n")
    assert kernel.runnable_tasks(str(fake)) is None
    assert kernel.runnable_tasks(str(fake) + ".missing") is None
    if os.path.exists("/proc/loadavg"):
        running = kernel.runnable_tasks()
        assert running is not None
        assert running >= 1  # this process is running as it reads


def _cgroup_file(root: Path, rel: str, name: str, text: str) -> None:
    directory = root / rel
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(text)


def test_cgroup_v2_quota_tightest_level_wins(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup"
    proc.write_text("0::/box/app\n")
    root = tmp_path / "fs"
    _cgroup_file(root, "box/app", "cpu.max", "max 100000\n")  # no limit on its own level
    _cgroup_file(root, "box", "cpu.max", "150000 100000\n")  # the parent's quota applies
    _cgroup_file(root, "", "cpu.max", "400000 100000\n")
    assert kernel.cgroup_cpu_limit(str(proc), str(root)) == 1.5


def test_cgroup_v1_quota_and_no_limit(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup"
    proc.write_text("4:memory:/x\n3:cpu,cpuacct:/docker/abc\n")
    root = tmp_path / "fs"
    _cgroup_file(root, "cpu,cpuacct/docker/abc", "cpu.cfs_quota_us", "50000\n")
    _cgroup_file(root, "cpu,cpuacct/docker/abc", "cpu.cfs_period_us", "100000\n")
    assert kernel.cgroup_cpu_limit(str(proc), str(root)) == 0.5
    _cgroup_file(root, "cpu,cpuacct/docker/abc", "cpu.cfs_quota_us", "-1\n")
    assert kernel.cgroup_cpu_limit(str(proc), str(root)) is None
    assert kernel.cgroup_cpu_limit(str(tmp_path / "missing"), str(root)) is None


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs sched_setaffinity")
def test_usable_cpus_follows_the_affinity_mask() -> None:
    # A child pinned to one CPU (as under `taskset -c N`) must see one, whatever the host has.
    first = min(os.sched_getaffinity(0))
    code = "from netprobe.kernel import usable_cpus; print(usable_cpus())"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        preexec_fn=lambda: os.sched_setaffinity(0, {first}),
    )
    assert out.stdout.strip() == "1"
    assert 1 <= kernel.usable_cpus() <= len(os.sched_getaffinity(0))


def test_a_row_that_does_not_parse_is_left_out(tmp_path: Path) -> None:
    table = tmp_path / "tcp"
    header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
    good = "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000003 00:00000000 00000000  1000        0 4242\n"
    bad = "   1: garbage 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 4243\n"
    table.write_text(header + good + bad + "   2: short\n")
    rows = kernel._proc_rows(str(table))
    assert [row[9] for row in rows] == ["4242"]
    assert kernel._proc_address(rows[0][1]) == (4, "127.0.0.1", 8080)
