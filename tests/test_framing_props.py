"""The codec suite's properties, run for every codec (hypothesis), and a stateful test that
drives feed/encode/EOF against a simple model of the stream."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from netprobe.errors import IncompleteFrame
from netprobe.framing import DEFAULT_MAX_FRAME, NEED_DATA
from tests.codec_suite import CODECS, PROPERTIES, Codec, check_codec
from tests.strategies import payloads

# 10 codecs x 6 properties: a third of the profile's examples each keeps the grid within the
# test budget (dev: 33 each, ~2,000 in all; the ci profile triples it).
_GRID = settings(max_examples=max(10, settings().max_examples // 3))


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
@pytest.mark.parametrize("prop", PROPERTIES, ids=lambda p: p.__name__)
@_GRID
@given(data=st.data())
def test_codec_property(
    prop: Callable[[Codec, st.DataObject], None], codec: Codec, data: st.DataObject
) -> None:
    prop(codec, data)


class FramingMachine(RuleBasedStateMachine):
    """Model: ``wire`` holds every encoded byte, ``fed`` how many went into the decoder,
    ``queued`` the (payload, end offset) of frames not yet taken; a frame must come out
    exactly when its last byte has been fed and it is pulled."""

    codec: Codec

    def __init__(self) -> None:
        super().__init__()
        self.decoder = self.codec.make(DEFAULT_MAX_FRAME)
        self.wire = bytearray()
        self.fed = 0
        self.taken = 0  # end offset of the last frame taken
        self.queued: list[tuple[bytes, int]] = []
        self.eof = False
        self.broken = False  # EOF inside a frame: the decoder is dead (errors are sticky)

    @precondition(lambda self: not self.eof)
    @rule(payload=payloads)
    def encode(self, payload: bytes) -> None:
        payload = self.codec.clean(payload)
        self.wire += self.codec.encode(payload)
        if self.codec.kind != "raw":  # raw frames are whatever each feed delivers
            self.queued.append((payload, len(self.wire)))

    @precondition(lambda self: not self.eof and self.fed < len(self.wire))
    @rule(size=st.integers(1, 80))
    def feed(self, size: int) -> None:
        chunk = bytes(self.wire[self.fed : self.fed + size])
        self.decoder.feed(chunk)
        self.fed += len(chunk)
        if self.codec.kind == "raw":
            self.queued.append((chunk, self.fed))

    @precondition(lambda self: not self.broken)
    @rule()
    def pull(self) -> None:
        expected = [p for p, end in self.queued if end <= self.fed]
        assert list(self.decoder.frames()) == expected
        if expected:
            self.taken = self.queued[len(expected) - 1][1]
        del self.queued[: len(expected)]
        assert self.decoder.next_frame() is NEED_DATA

    @precondition(lambda self: not self.eof)
    @rule()
    def end_of_stream(self) -> None:
        self.pull()
        self.decoder.feed(b"")
        self.eof = True
        if self.fed > self.taken:
            with pytest.raises(IncompleteFrame):
                self.decoder.next_frame()
            self.broken = True
        else:
            assert self.decoder.next_frame() is NEED_DATA

    @precondition(lambda self: self.broken)
    @rule()
    def stays_broken(self) -> None:
        with pytest.raises(IncompleteFrame):
            self.decoder.next_frame()

    @invariant()
    def trailing_data_is_the_untaken_suffix(self) -> None:
        assert self.decoder.trailing_data == (bytes(self.wire[self.taken : self.fed]), self.eof)
        assert self.decoder.buffered == self.fed - self.taken


def _machine_test(codec: Codec) -> type[FramingMachine]:
    return type(f"Machine_{codec.name}", (FramingMachine,), {"codec": codec})


_STATEFUL = settings(max_examples=max(5, settings().max_examples // 8), stateful_step_count=25)
_STATEFUL_CODECS = [c for c in CODECS if c.name in ("raw", "line", "len8", "len32", "netstring")]
_STATEFUL_CODECS.append(CODECS[-1])  # the multi-byte delimiter b"--END--"


@pytest.mark.parametrize("codec", _STATEFUL_CODECS, ids=lambda c: c.name)
def test_stateful(codec: Codec) -> None:
    machine = _machine_test(codec)
    machine.TestCase.settings = _STATEFUL
    machine.TestCase().runTest()


def test_check_codec_runs_the_whole_suite() -> None:
    # The one-call entry point for a codec added later (trio's check_* helpers).
    check_codec(CODECS[1], max_examples=5)
