"""The send engine's pure parts under any chunking: expectations, hexdump, CRLF, line splits."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import types
from typing import cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netprobe.engines.send import (
    REGEX_REGROW,
    REGEX_SMALL,
    REGEX_WINDOW,
    CrlfConverter,
    Expectations,
    HexDumper,
    LineSplitter,
    _Receiver,
    _regex_profile,
    _RegexCut,
    _RegexProfile,
    percentile,
)
from netprobe.errors import UsageError
from tests.strategies import chunkings

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
    receiver.finish(not stopped, None if stopped else "eof")
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
    if not data:  # as `hexdump -C` of empty input (before: a lone "00000000" line)
        assert lines == []
        return
    assert lines[-1] == f"{len(data):08x}"
    assert len(lines) == (len(data) + 15) // 16 + 1


def test_a_signal_while_a_hexdump_chunk_is_formatted_keeps_the_dump_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before: the rows made before the Ctrl-C were lost, the offset had moved past them, and
    # finish() printed the whole chunk as one 160-byte "row" (in a real run, up to 1 MB).
    dumper = HexDumper()
    assert len(dumper.feed(bytes(range(32))).splitlines()) == 2
    made = 0
    line = HexDumper._line

    def cut_at_the_third_row(offset: int, row: bytes) -> str:
        nonlocal made
        made += 1
        if made == 3:
            raise KeyboardInterrupt
        return line(offset, row)

    monkeypatch.setattr(HexDumper, "_line", staticmethod(cut_at_the_third_row))
    with pytest.raises(KeyboardInterrupt):
        dumper.feed(b"x" * 160)
    monkeypatch.undo()
    # That chunk is not shown; the dump goes on from the rows that were.
    assert dumper.feed(b"y" * 20) == (
        b"00000020  79 79 79 79 79 79 79 79  79 79 79 79 79 79 79 79  |yyyyyyyyyyyyyyyy|\n"
    )
    assert dumper.finish() == (
        b"00000030  79 79 79 79                                       |yyyy|\n00000034\n"
    )


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


@given(st.one_of(dense, small), st.lists(st.integers(0, 300), max_size=20))
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


@given(st.one_of(dense, small), st.lists(st.integers(0, 90), max_size=8), st.integers(0, 8))
def test_line_splitter_refuses_a_long_line_wherever_it_is_cut(
    data: bytes, cuts: list[int], max_line: int
) -> None:
    splitter = LineSplitter(max_line)
    pieces = chunked(data, cuts)
    too_long = any(len(line) > max_line for line in data.split(b"\n"))
    lines: list[bytes] = []
    try:
        for index, piece in enumerate(pieces):
            lines += splitter.feed(piece, index == len(pieces) - 1)
    except UsageError:
        assert too_long
        return
    assert not too_long
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


# --- --until-regex: the cut of a search over everything received, in linear work ------------

# Every shape the cut has to get right; the `ab01\r\n` alphabet makes each of them match.
REGEXES = [
    rb"ab\r\n",  # a literal: bounded, so searched exactly over a short lookback
    rb"^a[ab]*\n",  # anchored at the start of the stream
    rb"a.*b\n",  # `.*`: a match may start anywhere on its line
    rb"0(?:1|ab)\r|b\r\n",  # alternation
    rb"a\d+b",  # unbounded, and often split across chunks
    rb"(?m)^b[01]*$",  # multi-line; `$` also matches at the end of what has arrived
    rb"1(?=0a)",  # a lookahead: the match ends before the bytes that decided it
    rb"(?<=\n)0{2,4}",  # a lookbehind
    rb"(?s)b.*0\r",  # `.` takes every byte: no profile to bound where a match starts
    rb"(a|b)[01]*\1",  # a backreference
]
regex_streams = st.text(alphabet="ab01\r\n", max_size=300).map(str.encode)


def first_match(
    pattern: re.Pattern[bytes], pieces: list[bytes]
) -> tuple[bytes, re.Match[bytes] | None, int, int]:
    """Search everything received after each chunk, as the old code did: (what had arrived
    when a search first matched, that match, where the chunk that completed it starts, its
    index); with no match, (the whole stream, None, its length, the number of chunks)."""
    prefix = b""
    for index, piece in enumerate(pieces):
        before = len(prefix)
        prefix += piece
        match = pattern.search(prefix)
        if match is not None:
            return prefix, match, before, index
    return prefix, None, len(prefix), len(pieces)


def first_match_cut(pattern: re.Pattern[bytes], pieces: list[bytes]) -> tuple[bytes, bool]:
    """The reference output: cut at the end of that match (bytes an earlier chunk passed on
    stay passed on, which only a lookahead makes happen)."""
    prefix, match, before, _index = first_match(pattern, pieces)
    if match is None:
        return prefix, False
    return prefix[: max(match.end(), before)], True


@given(regex_streams, st.sampled_from(REGEXES), st.data())
def test_until_regex_cuts_like_a_search_of_everything_received(
    data: bytes, regex: bytes, draw: st.DataObject
) -> None:
    pattern = re.compile(regex)
    pieces = draw.draw(chunkings(data))
    assert run(Expectations(until_regex=pattern), pieces) == first_match_cut(pattern, pieces)


@given(
    regex_streams,
    st.sampled_from(REGEXES),
    st.data(),
    st.integers(0, 40),
    st.integers(1, 12),
    st.integers(1, 8),
)
def test_until_regex_with_tiny_limits_finds_short_matches_at_once_and_cuts_at_a_match_end(
    data: bytes, regex: bytes, draw: st.DataObject, small: int, recent: int, regrow: int
) -> None:
    # Limits of a few bytes put these short streams through every path the defaults take
    # only on long replies: partial searches, whole searches, held-back output.
    pattern = re.compile(regex)
    pieces = draw.draw(chunkings(data))
    cut = _RegexCut(pattern, small=small, recent=recent, regrow=regrow)
    out, found, fed = b"", False, 0
    found_at: int | None = None
    held_ever = False
    for index, piece in enumerate(pieces):
        got, found = cut.feed(piece)
        out += got
        fed += len(piece)
        if found:
            found_at = index
            break
        assert out == data[: fed - cut.held]
        # Held back: less than 1/regrow of the window (here everything fed).
        assert cut.held == 0 or cut.held * regrow < fed
        held_ever = held_ever or cut.held > 0
    if not found:
        got, found = cut.flush()
        out += got
    prefix, match, before, index = first_match(pattern, pieces)
    if match is None:
        assert (out, found) == (data, False)
        return
    if len(prefix) <= small or match.start() >= before - recent:
        assert found_at == index  # found by the chunk that completed it
    if found_at == index and not held_ever:
        assert (out, found) == first_match_cut(pattern, pieces)
    if found:
        # The output ends at the end of the match a search of all that had arrived found
        # (or, after a lookahead, at a chunk boundary already passed on).
        bounds = list(itertools.accumulate(len(p) for p in pieces))
        assert data.startswith(out)
        assert any(
            (m := pattern.search(data[:end])) is not None
            and (len(out) == m.end() or (m.end() < len(out) < end and len(out) in bounds))
            for end in bounds
            if end >= len(prefix)
        )
    else:
        # Only a prefix ending at a chunk boundary matched (`$` at the end of what had
        # arrived), and the match was too long for the partial searches to see.
        assert out == data


# Random patterns over the same alphabet, to check the profile never puts the first start a
# search tries past a match: atoms, then concatenation, alternation, repeats, lookarounds.
_ATOMS = [rb"a", rb"b", rb"0", rb"\r", rb"\n", rb".", rb"[ab]", rb"[^a\n]", rb"\d", rb"\s"]
_ATOMS += [rb"\w", rb"\b", rb"$", rb"^", rb"\Z", rb"(?<=a)", rb"(?<!\n)", rb"(?i:A)"]
_WRAPS = [b"(?:%s)*", b"(?:%s)+", b"(?:%s)?", b"(?:%s){1,3}", b"(?:%s)*?", b"(?:%s)++"]
_WRAPS += [b"(?=%s)", b"(?!%s)", b"(%s)", b"(?>%s)"]
random_regexes = st.tuples(
    st.sampled_from([b"", b"(?i)", b"(?m)", b"(?s)", b"(?ms)"]),
    st.recursive(
        st.sampled_from(_ATOMS),
        lambda inner: st.one_of(
            st.lists(inner, min_size=2, max_size=3).map(b"".join),
            st.tuples(inner, inner).map(lambda ab: b"(?:%s|%s)" % ab),
            st.tuples(st.sampled_from(_WRAPS), inner).map(lambda wrap: wrap[0] % wrap[1]),
        ),
        max_leaves=8,
    ),
).map(b"".join)


@settings(deadline=None)
@given(random_regexes, st.text(alphabet="ab01\r\n", max_size=60).map(str.encode), st.data())
def test_until_regex_profile_never_skips_a_match(
    regex: bytes, data: bytes, draw: st.DataObject
) -> None:
    # With the stream shorter than `recent`, every search starts where the profile says (or
    # at the start of the stream): the result must be the old code's, chunk for chunk.
    pattern = re.compile(regex)
    pieces = draw.draw(chunkings(data))
    cut = _RegexCut(pattern, small=0, recent=1 << 20)
    out, found, found_at = b"", False, len(pieces)
    for index, piece in enumerate(pieces):
        got, found = cut.feed(piece)
        out += got
        if found:
            found_at = index
            break
        assert cut.held == 0
    assert (out, found) == first_match_cut(pattern, pieces)
    assert found_at == first_match(pattern, pieces)[3]


class CountingPattern:
    """A compiled pattern that counts the bytes its searches start on (the old code and the
    new one both call search(window[, pos]))."""

    def __init__(self, regex: bytes) -> None:
        self.inner = re.compile(regex)
        self.pattern = self.inner.pattern
        self.flags = self.inner.flags
        self.scanned = 0
        self.whole = 0  # searches from the start of a window over REGEX_SMALL
        self.longest = 0

    def search(self, string: bytearray, pos: int = 0) -> re.Match[bytes] | None:
        self.scanned += len(string) - pos
        if pos <= 1 and len(string) > REGEX_SMALL:
            self.whole += 1
        self.longest = max(self.longest, len(string))
        return self.inner.search(string, pos)


def feed_without_match(regex: bytes, size: int, chunk: int) -> tuple[CountingPattern, int]:
    """Feed `size` bytes of text lines that never match, in `chunk`-byte chunks, then end
    the read; the pattern's counters and the most bytes ever held back."""
    counting = CountingPattern(regex)
    emitted = lag = 0

    def emit(data: bytes) -> None:
        nonlocal emitted
        emitted += len(data)

    receiver = _Receiver(
        emit=emit,
        expect=Expectations(until_regex=cast("re.Pattern[bytes]", counting)),
        decoder=None,
        collect=False,
        hexdump=False,
    )
    block = (b"x" * 99 + b"\n") * (chunk // 100) + b"y" * (chunk % 100)
    for fed in range(chunk, size + 1, chunk):
        assert not receiver.feed(block)
        lag = max(lag, fed - emitted)
    receiver.finish(True, "eof")
    assert emitted == size
    assert not receiver.met
    return counting, lag


@pytest.mark.parametrize(
    ("regex", "times", "whole"),
    [
        # A profile bounds how far back a match can start (a few newlines or non-digits
        # here): each byte is searched about once, and nothing is held back.
        (rb"DONE \d+\r\n", 1.1, 0),
        (rb"(?m)^DONE \d+\r$", 1.1, 0),
        (rb"^220 .*\r\n", 1.1, 0),
        (rb"DONE [0-9]{1,5}\r\n", 1.1, 0),
        # No useful profile: whole searches after geometric growth, then every 1/8 window.
        (rb"(?s)BEGIN.*END", 16, 40),
        (rb"DONE(a+)\1", 16, 40),  # a backreference to an unbounded group
    ],
)
def test_until_regex_work_is_linear_in_a_long_reply_without_a_match(
    regex: bytes, times: float, whole: int
) -> None:
    # The old code searched the whole window (up to 16 MiB) on every chunk: for 32 MiB in
    # 64 KiB chunks that is about 6 GiB of searching, 190 times the stream.
    size, chunk = 32 * 1024 * 1024, 64 * 1024
    counting, lag = feed_without_match(regex, size, chunk)
    assert counting.scanned <= times * size, f"{counting.scanned / size:.2f} times the stream"
    assert counting.whole <= whole
    assert counting.longest <= REGEX_WINDOW + REGEX_WINDOW // REGEX_REGROW + 2 * chunk
    # Held back: what the next whole search will clear, at most 1/8 of the window.
    assert lag <= (REGEX_WINDOW // REGEX_REGROW + 2 * chunk if whole else 0)


def long_match_stream(after: int) -> tuple[bytes, int]:
    """A match of 3 MiB (far longer than REGEX_RECENT), then `after` more bytes, starting
    with another END (a lazy pattern stops at the first); where the first match ends."""
    data = b"BEGIN" + b"x" * (3 * 1024 * 1024) + b"END" + b"yEND"[:after] + b"z" * (after - 4)
    return data, 5 + 3 * 1024 * 1024 + 3


@pytest.mark.parametrize("after", [4, 2 * 1024 * 1024])
def test_until_regex_finds_a_long_match_and_emits_nothing_past_it(after: int) -> None:
    data, end = long_match_stream(after)
    pattern = re.compile(rb"BEGIN[^\n]*?END")
    pieces = [data[i : i + 65536] for i in range(0, len(data), 65536)]
    got, stopped = run(Expectations(until_regex=pattern), pieces)
    assert got == data[:end]
    # 2 MiB after the match a whole search has found it: the read stopped. Four bytes after
    # it, only the search at the end of the read (EOF here) did.
    assert stopped == (after > 4)


def test_until_regex_flushes_held_back_bytes_at_the_idle_timeout() -> None:
    out: list[bytes] = []
    receiver = _Receiver(
        emit=out.append,
        expect=Expectations(until_regex=re.compile(rb"DONE.*\n")),
        decoder=None,
        collect=False,
        hexdump=False,
    )
    # 3 MiB without a newline and without a match: `.*` could span all of it, so the bytes
    # past the last whole search are held back.
    data = bytes(range(256)).replace(b"\n", b"") * 12_000
    for i in range(0, len(data), 65536):
        assert not receiver.feed(data[i : i + 65536])
    assert len(b"".join(out)) < len(data)  # some of it is held back
    receiver.finish(False, "idle-timeout")
    assert b"".join(out) == data
    assert not receiver.met


def test_until_regex_held_back_bytes_go_out_when_expect_bytes_ends_the_read() -> None:
    data, end = long_match_stream(2 * 1024 * 1024)
    limit = 2 * 1024 * 1024 + 7  # before the match completes
    expect = Expectations(expect_bytes=limit, until_regex=re.compile(rb"BEGIN[^\n]*END"))
    pieces = [data[i : i + 65536] for i in range(0, len(data), 65536)]
    assert run(expect, pieces) == (data[:limit], True)
    assert end > limit


NOT_NEWLINE = frozenset(range(256)) - {0x0A}


@pytest.mark.parametrize(
    ("regex", "profile"),
    [
        (rb"DONE\r\n", _RegexProfile(6, frozenset())),
        (rb"(?m)^ab$", _RegexProfile(3, frozenset())),  # `$` looks at the byte after
        (rb"(a|bc){2,3}(?=xyz)", _RegexProfile(9, frozenset())),  # the lookahead counts
        (rb"(?<=ab)c", _RegexProfile(1, frozenset())),
        (rb"(a)\1", _RegexProfile(2, frozenset())),
        (rb"a\d+b", _RegexProfile(2, frozenset(b"0123456789"))),
        (rb"(?m)^DONE \d+\r$", _RegexProfile(7, frozenset(b"0123456789"))),
        (rb"^220 .*\r\n", _RegexProfile(6, NOT_NEWLINE)),
        (rb"(?i)x[a-b]*", _RegexProfile(2, frozenset(b"abAB"))),
        (rb"[^\r\n]*END", _RegexProfile(3, NOT_NEWLINE - {0x0D})),
        (rb"(?s)BEGIN.*END", _RegexProfile(8, frozenset(range(256)))),
        (rb"(a+)\1", None),  # a backreference to an unbounded group
        (rb"(?<=a(?=b))c", None),
    ],
)
def test_regex_profile(regex: bytes, profile: _RegexProfile | None) -> None:
    assert _regex_profile(re.compile(regex)) == profile


def test_regex_profile_of_something_unparsable_is_none() -> None:
    odd = cast("re.Pattern[bytes]", types.SimpleNamespace(pattern=None, flags=0))
    assert _regex_profile(odd) is None


def test_a_signal_while_the_report_is_built_still_lets_it_out() -> None:
    # Building the JSON of a big reply takes a while (0.5 s for 20 MB); a Ctrl-C or SIGTERM
    # then discarded the report of an exchange that was already over. Now it waits until the
    # object is written, then acts (exit 130/143).
    from netprobe.cli.send import _emit_report

    class Finished:
        def record(self) -> dict[str, object]:
            os.kill(os.getpid(), signal.SIGINT)  # lands while the object is being built
            return {"ended_by": "eof", "bytes_received": 3}

    written: list[bytes] = []
    with pytest.raises(KeyboardInterrupt):
        _emit_report(written.append, Finished())
    assert [json.loads(w) for w in written] == [{"ended_by": "eof", "bytes_received": 3}]
