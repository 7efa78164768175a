"""Frames over real sockets: netprobe.framed on socketpair() and a loopback TCP pair."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netprobe.errors import DeadlineExceeded, FrameTooLarge, IncompleteFrame
from netprobe.framed import read_frames, send_frame
from netprobe.framing import FRAMING_NAMES, parse_framing
from tests.codec_suite import CODECS, Codec
from tests.helpers import LONG, SHORT
from tests.strategies import frame_lists


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    left, right = socket.socketpair()
    left.settimeout(LONG)
    right.settimeout(LONG)
    try:
        yield left, right
    finally:
        left.close()
        right.close()


@settings(max_examples=15, deadline=None)
@given(codec=st.sampled_from([c for c in CODECS if c.name in FRAMING_NAMES]), frames=frame_lists)
def test_round_trip_over_a_socketpair(codec: Codec, frames: list[bytes]) -> None:
    frames = [codec.clean(frame) for frame in frames]
    spec = parse_framing(codec.name)
    deadline = time.monotonic() + LONG
    left, right = socket.socketpair()
    with left, right:
        # The stream is a few KiB, far below the socket buffer: no sender thread needed.
        sent = sum(send_frame(left, spec, frame, deadline) for frame in frames)
        left.shutdown(socket.SHUT_WR)
        got = list(read_frames(right, spec.decoder(), deadline, chunk=97))
    assert sent == len(codec.stream(frames))
    if codec.kind == "raw":
        assert b"".join(got) == b"".join(frames)
    else:
        assert got == frames


def test_bulk_frames_over_loopback_tcp() -> None:
    spec = parse_framing("len32")
    frames = [bytes([i % 251]) * (i * 997 % 70_000) for i in range(60)]  # ~2 MB in all
    deadline = time.monotonic() + LONG
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname()[:2], timeout=LONG)
        server, _ = listener.accept()
    errors: list[BaseException] = []

    def send() -> None:
        try:
            for frame in frames:
                send_frame(client, spec, frame, deadline)
            client.shutdown(socket.SHUT_WR)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    sender = threading.Thread(target=send)
    with client, server:
        sender.start()
        try:
            got = list(read_frames(server, spec.decoder(max_frame=70_000), deadline))
        finally:
            sender.join(LONG)
    assert not sender.is_alive()
    assert errors == []
    assert got == frames


def test_peer_closes_inside_a_frame(pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = pair
    left.sendall(b"5:hello,3:ab")
    left.shutdown(socket.SHUT_WR)
    frames = read_frames(right, parse_framing("netstring").decoder(), time.monotonic() + LONG)
    assert next(frames) == b"hello"
    with pytest.raises(IncompleteFrame):
        next(frames)


def test_oversized_header_is_refused_before_the_body(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    left, right = pair
    left.sendall((1 << 30).to_bytes(8, "big"))  # "1 GiB follows", and nothing follows
    frames = read_frames(right, parse_framing("len64").decoder(), time.monotonic() + LONG)
    with pytest.raises(FrameTooLarge):
        next(frames)


def test_buffered_frames_come_out_before_waiting(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    _, right = pair
    decoder = parse_framing("line").decoder()
    decoder.feed(b"one\ntwo\n")
    # The deadline has already passed: both frames must come out without a recv().
    frames = read_frames(right, decoder, time.monotonic() - 1)
    assert [next(frames), next(frames)] == [b"one", b"two"]
    with pytest.raises(DeadlineExceeded):
        next(frames)


def test_silent_peer_hits_the_deadline(pair: tuple[socket.socket, socket.socket]) -> None:
    _, right = pair
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        list(read_frames(right, parse_framing("crlf").decoder(), started + SHORT))
    assert time.monotonic() - started >= SHORT * 0.9
