"""The `listen` engine: accept one peer (or one after another) and copy both ways at once.

Does network I/O through netprobe.sockets only; never prints: the peer's bytes leave through
`emit`, announcements and peer outcomes through `on_event` dicts.

Strategy: listen is one peer at a time with stdin as the other end, so it runs on the socket
core's synchronous pump (poll over the connection and stdin) instead of the asyncio server
core: asyncio cannot watch a regular file or every kind of terminal as stdin, and one
connection needs no event loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from netprobe.engines.send import Emit, InputSource, LineSplitter
from netprobe.errors import LOCAL_IO_ERRNOS, DeadlineExceeded, NetworkError
from netprobe.exitcodes import ExitStatus
from netprobe.sockets import (
    PUMP_CHUNK,
    CountingGate,
    PumpResult,
    ReplyFrom,
    accept_one,
    close_lingering,
    enable_pktinfo,
    errno_name,
    file_identity,
    format_sockaddr,
    open_listener,
    open_udp,
    pump_duplex,
    recv_datagram,
    remove_own_socket_file,
    send_datagram,
    sockaddr_host,
    wait_readable,
)

__all__ = ["ListenOptions", "ListenSummary", "listen"]

OnEvent = Callable[[dict[str, Any]], None]
# A peer still sending when --max-bytes ends its session: read and dropped this long at most
# before the close (see sockets.close_lingering), so that it gets EOF, not an RST.
_LINGER_CAP_S = 1.0
# Peers wait in the kernel's accept queue while one is served: listen(8) held 9, and a burst
# of 10+ clients at once (or arriving during a long session) lost SYNs to ListenOverflows,
# each a 1 s retransmit. 128 is echo's default; the kernel caps it at somaxconn.
_BACKLOG = 128


@dataclass
class ListenOptions:
    """What `netprobe listen` was asked to do."""

    host: str = "127.0.0.1"
    port: int = 0
    family: int = 0
    udp: bool = False
    unix_path: str | None = None
    keep_open: bool = False
    max_bytes: int | None = None
    idle_timeout_s: float | None = None
    source: InputSource | None = None  # stdin, or None when there is nothing to send
    interactive: bool = False  # stdin is a terminal: a peer's EOF ends the connection


@dataclass
class ListenSummary:
    """Totals over every peer; `ended_by` is how the last peer (or the wait) ended."""

    peers: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    ended_by: str | None = None
    # The kinds of ending seen, not one entry per peer: `-k` may serve millions of them.
    outcomes: set[str] = field(default_factory=set)

    def exit_status(self) -> ExitStatus:
        """0 when every peer ended cleanly; 4 after a reset; 3 when nobody came in time."""
        if "reset" in self.outcomes:
            return ExitStatus.RESET
        if self.peers == 0 and self.ended_by == "idle-timeout":
            return ExitStatus.TIMEOUT
        if "error" in self.outcomes:
            return ExitStatus.NOT_OPEN
        return ExitStatus.OK


class _Stdin:
    """stdin shared by successive peers: once it reached EOF, later peers get a FIN at once."""

    def __init__(self, source: InputSource | None) -> None:
        self.source = source
        self.eof = source is None
        self._read = source.chunks(PUMP_CHUNK) if source is not None else None

    @property
    def fd(self) -> int | None:
        if self.source is None or not self.source.pollable:
            return None
        return self.source.fd

    def read(self, n: int) -> tuple[bytes, bool]:
        assert self._read is not None
        data, eof = self._read(n)
        if eof:
            self.eof = True
        return data, eof


def listen(opts: ListenOptions, emit: Emit, on_event: OnEvent) -> ListenSummary:
    """Serve one peer (with keep_open: one after another) until it ends, or a bound is hit.

    Events passed to on_event: {"event": "listening", "proto", "host", "port"} (or "path" for
    Unix) first; then per peer "accept" {peer} and "close" {peer, ended_by, bytes_in,
    bytes_out, duration_ms}, where ended_by is eof, reset, idle-timeout, max-bytes or error;
    "idle" when no peer came within the idle timeout.

    Raises:
        LocalError: the address cannot be bound. ResolveError: host does not resolve.
    """
    if opts.udp:
        return _listen_udp(opts, emit, on_event)
    listener = open_listener(
        None if opts.unix_path else opts.host,
        opts.port,
        backlog=_BACKLOG,
        path=opts.unix_path,
        family=opts.family,
    )
    # As echo's: the socket file goes at exit, if it is still the one bound here.
    socket_file = None if opts.unix_path is None else file_identity(opts.unix_path)
    summary = ListenSummary()
    stdin = _Stdin(opts.source)
    try:
        if opts.unix_path is not None:
            on_event({"event": "listening", "proto": "unix", "path": opts.unix_path})
        else:
            name = listener.getsockname()
            on_event(
                {"event": "listening", "proto": "tcp", "host": sockaddr_host(name), "port": name[1]}
            )
        while True:
            wait = None if opts.idle_timeout_s is None else time.monotonic() + opts.idle_timeout_s
            try:
                conn, peer = accept_one(listener, wait)
            except DeadlineExceeded:
                summary.ended_by = "idle-timeout"
                on_event({"event": "idle", "waited_ms": round((opts.idle_timeout_s or 0) * 1000)})
                return summary
            if not opts.keep_open:
                # One peer only: a listener left open let up to backlog + 1 later clients
                # complete their handshake and send into a queue nobody reads, to be reset at
                # exit. Closed now, they are refused at once, as by `nc -l`.
                listener.close()
            summary.peers += 1
            on_event({"event": "accept", "peer": peer})
            ended = _serve(conn, peer, opts, stdin, emit, on_event, summary)
            summary.ended_by = ended
            summary.outcomes.add(ended)
            if not opts.keep_open or ended == "max-bytes":
                return summary
    finally:
        listener.close()
        if opts.unix_path is not None:
            remove_own_socket_file(opts.unix_path, socket_file)


def _serve(
    conn: Any,
    peer: str,
    opts: ListenOptions,
    stdin: _Stdin,
    emit: Emit,
    on_event: OnEvent,
    summary: ListenSummary,
) -> str:
    start = time.monotonic()
    limit = opts.max_bytes
    before = summary.bytes_in

    def on_received(data: bytes) -> bool:
        if limit is not None and summary.bytes_in + len(data) >= limit:
            emit(data[: limit - summary.bytes_in])
            summary.bytes_in = limit
            return True
        summary.bytes_in += len(data)
        emit(data)
        return False

    # The pump counts what the kernel took as it takes it (a Ctrl-C waits for the count), and
    # the counts stay here when an interrupt ends it.
    pumped = PumpResult()

    def report(ended: str, errno_name: str | None) -> None:
        sent = pumped.bytes_sent
        summary.bytes_out += sent
        event: dict[str, Any] = {
            "event": "close",
            "peer": peer,
            "ended_by": ended,
            # What this peer's bytes gave to stdout: the last read may go past --max-bytes,
            # and those bytes were dropped, as echo's bytes_in counts only what it kept.
            "bytes_in": summary.bytes_in - before,
            "bytes_out": sent,
            "duration_ms": round((time.monotonic() - start) * 1000, 3),
        }
        if errno_name is not None:
            event["errno_name"] = errno_name
        on_event(event)

    try:
        try:
            result = pump_duplex(
                conn,
                read_input=None if stdin.eof else stdin.read,
                input_fd=stdin.fd,
                on_received=on_received,
                idle_timeout_s=opts.idle_timeout_s,
                shutdown_on_input_eof=True,
                stop_on_peer_eof=opts.interactive or stdin.eof,
                idle_while_input=True,
                into=pumped,
            )
        except (KeyboardInterrupt, BrokenPipeError) as exc:
            # Ctrl-C is how an interactive session often ends, and a closed stdout (`| head`)
            # ends it too: the peer's report still comes (as for UDP), then the exit.
            ended = "interrupted" if isinstance(exc, KeyboardInterrupt) else "output-closed"
            summary.ended_by = ended
            report(ended, None)
            raise
        except OSError as exc:
            if exc.errno not in LOCAL_IO_ERRNOS:
                raise
            # stdout failed (a full disk behind `> file`, EIO): the peer's report still comes,
            # then the exit (6) says what broke.
            summary.ended_by = "error"
            report("error", errno_name(exc.errno))
            raise
        ended = "max-bytes" if result.ended_by == "stopped" else result.ended_by
        if ended == "idle-timeout" and result.peer_eof and not result.output_pending:
            # The peer had closed; only our stdin, open and silent, kept the connection until
            # the idle timeout. The peer's side ended as it should: that is what the report
            # says. (With our bytes stuck unsent, a peer that stopped reading, idle-timeout is
            # the truth.)
            ended = "eof"
        # Reported before any linger: its duration is the session's, and a Ctrl-C during the
        # linger finds it made.
        report(ended, result.errno_name)
        if ended == "max-bytes":  # the peer may still be sending
            close_lingering(conn, _LINGER_CAP_S)
    finally:
        conn.close()
    return ended


def _listen_udp(opts: ListenOptions, emit: Emit, on_event: OnEvent) -> ListenSummary:
    """Datagrams from the peer to emit; stdin lines back to it as datagrams.

    Each stdin line (without its newline) is one datagram. The first sender is the peer; without keep_open datagrams from others are ignored, with
    it replies go to whoever sent last. UDP has no EOF: it ends at the idle timeout (nothing
    received and nothing sent for that long, as TCP's pump counts it), max_bytes, or an
    interrupt.
    """
    sock = open_udp(opts.host, opts.port, family=opts.family)
    pktinfo = enable_pktinfo(sock)  # on a wildcard: replies from the address the peer used
    reply_from: ReplyFrom | None = None
    summary = ListenSummary()
    stdin = _Stdin(opts.source)
    splitter = LineSplitter(65507)
    gate = CountingGate()
    peer_addr: Any = None
    last_activity = peer_since = time.monotonic()

    def close(failed: str | None = None) -> ListenSummary:
        # UDP has no connection to end: the run's end closes the exchange with the last peer,
        # reported as TCP reports a peer's end (the byte counts are the whole run's).
        if peer_addr is not None:
            event: dict[str, Any] = {
                "event": "close",
                "peer": format_sockaddr(peer_addr),
                "ended_by": summary.ended_by,
                "bytes_in": summary.bytes_in,
                "bytes_out": summary.bytes_out,
                "duration_ms": round((time.monotonic() - peer_since) * 1000, 3),
            }
            if failed is not None:
                event["errno_name"] = failed
            on_event(event)
        return summary

    try:
        name = sock.getsockname()
        on_event(
            {"event": "listening", "proto": "udp", "host": sockaddr_host(name), "port": name[1]}
        )
        with gate.watching():
            while True:
                watch: list[Any] = [sock]
                stdin_fd = stdin.fd
                if peer_addr is not None and not stdin.eof:
                    if stdin_fd is None:
                        if _send_lines(sock, stdin, splitter, peer_addr, reply_from, summary, gate):
                            last_activity = time.monotonic()
                        continue
                    watch.append(stdin_fd)
                until = None
                if opts.idle_timeout_s is not None:
                    until = last_activity + opts.idle_timeout_s
                ready = wait_readable(watch, until)
                if not ready:
                    summary.ended_by = "idle-timeout"
                    if summary.peers == 0:
                        on_event(
                            {"event": "idle", "waited_ms": round((opts.idle_timeout_s or 0) * 1000)}
                        )
                    return close()
                if (
                    stdin_fd is not None
                    and stdin_fd in ready
                    and _send_lines(sock, stdin, splitter, peer_addr, reply_from, summary, gate)
                ):
                    # Idle is as TCP's pump counts it: nothing moved either way. Counting only
                    # the peer's datagrams ended the run while stdin still fed it replies.
                    last_activity = time.monotonic()
                if sock.fileno() not in ready:
                    continue
                try:
                    data, addr, to = recv_datagram(sock, None, with_reply_from=pktinfo)
                except NetworkError:
                    continue  # an ICMP error for an earlier reply: the peer went away
                if peer_addr is None or (opts.keep_open and addr != peer_addr):
                    peer_addr, reply_from = addr, to
                    peer_since = time.monotonic()
                    summary.peers += 1
                    on_event({"event": "peer", "peer": format_sockaddr(addr)})
                elif addr != peer_addr:
                    continue
                last_activity = time.monotonic()
                if opts.max_bytes is not None and summary.bytes_in + len(data) >= opts.max_bytes:
                    emit(data[: opts.max_bytes - summary.bytes_in])
                    summary.bytes_in = opts.max_bytes
                    summary.ended_by = "max-bytes"
                    return close()
                summary.bytes_in += len(data)
                emit(data)
                last_activity = time.monotonic()  # a blocked stdout is not the peer being idle
    except (KeyboardInterrupt, BrokenPipeError) as exc:
        # Ctrl-C is how a UDP listen usually ends (or a closed stdout): the report still
        # comes, then the exit.
        summary.ended_by = "interrupted" if isinstance(exc, KeyboardInterrupt) else "output-closed"
        close()
        raise
    except OSError as exc:
        if exc.errno not in LOCAL_IO_ERRNOS:
            raise
        summary.ended_by = "error"  # stdout failed: reported as over TCP, then exit 6
        close(errno_name(exc.errno))
        raise
    finally:
        sock.close()


def _send_lines(
    sock: Any,
    stdin: _Stdin,
    splitter: LineSplitter,
    peer: Any,
    reply_from: ReplyFrom | None,
    summary: ListenSummary,
    gate: CountingGate,
) -> bool:
    """Send the whole lines stdin has now; True when that was activity for the idle clock.

    Activity, as in TCP's pump: a datagram sent, or the end of stdin (TCP's FIN; a peer that
    answers only then gets the whole idle time from it). A partial line is not: nothing left.
    """
    data, eof = stdin.read(PUMP_CHUNK)
    sent = False
    for line in splitter.feed(data, eof):
        with gate:  # a signal between the send and its count lost a datagram from bytes_out
            summary.bytes_out += send_datagram(sock, line, peer, reply_from)
        sent = True
    return sent or eof
