"""The receive buffer every framing decoder parses from. No I/O.

Strategy (h11's receive buffer): a bytearray plus ``_start``, the offset of the first byte not
yet consumed. Extracting a frame only moves ``_start``; the consumed prefix is dropped in
``append`` once it is at least as long as what is still live, so every byte is copied a
bounded number of times (linear time), and the consumed slack never outweighs the live bytes.
Decoders keep their own "searched up to here" offsets relative to ``_start``, so a slow drip
of bytes is never rescanned from the beginning.
"""

from __future__ import annotations

__all__ = ["ReceiveBuffer"]


class ReceiveBuffer:
    """Unconsumed input bytes; every position argument is relative to the first live byte."""

    __slots__ = ("_data", "_start")

    def __init__(self) -> None:
        self._data = bytearray()
        self._start = 0

    def __len__(self) -> int:
        return len(self._data) - self._start

    def append(self, data: bytes) -> None:
        if self._start and self._start >= len(self):
            # The copy made here (the live bytes) is no longer than what was consumed since
            # the last compaction, which keeps the total copying linear in the input.
            del self._data[: self._start]
            self._start = 0
        self._data += data

    def find(self, needle: bytes, start: int, end: int) -> int:
        pos = self._data.find(needle, self._start + start, self._start + end)
        return pos - self._start if pos >= 0 else -1

    def byte_at(self, index: int) -> int:
        return self._data[self._start + index]

    def peek(self, start: int, end: int) -> bytes:
        return bytes(self._data[self._start + start : self._start + end])

    def read_uint(self, width: int) -> int:
        return int.from_bytes(self._data[self._start : self._start + width], "big")

    def extract(self, count: int) -> bytes:
        begin = self._start
        # One copy of the frame (a bytearray slice would add a second one).
        with memoryview(self._data) as view:
            out = bytes(view[begin : begin + count])
        self.skip(count)
        return out

    def skip(self, count: int) -> None:
        self._start += count
        if self._start == len(self._data):
            # Everything consumed: dropping it is free, so do it now.
            self._data.clear()
            self._start = 0

    def contents(self) -> bytes:
        return self.peek(0, len(self))
