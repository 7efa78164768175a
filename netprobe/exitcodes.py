"""The suite's exit codes and the pure functions that choose one. No I/O."""

from __future__ import annotations

from collections.abc import Iterable
from enum import IntEnum, unique

from netprobe.errors import (
    DeadlineExceeded,
    LocalError,
    NetprobeError,
    NetworkError,
    PeerResetError,
    ResolveError,
    UsageError,
)
from netprobe.results import ConnectState

__all__ = ["SEVERITY", "ExitStatus", "exit_status_for_error", "exit_status_for_state", "worst"]


@unique
class ExitStatus(IntEnum):
    """Every exit code netprobe uses (README's table lists the same; a test checks it).

    A command chained with `--wait ... -- COMMAND` passes on that command's own code."""

    OK = 0
    NOT_OPEN = 1  # the target answered "no": closed, refused, expectation not met
    USAGE = 2  # bad input (Click's own code for usage errors)
    TIMEOUT = 3  # no answer in time: filtered, connect or read timeout
    RESET = 4  # reset by peer
    RESOLVE = 5  # name resolution failed
    LOCAL = 6  # bind failed, fd or port exhaustion, permission
    INTERNAL = 70  # a bug: unexpected exception (EX_SOFTWARE)
    WAIT_DEADLINE = 124  # wait mode gave up (as wait-for-it and timeout(1) do)
    INTERRUPTED = 130  # 128 + SIGINT
    OUTPUT_CLOSED = 141  # 128 + SIGPIPE: the reader left before the verdict was known
    TERMINATED = 143  # 128 + SIGTERM: listen and send, stopped after their report


# What each code means in a word or two: the root --help lists them all (a test checks that
# every code is here); each command's --help says which of them it uses.
SHORT_MEANING: dict[ExitStatus, str] = {
    ExitStatus.OK: "OK",
    ExitStatus.NOT_OPEN: "not open",
    ExitStatus.USAGE: "bad input",
    ExitStatus.TIMEOUT: "timeout",
    ExitStatus.RESET: "reset",
    ExitStatus.RESOLVE: "resolve",
    ExitStatus.LOCAL: "local error",
    ExitStatus.INTERNAL: "internal error",
    ExitStatus.WAIT_DEADLINE: "wait deadline",
    ExitStatus.INTERRUPTED: "Ctrl-C",
    ExitStatus.OUTPUT_CLOSED: "output closed",
    ExitStatus.TERMINATED: "SIGTERM",
}


# Worst first: a run with many results exits with the first of these that occurred.
SEVERITY: tuple[ExitStatus, ...] = (
    ExitStatus.INTERNAL,
    ExitStatus.LOCAL,
    ExitStatus.RESOLVE,
    ExitStatus.NOT_OPEN,
    ExitStatus.RESET,
    ExitStatus.TIMEOUT,
    ExitStatus.OK,
)
_RANK = {status: rank for rank, status in enumerate(SEVERITY)}


def worst(statuses: Iterable[ExitStatus]) -> ExitStatus:
    """Return the most severe status (OK for an empty iterable).

    Statuses outside SEVERITY (USAGE, WAIT_DEADLINE, INTERRUPTED) end a run on their own and
    win over everything when present.
    """
    best_rank = len(SEVERITY) - 1
    for status in statuses:
        rank = _RANK.get(status)
        if rank is None:
            return status
        best_rank = min(best_rank, rank)
    return SEVERITY[best_rank]


def exit_status_for_error(exc: BaseException) -> ExitStatus:
    """Map an exception that ended a command to its exit status."""
    if isinstance(exc, KeyboardInterrupt):
        return ExitStatus.INTERRUPTED
    if isinstance(exc, UsageError):
        return ExitStatus.USAGE
    if isinstance(exc, LocalError):
        return ExitStatus.LOCAL
    if isinstance(exc, ResolveError):
        return ExitStatus.RESOLVE
    if isinstance(exc, PeerResetError):
        return ExitStatus.RESET
    if isinstance(exc, DeadlineExceeded):
        return ExitStatus.TIMEOUT
    if isinstance(exc, NetworkError):
        return ExitStatus.NOT_OPEN
    if isinstance(exc, NetprobeError):
        return ExitStatus.NOT_OPEN
    return ExitStatus.INTERNAL


_STATE_STATUS = {
    ConnectState.OPEN: ExitStatus.OK,
    ConnectState.REFUSED: ExitStatus.NOT_OPEN,
    ConnectState.UNREACHABLE: ExitStatus.NOT_OPEN,
    ConnectState.TIMEOUT: ExitStatus.TIMEOUT,
    ConnectState.RESET: ExitStatus.RESET,
    ConnectState.RESOLVE: ExitStatus.RESOLVE,
    ConnectState.ERROR: ExitStatus.LOCAL,
}


def exit_status_for_state(state: ConnectState) -> ExitStatus:
    """The exit status a single connect outcome stands for."""
    return _STATE_STATUS[state]
