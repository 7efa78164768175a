"""`netprobe listeners`: who listens where on this host, and how full each accept queue is.

Does I/O through netprobe.kernel only (inet_diag, /proc/net, psutil for owners); read-only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from netprobe import kernel

__all__ = ["ListenerRow", "list_listeners"]


@dataclass(frozen=True, slots=True)
class ListenerRow:
    """One listening socket.

    Attributes:
        proto: "tcp", "tcp6", "udp", "udp6" or "unix".
        address: local address, or the Unix path ('@' starts an abstract name).
        port: local port (None for Unix sockets).
        pid, process: the owning process; None when it is not visible to this user.
        user: the owning user (from the socket's uid even when the process is hidden).
        recv_q: TCP only: connections waiting in the accept queue now (ss Recv-Q).
        send_q: TCP only: the accept-queue limit (ss Send-Q); None via the /proc fallback.
        drops: TCP only: the listener's own drop count (sk_drops), when inet_diag works.
        process_known: False when the owner could not be read (not root: other users').
    """

    proto: str
    address: str
    port: int | None
    pid: int | None
    process: str | None
    user: str | None
    recv_q: int | None
    send_q: int | None
    drops: int | None
    process_known: bool


def list_listeners(
    *, port: int | None = None, tcp: bool = True, udp: bool = True, unix: bool = True
) -> list[ListenerRow]:
    """Listening TCP sockets, bound UDP sockets and listening Unix sockets, sorted.

    Args:
        port: only this local port (drops Unix sockets, which have none).
        tcp, udp, unix: which kinds to include.
    """
    rows: list[tuple[str, str, int | None, int | None, int, int | None, int | None, int | None]]
    rows = []
    if tcp:
        for q in kernel.tcp_listeners(port):
            proto = "tcp" if q.family == 4 else "tcp6"
            rows.append((proto, q.address, q.port, q.uid, q.inode, q.queue, q.limit, q.drops))
    if udp:
        for r in kernel.udp_sockets(port):
            rows.append((r.proto, r.address, r.port, r.uid, r.inode, None, None, None))
    if unix and port is None:
        for r in kernel.unix_listeners():
            rows.append((r.proto, r.address, None, r.uid, r.inode, None, None, None))
    owners = kernel.socket_owners(inode for _p, _a, _port, _u, inode, *_rest in rows)
    out: list[ListenerRow] = []
    for proto, address, lport, uid, inode, recv_q, send_q, drops in rows:
        owner = kernel.owner_or_uid(owners, inode, uid)
        user = owner.user
        if user is None and proto == "unix" and owner.pid is None:
            user = None  # /proc/net/unix carries no uid; nothing else to go on
        out.append(
            ListenerRow(
                proto=proto,
                address=address,
                port=lport,
                pid=owner.pid,
                process=owner.process,
                user=user,
                recv_q=recv_q,
                send_q=send_q,
                drops=drops,
                process_known=owner.pid is not None,
            )
        )
    out.sort(key=lambda r: (r.proto.rstrip("6"), r.port or 0, r.address, r.proto))
    return out


def is_root() -> bool:
    """True when this process can read every other process's fds."""
    return hasattr(os, "geteuid") and os.geteuid() == 0
