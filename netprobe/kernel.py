"""Read-only facts about this host's TCP stack: sysctls, counters, listener queues, owners.

Does I/O (reads /proc, /proc/sys and a NETLINK_SOCK_DIAG socket) but never writes anything
and sends no network traffic. Linux only; elsewhere every reader returns None or an empty
result so callers can say "not available" instead of guessing (SOCKETS.md §2).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import math
import os
import re
import socket
import struct
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from netprobe.errors import OUT_OF_FDS_ERRNOS
from netprobe.sockets import nofile_limit

__all__ = [
    "HostLimits",
    "ListenerQueue",
    "Owner",
    "ProcMount",
    "SocketRow",
    "counter_deltas",
    "find_listener",
    "host_limits",
    "in_initial_user_namespace",
    "kernel_facts",
    "parse_id_map",
    "parse_proc_mount",
    "proc_mount",
    "read_counters",
    "read_id_map",
    "read_sysctl",
    "reuseport_group",
    "runnable_tasks",
    "socket_owners",
    "syn_recv_count",
    "tcp_listeners",
    "udp_sockets",
    "unix_listeners",
    "usable_cpus",
]

_PROC_SYS = "/proc/sys"

# The counters the backlog report takes deltas of (all in /proc/net/netstat TcpExt).
BACKLOG_COUNTERS = (
    "TcpExt.ListenOverflows",
    "TcpExt.ListenDrops",
    "TcpExt.SyncookiesSent",
    "TcpExt.SyncookiesRecv",
    "TcpExt.SyncookiesFailed",
    "TcpExt.TCPReqQFullDrop",
    "TcpExt.TCPReqQFullDoCookies",
)

# ---------------------------------------------------------------------------------------------
# Sysctls and limits
# ---------------------------------------------------------------------------------------------


def read_sysctl(name: str, root: str = _PROC_SYS) -> str | None:
    """The value of a sysctl (`net.core.somaxconn`), stripped; None when unreadable."""
    path = os.path.join(root, *name.split("."))
    try:
        with open(path, encoding="ascii") as handle:
            return handle.read().strip()
    except OSError:
        return None


def runnable_tasks(path: str = "/proc/loadavg") -> int | None:
    """Tasks runnable at this instant, the reader included (/proc/loadavg's "R/T" field).

    Unlike the load averages, which still count the last minute's work, this tells whether
    a core is free right now. None where /proc is missing.
    """
    try:
        with open(path, encoding="ascii") as handle:
            return int(handle.read().split()[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        return None


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as handle:
            return handle.read().strip()
    except (OSError, UnicodeDecodeError):
        return None


def cgroup_cpu_limit(
    proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup"
) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (1.5: 150 ms per 100 ms), None if none.

    cgroup v2 (`cpu.max`) and v1 (`cpu.cfs_quota_us` / `cpu.cfs_period_us`); a quota set on
    any ancestor counts too (the tightest wins), as the scheduler enforces every level.
    """
    text = _read_text(proc_cgroup)
    if text is None:
        return None
    limits: list[float] = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        files: tuple[str, ...]
        if hierarchy == "0" and controllers == "":
            base, files = root, ("cpu.max",)
        elif "cpu" in controllers.split(","):
            base, files = os.path.join(root, controllers), ("cpu.cfs_quota_us", "cpu.cfs_period_us")
            if not os.path.isdir(base):  # "cpu,cpuacct" is often reached by a cpu symlink only
                base = os.path.join(root, "cpu")
        else:
            continue
        rel = path.strip("/")
        while True:
            limit = _quota_at(os.path.join(base, rel), files)
            if limit is not None:
                limits.append(limit)
            if not rel:
                break
            rel = os.path.dirname(rel)
    return min(limits) if limits else None


def _quota_at(directory: str, files: tuple[str, ...]) -> float | None:
    if len(files) == 1:  # v2: "max 100000" or "150000 100000"
        text = _read_text(os.path.join(directory, files[0]))
        fields = text.split() if text else []
    else:
        fields = [_read_text(os.path.join(directory, name)) or "" for name in files]
    if len(fields) != 2:
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:  # "max": no limit at this level
        return None
    if quota <= 0 or period <= 0:  # v1 writes -1 for no limit
        return None
    return quota / period


def usable_cpus() -> int:
    """The CPUs this process may actually use: its affinity mask (taskset, cpuset), capped by
    a cgroup CPU quota (a container's --cpus), rounded up; at least 1.

    os.cpu_count() counts the host's CPUs and would over-commit inside a container.
    """
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    if quota is not None:
        count = min(count, math.ceil(quota))
    return max(1, count)


def _int_sysctl(name: str) -> int | None:
    text = read_sysctl(name)
    if text is None:
        return None
    try:
        return int(text.split()[0])
    except (ValueError, IndexError):
        return None


@dataclass(frozen=True, slots=True)
class HostLimits:
    """The host limits that shape a connection flood (None: not readable here).

    Attributes:
        somaxconn: net.core.somaxconn (clamps every listen() backlog).
        tcp_max_syn_backlog: net.ipv4.tcp_max_syn_backlog (matters with syncookies off).
        tcp_syncookies: 0 off, 1 when the SYN queue overflows, 2 always.
        tcp_abort_on_overflow: 1 answers an overflowing final ACK with RST.
        port_range: net.ipv4.ip_local_port_range (low, high).
        nofile_soft, nofile_hard: RLIMIT_NOFILE of this process (None: unlimited/unknown).
    """

    somaxconn: int | None
    tcp_max_syn_backlog: int | None
    tcp_syncookies: int | None
    tcp_abort_on_overflow: int | None
    port_range: tuple[int, int] | None
    nofile_soft: int | None
    nofile_hard: int | None

    @property
    def ports_per_source(self) -> int | None:
        """Ephemeral ports available to one (source, destination) pair."""
        if self.port_range is None:
            return None
        return self.port_range[1] - self.port_range[0] + 1

    def as_dict(self) -> dict[str, Any]:
        """The JSON form used in reports."""
        return {
            "somaxconn": self.somaxconn,
            "tcp_max_syn_backlog": self.tcp_max_syn_backlog,
            "tcp_syncookies": self.tcp_syncookies,
            "tcp_abort_on_overflow": self.tcp_abort_on_overflow,
            "ip_local_port_range": list(self.port_range) if self.port_range else None,
            "nofile_soft": self.nofile_soft,
            "nofile_hard": self.nofile_hard,
        }


def host_limits() -> HostLimits:
    """Read somaxconn, SYN-backlog, syncookies, abort_on_overflow, port range, RLIMIT_NOFILE."""
    port_range: tuple[int, int] | None = None
    text = read_sysctl("net.ipv4.ip_local_port_range")
    if text is not None:
        parts = text.split()
        if len(parts) == 2 and all(p.isdigit() for p in parts):
            port_range = (int(parts[0]), int(parts[1]))
    soft, hard = nofile_limit()
    return HostLimits(
        somaxconn=_int_sysctl("net.core.somaxconn"),
        tcp_max_syn_backlog=_int_sysctl("net.ipv4.tcp_max_syn_backlog"),
        tcp_syncookies=_int_sysctl("net.ipv4.tcp_syncookies"),
        tcp_abort_on_overflow=_int_sysctl("net.ipv4.tcp_abort_on_overflow"),
        port_range=port_range,
        nofile_soft=soft,
        nofile_hard=hard,
    )


# ---------------------------------------------------------------------------------------------
# /proc/net/netstat and /proc/net/snmp counters
# ---------------------------------------------------------------------------------------------


def parse_counter_pairs(text: str) -> dict[str, int]:
    """Zip the header/value line pairs of /proc/net/netstat or snmp into `Prefix.Name` keys."""
    counters: dict[str, int] = {}
    lines = [line.split() for line in text.splitlines() if line.strip()]
    for header, values in zip(lines[::2], lines[1::2], strict=False):
        if not header or not values or header[0] != values[0]:
            continue  # out of step: skip rather than mislabel a counter
        prefix = header[0].rstrip(":")
        for name, value in zip(header[1:], values[1:], strict=False):
            with contextlib.suppress(ValueError):
                counters[f"{prefix}.{name}"] = int(value)
    return counters


def read_counters(paths: Iterable[str] = ("/proc/net/netstat", "/proc/net/snmp")) -> dict[str, int]:
    """Every counter of /proc/net/netstat and /proc/net/snmp (empty where unreadable).

    They are per network namespace and system-wide, not per socket (SOCKETS.md §1.5).
    """
    counters: dict[str, int] = {}
    for path in paths:
        try:
            with open(path, encoding="ascii") as handle:
                counters.update(parse_counter_pairs(handle.read()))
        except OSError:
            continue
    return counters


def counter_deltas(
    before: Mapping[str, int], after: Mapping[str, int], names: Iterable[str] | None = None
) -> dict[str, int | None]:
    """after - before for each name (all common names by default); None where either is missing."""
    keys = list(names) if names is not None else sorted(set(before) & set(after))
    out: dict[str, int | None] = {}
    for key in keys:
        if key in before and key in after:
            out[key] = after[key] - before[key]
        else:
            out[key] = None
    return out


# ---------------------------------------------------------------------------------------------
# Listener queues: inet_diag over netlink, /proc/net/tcp as the fallback
# ---------------------------------------------------------------------------------------------

_NETLINK_SOCK_DIAG = 4  # Python's socket module has no constant for it
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST_DUMP = 0x301  # NLM_F_REQUEST | NLM_F_ROOT | NLM_F_MATCH
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_INET_DIAG_SKMEMINFO = 7
_INET_DIAG_SKV6ONLY = 11  # a u8 the kernel adds for every AF_INET6 socket
_SK_MEMINFO_DROPS = 8  # index of the drop count among the SKMEMINFO u32s
_TCP_SYN_RECV = 3
_TCP_LISTEN = 10
_NLMSG_HDR = struct.Struct("=IHHII")
_DIAG_REQ = struct.Struct("=BBBBI48s")
_DIAG_MSG = struct.Struct("=BBBB2s2s16s16sI8sIIIII")


@dataclass(frozen=True, slots=True)
class ListenerQueue:
    """One listening TCP socket as the kernel sees it (`ss -lnt` Recv-Q/Send-Q).

    Attributes:
        family: 4 or 6.
        address: local address (text).
        port: local port.
        queue: current accept-queue length (Recv-Q, sk_ack_backlog).
        limit: accept-queue limit after the somaxconn clamp (Send-Q); None via /proc.
        drops: the listener's own drop count (sk_drops, SKMEMINFO); None when unavailable.
        uid: owning user id.
        inode: socket inode (ties the row to a process's fd).
        source: "inet_diag" or "proc" (the fallback, which lacks limit and drops).
        v6only: an IPv6 socket that takes no IPv4 (IPV6_V6ONLY); None for IPv4 and via /proc.
        members: the SO_REUSEPORT sockets this row stands for (find_listener sums a group:
            queue, drops, and a limit whose + 1 is the group's room, each socket's Send-Q + 1).
        ifindex: the interface the socket is bound to (SO_BINDTODEVICE, a VRF), 0 for none;
            None via /proc.
    """

    family: int
    address: str
    port: int
    queue: int
    limit: int | None
    drops: int | None
    uid: int
    inode: int
    source: str
    v6only: bool | None = None
    members: int = 1
    ifindex: int | None = None


def _diag_dump(family: int, states: int, ext: int, sport: int = 0) -> list[tuple[Any, ...]]:
    """One SOCK_DIAG_BY_FAMILY dump; rows are (msg fields, drops or None). Raises OSError."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG)
    try:
        sock.settimeout(2.0)
        sockid = struct.pack("!HH", sport, 0) + bytes(44)
        req = _DIAG_REQ.pack(family, socket.IPPROTO_TCP, ext, 0, states, sockid)
        header = _NLMSG_HDR.pack(
            _NLMSG_HDR.size + len(req), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST_DUMP, 1, 0
        )
        sock.send(header + req)
        rows: list[tuple[Any, ...]] = []
        while True:
            data = sock.recv(65536)
            if not data:
                return rows
            offset = 0
            while offset + _NLMSG_HDR.size <= len(data):
                length, msg_type, _flags, _seq, _pid = _NLMSG_HDR.unpack_from(data, offset)
                if length < _NLMSG_HDR.size:
                    return rows
                if msg_type == _NLMSG_DONE:
                    return rows
                if msg_type == _NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", data, offset + _NLMSG_HDR.size)
                    if code:
                        raise OSError(-code, os.strerror(-code))
                    return rows
                body = offset + _NLMSG_HDR.size
                if msg_type == _SOCK_DIAG_BY_FAMILY and length >= _NLMSG_HDR.size + _DIAG_MSG.size:
                    fields = _DIAG_MSG.unpack_from(data, body)
                    drops, v6only = _diag_attrs(data, body + _DIAG_MSG.size, offset + length)
                    rows.append((fields, drops, v6only))
                offset += (length + 3) & ~3
    finally:
        sock.close()


def _diag_attrs(data: bytes, start: int, end: int) -> tuple[int | None, bool | None]:
    """The listener's drop count (SKMEMINFO) and, for IPv6, its v6only flag."""
    drops: int | None = None
    v6only: bool | None = None
    pos = start
    while pos + 4 <= end:
        attr_len, attr_type = struct.unpack_from("=HH", data, pos)
        if attr_len < 4:
            break
        if attr_type == _INET_DIAG_SKMEMINFO and attr_len >= 4 + 4 * (_SK_MEMINFO_DROPS + 1):
            drops = int(struct.unpack_from("=I", data, pos + 4 + 4 * _SK_MEMINFO_DROPS)[0])
        elif attr_type == _INET_DIAG_SKV6ONLY and attr_len >= 5:
            v6only = bool(data[pos + 4])
        pos += (attr_len + 3) & ~3
    return drops, v6only


def _ipv6_text(packed: bytes) -> str:
    address = ipaddress.IPv6Address(packed)
    mapped = address.ipv4_mapped
    # As `ss` prints it (Python 3.11 would say ::ffff:7f00:1, and 3.13 the dotted form).
    return f"::ffff:{mapped}" if mapped is not None else str(address)


def _diag_address(family: int, raw: bytes) -> str:
    if family == socket.AF_INET:
        return str(ipaddress.IPv4Address(raw[:4]))
    return _ipv6_text(raw)


def _listeners_via_diag(port: int | None) -> list[ListenerQueue]:
    out: list[ListenerQueue] = []
    for family, version in ((socket.AF_INET, 4), (socket.AF_INET6, 6)):
        rows = _diag_dump(family, 1 << _TCP_LISTEN, 1 << (_INET_DIAG_SKMEMINFO - 1), port or 0)
        for fields, drops, v6only in rows:
            sport = struct.unpack("!H", fields[4])[0]
            if port is not None and sport != port:
                continue
            out.append(
                ListenerQueue(
                    family=version,
                    address=_diag_address(family, fields[6]),
                    port=sport,
                    queue=fields[11],
                    limit=fields[12],
                    drops=drops,
                    uid=fields[13],
                    inode=fields[14],
                    source="inet_diag",
                    v6only=v6only if version == 6 else None,
                    ifindex=fields[8],
                )
            )
    return out


def _proc_address(text: str) -> tuple[int, str, int]:
    """Decode `0100007F:1F90` (IPv4) or the 32-hex-digit IPv6 form from /proc/net/tcp*."""
    hex_addr, hex_port = text.split(":")
    raw = bytes.fromhex(hex_addr)
    # The kernel prints each 32-bit word in host byte order.
    words = [raw[i : i + 4] for i in range(0, len(raw), 4)]
    if sys.byteorder == "little":
        words = [w[::-1] for w in words]
    packed = b"".join(words)
    if len(packed) == 4:
        return 4, str(ipaddress.IPv4Address(packed)), int(hex_port, 16)
    return 6, _ipv6_text(packed), int(hex_port, 16)


def _proc_rows(path: str) -> list[list[str]]:
    """The rows of a /proc/net/{tcp,udp}* table, split; a row that does not parse (columns
    missing, an address that is not hex) is left out rather than failing the whole table."""
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            lines = handle.read().splitlines()[1:]
    except OSError as exc:
        if exc.errno in OUT_OF_FDS_ERRNOS:
            raise  # the table exists; "no rows" would be a false answer
        return []  # no such table here (no IPv6, no /proc)
    rows = []
    for line in lines:
        cols = line.split()
        try:
            if len(cols) < 10:
                raise ValueError(line)
            _proc_address(cols[1])
            _proc_address(cols[2])
            int(cols[4].split(":")[1], 16)
            int(cols[7])
            int(cols[9])
        except (ValueError, IndexError):
            continue
        rows.append(cols)
    return rows


def _listeners_via_proc(port: int | None) -> list[ListenerQueue]:
    out: list[ListenerQueue] = []
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        for cols in _proc_rows(path):
            if len(cols) < 10 or cols[3] != "0A":
                continue
            version, address, lport = _proc_address(cols[1])
            if port is not None and lport != port:
                continue
            rx_queue = int(cols[4].split(":")[1], 16)
            out.append(
                ListenerQueue(version, address, lport, rx_queue, None, None, int(cols[7]),
                              int(cols[9]), "proc")
            )  # fmt: skip
    return out


def tcp_listeners(port: int | None = None) -> list[ListenerQueue]:
    """Every listening TCP socket (optionally on one port) with its accept-queue figures.

    Uses a LISTEN-filtered inet_diag dump (queue, limit and per-socket drops, no root
    needed); falls back to /proc/net/tcp, whose rx_queue is the queue length but which
    shows neither the limit nor drops (SOCKETS.md §1.5, §2).
    """
    if hasattr(socket, "AF_NETLINK"):
        try:
            return _listeners_via_diag(port)
        except OSError as exc:
            if exc.errno in OUT_OF_FDS_ERRNOS:
                raise  # /proc needs a descriptor too: an empty list would be a false answer
    return _listeners_via_proc(port)


def _reached_listener(listeners: Iterable[ListenerQueue], address: str) -> ListenerQueue | None:
    """The listener among `listeners` (all on one port) that a connect to `address` reaches.

    Mirrors the kernel's listener lookup: an exact address beats a wildcard, and at equal
    rank an IPv4 socket beats an IPv6 one. An IPv4 destination (or its ::ffff: form, which
    is IPv4 on the wire) also reaches an IPv6 socket bound to the mapped address, and a `::`
    socket unless it is v6only (None: unknown, via /proc, so assumed dual-stack as the
    default is). A scope id (`fe80::1%eth0`) names an interface, not another address.
    """
    rows = sorted(listeners, key=lambda row: row.family)  # stable: IPv4 first at equal rank
    text = address.split("%", 1)[0]
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    with contextlib.suppress(ValueError):
        ip = ipaddress.ip_address(text)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip is None:  # not an IP literal: only its own text can match
        exact, ipv4 = {text}, False
    elif ip.version == 4:
        exact, ipv4 = {str(ip), f"::ffff:{ip}"}, True
    else:
        exact, ipv4 = {str(ip)}, False
    for row in rows:
        if row.address in exact:
            return row
    for row in rows:
        if row.address == "0.0.0.0" and ipv4:
            return row
        if row.address == "::" and (not ipv4 or row.v6only is not True):
            return row
    return None


def find_listener(port: int, address: str | None = None) -> ListenerQueue | None:
    """The listener a connect to address:port would reach (exact address, else a wildcard).

    SO_REUSEPORT sockets on that address share its connects (the kernel spreads them over the
    group), so a group comes back as one row of their sums, `members` saying how many.
    """
    rows = tcp_listeners(port)
    row = _reached_listener(rows, address) if address is not None else (rows[0] if rows else None)
    return None if row is None else reuseport_group(row, rows)


def reuseport_group(row: ListenerQueue, rows: Sequence[ListenerQueue]) -> ListenerQueue:
    """ROW, summed over the sockets of `rows` bound to the same address, port, v6only flag and
    device (an SO_REUSEPORT group); ROW itself when it is alone, or when the rows come from
    /proc, which shows neither the flag nor the device (sockets bound to different devices
    share an address and port without being a group)."""
    if row.source != "inet_diag":
        return row
    key = (row.family, row.address, row.port, row.v6only, row.ifindex)
    group = [
        r
        for r in rows
        if r.source == "inet_diag" and (r.family, r.address, r.port, r.v6only, r.ifindex) == key
    ]
    if len(group) < 2:
        return row
    limits = [r.limit for r in group]
    drops = [r.drops for r in group]
    return dataclasses.replace(
        row,
        queue=sum(r.queue for r in group),
        # Each socket holds its Send-Q + 1: the group holds the sum, i.e. this limit + 1.
        limit=None if None in limits else sum(x for x in limits if x is not None) + len(group) - 1,
        drops=None if None in drops else sum(x for x in drops if x is not None),
        members=len(group),
    )


def _syn_recv_of(
    requests: Iterable[tuple[int, str]], listeners: Sequence[ListenerQueue], address: str
) -> int:
    """How many of `requests` ((family 4/6, local address) of SYN-RECV sockets on one port)
    belong to the listener that a connect to `address` reaches, among `listeners`.

    A request socket names no listener (its inode is 0), so each is given to the listener
    its own local address reaches, looked up among the listeners of its family: the table
    it shows in is its listener's (IPv4 on a dual-stack socket shows in the IPv6 one with a
    ::ffff: address). So a wildcard gets the requests of every local address of its family
    that no specific listener takes. The SO_REUSEPORT sockets of one address share a SYN
    queue figure: a request socket cannot tell which of them it is queued on.
    """
    target = _reached_listener(listeners, address)
    if target is None:
        return 0
    want = (target.family, target.address)
    by_family: dict[int, list[ListenerQueue]] = {4: [], 6: []}
    for row in listeners:
        by_family.setdefault(row.family, []).append(row)
    owners: dict[tuple[int, str], tuple[int, str] | None] = {}
    count = 0
    for request in requests:
        if request not in owners:  # a flood has thousands of requests on a few addresses
            owner = _reached_listener(by_family.get(request[0], []), request[1])
            owners[request] = None if owner is None else (owner.family, owner.address)
        if owners[request] == want:
            count += 1
    return count


def _syn_recv_requests(port: int) -> list[tuple[int, str]] | None:
    """(family 4/6, local address) of every SYN-RECV socket on `port`; None if unreadable."""
    if hasattr(socket, "AF_NETLINK"):
        try:
            out: list[tuple[int, str]] = []
            for family, version in ((socket.AF_INET, 4), (socket.AF_INET6, 6)):
                for fields, _drops, _v6only in _diag_dump(family, 1 << _TCP_SYN_RECV, 0, port):
                    if struct.unpack("!H", fields[4])[0] == port and fields[1] == _TCP_SYN_RECV:
                        out.append((version, _diag_address(family, fields[6])))
            return out
        except OSError:
            pass
    found = False
    requests: list[tuple[int, str]] = []
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        rows = _proc_rows(path)
        found = found or bool(rows) or os.path.exists(path)
        for cols in rows:
            if len(cols) >= 4 and cols[3] == "03":
                version, local, lport = _proc_address(cols[1])
                if lport == port:
                    requests.append((version, local))
    return requests if found else None


def syn_recv_count(port: int, address: str | None = None) -> int | None:
    """Request sockets in SYN-RECV (the SYN-queue depth `ss` has no column for).

    With `address`, only those of the listener a connect to address:port reaches (see
    _syn_recv_of); without it, every one on `port`, whatever its local address. None when
    neither inet_diag nor /proc can be read.
    """
    requests = _syn_recv_requests(port)
    if requests is None or address is None:
        return None if requests is None else len(requests)
    return _syn_recv_of(requests, tcp_listeners(port), address)


# ---------------------------------------------------------------------------------------------
# UDP and Unix sockets (for `netprobe listeners`)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SocketRow:
    """A bound UDP socket or a listening Unix socket from /proc/net/{udp,udp6,unix}."""

    proto: str  # "udp", "udp6" or "unix"
    address: str
    port: int | None
    uid: int | None
    inode: int


def udp_sockets(port: int | None = None) -> list[SocketRow]:
    """Bound, unconnected UDP sockets (what "listening" means for UDP)."""
    out: list[SocketRow] = []
    for path, proto in (("/proc/net/udp", "udp"), ("/proc/net/udp6", "udp6")):
        for cols in _proc_rows(path):
            if len(cols) < 10 or cols[3] != "07":
                continue
            _v, address, lport = _proc_address(cols[1])
            _rv, _raddr, rport = _proc_address(cols[2])
            if rport != 0 or (port is not None and lport != port):
                continue
            out.append(SocketRow(proto, address, lport, int(cols[7]), int(cols[9])))
    return out


_SO_ACCEPTCON = 0x10000


# Num: RefCount Protocol Flags Type St Inode[ Path]. The kernel writes exactly one space
# before the path and the path as is, so a path may hold (and even start with) spaces.
_UNIX_ROW_RE = re.compile(r"^\s*(?:\S+\s+){3}(\S+)\s+\S+\s+\S+\s+(\d+)(?: (.*))?$")


def unix_listeners() -> list[SocketRow]:
    """Listening Unix stream/seqpacket sockets (abstract names start with '@')."""
    out: list[SocketRow] = []
    try:
        with open("/proc/net/unix", encoding="utf-8", errors="backslashreplace") as handle:
            lines = handle.read().split("\n")[1:]
    except OSError:
        return out
    for line in lines:
        match = _UNIX_ROW_RE.match(line)
        if match is None:
            continue
        flags, inode, path = match.groups()
        with contextlib.suppress(ValueError):
            if int(flags, 16) & _SO_ACCEPTCON:
                out.append(SocketRow("unix", path or "", None, None, int(inode)))
    return out


# ---------------------------------------------------------------------------------------------
# Owners (psutil, imported lazily: it costs start-up time)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Owner:
    """The process holding a socket (None fields: not visible to this user)."""

    pid: int | None
    process: str | None
    user: str | None


def _user_name(uid: int | None) -> str | None:
    if uid is None:
        return None
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return str(uid)


def socket_owners(inodes: Iterable[int]) -> dict[int, Owner]:
    """Map socket inodes to their owning process, by scanning processes' fds with psutil.

    psutil.net_connections does not expose inodes, so psutil lists the processes (name,
    user) and each one's /proc/PID/fd links are read for `socket:[INODE]`, as psutil does
    internally. Other users' processes cannot be read when not root: their sockets are
    absent from the result, and the caller reports those rows as lacking process data.
    """
    import psutil

    wanted = set(inodes)
    found: dict[int, Owner] = {}
    if not wanted:
        return found
    for proc in psutil.process_iter(["pid", "name", "username"]):
        pid = proc.info["pid"]
        fd_dir = f"/proc/{pid}/fd"
        try:
            names = os.listdir(fd_dir)
        except OSError:
            continue
        for name in names:
            try:
                link = os.readlink(f"{fd_dir}/{name}")
            except OSError:
                continue
            if not link.startswith("socket:["):
                continue
            inode = int(link[8:-1])
            if inode in wanted and inode not in found:
                found[inode] = Owner(pid, proc.info["name"], proc.info["username"])
        if len(found) == len(wanted):
            break
    return found


def owner_or_uid(owners: Mapping[int, Owner], inode: int, uid: int | None) -> Owner:
    """The owner of `inode`, or an Owner with only the user (from the socket's uid)."""
    owner = owners.get(inode)
    if owner is not None:
        return owner
    return Owner(None, None, _user_name(uid))


# ---------------------------------------------------------------------------------------------
# What this process may see of other processes: /proc's hidepid, the user namespace
# ---------------------------------------------------------------------------------------------

# hidepid as kernels before 5.8 print it (a number) and later ones (a name).
_HIDEPID_NAMES = {"0": "off", "1": "noaccess", "2": "invisible", "4": "ptraceable"}


@dataclass(frozen=True, slots=True)
class ProcMount:
    """The options of the procfs on /proc that hide other users' processes.

    Attributes:
        hidepid: "off"; "noaccess" (other users' /proc/PID listed but unreadable);
            "invisible" (not even listed); "ptraceable" (only processes one may ptrace show).
        gid: the group exempt from noaccess and invisible (a host id; 0 unless set).
    """

    hidepid: str
    gid: int


_MOUNTINFO_ESCAPE = re.compile(r"\\([0-7]{3})")


def parse_proc_mount(mountinfo: str, mount_point: str = "/proc") -> ProcMount | None:
    """The procfs options in effect at `mount_point`, from /proc/PID/mountinfo text.

    None when nothing, or something other than procfs, is mounted there. When mounts are
    stacked on the point, the one on top is what a path resolves to: the one that is no
    other's parent (listing order is not enough: `mount --beneath` slides one underneath).
    """
    found: list[tuple[str, str, str, str]] = []  # id, parent id, fs type, super options
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
            point = _MOUNTINFO_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), fields[4])
            entry = (fields[0], fields[1], fields[sep + 1], fields[sep + 3])
        except (ValueError, IndexError):
            continue
        if point == mount_point:
            found.append(entry)
    parents = {parent for _id, parent, _fs, _opts in found}
    on_top = [entry for entry in found if entry[0] not in parents] or found
    if not on_top or on_top[-1][2] != "proc":
        return None
    options: dict[str, str] = {}
    for option in on_top[-1][3].split(","):
        name, _eq, value = option.partition("=")
        options[name] = value
    hidepid = options.get("hidepid", "off")
    gid = options.get("gid", "0")
    return ProcMount(_HIDEPID_NAMES.get(hidepid, hidepid), int(gid) if gid.isdigit() else 0)


def proc_mount(path: str = "/proc/self/mountinfo") -> ProcMount | None:
    """The hidepid and gid options of /proc, as psutil and socket_owners read it."""
    try:
        # Other mount points may hold any bytes; they must not hide the /proc line.
        with open(path, encoding="utf-8", errors="replace") as handle:
            return parse_proc_mount(handle.read())
    except OSError:
        return None


def parse_id_map(text: str) -> list[tuple[int, int, int]]:
    """The (inside, outside, count) lines of a /proc/PID/uid_map or gid_map."""
    out: list[tuple[int, int, int]] = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            inside, outside, count = (int(field) for field in line.split())
            out.append((inside, outside, count))
    return out


def read_id_map(kind: str = "uid") -> list[tuple[int, int, int]] | None:
    """This process's uid_map ("uid") or gid_map ("gid"); None when unreadable."""
    text = _read_text(f"/proc/self/{kind}_map")
    return None if text is None else parse_id_map(text)


# The identity over every id: what the initial user namespace (and only it) shows.
_INITIAL_ID_MAP = [(0, 0, 4294967295)]


def in_initial_user_namespace() -> bool | None:
    """False inside a user namespace (a rootless container, `unshare -r`), where uid 0 holds
    capabilities only over that namespace's own processes; None when it cannot be told."""
    id_map = read_id_map("uid")
    return None if id_map is None else id_map == _INITIAL_ID_MAP


# ---------------------------------------------------------------------------------------------
# Summary for `doctor`
# ---------------------------------------------------------------------------------------------


def kernel_facts() -> dict[str, Any]:
    """A JSON-ready summary: limits, listener count, whether inet_diag works, key counters."""
    diag_ok = False
    listeners: list[ListenerQueue] = []
    if hasattr(socket, "AF_NETLINK"):
        try:
            listeners = _listeners_via_diag(None)
            diag_ok = True
        except OSError:
            listeners = _listeners_via_proc(None)
    counters = read_counters()
    return {
        "platform": sys.platform,
        "limits": host_limits().as_dict(),
        "tcp_listeners": len(listeners),
        "inet_diag": diag_ok,
        "counters": {name: counters.get(name) for name in BACKLOG_COUNTERS},
    }
