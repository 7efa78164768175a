"""The send engine's pure parts under any chunking: expectations, hexdump, CRLF, line splits."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from netprobe.engines.send import (
    CrlfConverter,
    Expectations,
    HexDumper,
    LineSplitter,
    _Receiver,
    percentile,
)

small = st.binary(max_size=200)
# A small alphabet, so delimiters and regex matches actually occur (and straddle chunks).
dense = st.text(alphabet="ab01\r\n", max_size=80).map(str.encode)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for point in [*points, len(data)]:
        pieces.append(data[last:point])
        last = point
    return pieces


def run(expect: Expectations, pieces: list[bytes]) -> tuple[bytes, bool]:
    out: list[bytes] = []
    receiver = _Receiver(emit=out.append, expect=expect, decoder=None, collect=False, hexdump=False)
    stopped = False
    for piece in pieces:
        if receiver.feed(piece):
            stopped = True
            break
    return b"".join(out), stopped


@given(
    dense,
    st.text(alphabet="ab\r\n", min_size=1, max_size=3).map(str.encode),
    st.lists(st.integers(0, 300), max_size=20),
)
def test_until_cuts_right_after_the_first_delimiter(
    data: bytes, delim: bytes, cuts: list[int]
) -> None:
    got, stopped = run(Expectations(until=delim), chunked(data, cuts))
    where = data.find(delim)
    if where < 0:
        assert (got, stopped) == (data, False)
    else:
        assert (got, stopped) == (data[: where + len(delim)], True)


@given(dense, st.lists(st.integers(0, 300), max_size=20))
def test_until_regex_matches_across_chunks(data: bytes, cuts: list[int]) -> None:
    pattern = re.compile(rb"a\d+b")
    got, stopped = run(Expectations(until_regex=pattern), chunked(data, cuts))
    match = pattern.search(data)
    if match is None:
        assert (got, stopped) == (data, False)
    else:
        # The first chunk that completes some match ends the read at that match's end.
        assert stopped
        assert pattern.search(got) is not None
        assert data.startswith(got)


@given(small, st.integers(1, 250), st.lists(st.integers(0, 300), max_size=20))
def test_expect_bytes_is_exact(data: bytes, count: int, cuts: list[int]) -> None:
    got, stopped = run(Expectations(expect_bytes=count), chunked(data, cuts))
    assert got == data[:count]
    assert stopped == (len(data) >= count)


@given(small, st.lists(st.integers(0, 300), max_size=20))
def test_hexdump_does_not_depend_on_chunking(data: bytes, cuts: list[int]) -> None:
    whole = HexDumper()
    expected = whole.feed(data) + whole.finish()
    split = HexDumper()
    got = b"".join(split.feed(piece) for piece in chunked(data, cuts)) + split.finish()
    assert got == expected
    lines = expected.decode().splitlines()
    assert lines[-1] == f"{len(data):08x}"
    assert len(lines) == (len(data) + 15) // 16 + 1


@given(st.binary(max_size=100).map(lambda b: b.replace(b"\r", b"")), st.lists(st.integers(0, 200)))
def test_crlf_whatever_the_chunking(data: bytes, cuts: list[int]) -> None:
    converter = CrlfConverter()
    got = b"".join(converter.feed(piece) for piece in chunked(data, cuts))
    assert got == data.replace(b"\n", b"\r\n")


# Pieces dense in CR and LF (one-byte pieces too), so CRLF pairs, bare CRs and bare LFs meet
# every kind of chunk boundary.
crlf_pieces = st.lists(
    st.lists(st.sampled_from([b"\r", b"\n", b"a"]), max_size=6).map(b"".join), max_size=20
)


@given(crlf_pieces)
def test_crlf_any_split_gives_the_whole_stream_conversion(pieces: list[bytes]) -> None:
    converter = CrlfConverter()
    got = b"".join(converter.feed(piece) for piece in pieces)
    data = b"".join(pieces)
    assert got == re.sub(rb"(?<!\r)\n", b"\r\n", data)  # each bare LF, and only those


def test_crlf_keeps_crlf_split_between_chunks() -> None:
    converter = CrlfConverter()
    assert converter.feed(b"a\r") + converter.feed(b"\nb\n") == b"a\r\nb\r\n"
    converter = CrlfConverter()  # a chunk of just the LF, then a bare LF
    pieces = [b"a\r", b"\n", b"\n", b"b"]
    assert b"".join(converter.feed(p) for p in pieces) == b"a\r\n\r\nb"


@given(small, st.lists(st.integers(0, 300), max_size=20))
def test_line_splitter(data: bytes, cuts: list[int]) -> None:
    splitter = LineSplitter(1000)
    pieces = chunked(data, cuts)
    lines: list[bytes] = []
    for index, piece in enumerate(pieces):
        lines += splitter.feed(piece, index == len(pieces) - 1)
    expected = data.split(b"\n")
    if expected[-1] == b"":
        expected.pop()
    assert lines == expected


def test_percentile_interpolates() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 100) == 4.0
    assert percentile([7.0], 99) == 7.0
