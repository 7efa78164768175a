"""netprobe.kernel: counters parsing, sysctls, inet_diag listener queues against /proc."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

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
def test_find_listener_sums_an_so_reuseport_group() -> None:
    # The kernel spreads connects over the group: one member's queue is not the listener's.
    # Before: the first member alone (queue 3 of a possible 3) while 13 clients got in.
    group = []
    try:
        for backlog in (4, 4, 2):
            sock = socket.socket()
            group.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(("127.0.0.1", group[0].getsockname()[1] if len(group) > 1 else 0))
            sock.listen(backlog)
        port = group[0].getsockname()[1]
        # 3: whichever members the kernel picks, none overflows (the smallest holds 3).
        clients = [socket.create_connection(("127.0.0.1", port), timeout=LONG) for _ in range(3)]
        try:
            row = kernel.find_listener(port, "127.0.0.1")
        finally:
            for client in clients:
                client.close()
    finally:
        for sock in group:
            sock.close()
    assert row is not None
    if row.source != "inet_diag":
        assert row.members == 1  # /proc shows no device or v6only flag: no grouping
        return
    assert (row.members, row.queue) == (3, 3)  # every queued connection, wherever it landed
    assert row.limit == 4 + 4 + 2 + 2  # so that limit + 1 = (4+1) + (4+1) + (2+1)
    assert row.drops == 0


def test_a_group_is_one_address_port_flag_and_device_seen_by_inet_diag() -> None:
    def row(
        address: str = "127.0.0.1", ifindex: int | None = 0, source: str = "inet_diag"
    ) -> kernel.ListenerQueue:
        return kernel.ListenerQueue(4, address, 80, 1, 4, 0, 0, 0, source, None, ifindex=ifindex)

    plain, other_device, other_address = row(), row(ifindex=2), row(address="127.0.0.2")
    alone = kernel.reuseport_group(plain, [plain, other_device, other_address])
    assert (alone.members, alone.queue) == (1, 1)  # bound to different devices: no group
    twin = row()
    assert kernel.reuseport_group(plain, [plain, twin, other_device]).members == 2
    proc = row(ifindex=None, source="proc")
    assert kernel.reuseport_group(proc, [proc, row(ifindex=None, source="proc")]).members == 1


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


# SYN-RECV per listener. TCP_DEFER_ACCEPT keeps a finished handshake in SYN-RECV until data
# arrives (here never), so request sockets stay put for the whole test instead of flickering
# past on loopback.
_DEFER_S = 30


def _deferred(
    stack: contextlib.ExitStack, address: str, port: int, *, v6only: int | None = None
) -> int:
    """A listener on address:port (SO_REUSEPORT, so a wildcard and a specific address can
    share the port) that leaves its handshakes in SYN-RECV; returns its port."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    listener = stack.enter_context(socket.socket(family))
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if v6only is not None:
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, _DEFER_S)
    listener.bind((address, port))
    listener.listen(16)
    return int(listener.getsockname()[1])


def _handshakes(stack: contextlib.ExitStack, port: int, counts: dict[str, int]) -> None:
    """counts[address] completed handshakes to address:port, clients kept open; then wait
    (bounded) until the kernel shows them all in SYN-RECV."""
    for address, n in counts.items():
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        for _ in range(n):
            client = stack.enter_context(socket.socket(family))
            client.settimeout(LONG)
            client.connect((address, port))
    deadline = time.monotonic() + LONG
    while kernel.syn_recv_count(port) != sum(counts.values()) and time.monotonic() < deadline:
        time.sleep(SHORT)
    assert kernel.syn_recv_count(port) == sum(counts.values())


def _shared_port(addresses: list[tuple[str, int | None]]) -> tuple[contextlib.ExitStack, int]:
    """Deferred listeners on every address, all on one port (a few tries: another program
    may hold the port on one of the later addresses)."""
    for _ in range(20):
        stack = contextlib.ExitStack()
        try:
            port = 0
            for address, v6only in addresses:
                port = _deferred(stack, address, port, v6only=v6only)
        except OSError:
            stack.close()
            continue
        return stack, port
    pytest.fail("no port free on every address")


@linux
def test_syn_recv_count_keeps_to_the_flooded_listener() -> None:
    # Another listener on the same port (another loopback address, ::1) has its own SYN
    # queue: it used to be added in, whatever address backlog flooded.
    addresses: list[tuple[str, int | None]] = [("127.0.0.1", None), ("127.0.0.2", None)]
    counts = {"127.0.0.1": 1, "127.0.0.2": 2}
    if HAS_IPV6:
        addresses.append(("::1", 1))
        counts["::1"] = 3
    stack, port = _shared_port(addresses)
    with stack:
        _handshakes(stack, port, counts)
        for address, n in counts.items():
            assert kernel.syn_recv_count(port, address) == n, address
        assert kernel.syn_recv_count(port, "127.0.0.9") == 0  # nothing listens there
        assert kernel.syn_recv_count(port) == sum(counts.values())  # the old meaning


@linux
def test_syn_recv_count_gives_a_wildcard_what_no_specific_listener_takes() -> None:
    addresses: list[tuple[str, int | None]] = [("0.0.0.0", None), ("127.0.0.2", None)]
    counts = {"127.0.0.1": 1, "127.0.0.3": 2, "127.0.0.2": 4}
    if HAS_IPV6:
        addresses.append(("::", 1))  # v6only: IPv4 handshakes are not its business
        counts["::1"] = 3
    stack, port = _shared_port(addresses)
    with stack:
        _handshakes(stack, port, counts)
        assert kernel.syn_recv_count(port, "127.0.0.1") == 3  # 127.0.0.1 and .3: the wildcard's
        assert kernel.syn_recv_count(port, "127.0.0.3") == 3
        assert kernel.syn_recv_count(port, "0.0.0.0") == 3
        assert kernel.syn_recv_count(port, "127.0.0.2") == 4
        if HAS_IPV6:
            assert kernel.syn_recv_count(port, "::1") == 3
            assert kernel.syn_recv_count(port, "::") == 3


@linux
@pytest.mark.skipif(not HAS_IPV6, reason="no IPv6 loopback")
def test_syn_recv_count_follows_ipv4_into_ipv6_sockets() -> None:
    # IPv4 handshakes on an IPv6 socket show in the IPv6 table with a ::ffff: address: a
    # dual-stack `::` owns them, and so does a socket bound to the mapped address.
    stack, port = _shared_port([("::", 0)])
    with stack:
        _handshakes(stack, port, {"127.0.0.1": 2, "::1": 1})
        assert kernel.syn_recv_count(port, "127.0.0.1") == 3
        assert kernel.syn_recv_count(port, "::1") == 3
        assert kernel.syn_recv_count(port, "::ffff:127.0.0.1") == 3
    stack, port = _shared_port([("::ffff:127.0.0.1", 0), ("127.0.0.2", None)])
    with stack:
        _handshakes(stack, port, {"127.0.0.1": 2, "127.0.0.2": 1})
        assert kernel.syn_recv_count(port, "127.0.0.1") == 2
        assert kernel.syn_recv_count(port, "::ffff:127.0.0.1") == 2
        assert kernel.syn_recv_count(port, "127.0.0.2") == 1


def _lq(family: int, address: str, v6only: bool | None = None) -> kernel.ListenerQueue:
    return kernel.ListenerQueue(family, address, 8080, 0, None, None, 0, 0, "proc", v6only)


# Synthetic rows (as inet_diag or /proc/net/tcp* give them) for the pure SYN-RECV filter.
_SPECIFIC_AND_WILDCARDS = [
    _lq(4, "0.0.0.0"),
    _lq(4, "127.0.0.2"),
    _lq(6, "::", v6only=True),
    _lq(6, "::1"),
]


@pytest.mark.parametrize(
    ("listeners", "requests", "target", "want"),
    [
        # A specific listener takes its own address; the wildcard takes the rest of its family.
        (
            _SPECIFIC_AND_WILDCARDS,
            [(4, "127.0.0.2"), (4, "127.0.0.1"), (4, "10.0.0.5")],
            "127.0.0.2",
            1,
        ),
        (
            _SPECIFIC_AND_WILDCARDS,
            [(4, "127.0.0.2"), (4, "127.0.0.1"), (4, "10.0.0.5")],
            "127.0.0.1",
            2,
        ),
        (_SPECIFIC_AND_WILDCARDS, [(4, "127.0.0.2"), (4, "127.0.0.1")], "0.0.0.0", 1),
        (_SPECIFIC_AND_WILDCARDS, [(6, "::1"), (6, "fe80::1"), (6, "::2")], "::1", 1),
        (_SPECIFIC_AND_WILDCARDS, [(6, "::1"), (6, "fe80::1"), (6, "::2")], "::", 2),
        (_SPECIFIC_AND_WILDCARDS, [(6, "::1"), (4, "127.0.0.1")], "::2", 0),
        # A scope id names the interface, not another address.
        (_SPECIFIC_AND_WILDCARDS, [(6, "fe80::1")], "fe80::1%lo", 1),
        # Dual-stack `::` (or v6only unknown, via /proc): IPv4 arrives mapped in the v6 table.
        ([_lq(6, "::", v6only=False)], [(6, "::ffff:127.0.0.1"), (6, "::1")], "127.0.0.1", 2),
        ([_lq(6, "::")], [(6, "::ffff:127.0.0.1"), (6, "::1")], "127.0.0.1", 2),
        ([_lq(6, "::", v6only=True)], [(6, "::1")], "127.0.0.1", 0),
        # A v6 socket bound to a mapped address is what an IPv4 client of that address reaches.
        (
            [_lq(6, "::ffff:127.0.0.1"), _lq(4, "127.0.0.2")],
            [(6, "::ffff:127.0.0.1"), (4, "127.0.0.2")],
            "127.0.0.1",
            1,
        ),
        (
            [_lq(6, "::ffff:127.0.0.1"), _lq(4, "127.0.0.2")],
            [(6, "::ffff:127.0.0.1"), (4, "127.0.0.2")],
            "::ffff:127.0.0.1",
            1,
        ),
        # No listener for the target: none of the requests are its.
        ([_lq(4, "127.0.0.2")], [(4, "127.0.0.2")], "127.0.0.1", 0),
        ([], [(4, "127.0.0.1")], "127.0.0.1", 0),
    ],
)
def test_syn_recv_filter_on_synthetic_rows(
    listeners: list[kernel.ListenerQueue],
    requests: list[tuple[int, str]],
    target: str,
    want: int,
) -> None:
    assert kernel._syn_recv_of(requests, listeners, target) == want


_V4 = ["0.0.0.0", "127.0.0.1", "127.0.0.2", "10.1.2.3"]
_V6 = ["::", "::1", "fe80::1", "::ffff:127.0.0.1", "::ffff:10.1.2.3"]


@st.composite
def _listener_sets(draw: st.DrawFn) -> list[kernel.ListenerQueue]:
    """Listeners on one port that can coexist: never an IPv4 address and its ::ffff: form."""
    v4 = draw(st.sets(st.sampled_from(_V4)))
    v6 = {a for a in draw(st.sets(st.sampled_from(_V6))) if a.removeprefix("::ffff:") not in v4}
    v6only = draw(st.sampled_from([True, False, None]))
    rows = [_lq(4, a) for a in v4] + [_lq(6, a, v6only if a == "::" else None) for a in v6]
    return draw(st.permutations(rows))


_REQUESTS = st.lists(
    st.one_of(
        st.tuples(st.just(4), st.sampled_from(_V4[1:])),
        st.tuples(st.just(6), st.sampled_from(_V6[1:])),
    ),
    max_size=12,
)


@given(listeners=_listener_sets(), requests=_REQUESTS)
def test_each_syn_recv_belongs_to_at_most_one_listener(
    listeners: list[kernel.ListenerQueue], requests: list[tuple[int, str]]
) -> None:
    # One target address per distinct listener (its own address reaches it): no request is
    # counted for two listeners, and with a wildcard for each family every one is counted
    # once. (A v6only `::` takes no ::ffff: request; such a request cannot exist.)
    targets = {}
    for row in listeners:
        reached = kernel._reached_listener(listeners, row.address)
        assert reached is row
        targets[(row.family, row.address)] = row.address
    claims = [
        sum(kernel._syn_recv_of([r], listeners, t) for t in targets.values()) for r in requests
    ]
    assert all(claim in (0, 1) for claim in claims)
    total = sum(kernel._syn_recv_of(requests, listeners, t) for t in targets.values())
    assert total == sum(claims) <= len(requests)
    addresses = {(row.family, row.address): row for row in listeners}
    dual = (6, "::") in addresses and addresses[(6, "::")].v6only is not True
    for request, claim in zip(requests, claims, strict=True):
        mapped = request[1].startswith("::ffff:")
        wildcard = (4, "0.0.0.0") if request[0] == 4 else (6, "::")
        if request in addresses or (wildcard in addresses and (dual or not mapped)):
            assert claim == 1, request


_MOUNTINFO = """\
22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
25 22 0:24 / /proc/sys/fs/binfmt_misc rw,relatime shared:13 - autofs systemd-1 rw,fd=29
30 1 8:1 / /mnt/odd\\040dir rw,relatime - ext4 /dev/sda1 rw
"""


@pytest.mark.parametrize(
    ("text", "want"),
    [
        (_MOUNTINFO, kernel.ProcMount("off", 0)),
        # A second procfs mounted over /proc is the one in effect (new kernels name the mode).
        (
            _MOUNTINFO
            + "63 22 0:39 / /proc rw,relatime - proc proc rw,gid=1001,hidepid=invisible\n",
            kernel.ProcMount("invisible", 1001),
        ),
        # Kernels before 5.8 print a number; optional fields may come before the separator.
        (
            "22 1 0:21 / /proc rw shared:12 master:3 - proc proc rw,hidepid=2\n",
            kernel.ProcMount("invisible", 0),
        ),
        ("22 1 0:21 / /proc rw - proc proc rw,hidepid=1\n", kernel.ProcMount("noaccess", 0)),
        ("22 1 0:21 / /proc rw - proc proc rw,hidepid=4\n", kernel.ProcMount("ptraceable", 0)),
        # `mount --beneath` slid 63 under 22: listed last, yet 22 is the one on top.
        (
            "22 63 0:21 / /proc rw - proc proc rw\n63 1 0:39 / /proc rw - proc proc rw,hidepid=2\n",
            kernel.ProcMount("off", 0),
        ),
        # Not procfs on /proc, or nothing there: no answer rather than a guess.
        ("22 1 0:21 / /proc rw - tmpfs tmpfs rw\n", None),
        ("30 1 8:1 / /mnt rw - ext4 /dev/sda1 rw\nnot a mountinfo line\n", None),
    ],
)
def test_proc_mount_options_come_from_the_mount_on_top(
    text: str, want: kernel.ProcMount | None
) -> None:
    assert kernel.parse_proc_mount(text) == want


def test_proc_mount_point_escapes_are_decoded() -> None:
    assert kernel.parse_proc_mount(_MOUNTINFO, "/mnt/odd dir") is None  # ext4, not procfs
    text = "40 1 0:50 / /srv/my\\040proc rw - proc proc rw,hidepid=2\n"
    assert kernel.parse_proc_mount(text, "/srv/my proc") == kernel.ProcMount("invisible", 0)


@linux
def test_proc_mount_reads_this_process() -> None:
    mount = kernel.proc_mount()
    assert mount is not None
    assert mount.hidepid in {"off", "noaccess", "invisible", "ptraceable"}


def test_initial_user_namespace_is_the_identity_over_every_id() -> None:
    assert kernel.parse_id_map("         0          0 4294967295\n") == [(0, 0, 4294967295)]
    assert kernel.parse_id_map("0 1000 1\n1 100000 65536\n") == [(0, 1000, 1), (1, 100000, 65536)]
    assert kernel.parse_id_map("") == []
    assert kernel.parse_id_map("0 0 4294967295\n") == kernel._INITIAL_ID_MAP
    assert kernel.parse_id_map("0 0 1\n") != kernel._INITIAL_ID_MAP  # `unshare -r` by root


@linux
def test_in_initial_user_namespace_matches_unshare() -> None:
    code = "from netprobe import kernel; print(kernel.in_initial_user_namespace())"
    unshare = shutil.which("unshare")
    probe = [unshare or "unshare", "-r", "true"]
    if unshare is None or subprocess.run(probe, capture_output=True, check=False).returncode:
        pytest.skip("no unprivileged user namespaces here")
    out = subprocess.run(
        ["unshare", "-r", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    )
    assert out.stdout.strip() == "False"


_LISTENERS_OUT_OF_FDS = """
import errno, os
from netprobe import kernel
held = []
try:
    while True:  # every descriptor this process may have, in use
        held.append(os.open("/dev/null", os.O_RDONLY))
except OSError as exc:
    assert exc.errno == errno.EMFILE
try:
    rows = kernel.tcp_listeners()
except OSError as exc:
    print(errno.errorcode[exc.errno])
else:
    print("rows", len(rows))
"""


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")
def test_listeners_out_of_fds_is_an_error_not_an_empty_list() -> None:
    # Neither the inet_diag socket nor /proc/net/tcp could be opened: the empty list that
    # came back said "nothing listens" (doctor: "not listed our listener ... is missing").
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        proc = subprocess.run(
            [sys.executable, "-c", _LISTENERS_OUT_OF_FDS],
            capture_output=True,
            timeout=LONG,
            check=False,
        )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().split() == ["EMFILE"]
