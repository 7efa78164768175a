"""Delimiter-terminated frames (``line``: b"\\n", ``crlf``: b"\\r\\n", or any byte string). No I/O.

Strategy: remember how far the buffer has been searched, so a frame that drips in byte by
byte is scanned once (each search re-reads at most ``len(delimiter) - 1`` old bytes), and
never search past ``max_frame + len(delimiter)``: a delimiter further on could only end an
oversized frame.
"""

from __future__ import annotations

from netprobe.errors import FrameTooLarge
from netprobe.framing._base import DEFAULT_MAX_FRAME, BufferedDecoder

__all__ = ["DelimiterDecoder", "encode_delimited"]


def _check_delimiter(delimiter: bytes) -> None:
    if not delimiter:
        raise ValueError("the delimiter must not be empty")


def encode_delimited(payload: bytes, delimiter: bytes = b"\n") -> bytes:
    """Frame a payload by appending the delimiter.

    Args:
        payload: the frame body.
        delimiter: the terminator (b"\\n" for ``line``, b"\\r\\n" for ``crlf``).

    Returns:
        payload + delimiter.

    Raises:
        ValueError: the delimiter is empty, or the decoder would end the frame early (the
            payload contains the delimiter, or its tail plus the delimiter does, as
            b"a\\n-" + b"\\n-").
    """
    _check_delimiter(delimiter)
    framed = payload + delimiter
    if framed.find(delimiter) != len(payload):
        raise ValueError(f"payload contains the delimiter {delimiter!r}")
    return framed


class DelimiterDecoder(BufferedDecoder):
    """Decoder for frames that end with a delimiter (the frame excludes it).

    Args:
        delimiter: the terminator; default b"\\n" (``line``). Nothing is stripped: with
            ``line``, a frame sent as b"x\\r\\n" decodes to b"x\\r".
        max_frame: the largest frame accepted; once the buffer holds more than that with
            no delimiter that could still end a frame in time, FrameTooLarge is raised.
    """

    def __init__(self, delimiter: bytes = b"\n", max_frame: int = DEFAULT_MAX_FRAME) -> None:
        _check_delimiter(delimiter)
        super().__init__(max_frame)
        self._delimiter = bytes(delimiter)
        self._searched = 0  # no delimiter starts before this offset of the current frame

    @property
    def delimiter(self) -> bytes:
        """The frame terminator."""
        return self._delimiter

    def _maybe_extract(self) -> bytes | None:
        delim = self._delimiter
        size = len(delim)
        have = len(self._buf)
        window = min(have, self._max_frame + size)
        pos = self._buf.find(delim, self._searched, window)
        if pos >= 0:
            frame = self._buf.extract(pos)
            self._buf.skip(size)
            self._searched = 0
            return frame
        self._searched = max(0, window - size + 1)
        if have > self._max_frame and not self._may_end_in_time(have):
            raise FrameTooLarge(
                f"no {delim!r} within max_frame {self._max_frame} bytes (have {have})"
            )
        return None

    def _may_end_in_time(self, have: int) -> bool:
        # Every delimiter position before self._searched is ruled out; one starting at or
        # before max_frame may still be arriving as a partial match at the buffer's end.
        return any(
            self._delimiter.startswith(self._buf.peek(start, have))
            for start in range(self._searched, self._max_frame + 1)
        )

    def _incomplete_message(self) -> str:
        return f"end of stream after {len(self._buf)} bytes without {self._delimiter!r}"
