"""Loopback fixtures and hypothesis profiles shared by every test."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from netprobe.sockets import fill_accept_queue, signal_wake_fd
from tests.helpers import LONG, ServerThread

# No timing checks (hypothesis's per-example deadline of 200 ms, its too_slow health check):
# the suite times nothing, and a loaded machine made examples of a pure codec take 330-470 ms
# once (DeadlineExceeded, FlakyFailure).
settings.register_profile(
    "dev", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "ci",
    max_examples=300,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


HAS_IPV6 = _has_ipv6()

# A shell starts a background job (`cmd &`) with SIGINT ignored, and every child inherits that
# (Python then installs no Ctrl-C handler): the tests that press Ctrl-C on a netprobe process
# would wait on a child that cannot hear it. Those tests are about netprobe, not the job control
# of whoever ran pytest, so the suite gives SIGINT its normal handler back.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# The socket core's signal wake-up pipe lives as long as the process does (made by the first
# wait in the main thread); made here, it is already in every test's count of this process's fds.
signal_wake_fd()

_STOP_SIGNALS = [signal.SIGINT, signal.SIGTERM, *[getattr(signal, "SIGUSR1", signal.SIGTERM)]]


@pytest.fixture(autouse=True)
def _signal_dispositions() -> Iterator[None]:
    """Each test starts and ends with this process's signal handlers as they were.

    A server run in-process through the CLI (`invoke(["echo", ...])`) leaves SIGINT, SIGTERM
    and SIGUSR1 ignored, as the real process needs while it exits; here the process goes on,
    and every later subprocess would inherit SIGINT ignored (a child's Ctrl-C test then hangs).
    """
    saved = {sig: signal.getsignal(sig) for sig in _STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)


@pytest.fixture
def server() -> Iterator[ServerThread]:
    """A TCP listener on 127.0.0.1 that accepts and closes each connection."""
    srv = ServerThread()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port that is certainly closed: bound but not listening (nobody else can take it)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


@pytest.fixture
def full_queue_port() -> Iterator[int]:
    """A listener with listen(0) that never accepts, its queue already full: connects hang."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    clients = fill_accept_queue(listener, deadline=time.monotonic() + LONG)
    try:
        yield listener.getsockname()[1]
    finally:
        for client in clients:
            client.close()
        listener.close()
