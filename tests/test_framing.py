"""Deterministic companions of the property suite (h11 style), error texts, API misuse, and
the structural linear-time check. Pure: no sockets."""

from __future__ import annotations

import pytest

from netprobe.errors import FrameTooLarge, IncompleteFrame, MalformedFrame, UsageError
from netprobe.framing import (
    DEFAULT_MAX_FRAME,
    FRAMING_NAMES,
    NEED_DATA,
    DelimiterDecoder,
    FramingSpec,
    LengthPrefixDecoder,
    NetstringDecoder,
    RawDecoder,
    encode_delimited,
    encode_length_prefixed,
    encode_netstring,
    parse_framing,
)
from netprobe.framing._buffer import ReceiveBuffer
from tests.codec_suite import CODECS, Codec, feed_byte_at_a_time

FRAMES = [b"hello", b"", b"a\rb", b"x" * 200, b"5:,", b"\x00\x01"]


def _frames_for(codec: Codec) -> list[bytes]:
    return [codec.clean(frame) for frame in FRAMES]


@pytest.mark.parametrize("codec", [c for c in CODECS if c.kind != "raw"], ids=lambda c: c.name)
def test_byte_at_a_time(codec: Codec) -> None:
    decoder = codec.make(DEFAULT_MAX_FRAME)
    for frame in _frames_for(codec):
        wire = codec.encode(frame)
        # NEED_DATA until the very last byte of the frame, then exactly the frame.
        assert feed_byte_at_a_time(decoder, wire[:-1]) == []
        decoder.feed(wire[-1:])
        assert decoder.next_frame() == frame
        assert decoder.next_frame() is NEED_DATA
    decoder.feed(b"")
    assert decoder.next_frame() is NEED_DATA


@pytest.mark.parametrize("codec", [c for c in CODECS if c.kind != "raw"], ids=lambda c: c.name)
def test_trailing_junk_stays_untouched(codec: Codec) -> None:
    frames = _frames_for(codec)
    junk = codec.encode(b"partial frame")[:-1]
    decoder = codec.make(DEFAULT_MAX_FRAME)
    decoder.feed(b"".join(codec.encode(f) for f in frames) + junk)
    assert list(decoder.frames()) == frames
    assert decoder.trailing_data == (junk, False)
    decoder.feed(b"")
    assert decoder.trailing_data == (junk, True)
    with pytest.raises(IncompleteFrame, match="end of stream"):
        decoder.next_frame()


def test_raw_chunks_are_frames() -> None:
    decoder = RawDecoder()
    decoder.feed(b"ab")
    decoder.feed(b"c")
    assert decoder.buffered == 3
    assert decoder.trailing_data == (b"abc", False)
    assert list(decoder.frames()) == [b"ab", b"c"]
    decoder.feed(b"")
    assert decoder.next_frame() is NEED_DATA
    assert parse_framing("raw").encode(b"xy") == b"xy"


def test_raw_chunk_over_max_frame() -> None:
    decoder = RawDecoder(max_frame=2)
    decoder.feed(b"abc")
    with pytest.raises(FrameTooLarge, match="raw chunk of 3 bytes"):
        decoder.next_frame()
    assert decoder.trailing_data == (b"abc", False)


@pytest.mark.parametrize(
    ("wire", "error", "match"),
    [
        (b"05:hello,", MalformedFrame, "leading zero"),
        (b"00:,", MalformedFrame, "leading zero"),
        (b":,", MalformedFrame, "empty"),
        (b"x:", MalformedFrame, "non-digit"),
        (b"-1:", MalformedFrame, "non-digit"),
        (b"+5:hello,", MalformedFrame, "non-digit"),
        (b" 5:hello,", MalformedFrame, "non-digit"),
        (b"5 :hello,", MalformedFrame, "non-digit"),
        (b"5:hello!", MalformedFrame, "ends with b'!'"),
        (b"5:hello", IncompleteFrame, "0 of|5 of"),
        (b"12", IncompleteFrame, "inside a netstring length"),
        (b"100:", FrameTooLarge, "at least 100"),
        (b"99999999999999999999999999:", FrameTooLarge, "exceeds max_frame 99"),
    ],
)
def test_netstring_bad_input(wire: bytes, error: type[Exception], match: str) -> None:
    decoder = NetstringDecoder(max_frame=99)
    decoder.feed(wire)
    decoder.feed(b"")
    with pytest.raises(error, match=match):
        decoder.next_frame()


def test_netstring_values() -> None:
    assert encode_netstring(b"hello") == b"5:hello,"
    assert encode_netstring(b"") == b"0:,"
    decoder = NetstringDecoder()
    decoder.feed(b"0:,5:hello,10:0123456789,")
    assert list(decoder.frames()) == [b"", b"hello", b"0123456789"]


def test_netstring_oversized_length_is_refused_at_the_digit() -> None:
    decoder = NetstringDecoder(max_frame=DEFAULT_MAX_FRAME)
    decoder.feed(b"1677721")
    assert decoder.next_frame() is NEED_DATA
    decoder.feed(b"7")  # 16777217 = 16 MiB + 1: refused before ':' and any body byte
    with pytest.raises(FrameTooLarge):
        decoder.next_frame()


def test_length_prefix_headers() -> None:
    assert encode_length_prefixed(b"hi", 2) == b"\x00\x02hi"
    assert parse_framing("len64").encode(b"") == bytes(8)
    decoder = LengthPrefixDecoder(width=8)
    assert decoder.width == 8
    decoder.feed((1 << 30).to_bytes(8, "big"))  # "1 GiB follows"
    with pytest.raises(FrameTooLarge, match="announces 1073741824 bytes"):
        decoder.next_frame()


@pytest.mark.parametrize(
    ("wire", "match"),
    [(b"\x00\x00", "inside a 4-byte length header"), (b"\x00\x00\x00\x05abc", "after 3 of 5")],
)
def test_length_prefix_incomplete(wire: bytes, match: str) -> None:
    decoder = LengthPrefixDecoder(4)
    decoder.feed(wire)
    decoder.feed(b"")
    with pytest.raises(IncompleteFrame, match=match):
        decoder.next_frame()


def test_line_keeps_carriage_return_and_crlf_strips_it() -> None:
    line = parse_framing("line").decoder()
    crlf = parse_framing("crlf").decoder()
    for decoder in (line, crlf):
        decoder.feed(b"one\r\ntwo\r\n")
    assert list(line.frames()) == [b"one\r", b"two\r"]
    assert list(crlf.frames()) == [b"one", b"two"]


def test_delimiter_partial_match_at_the_cap_is_not_too_large() -> None:
    # 8 body bytes, then "--EN": the delimiter may still start at offset 8 (<= max_frame 10).
    decoder = DelimiterDecoder(b"--END--", max_frame=10)
    assert decoder.delimiter == b"--END--"
    decoder.feed(b"aaaaaaaa--EN")
    assert decoder.next_frame() is NEED_DATA
    decoder.feed(b"D--")
    assert decoder.next_frame() == b"aaaaaaaa"


def test_delimiter_over_the_cap_without_a_possible_end() -> None:
    decoder = DelimiterDecoder(b"\r\n", max_frame=4)
    decoder.feed(b"abcd\r")  # a frame of exactly 4 may still end here
    assert decoder.next_frame() is NEED_DATA
    decoder.feed(b"x")
    with pytest.raises(FrameTooLarge, match="within max_frame 4"):
        decoder.next_frame()


def test_delimiter_found_past_the_cap_in_one_chunk() -> None:
    decoder = DelimiterDecoder(b"\n", max_frame=3)
    decoder.feed(b"abcdef\n")
    with pytest.raises(FrameTooLarge):
        decoder.next_frame()


def test_delimited_encoder_refuses_what_would_end_early() -> None:
    with pytest.raises(ValueError, match="contains the delimiter"):
        encode_delimited(b"a\nb")
    with pytest.raises(ValueError, match="contains the delimiter"):
        parse_framing("crlf").encode(b"a\r\nb")
    # The tail of the payload plus the delimiter would hold an earlier delimiter.
    with pytest.raises(ValueError, match="contains the delimiter"):
        encode_delimited(b"x--END-", b"--END--")
    assert encode_delimited(b"a\r", b"\r\n") == b"a\r\r\n"


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: encode_length_prefixed(b"x" * 256, 1), "does not fit a 1-byte"),
        (lambda: encode_length_prefixed(b"", 3), "width must be one of"),
        (lambda: LengthPrefixDecoder(5), "width must be one of"),
        (lambda: DelimiterDecoder(b""), "must not be empty"),
        (lambda: encode_delimited(b"x", b""), "must not be empty"),
        (lambda: RawDecoder(-1), "max_frame must be >= 0"),
        (lambda: FramingSpec("len7"), "unknown framing"),
    ],
)
def test_misuse_is_a_value_error(call: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()  # type: ignore[operator]


def test_feed_after_eof() -> None:
    decoder = LengthPrefixDecoder(1)
    decoder.feed(b"\x01a")
    decoder.feed(b"")
    decoder.feed(b"")  # a second EOF is harmless
    with pytest.raises(ValueError, match="after EOF"):
        decoder.feed(b"more")
    assert decoder.next_frame() == b"a"
    assert decoder.next_frame() is NEED_DATA


def test_errors_are_sticky_and_later_input_is_dropped() -> None:
    decoder = NetstringDecoder()
    decoder.feed(b"x")
    with pytest.raises(MalformedFrame):
        decoder.next_frame()
    decoder.feed(b"0:,")
    assert decoder.trailing_data == (b"x", False)
    with pytest.raises(MalformedFrame):
        decoder.next_frame()


def test_parse_framing() -> None:
    assert FRAMING_NAMES == ("raw", "line", "crlf", "len8", "len16", "len32", "len64", "netstring")
    for name in FRAMING_NAMES:
        spec = parse_framing(name)
        assert spec == FramingSpec(name)
        assert spec.decoder(max_frame=7).max_frame == 7
    with pytest.raises(UsageError) as info:
        parse_framing("len7")
    assert str(info.value) == (
        "--framing 'len7' is not a framing "
        "(choose raw, line, crlf, len8, len16, len32, len64, netstring)"
    )
    # An empty value is named too (the line read "echo:  is not a framing").
    with pytest.raises(UsageError, match=r"^--framing '' is not a framing"):
        parse_framing("")


def test_receive_buffer_compacts_once_consumed_outweighs_live() -> None:
    buf = ReceiveBuffer()
    buf.append(b"abcdef")
    buf.skip(2)
    buf.append(b"g")  # consumed 2 < live 4: no compaction yet
    assert buf.contents() == b"cdefg"
    buf.skip(3)
    buf.append(b"h")  # consumed 5 >= live 2: compacted
    assert buf.contents() == b"fgh"
    assert buf.find(b"h", 0, 3) == 2
    assert buf.find(b"z", 0, 3) == -1
    assert buf.extract(3) == b"fgh"
    assert len(buf) == 0


def test_delimiter_search_is_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    # Structural check instead of timing: count the bytes find() is asked to scan while a
    # 20,000-byte line drips in byte by byte. A rescan from the start would be ~2e8.
    scanned = 0
    original = ReceiveBuffer.find

    def counting_find(self: ReceiveBuffer, needle: bytes, start: int, end: int) -> int:
        nonlocal scanned
        scanned += max(0, end - start)
        return original(self, needle, start, end)

    monkeypatch.setattr(ReceiveBuffer, "find", counting_find)
    decoder = DelimiterDecoder(b"--END--")
    size = 20_000
    assert feed_byte_at_a_time(decoder, b"a" * size + b"--END--") == [b"a" * size]
    assert scanned <= 7 * (size + 7)


@pytest.mark.parametrize("codec", [c for c in CODECS if c.kind != "raw"], ids=lambda c: c.name)
@pytest.mark.parametrize("fault", ["incomplete", "too-large"])
def test_a_decoder_that_failed_is_freed_without_the_cyclic_gc(codec: Codec, fault: str) -> None:
    # The decoder kept the error it raised, whose traceback held the decoder's own frame: a
    # cycle, so its buffer (up to max_frame) lived until the cyclic GC ran. An echo closing
    # one connection after another for framing errors grew by max_frame each time.
    import gc
    import weakref

    decoder = codec.make(64)
    if fault == "incomplete":
        decoder.feed(codec.encode(b"x" * 10)[:-1])
        decoder.feed(b"")  # EOF mid-frame
    else:
        decoder.feed(codec.encode(b"x" * 100))
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(2):  # the stored error raised again must not make the cycle either
            with pytest.raises((IncompleteFrame, FrameTooLarge, MalformedFrame)):
                decoder.next_frame()
        gone = weakref.ref(decoder)
        del decoder
        assert gone() is None
    finally:
        if was_enabled:
            gc.enable()
