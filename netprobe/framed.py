"""Where a framing codec meets a socket: read frames from and send frames to a connected
stream socket. Does socket I/O only through netprobe.sockets (recv_some, send_all).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from netprobe.sockets import recv_some, send_all

if TYPE_CHECKING:
    import socket  # noqa: TID251 - annotations only; every socket call goes through sockets.py

    from netprobe.framing import Decoder, FramingSpec

__all__ = ["DEFAULT_CHUNK", "read_frames", "send_frame"]

# 64 KiB per recv(): the Linux loopback MTU, and large enough that a bulk transfer is not
# dominated by per-call overhead. Also the "one chunk" in the decoders' memory bound.
DEFAULT_CHUNK = 65536


def read_frames(
    sock: socket.socket, decoder: Decoder, deadline: float | None, chunk: int = DEFAULT_CHUNK
) -> Iterator[bytes]:
    """Yield frames as they arrive until the peer closes cleanly on a frame boundary.

    Frames already complete in the decoder come out before the next ``recv``, so a caller
    that stops iterating after the frame it wanted never waits for more bytes.

    Args:
        sock: a connected stream socket.
        decoder: a fresh decoder (e.g. ``parse_framing("len32").decoder()``).
        deadline: absolute ``time.monotonic()`` time for the whole iteration, or None.
        chunk: the most bytes asked of one ``recv``.

    Yields:
        Each frame's payload.

    Raises:
        FrameTooLarge, MalformedFrame: the peer broke the framing.
        IncompleteFrame: the peer closed in the middle of a frame.
        DeadlineExceeded, PeerResetError, NetworkError: from the socket.
    """
    while True:
        yield from decoder.frames()
        data = recv_some(sock, chunk, deadline)
        decoder.feed(data)
        if not data:
            # EOF: hand out what is left; a partial frame raises IncompleteFrame here.
            yield from decoder.frames()
            return


def send_frame(
    sock: socket.socket, spec: FramingSpec, payload: bytes, deadline: float | None
) -> int:
    """Encode one payload with ``spec`` and send all of it before ``deadline``.

    Returns:
        The number of bytes put on the wire (framing included).

    Raises:
        ValueError: the framing cannot carry this payload.
        DeadlineExceeded, PeerResetError, NetworkError: from the socket.
    """
    return send_all(sock, spec.encode(payload), deadline)
