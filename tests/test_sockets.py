"""The socket core on real loopback sockets: errno names, connect outcomes, streams, limits."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from netprobe.connector import ConnectJob, run_connects
from netprobe.errors import (
    DeadlineExceeded,
    LocalError,
    PeerClosedError,
    PeerResetError,
    ResolveError,
    UsageError,
)
from netprobe.results import ConnectState
from netprobe.sockets import (
    CountingGate,
    PumpResult,
    Resolved,
    WakePipe,
    abort_connection,
    accept_one,
    classify_errno,
    connect_nonblocking,
    errno_name,
    file_identity,
    fill_accept_queue,
    format_sockaddr,
    half_close,
    open_listener,
    parse_target,
    pump_duplex,
    raise_nofile_limit,
    recv_exactly,
    recv_some,
    remove_own_socket_file,
    resolve,
    send_all,
    sleep,
    sockaddr_host,
    udp_probe_many,
    unix_sockaddr,
    wait_readable,
)
from tests.conftest import HAS_IPV6
from tests.helpers import LONG, SHORT, ServerThread


def test_errno_names() -> None:
    assert errno_name(errno.ECONNREFUSED) == "ECONNREFUSED"
    assert errno_name(10061) == "ECONNREFUSED"  # Windows WSAECONNREFUSED
    assert errno_name(10060) == "ETIMEDOUT"
    assert errno_name(None) is None
    assert errno_name(99999) == "E99999"


@pytest.mark.parametrize(
    ("code", "state"),
    [
        (0, ConnectState.OPEN),
        (errno.EISCONN, ConnectState.OPEN),
        (errno.ECONNREFUSED, ConnectState.REFUSED),
        (errno.ETIMEDOUT, ConnectState.TIMEOUT),
        (errno.EHOSTUNREACH, ConnectState.UNREACHABLE),
        (errno.ENETUNREACH, ConnectState.UNREACHABLE),
        (errno.ECONNRESET, ConnectState.RESET),
        (errno.EADDRNOTAVAIL, ConnectState.ERROR),
        (None, ConnectState.ERROR),  # an errno-less OSError is no proof of an open port
    ],
)
def test_classify_errno(code: int | None, state: ConnectState) -> None:
    assert classify_errno(code) is state


def test_resolve_literal_and_name() -> None:
    assert resolve("127.0.0.1", 80) == [Resolved(socket.AF_INET, ("127.0.0.1", 80))]
    names = resolve("localhost", 80, family=socket.AF_INET)
    assert names
    assert all(r.family == socket.AF_INET for r in names)
    with pytest.raises(ResolveError) as info:
        resolve("no-such-host.invalid", 80)
    assert info.value.errno_name in {"EAI_NONAME", "EAI_AGAIN", "EAI_FAIL", "EAI_NODATA"}
    with pytest.raises(ResolveError, match="not an IPv6"):
        resolve("127.0.0.1", 80, family=socket.AF_INET6)


def test_connect_open_refused_timeout(
    server: ServerThread, closed_port: int, full_queue_port: int
) -> None:
    deadline = time.monotonic() + LONG
    target = Resolved(socket.AF_INET, ("127.0.0.1", server.port))
    opened = connect_nonblocking(target, deadline=deadline)
    assert (opened.state, opened.errno_name) == (ConnectState.OPEN, None)
    refused = connect_nonblocking(
        Resolved(socket.AF_INET, ("127.0.0.1", closed_port)), deadline=deadline
    )
    assert (refused.state, refused.errno_name) == (ConnectState.REFUSED, "ECONNREFUSED")
    start = time.monotonic()
    hung = connect_nonblocking(
        Resolved(socket.AF_INET, ("127.0.0.1", full_queue_port)), deadline=start + 0.3
    )
    assert hung.state is ConnectState.TIMEOUT
    assert 0.25 <= hung.elapsed_s < LONG


@pytest.mark.skipif(not HAS_IPV6, reason="no IPv6 loopback on this host")
def test_connect_ipv6() -> None:
    srv = ServerThread(family=socket.AF_INET6, host="::1")
    try:
        outcome = connect_nonblocking(resolve("::1", srv.port)[0], deadline=time.monotonic() + LONG)
        assert outcome.state is ConnectState.OPEN
    finally:
        srv.stop()


def test_stream_helpers_and_abort() -> None:
    listener = open_listener("127.0.0.1", 0, backlog=4)
    port = listener.getsockname()[1]
    try:
        outcome = connect_nonblocking(
            Resolved(socket.AF_INET, ("127.0.0.1", port)),
            deadline=time.monotonic() + LONG,
            keep=True,
        )
        client = outcome.sock
        assert client is not None
        peer, _ = listener.accept()
        with client, peer:
            deadline = time.monotonic() + LONG
            assert send_all(client, b"x" * 100_000, deadline) == 100_000
            assert len(recv_exactly(peer, 100_000, deadline)) == 100_000
            with pytest.raises(DeadlineExceeded):
                recv_some(peer, 10, time.monotonic() + SHORT)
            half_close(client)
            assert recv_some(peer, 10, deadline) == b""
            with pytest.raises(PeerClosedError, match="after 0 of 5"):
                recv_exactly(peer, 5, deadline)
            send_all(peer, b"reply", deadline)
            assert recv_exactly(client, 5, deadline) == b"reply"  # half-closed side still reads
            abort_connection(peer)
            with pytest.raises(PeerResetError) as info:
                recv_some(client, 10, deadline)
            assert info.value.errno_name == "ECONNRESET"
    finally:
        listener.close()


def test_abort_sets_linger_zero() -> None:
    sock = socket.socket()
    from netprobe.sockets import set_linger_zero

    set_linger_zero(sock)
    assert struct.unpack("ii", sock.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8)) == (1, 0)
    sock.close()


def test_open_listener_in_use_is_local_error() -> None:
    first = open_listener("127.0.0.1", 0)
    try:
        port = first.getsockname()[1]
        with pytest.raises(LocalError, match="EADDRINUSE"):
            open_listener("127.0.0.1", port)
    finally:
        first.close()


def test_unix_listener_replaces_only_stale_files(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "s.sock")
    first = open_listener(None, path=path)
    with pytest.raises(LocalError, match="a live socket is bound to it"):
        open_listener(None, path=path)
    first.close()  # the file stays behind: stale now
    second = open_listener(None, path=path)
    second.close()
    with open(os.path.join(tmp_path, "plain"), "w"):
        pass
    with pytest.raises(LocalError, match="not a socket"):
        open_listener(None, path=os.path.join(tmp_path, "plain"))


def test_raise_nofile_limit_never_above_hard() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = raise_nofile_limit(soft)
    assert limit.soft == soft
    assert limit.raised_from is None
    if hard != resource.RLIM_INFINITY:
        assert (raise_nofile_limit(hard * 10).soft or 0) <= hard


def test_resolve_rejects_malformed_names_as_bad_input() -> None:
    from netprobe.errors import AddressError

    with pytest.raises(AddressError, match="not a valid host name"):
        resolve("a..b", 80)


def test_full_unix_queue_is_eagain_not_open(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "full.sock")
    listener = open_listener(None, path=path, backlog=1)
    clients = fill_accept_queue(listener, deadline=time.monotonic() + LONG)
    try:
        assert len(clients) == 2  # listen(1) holds backlog + 1
        outcome = connect_nonblocking(
            Resolved(socket.AF_UNIX, path),  # type: ignore[arg-type]
            deadline=time.monotonic() + LONG,
        )
        assert (outcome.state, outcome.errno_name) == (ConnectState.ERROR, "EAGAIN")
        assert outcome.sock is None
    finally:
        for client in clients:
            client.close()
        listener.close()


def test_link_local_addresses_keep_their_zone() -> None:
    lo = socket.if_nametoindex("lo") if hasattr(socket, "if_nametoindex") else 0
    if not lo:
        pytest.skip("no interface named lo")
    assert Resolved(socket.AF_INET6, ("fe80::1", 22, 0, lo)).host == "fe80::1%lo"
    assert Resolved(socket.AF_INET6, ("::1", 22, 0, 0)).host == "::1"


def test_port_check_keeps_one_link_local_address_per_interface() -> None:
    from netprobe.engines.port_check import Expect, TargetSpec, build_hosts

    def resolver(host: str, family: int) -> list[Resolved]:
        address, _, zone = host.partition("%")
        return [Resolved(socket.AF_INET6, (address, 0, 0, int(zone)))]

    # The scope ids stand for two interfaces: fe80::1 on each is a different peer. (Built,
    # not parsed: parsing refuses a zone that names no interface, and a test's namespace
    # has one, lo.)
    specs = [
        TargetSpec("[fe80::1%1]:22", "fe80::1%1", (22,), None),
        TargetSpec("[fe80::1%2]:22=closed", "fe80::1%2", (22,), Expect.CLOSED),
    ]
    hosts = build_hosts(specs, ports=None, family=0, expect=Expect.OPEN, resolver=resolver)
    assert len(hosts) == 2
    assert hosts[0].address != hosts[1].address


def test_errno_name_knows_getaddrinfo_codes() -> None:
    # An asyncio connect resolves a name itself and fails with a gaierror: its negative code
    # must read as EAI_*, not "E-3".
    assert errno_name(socket.EAI_AGAIN) == "EAI_AGAIN"
    assert errno_name(socket.EAI_NONAME) == "EAI_NONAME"


@pytest.mark.skipif(not hasattr(socket, "TCP_INFO"), reason="Linux TCP_INFO")
def test_send_queue_bytes_counts_data_and_not_our_fin() -> None:
    # SIOCOUTQ is write_seq - snd_una: a FIN sent and not yet acknowledged adds one. Before,
    # an abort after a half-close counted that as a dropped byte: bytes_out one short.
    from netprobe.sockets import send_queue_bytes

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        with socket.create_connection(listener.getsockname(), timeout=LONG) as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            server, _ = listener.accept()
            with server:
                server.setblocking(False)
                sent = 0
                with contextlib.suppress(BlockingIOError):
                    while True:  # until the kernel holds what the client does not read
                        sent += server.send(b"x" * 65536)
                before = send_queue_bytes(server)
                assert before is not None
                assert 0 < before <= sent
                server.shutdown(socket.SHUT_WR)  # the FIN waits behind the unread data
                assert send_queue_bytes(server) == before
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix:
        assert send_queue_bytes(unix) is None  # AF_UNIX counts buffer memory, not bytes


# --- Ctrl-C and the counts (CountingGate) ------------------------------------------------------


class _SignalAfterTheCall(socket.socket):
    """A real socket whose recv()/send() is followed at once by a signal to this process.

    The signal's handler runs at the next bytecode, between the system call and the count of
    its result: the one place a Ctrl-C used to drop a chunk from the report.
    """

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data = super().recv(bufsize, flags)
        os.kill(os.getpid(), signal.SIGINT)
        return data

    def send(self, data: Any, flags: int = 0) -> int:
        sent = super().send(data, flags)
        os.kill(os.getpid(), signal.SIGINT)
        return sent


def _signalling_pair() -> tuple[_SignalAfterTheCall, socket.socket]:
    ours, peer = socket.socketpair()
    return _SignalAfterTheCall(ours.family, ours.type, fileno=ours.detach()), peer


def test_ctrl_c_right_after_a_recv_still_counts_the_chunk() -> None:
    ours, peer = _signalling_pair()
    got: list[bytes] = []

    def take(data: bytes) -> bool:
        got.append(data)
        return False

    with ours, peer:
        peer.sendall(b"x" * 1000)
        counts = PumpResult()
        with pytest.raises(KeyboardInterrupt):
            pump_duplex(ours, read_input=None, input_fd=None, on_received=take, into=counts)
        # Counted; then the signal acts, before the hand-over (which may wait on a stuck
        # stdout, where a supervisor's single SIGTERM must not wait).
        assert counts.bytes_received == 1000
        assert got == []
        assert counts.first_byte_at is not None


def test_ctrl_c_right_after_a_send_still_counts_the_bytes() -> None:
    ours, peer = _signalling_pair()
    sent: list[bytes] = []
    with ours, peer:
        counts = PumpResult()
        with pytest.raises(KeyboardInterrupt):
            pump_duplex(
                ours,
                read_input=lambda _n: (b"y" * 500, False),
                input_fd=None,
                on_received=lambda _data: False,
                on_sent=lambda chunk: sent.append(bytes(chunk)),
                into=counts,
            )
        assert peer.recv(4096) == b"y" * 500  # the kernel took them ...
        assert counts.bytes_sent == 500  # ... and the report says so


def _write_all(fd: int, data: bytes) -> None:
    os.write(fd, data)


def test_a_transcript_write_that_waits_does_not_hold_ctrl_c() -> None:
    # on_sent (a --transcript) writes to a pipe nobody reads. Inside the held block, each
    # Ctrl-C was kept and the write retried: only SIGKILL ended `send --transcript FIFO`.
    ours, peer = socket.socketpair()
    r, w = os.pipe()
    os.set_blocking(w, False)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(w, b"z" * 65536)
    os.set_blocking(w, True)
    main = threading.get_ident()
    interrupted = threading.Event()
    # The signal, then (a bounded test) the pipe drained after 3 s, which unblocks a held one.
    threading.Timer(0.3, signal.pthread_kill, (main, signal.SIGINT)).start()

    def drain_later() -> None:
        if not interrupted.wait(3.0):
            with contextlib.suppress(OSError):
                while os.read(r, 65536):
                    pass

    drainer = threading.Thread(target=drain_later)
    drainer.start()
    started = time.monotonic()
    try:
        with ours, peer, pytest.raises(KeyboardInterrupt):
            pump_duplex(
                ours,
                read_input=lambda _n: (b"y" * 100, False),
                input_fd=None,
                on_received=lambda _data: False,
                on_sent=lambda chunk: _write_all(w, bytes(chunk)),
            )
        waited = time.monotonic() - started
    finally:
        interrupted.set()
        os.close(w)
        drainer.join(LONG)
        os.close(r)
    assert waited < 2.0


def test_the_gate_holds_a_signal_to_the_end_of_its_block_and_only_there() -> None:
    gate = CountingGate()
    before = signal.getsignal(signal.SIGINT)
    steps: list[str] = []

    def counting() -> None:
        with gate:
            os.kill(os.getpid(), signal.SIGINT)
            steps.append("counted")  # runs: the signal waits for the block's end

    def not_counting() -> None:
        os.kill(os.getpid(), signal.SIGINT)  # outside a block: at once, as always
        steps.append("never")

    with gate.watching():
        with pytest.raises(KeyboardInterrupt):
            counting()
        assert steps == ["counted"]
        with pytest.raises(KeyboardInterrupt):
            not_counting()
        # A default disposition is not taken over (SIGTERM kills, as without the gate).
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert steps == ["counted"]
    assert signal.getsignal(signal.SIGINT) is before


def test_sigterm_then_ctrl_c_in_one_block_is_still_sigterm() -> None:
    gate = CountingGate()
    seen: list[int] = []

    def as_interrupt(signum: int, _frame: object) -> None:
        seen.append(signum)
        raise KeyboardInterrupt

    def both() -> None:
        with gate:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)

    previous = signal.signal(signal.SIGTERM, as_interrupt)
    try:
        with gate.watching(), pytest.raises(KeyboardInterrupt):
            both()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen == [signal.SIGTERM]  # exits 143 (terminated), not 130


def _ctrl_c_the_poll_misses(after_s: float) -> threading.Thread:
    """A Ctrl-C whose C-level handler runs while the main thread already sleeps in poll(2).

    That is the race a single process meets when the signal lands after the last bytecode
    before poll(): the flag is set, the poll is not interrupted. Here the main thread blocks
    SIGINT and another thread takes it, which leaves the main thread in exactly that state."""

    def press() -> None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        time.sleep(after_s)  # the main thread is in its poll by then (or the fd is ready first)
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)

    return threading.Thread(target=press)


def _wait_in_pump(deadline: float) -> None:
    ours, peer = socket.socketpair()
    with ours, peer:  # the peer never sends nor closes: only the deadline ends the pump
        pump_duplex(
            ours,
            read_input=None,
            input_fd=None,
            on_received=lambda _data: False,
            shutdown_on_input_eof=False,
            deadline=deadline,
        )


def _wait_in_wait_readable(deadline: float) -> None:
    ours, peer = socket.socketpair()
    with ours, peer:
        wait_readable([ours], deadline)


def _wait_in_accept(deadline: float) -> None:
    with open_listener("127.0.0.1", 0) as listener:
        accept_one(listener, deadline)


def _wait_in_sleep(deadline: float) -> None:
    sleep(deadline - time.monotonic())


def _wait_in_udp_probe(deadline: float) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # bound, never answers
        silent.bind(("127.0.0.1", 0))
        (target,) = resolve("127.0.0.1", silent.getsockname()[1], family=socket.AF_INET)
        list(udp_probe_many([(None, target)], b"?", timeout_s=deadline - time.monotonic()))


def _ends_at_the_ctrl_c_the_poll_misses(wait: Callable[[float], None]) -> None:
    # Before: the wait slept until its deadline (with none, forever: `send` in CI ignored its
    # single SIGINT, about one run in 700), and only then was the KeyboardInterrupt raised.
    presser = _ctrl_c_the_poll_misses(0.2)
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    started = time.monotonic()
    try:
        presser.start()
        with pytest.raises(KeyboardInterrupt):
            wait(started + 6 * LONG)
    finally:
        presser.join(LONG)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    assert time.monotonic() - started < LONG  # woken by the signal, not by the deadline


@pytest.mark.parametrize(
    "wait",
    [_wait_in_pump, _wait_in_wait_readable, _wait_in_accept, _wait_in_sleep, _wait_in_udp_probe],
    ids=lambda f: f.__name__,
)
def test_a_ctrl_c_that_lands_just_before_the_poll_still_ends_the_wait(
    wait: Callable[[float], None],
) -> None:
    _ends_at_the_ctrl_c_the_poll_misses(wait)


def test_a_ctrl_c_just_before_the_connectors_epoll_still_ends_its_wait(
    full_queue_port: int,
) -> None:
    # Before: a connect that hangs (a full accept queue) held the signal until its timeout.
    def connect_until(deadline: float) -> None:
        job = ConnectJob(None, socket.AF_INET, ("127.0.0.1", full_queue_port))
        list(run_connects([job], concurrency=1, timeout_s=deadline - time.monotonic()))

    _ends_at_the_ctrl_c_the_poll_misses(connect_until)


def test_a_wake_pipe_ends_a_wait_from_another_thread_and_is_mute_once_closed() -> None:
    handed: list[int] = []
    pipe = WakePipe()
    try:
        started = time.monotonic()
        pipe.wait(handed.__len__, started + 0.05)  # nothing handed over: the deadline
        assert time.monotonic() - started >= 0.05

        def hand_over() -> None:
            handed.append(1)
            pipe.wake()

        worker = threading.Timer(0.05, hand_over)
        worker.start()
        started = time.monotonic()
        pipe.wait(handed.__len__, started + 6 * LONG)
        assert handed
        assert time.monotonic() - started < LONG  # woken, not timed out
        worker.join(LONG)
        # A wake-up nobody waits for writes nothing: the next wait sleeps to its deadline.
        pipe.wake()
        started = time.monotonic()
        pipe.wait(lambda: False, started + 0.05)
        assert time.monotonic() - started >= 0.05
    finally:
        pipe.close()
    # A worker that wakes after the close must not write to whatever file took its number.
    old_write_end = pipe._write_end
    read_end, write_end = os.pipe()
    try:
        assert old_write_end in (read_end, write_end)  # the number was taken again
        pipe._waiting = True  # as if a waiter were in wait(): wake() would write
        pipe.wake()
        pipe.close()
        os.set_blocking(read_end, False)
        with pytest.raises(BlockingIOError):
            os.read(read_end, 1)
    finally:
        os.close(read_end)
        os.close(write_end)


def test_the_gate_leaves_signals_alone_outside_the_main_thread() -> None:
    gate = CountingGate()
    seen: list[object] = []

    def look() -> None:
        with gate.watching():
            seen.append(gate._previous)

    worker = threading.Thread(target=look)
    worker.start()
    worker.join(LONG)
    assert seen == [{}]


def test_sockaddrs_are_shown_as_users_give_them() -> None:
    lo = socket.if_nametoindex("lo") if hasattr(socket, "if_nametoindex") else 0
    if lo:
        assert format_sockaddr(("fe80::1", 22, 0, lo)) == "[fe80::1%lo]:22"
        assert sockaddr_host(("fe80::1", 22, 0, lo)) == "fe80::1%lo"
    assert format_sockaddr(("::1", 22, 0, 0)) == "[::1]:22"
    assert format_sockaddr(("127.0.0.1", 22)) == "127.0.0.1:22"
    assert format_sockaddr("/run/app.sock") == "unix:/run/app.sock"
    assert format_sockaddr(b"\0app") == "unix:@app"  # abstract: what Python returns
    assert format_sockaddr("") == "unix"  # a client that bound no name
    assert unix_sockaddr("@app") == "\0app"
    assert unix_sockaddr("./@app") == "./@app"


def test_an_abstract_name_is_bad_input_where_there_are_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    with pytest.raises(UsageError, match="only Linux has"):
        parse_target("unix:@app")
    parse_target("unix:./@app")  # a file whose name starts with @


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract names: Linux")
def test_an_abstract_socket_needs_a_name() -> None:
    with pytest.raises(UsageError, match="needs a name after the @"):
        parse_target("unix:@")


def test_an_abstract_name_is_no_file_to_look_at_or_remove(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "@app").write_text("not a socket of ours")
    assert file_identity("@app") is None
    remove_own_socket_file("@app", file_identity("./@app"))
    assert (tmp_path / "@app").exists()
