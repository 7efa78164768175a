"""The decoder protocol, the NEED_DATA sentinel and the shared decoder state machine. No I/O.

Plan: a decoder only buffers in ``feed``; all parsing and every error happen in
``next_frame``, which asks the codec's ``_maybe_extract`` for one frame. The first
FramingError is sticky: the stream cannot be resynchronised, so the decoder stays broken.
"""

from __future__ import annotations

from collections.abc import Iterator
from enum import Enum
from typing import Final, Protocol

from netprobe.errors import FramingError, IncompleteFrame
from netprobe.framing._buffer import ReceiveBuffer

__all__ = [
    "DEFAULT_MAX_FRAME",
    "NEED_DATA",
    "BufferedDecoder",
    "Decoder",
    "DecoderBase",
    "NeedData",
]

# 16 MiB: far above any frame a probe sends, small enough that a hostile length header
# cannot make us allocate much.
DEFAULT_MAX_FRAME: Final = 16 * 1024 * 1024


class NeedData(Enum):
    """The "no complete frame yet" answer of ``next_frame`` (never confused with ``b""``)."""

    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA


class Decoder(Protocol):
    """What every framing decoder provides (sans-IO: the caller moves the bytes)."""

    @property
    def max_frame(self) -> int:
        """The largest frame (payload bytes) this decoder accepts."""
        ...

    @property
    def buffered(self) -> int:
        """How many received bytes the decoder holds right now (for memory checks)."""
        ...

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        """The bytes not yet returned as frames, and whether EOF has been fed."""
        ...

    def feed(self, data: bytes) -> None:
        """Hand received bytes to the decoder; ``b""`` means end of stream."""
        ...

    def next_frame(self) -> bytes | NeedData:
        """Return the next complete frame, or ``NEED_DATA``."""
        ...

    def frames(self) -> Iterator[bytes]:
        """Yield every complete frame available now."""
        ...


class DecoderBase:
    """Feed/EOF/error bookkeeping shared by all codecs; subclasses parse."""

    def __init__(self, max_frame: int) -> None:
        if max_frame < 0:
            raise ValueError(f"max_frame must be >= 0, not {max_frame}")
        self._max_frame = max_frame
        self._eof = False
        self._error: FramingError | None = None

    @property
    def max_frame(self) -> int:
        """The largest frame (payload bytes) this decoder accepts."""
        return self._max_frame

    @property
    def buffered(self) -> int:
        """How many received bytes the decoder holds right now.

        After ``next_frame`` has returned ``NEED_DATA``, this is at most ``max_frame`` plus the
        codec's fixed overhead (a length header, a partial delimiter, netstring digits); a
        following ``feed(chunk)`` adds ``len(chunk)``.
        """
        return self._pending()

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        """The bytes not yet returned as frames, and whether EOF has been fed.

        Returns:
            ``(unconsumed_bytes, eof_seen)``: after the last whole frame has been taken, the
            bytes are exactly the suffix of the stream that follows it.
        """
        return self._unconsumed(), self._eof

    def feed(self, data: bytes) -> None:
        """Hand received bytes to the decoder.

        ``b""`` means end of stream (EOF), so the result of ``recv()`` can be passed straight
        in; feeding ``b""`` again is harmless. Nothing is parsed here: errors come from
        ``next_frame``. After a FramingError the decoder is dead and drops further input.

        Args:
            data: the bytes received, or ``b""`` at EOF.

        Raises:
            ValueError: non-empty data after EOF.
        """
        if self._eof:
            if data:
                raise ValueError("feed() after EOF")
            return
        if not data:
            self._eof = True
        elif self._error is None:
            self._store(data)

    def next_frame(self) -> bytes | NeedData:
        """Return the next complete frame, or ``NEED_DATA`` if more bytes are needed.

        An empty frame ``b""`` is a valid frame; test the result with ``is NEED_DATA``.
        After EOF with nothing left over it returns ``NEED_DATA`` forever.

        Returns:
            The payload of the next frame (framing removed), or ``NEED_DATA``.

        Raises:
            FrameTooLarge: the next frame is longer than ``max_frame`` (raised as soon as
                that is known, before its body is buffered).
            MalformedFrame: the bytes are not valid for this codec.
            IncompleteFrame: EOF was fed in the middle of a frame.
        """
        if self._error is not None:
            raise _untraced(self._error)
        try:
            frame = self._maybe_extract()
            if frame is not None:
                return frame
            if self._eof and self._pending():
                raise IncompleteFrame(self._incomplete_message())
        except FramingError as exc:
            # Kept as a copy without a traceback: the one raised refers to this frame, so to
            # self, and that cycle held the buffer (up to max_frame) until the cyclic GC ran.
            self._error = _untraced(exc)
            raise
        return NEED_DATA

    def frames(self) -> Iterator[bytes]:
        """Yield every complete frame available now (stops at ``NEED_DATA``).

        Raises:
            FramingError: as ``next_frame``.
        """
        while True:
            frame = self.next_frame()
            if frame is NEED_DATA:
                return
            yield frame

    # Hooks for the codecs.
    def _store(self, data: bytes) -> None:
        raise NotImplementedError  # pragma: no cover

    def _pending(self) -> int:
        raise NotImplementedError  # pragma: no cover

    def _unconsumed(self) -> bytes:
        raise NotImplementedError  # pragma: no cover

    def _maybe_extract(self) -> bytes | None:
        raise NotImplementedError  # pragma: no cover

    def _incomplete_message(self) -> str:
        raise NotImplementedError  # pragma: no cover


class BufferedDecoder(DecoderBase):
    """A decoder that parses frames out of one ReceiveBuffer."""

    def __init__(self, max_frame: int) -> None:
        super().__init__(max_frame)
        self._buf = ReceiveBuffer()

    def _store(self, data: bytes) -> None:
        self._buf.append(data)

    def _pending(self) -> int:
        return len(self._buf)

    def _unconsumed(self) -> bytes:
        return self._buf.contents()


def _untraced(exc: FramingError) -> FramingError:
    """A copy of `exc` without traceback, cause or context (to keep, or to raise again)."""
    return type(exc)(*exc.args)
