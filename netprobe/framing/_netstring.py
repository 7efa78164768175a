"""Netstrings (``5:hello,``), as D. J. Bernstein specified them. No I/O.

Policy: the length is one or more ASCII digits with no sign, spaces or leading zeros
(``0:,`` is the empty frame; ``05:hello,`` is malformed), then ``:``, the body and ``,``.
The digits are checked as they arrive: once their value passes ``max_frame``, FrameTooLarge is
raised before any body byte, so at most ``len(str(max_frame))`` digits are ever buffered.
"""

from __future__ import annotations

from netprobe.errors import FrameTooLarge, MalformedFrame
from netprobe.framing._base import DEFAULT_MAX_FRAME, BufferedDecoder

__all__ = ["NetstringDecoder", "encode_netstring"]

_COLON = ord(":")
_COMMA = ord(",")
_ZERO = ord("0")
_NINE = ord("9")


def encode_netstring(payload: bytes) -> bytes:
    """Frame a payload as a netstring: ``b"5:hello,"`` for ``b"hello"``."""
    return b"%d:%s," % (len(payload), payload)


class NetstringDecoder(BufferedDecoder):
    """Decoder for netstrings.

    Args:
        max_frame: the largest body accepted.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        super().__init__(max_frame)
        self._digits = 0  # length digits parsed so far
        self._value = 0  # their value
        self._length: int | None = None  # body length once the ':' is seen

    def _maybe_extract(self) -> bytes | None:
        if self._length is None and not self._parse_header():
            return None
        assert self._length is not None
        head = self._digits + 1
        end = head + self._length  # offset of the ','
        if len(self._buf) <= end:
            return None
        if self._buf.byte_at(end) != _COMMA:
            raise MalformedFrame(
                f"netstring of {self._length} bytes ends with "
                f"{self._buf.peek(end, end + 1)!r}, not b','"
            )
        self._buf.skip(head)
        frame = self._buf.extract(self._length)
        self._buf.skip(1)
        self._digits = self._value = 0
        self._length = None
        return frame

    def _parse_header(self) -> bool:
        # Runs over at most len(str(max_frame)) + 1 bytes per frame, so resuming it from
        # self._digits after every feed stays linear.
        while self._digits < len(self._buf):
            byte = self._buf.byte_at(self._digits)
            if byte == _COLON:
                if not self._digits:
                    raise MalformedFrame("netstring length is empty (b':' first)")
                self._length = self._value
                return True
            if not _ZERO <= byte <= _NINE:
                raise MalformedFrame(f"netstring length has a non-digit byte {bytes([byte])!r}")
            if self._digits == 1 and self._value == 0:
                raise MalformedFrame("netstring length has a leading zero")
            self._value = self._value * 10 + byte - _ZERO
            self._digits += 1
            if self._value > self._max_frame:
                raise FrameTooLarge(
                    f"netstring length of at least {self._value} bytes exceeds max_frame "
                    f"{self._max_frame}"
                )
        return False

    def _incomplete_message(self) -> str:
        if self._length is None:
            return f"end of stream inside a netstring length ({len(self._buf)} bytes)"
        return (
            f"end of stream after {len(self._buf) - self._digits - 1} of "
            f"{self._length} netstring bytes and the b','"
        )
