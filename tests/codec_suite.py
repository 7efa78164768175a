"""Generic properties every framing codec must satisfy (trio's check_* idea, h11's helpers).

``CODECS`` lists every codec the product ships plus extra delimiters; each ``prop_*`` takes a
``Codec`` and hypothesis' ``st.data()``. ``check_codec(codec)`` runs them all, so a new codec
gets the whole suite in one line. ``feed_and_drain`` is the model caller: feed a chunk, take
every complete frame, and check the memory bound after each step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netprobe.errors import FrameTooLarge, FramingError, IncompleteFrame
from netprobe.framing import (
    DEFAULT_MAX_FRAME,
    FRAMING_NAMES,
    NEED_DATA,
    Decoder,
    DelimiterDecoder,
    encode_delimited,
    parse_framing,
)
from tests.strategies import chunkings, frame_lists, garbage, max_frames, payloads

__all__ = [
    "CODECS",
    "PROPERTIES",
    "Codec",
    "check_codec",
    "feed_and_drain",
    "feed_byte_at_a_time",
]


@dataclass(frozen=True)
class Codec:
    """A codec under test: how to make its decoder, encode, and what it can carry.

    Attributes:
        name: for test ids (the framing name, or ``delim=...``).
        make: max_frame -> fresh decoder.
        encode: payload -> wire bytes.
        kind: "raw", "delimiter", "length" or "netstring".
        delimiter: the terminator (delimiter codecs).
        width: the header size (length codecs).
    """

    name: str
    make: Callable[[int], Decoder]
    encode: Callable[[bytes], bytes]
    kind: str
    delimiter: bytes = b""
    width: int = 0

    def overhead(self, max_frame: int) -> int:
        """Bytes beyond max_frame a decoder may hold at rest (header, partial delimiter)."""
        if self.kind == "delimiter":
            return len(self.delimiter) - 1
        if self.kind == "length":
            return self.width
        if self.kind == "netstring":
            return len(str(max_frame)) + 1
        return 0

    def clean(self, payload: bytes) -> bytes:
        """Make a payload this codec can carry (raw cannot carry an empty one)."""
        if self.kind == "delimiter":
            try:
                self.encode(payload)
            except ValueError:
                payload = payload.replace(self.delimiter[:1], b"")
        elif self.kind == "length":
            payload = payload[: (1 << (8 * self.width)) - 1]
        elif self.kind == "raw":
            payload = payload or b"r"
        return payload

    def sized(self, payload: bytes, size: int) -> bytes:
        """A carriable payload of exactly ``size`` bytes, built from ``payload``."""
        filler = b"a" if self.delimiter[:1] != b"a" else b"b"
        base = self.clean(payload)[:size]
        if self.kind == "delimiter":
            base = base.replace(self.delimiter[:1], filler)
        return base + filler * (size - len(base))

    def stream(self, frames: Iterable[bytes]) -> bytes:
        return b"".join(self.encode(frame) for frame in frames)

    def expected(self, frames: list[bytes], chunks: list[bytes]) -> list[bytes]:
        """What a decoder must return for ``frames`` sent as ``chunks``."""
        if self.kind == "raw":
            return [chunk for chunk in chunks if chunk]
        return frames


def _spec_codec(name: str) -> Codec:
    spec = parse_framing(name)
    if name in ("line", "crlf"):
        return Codec(
            name, spec.decoder, spec.encode, "delimiter", b"\n" if name == "line" else b"\r\n"
        )
    if name.startswith("len"):
        return Codec(name, spec.decoder, spec.encode, "length", width=int(name[3:]) // 8)
    return Codec(name, spec.decoder, spec.encode, name)


def _delimiter_codec(delimiter: bytes) -> Codec:
    def make(max_frame: int) -> Decoder:
        return DelimiterDecoder(delimiter, max_frame)

    def encode(payload: bytes) -> bytes:
        return encode_delimited(payload, delimiter)

    return Codec(f"delim={delimiter!r}", make, encode, "delimiter", delimiter)


CODECS: tuple[Codec, ...] = (
    *(_spec_codec(name) for name in FRAMING_NAMES),
    _delimiter_codec(b"\x00"),
    _delimiter_codec(b"--END--"),
)


def feed_and_drain(
    codec: Codec, decoder: Decoder, chunks: Iterable[bytes], *, eof: bool = False
) -> list[bytes]:
    """Feed each chunk (an empty one only polls), taking every frame after each step.

    Checks the memory bound throughout: a feed adds exactly the chunk, and once drained the
    decoder holds at most max_frame plus the codec's fixed overhead.
    """
    out: list[bytes] = []
    bound = decoder.max_frame + codec.overhead(decoder.max_frame)
    for chunk in chunks:
        before = decoder.buffered
        if chunk:
            decoder.feed(chunk)
        assert decoder.buffered == before + len(chunk)
        out.extend(decoder.frames())
        assert decoder.buffered <= bound
    if eof:
        decoder.feed(b"")
        out.extend(decoder.frames())
    return out


def feed_byte_at_a_time(decoder: Decoder, data: bytes) -> list[bytes]:
    """h11's slow drip: every frame must appear exactly when its last byte arrives."""
    out: list[bytes] = []
    for i in range(len(data)):
        decoder.feed(data[i : i + 1])
        out.extend(decoder.frames())
    return out


def _frames(codec: Codec, data: st.DataObject) -> list[bytes]:
    return [codec.clean(p) for p in data.draw(frame_lists, label="frames")]


def prop_any_chunking(codec: Codec, data: st.DataObject) -> None:
    """(a) Any chunking of the encoded stream decodes to the original frames; EOF is clean."""
    frames = _frames(codec, data)
    chunks = data.draw(chunkings(codec.stream(frames)), label="chunks")
    decoder = codec.make(DEFAULT_MAX_FRAME)
    assert feed_and_drain(codec, decoder, chunks, eof=True) == codec.expected(frames, chunks)
    assert decoder.next_frame() is NEED_DATA
    assert decoder.trailing_data == (b"", True)


def prop_all_at_once(codec: Codec, data: st.DataObject) -> None:
    """(b) A chunked feed gives the same result as feeding the whole stream at once."""
    frames = _frames(codec, data)
    stream = codec.stream(frames)
    chunks = data.draw(chunkings(stream), label="chunks")
    chunked = feed_and_drain(codec, codec.make(DEFAULT_MAX_FRAME), chunks, eof=True)
    whole = feed_and_drain(codec, codec.make(DEFAULT_MAX_FRAME), [stream], eof=True)
    if codec.kind == "raw":
        assert b"".join(chunked) == b"".join(whole) == stream
    else:
        assert chunked == whole == frames


def prop_strict_prefix(codec: Codec, data: st.DataObject) -> None:
    """(c, d, f) A strict prefix of a frame: NEED_DATA, no partial frame, exact trailing
    data; then EOF raises IncompleteFrame, or is clean when the prefix is empty."""
    frames = _frames(codec, data)
    last = codec.encode(codec.clean(data.draw(payloads, label="last")))
    cut = data.draw(st.integers(0, len(last) - 1), label="cut")
    chunks = data.draw(chunkings(codec.stream(frames) + last[:cut]), label="chunks")
    decoder = codec.make(DEFAULT_MAX_FRAME)
    got = feed_and_drain(codec, decoder, chunks)
    if codec.kind == "raw":
        # Raw has no partial frames: every chunk is whole, EOF is always clean.
        assert b"".join(got) == codec.stream(frames) + last[:cut]
        decoder.feed(b"")
        assert decoder.next_frame() is NEED_DATA
        return
    assert got == frames
    assert decoder.next_frame() is NEED_DATA
    assert decoder.next_frame() is NEED_DATA
    assert decoder.trailing_data == (last[:cut], False)
    decoder.feed(b"")
    if cut:
        with pytest.raises(IncompleteFrame):
            decoder.next_frame()
        assert decoder.trailing_data == (last[:cut], True)
    else:
        assert decoder.next_frame() is NEED_DATA
        assert decoder.next_frame() is NEED_DATA


def prop_empty_chunk_is_eof(codec: Codec, data: st.DataObject) -> None:
    """An empty chunk really fed is EOF: clean on a frame boundary, IncompleteFrame inside a
    frame, and more data afterwards is refused with ValueError."""
    frames = _frames(codec, data)
    stream = codec.stream(frames)
    chunks = data.draw(chunkings(stream), label="chunks")
    if b"" not in chunks:
        chunks.append(b"")
    fed = b"".join(chunks[: chunks.index(b"")])
    rest = b"".join(chunks[chunks.index(b"") :])
    decoder = codec.make(DEFAULT_MAX_FRAME)
    for chunk in chunks[: chunks.index(b"")]:
        decoder.feed(chunk)
    decoder.feed(b"")
    boundaries = {0}
    offset = 0
    for frame in frames:
        offset += len(codec.encode(frame))
        boundaries.add(offset)
    if codec.kind == "raw" or len(fed) in boundaries:
        list(decoder.frames())
        assert decoder.next_frame() is NEED_DATA
    else:
        with pytest.raises(IncompleteFrame):
            list(decoder.frames())
    if rest:
        with pytest.raises(ValueError, match="after EOF"):
            decoder.feed(rest)


def prop_max_frame(codec: Codec, data: st.DataObject) -> None:
    """(e) A frame of exactly max_frame passes; one byte more raises FrameTooLarge as soon as
    that is knowable: after the length header or netstring digits, before the body."""
    limit = (1 << (8 * codec.width)) - 2 if codec.kind == "length" else 320
    cap = min(data.draw(max_frames, label="max_frame"), limit)
    seed = data.draw(payloads, label="seed")
    if cap or codec.kind != "raw":  # raw cannot send an empty frame
        at_cap = codec.sized(seed, cap)
        chunks = data.draw(chunkings(codec.encode(at_cap)), label="chunks")
        got = feed_and_drain(codec, codec.make(cap), chunks, eof=True)
        assert got == codec.expected([at_cap], chunks)
    wire = codec.encode(codec.sized(seed, cap + 1))
    decoder = codec.make(cap)
    # Byte by byte, so the test sees exactly when the error comes (raw: one whole chunk).
    step = len(wire) if codec.kind == "raw" else 1
    for fed in range(step, len(wire) + 1, step):
        decoder.feed(wire[fed - step : fed])
        try:
            assert decoder.next_frame() is NEED_DATA
        except FrameTooLarge:
            break
    else:
        pytest.fail("FrameTooLarge never raised")
    assert decoder.buffered <= cap + codec.overhead(cap) + 1
    if codec.kind == "length":
        assert fed == codec.width
    elif codec.kind == "netstring":
        assert fed == len(str(cap + 1))
    elif codec.kind == "delimiter":
        assert cap < fed <= cap + len(codec.delimiter)
    with pytest.raises(FrameTooLarge):  # the error is sticky
        decoder.next_frame()


def prop_garbage(codec: Codec, data: st.DataObject) -> None:
    """Arbitrary bytes, any max_frame, any chunking: frames or FramingError, nothing else,
    and the memory bound holds until the error."""
    junk = data.draw(garbage(), label="garbage")
    decoder = codec.make(data.draw(max_frames, label="max_frame"))
    chunks = data.draw(chunkings(junk), label="chunks")
    try:
        feed_and_drain(codec, decoder, chunks, eof=data.draw(st.booleans(), label="eof"))
    except FramingError as exc:
        with pytest.raises(type(exc)):
            decoder.next_frame()


PROPERTIES: tuple[Callable[[Codec, st.DataObject], None], ...] = (
    prop_any_chunking,
    prop_all_at_once,
    prop_strict_prefix,
    prop_empty_chunk_is_eof,
    prop_max_frame,
    prop_garbage,
)


def check_codec(codec: Codec, max_examples: int | None = None) -> None:
    """Run every property against one codec (for codecs added outside this suite)."""
    for prop in PROPERTIES:
        _run_property(codec, prop, max_examples or settings().max_examples)


def _run_property(
    codec: Codec, prop: Callable[[Codec, st.DataObject], None], max_examples: int
) -> None:
    @settings(max_examples=max_examples)
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        prop(codec, data)

    run()
