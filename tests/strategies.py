"""Hypothesis strategies for framed byte streams: payloads, frame lists, chunkings, garbage.

Chunkings are drawn after encoding (with ``st.data()``) from cut points inside the stream, so
they reach every shape: no cut, a cut between every byte, cuts inside a length header or a
multi-byte delimiter, and empty chunks (which a decoder must treat as "nothing", not EOF,
when they come from a split; see ``chunkings``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

from hypothesis import strategies as st

__all__ = [
    "DELIMITERS",
    "chunkings",
    "delimiters",
    "frame_lists",
    "garbage",
    "mapped_payloads",
    "max_frames",
    "payloads",
    "split_at",
]

DELIMITERS = (b"\n", b"\r\n", b"\x00", b"--END--")
delimiters = st.sampled_from(DELIMITERS)

# Fragments that look like framing (delimiter pieces, netstring digits and commas, length
# bytes) so random payloads and garbage exercise the parsers' edge cases, not just noise.
_FRAGMENTS = (b"\n", b"\r", b"\r\n", b"\x00", b"-", b"--EN", b"--END--", b"0", b"5:", b":", b",")
_pieces = st.one_of(st.binary(max_size=12), st.sampled_from(_FRAGMENTS))

payloads = st.lists(_pieces, max_size=6).map(b"".join) | st.binary(max_size=300)
frame_lists = st.lists(payloads, max_size=12)
max_frames = st.integers(min_value=0, max_value=320)


def garbage(max_size: int = 400) -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, biased towards framing-like fragments and length headers."""
    headers = st.integers(0, 2**64 - 1).map(lambda n: n.to_bytes(8, "big"))
    return st.lists(st.one_of(_pieces, headers), max_size=24).map(
        lambda parts: b"".join(parts)[:max_size]
    )


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """Split data at the given sorted cut points (repeats give empty chunks)."""
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@st.composite
def chunkings(draw: st.DrawFn, data: bytes, *, empty: bool = True) -> list[bytes]:
    """A list of chunks whose concatenation is ``data``.

    Shapes: one chunk, one byte per chunk, or random cut points; with ``empty`` some cut
    points repeat (or sit at 0 or the end), which yields empty chunks. ``feed(b"")`` means
    EOF, so the codec suite gives empty chunks two readings: in the round-trip properties an
    empty chunk is a poll that brought no bytes (drain without feeding), and a separate
    property feeds it for real and checks that it acts as EOF at that point.

    Args:
        data: the stream to split.
        empty: whether empty chunks may appear.
    """
    if len(data) <= 1:
        if empty and draw(st.booleans()):
            return [b"", data] if data else [b""]
        return [data]
    shape = draw(st.sampled_from(["one", "bytes", "cuts", "cuts"]))
    if shape == "one":
        return [data]
    if shape == "bytes":
        return [data[i : i + 1] for i in range(len(data))]
    positions = st.integers(min_value=0 if empty else 1, max_value=len(data) - (not empty))
    cuts = draw(st.lists(positions, max_size=min(24, len(data) * 2)))
    return split_at(data, sorted(cuts))


def mapped_payloads(clean: Callable[[bytes], bytes]) -> st.SearchStrategy[bytes]:
    """Payloads passed through a codec's ``clean`` (e.g. dropping what would end a line)."""
    return payloads.map(clean)
