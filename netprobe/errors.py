"""The one exception tree of netprobe. No I/O.

Network outcomes (refused, timed out, reset) are normally *data* in result objects; these
exceptions carry the cases that end a command: bad input, a local resource failure, or a
framing violation where the user asked for strict framing.
"""

from __future__ import annotations

import errno

__all__ = [
    "LOCAL_IO_ERRNOS",
    "OUT_OF_FDS_ERRNOS",
    "AddressError",
    "ConnectError",
    "DeadlineExceeded",
    "FrameTooLarge",
    "FramingError",
    "IncompleteFrame",
    "LocalError",
    "MalformedFrame",
    "NetprobeError",
    "NetworkError",
    "PeerClosedError",
    "PeerResetError",
    "ResolveError",
    "UsageError",
    "from_an_interrupt",
]


# Local I/O failures: a full disk or quota behind stdout (or any file), a failing device, a
# terminal that hung up. This host's failure (exit 6), not a bug and not the network's.
LOCAL_IO_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG})
# Out of file descriptors (this process's limit, or the system's): a file or socket that could
# not be opened, never an empty answer.
OUT_OF_FDS_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE})


class NetprobeError(Exception):
    """Base of every error netprobe raises on purpose."""


class UsageError(NetprobeError):
    """Bad user input: the message names the value and why it is wrong (exit 2)."""


class AddressError(UsageError):
    """A target, port spec, CIDR block or socket path that cannot be parsed."""


class LocalError(NetprobeError):
    """This host refused: bind failed, fd or port exhaustion, permission (exit 6)."""

    def __init__(self, message: str, errno_name: str | None = None) -> None:
        super().__init__(message)
        self.errno_name = errno_name


class NetworkError(NetprobeError):
    """A socket operation failed because of the network or the peer.

    Attributes:
        op: the operation ("connect", "send", "recv", ...).
        errno: the OS error number, or None when the failure has none.
        errno_name: symbolic name ("ECONNREFUSED", "EAI_NONAME", ...).
    """

    def __init__(
        self, op: str, errno: int | None, errno_name: str | None, detail: str = ""
    ) -> None:
        self.op = op
        self.errno = errno
        self.errno_name = errno_name
        text = f"{op}: {errno_name or 'error'}"
        super().__init__(f"{text}: {detail}" if detail else text)


class ConnectError(NetworkError):
    """connect() failed (refused, unreachable, ...)."""


class ResolveError(NetworkError):
    """getaddrinfo() failed; errno_name is the EAI_* name (exit 5)."""


class PeerResetError(NetworkError):
    """The peer aborted the connection (ECONNRESET, or EPIPE after its RST)."""


class PeerClosedError(NetworkError):
    """The peer closed (EOF) before the bytes we needed arrived."""


class DeadlineExceeded(NetprobeError):
    """The caller's deadline passed before the operation finished (exit 3)."""

    def __init__(self, op: str) -> None:
        super().__init__(f"{op}: timed out")
        self.op = op


class FramingError(NetprobeError):
    """Bytes from the peer violate the framing (the peer's fault, not the caller's)."""


class FrameTooLarge(FramingError):
    """A frame is longer than the decoder's max_frame; raised before it is buffered."""


class IncompleteFrame(FramingError):
    """End of stream in the middle of a frame."""


class MalformedFrame(FramingError):
    """Bytes that are not a valid frame for this codec (e.g. a bad netstring)."""


def from_an_interrupt(exc: BaseException) -> bool:
    """Whether `exc` is a Ctrl-C: a KeyboardInterrupt, or an error raised while Python was
    handling one. A KeyboardInterrupt that lands inside threading's Condition.wait (a
    Thread.start, a queue's get) between its lock's release and its try leaves that lock
    released, and the `with` around the wait then fails with "RuntimeError: release unlocked
    lock", the interrupt as its context: the run was interrupted, it did not fail."""
    seen: BaseException | None = exc
    for _ in range(8):  # a context chain is short; a cycle must not hang the exit
        if seen is None:
            return False
        if isinstance(seen, KeyboardInterrupt):
            return True
        seen = seen.__context__
    return False
