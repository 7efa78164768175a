"""Length-prefixed frames: a big-endian unsigned header of 1, 2, 4 or 8 bytes. No I/O.

The header is checked against ``max_frame`` as soon as it is complete, so a hostile
"1 GB follows" header is refused before a single body byte is buffered.
"""

from __future__ import annotations

from netprobe.errors import FrameTooLarge
from netprobe.framing._base import DEFAULT_MAX_FRAME, BufferedDecoder

__all__ = ["LENGTH_WIDTHS", "LengthPrefixDecoder", "encode_length_prefixed"]

LENGTH_WIDTHS = (1, 2, 4, 8)


def _check_width(width: int) -> None:
    if width not in LENGTH_WIDTHS:
        raise ValueError(f"length prefix width must be one of {LENGTH_WIDTHS}, not {width}")


def encode_length_prefixed(payload: bytes, width: int = 4) -> bytes:
    """Frame a payload behind a big-endian length header of ``width`` bytes.

    Args:
        payload: the frame body.
        width: header size in bytes (1, 2, 4 or 8).

    Returns:
        header + payload.

    Raises:
        ValueError: a bad width, or a payload longer than the header can express.
    """
    _check_width(width)
    if len(payload) >= 1 << (8 * width):
        raise ValueError(f"a {len(payload)}-byte payload does not fit a {width}-byte length prefix")
    return len(payload).to_bytes(width, "big") + payload


class LengthPrefixDecoder(BufferedDecoder):
    """Decoder for frames behind a big-endian unsigned length header.

    Args:
        width: header size in bytes (1, 2, 4 or 8; len8 is 1, len64 is 8).
        max_frame: the largest body accepted; a header announcing more raises FrameTooLarge.
    """

    def __init__(self, width: int = 4, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        _check_width(width)
        super().__init__(max_frame)
        self._width = width
        self._length: int | None = None  # body length once the header is complete

    @property
    def width(self) -> int:
        """Header size in bytes."""
        return self._width

    def _maybe_extract(self) -> bytes | None:
        if self._length is None:
            if len(self._buf) < self._width:
                return None
            length = self._buf.read_uint(self._width)
            if length > self._max_frame:
                raise FrameTooLarge(
                    f"length header announces {length} bytes; max_frame is {self._max_frame}"
                )
            self._length = length
        if len(self._buf) < self._width + self._length:
            return None
        self._buf.skip(self._width)
        frame = self._buf.extract(self._length)
        self._length = None
        return frame

    def _incomplete_message(self) -> str:
        have = len(self._buf)
        if self._length is None:
            return f"end of stream inside a {self._width}-byte length header ({have} bytes)"
        return f"end of stream after {have - self._width} of {self._length} frame bytes"
