"""Raw "framing": every chunk handed to ``feed`` is one frame. No I/O."""

from __future__ import annotations

from collections import deque

from netprobe.errors import FrameTooLarge
from netprobe.framing._base import DEFAULT_MAX_FRAME, DecoderBase

__all__ = ["RawDecoder", "encode_raw"]


def encode_raw(payload: bytes) -> bytes:
    """Return the payload unchanged (raw framing adds nothing and keeps no boundaries).

    An empty payload encodes to ``b""``, which puts nothing on the wire.
    """
    return bytes(payload)


class RawDecoder(DecoderBase):
    """Each non-empty fed chunk comes back as one frame; EOF is always clean.

    A chunk longer than ``max_frame`` raises FrameTooLarge when it is reached.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        super().__init__(max_frame)
        self._chunks: deque[bytes] = deque()
        self._size = 0

    def _store(self, data: bytes) -> None:
        self._chunks.append(bytes(data))
        self._size += len(data)

    def _pending(self) -> int:
        return self._size

    def _unconsumed(self) -> bytes:
        return b"".join(self._chunks)

    def _maybe_extract(self) -> bytes | None:
        if not self._chunks:
            return None
        if len(self._chunks[0]) > self._max_frame:
            raise FrameTooLarge(
                f"raw chunk of {len(self._chunks[0])} bytes exceeds max_frame {self._max_frame}"
            )
        chunk = self._chunks.popleft()
        self._size -= len(chunk)
        return chunk

    def _incomplete_message(self) -> str:  # pragma: no cover - every raw chunk is whole
        raise AssertionError("raw frames are never incomplete")
