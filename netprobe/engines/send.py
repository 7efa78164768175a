"""The `send` engine: one client exchange (TCP, Unix or UDP), optionally framed and repeated.

Does network I/O through netprobe.sockets only; never prints. Received bytes leave through
the `emit` callback the caller passes in, so memory stays flat whatever the stream size.
"""

from __future__ import annotations

import base64
import errno
import importlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

from netprobe.errors import (
    ConnectError,
    DeadlineExceeded,
    FramingError,
    LocalError,
    NetworkError,
    PeerResetError,
    UsageError,
)
from netprobe.exitcodes import ExitStatus
from netprobe.results import ConnectState
from netprobe.sockets import (
    PUMP_CHUNK,
    CountingGate,
    PumpResult,
    Resolved,
    Target,
    classify_connect_errno,
    classify_errno,
    connect_nonblocking,
    connect_udp,
    errno_name,
    format_hostport,
    format_sockaddr,
    preferred,
    pump_duplex,
    recv_datagram,
    resolve_named,
    send_datagram,
    sleep,
    unix_address,
    wait_readable,
)

if TYPE_CHECKING:
    from netprobe.framing import Decoder, FramingSpec

__all__ = [
    "Expectations",
    "HexDumper",
    "InputSource",
    "SendOptions",
    "SendResult",
    "Transcript",
    "exchange",
    "exit_status_for",
    "failed_result",
    "latency_stats",
    "percentile",
    "repeat_exchange",
]

Emit = Callable[[bytes], None]

# The keys of each latency row in the send-stats object (README: send --json).
STAT_KEYS = ("min", "avg", "p50", "p90", "p99", "max", "count")

# --until-regex keeps a window of the received stream to search; a match longer than this
# is not found (memory stays bounded on an endless stream).
REGEX_WINDOW = 16 * 1024 * 1024
# A chunk is searched from at most this far back (see _RegexCut), unless a whole search is
# due. A 64 KiB line is long for a text protocol, and this much may be searched again for
# each chunk, however small.
REGEX_RECENT = 64 * 1024
# A pattern that may match from further back (`(?s).*`, a long run of digits for `\d+`) is
# searched over the whole window on every chunk while it is at most this big: cheap, and
# nothing is held back. (Searching 16 MiB on every chunk made a 16 MB reply take 10 s.)
REGEX_SMALL = 1024 * 1024
# Beyond it, the whole window is searched again once the stream has grown by 1/REGEX_REGROW
# of what the last whole search covered: the searches add up to a constant times the
# stream, and at most that much output is held back meanwhile.
REGEX_REGROW = 8


# ---------------------------------------------------------------------------------------------
# Input: DATA, a file or stdin, read in chunks, optionally converted or framed
# ---------------------------------------------------------------------------------------------


@dataclass
class InputSource:
    """What to send: fixed bytes, or a binary stream read chunk by chunk.

    Attributes:
        data: DATA (already decoded from text or hex); None for a stream.
        stream: a binary file object (a file, stdin's buffer); read with os.read on `fd`
            when it has one, so nothing is buffered behind our back.
        fd: the stream's file descriptor, or None (in-memory streams in tests).
        pollable: the fd can block (pipe, terminal, socket): poll it before reading.
    """

    data: bytes | None = None
    stream: IO[bytes] | None = None
    fd: int | None = None
    pollable: bool = False

    @classmethod
    def from_stream(cls, stream: IO[bytes]) -> InputSource:
        """Wrap a binary stream, using its fd when it has a real one."""
        try:
            fd: int | None = stream.fileno()
        except (OSError, ValueError, AttributeError):
            fd = None
        pollable = False
        if fd is not None:
            import stat

            mode = os.fstat(fd).st_mode
            pollable = not (stat.S_ISREG(mode) or stat.S_ISBLK(mode))
        return cls(stream=stream, fd=fd, pollable=pollable)

    def rewind(self) -> bool:
        """Seek back to the start for another run; False when the input cannot be replayed."""
        if self.data is not None:
            return True
        if self.stream is None or self.pollable:
            return False
        try:
            if self.fd is not None:
                os.lseek(self.fd, 0, os.SEEK_SET)
            else:
                self.stream.seek(0)
        except (OSError, ValueError):
            return False
        return True

    def offset(self) -> int | None:
        """Where the next read starts, when the input can be read again from there (DATA, a
        regular file, an in-memory stream); None for a pipe, a terminal or a socket."""
        if self.data is not None:
            return 0
        if self.stream is None or self.pollable:
            return None
        try:
            if self.fd is not None:
                return os.lseek(self.fd, 0, os.SEEK_CUR)
            return self.stream.tell()
        except (OSError, ValueError):
            return None

    def seek(self, offset: int) -> None:
        """Go back to an offset() taken earlier (DATA needs nothing)."""
        if self.data is not None:
            return
        if self.fd is not None:
            os.lseek(self.fd, offset, os.SEEK_SET)
        elif self.stream is not None:
            self.stream.seek(offset)

    def chunks(self, size: int) -> Callable[[int], tuple[bytes, bool]]:
        """A reader returning (chunk, eof) per call: the shape pump_duplex wants."""
        if self.data is not None:
            data = self.data
            done = False

            def read_data(_n: int) -> tuple[bytes, bool]:
                nonlocal done
                if done:
                    return b"", True
                done = True
                return data, True

            return read_data
        stream, fd = self.stream, self.fd
        assert stream is not None
        if fd is not None:

            def read_fd(n: int) -> tuple[bytes, bool]:
                chunk = os.read(fd, min(n, size))
                return chunk, not chunk

            return read_fd
        read1 = getattr(stream, "read1", stream.read)

        def read_stream(n: int) -> tuple[bytes, bool]:
            chunk = read1(min(n, size))
            return chunk, not chunk

        return read_stream


class CrlfConverter:
    """Turn bare LF into CRLF across chunk boundaries (an existing CRLF stays as it is)."""

    def __init__(self) -> None:
        self._last = b""

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        head = b""
        ends_with = chunk[-1:]  # before the head goes: a chunk of just b"\n" ends in it too
        if self._last == b"\r" and chunk.startswith(b"\n"):
            head, chunk = b"\n", chunk[1:]
        self._last = ends_with
        return head + chunk.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


class LineSplitter:
    """Cut a byte stream into lines (without the b"\\n"); a last unterminated line counts too."""

    def __init__(self, max_line: int) -> None:
        self._buffer = bytearray()
        self._max_line = max_line

    def feed(self, chunk: bytes, eof: bool) -> list[bytes]:
        # Only the new chunk is split: splitting the whole buffer each time made a long line
        # cost its length once per chunk (a 24 MB line took 11 s in 64 KiB chunks).
        lines = chunk.split(b"\n")
        rest = lines.pop()
        if lines and self._buffer:
            self._buffer += lines[0]
            lines[0] = bytes(self._buffer)
            self._buffer = bytearray()
        self._buffer += rest
        # Complete lines too: a long line that arrived within one chunk is just as long.
        if len(self._buffer) > self._max_line or any(len(line) > self._max_line for line in lines):
            raise UsageError(f"an input line is longer than {self._max_line} bytes")
        if eof and self._buffer:
            lines.append(bytes(self._buffer))
            self._buffer = bytearray()
        return lines


def _line_of_crlf(line: bytes) -> bytes:
    # An input line that ended in CRLF already: its CR is the line end `--framing crlf` adds,
    # not part of the payload (it went out as "a\r\r\n").
    return line.removesuffix(b"\r")


def _encode_frame(spec: FramingSpec, payload: bytes, max_frame: int) -> bytes:
    if len(payload) > max_frame:
        raise UsageError(
            f"cannot send {payload[:40]!r} as a {spec.name} frame: {len(payload)} bytes is more "
            f"than --max-frame {max_frame}"
        )
    try:
        return spec.encode(payload)
    except ValueError as exc:
        raise UsageError(f"cannot send {payload[:40]!r} as a {spec.name} frame: {exc}") from None


def _input_reader(
    source: InputSource, *, crlf: bool, framing: FramingSpec | None, max_frame: int
) -> Callable[[int], tuple[bytes, bool]]:
    read = source.chunks(PUMP_CHUNK)
    if framing is not None and framing.name == "raw":
        # raw frames have no boundary on the wire: cutting lines would only drop the newlines.
        return read
    if framing is not None:
        if source.data is not None:
            frame = _encode_frame(framing, source.data, max_frame)
            return lambda _n: (frame, True)
        splitter = LineSplitter(max_frame)
        spec = framing
        own_cr = spec.name == "crlf"

        def read_framed(n: int) -> tuple[bytes, bool]:
            chunk, eof = read(n)
            lines = splitter.feed(chunk, eof)
            if own_cr:
                lines = [_line_of_crlf(line) for line in lines]
            return b"".join(_encode_frame(spec, line, max_frame) for line in lines), eof

        return read_framed
    if crlf:
        converter = CrlfConverter()

        def read_crlf(n: int) -> tuple[bytes, bool]:
            chunk, eof = read(n)
            return converter.feed(chunk), eof

        return read_crlf
    return read


# ---------------------------------------------------------------------------------------------
# Output: raw, hexdump, frames; expectations that end the read
# ---------------------------------------------------------------------------------------------


class HexDumper:
    """`hexdump -C` layout, streamed: offset, 16 hex bytes in two groups of 8, |ASCII|."""

    def __init__(self) -> None:
        # (offset of the next row, bytes of a row not yet complete): one attribute, replaced
        # whole once a chunk's lines are made. A Ctrl-C while they were made (a 256 KiB chunk
        # takes a while) lost the rows made so far but kept the whole chunk: finish() then
        # printed it as one line of up to 1 MB, after a gap in the offsets.
        self._state: tuple[int, bytes] = (0, b"")

    @staticmethod
    def _line(offset: int, row: bytes) -> str:
        hexes = [f"{b:02x}" for b in row]
        left = " ".join(hexes[:8])
        right = " ".join(hexes[8:])
        text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in row)
        return f"{offset:08x}  {left:<23}  {right:<23}  |{text}|\n"

    def feed(self, data: bytes) -> bytes:
        """Lines for every complete 16-byte row now available (a signal while they are made
        leaves the dumper as it was: that chunk is not shown, the offsets stay whole)."""
        offset, partial = self._state
        pending = partial + data
        whole = len(pending) - len(pending) % 16
        lines = "".join(
            self._line(offset + start, pending[start : start + 16]) for start in range(0, whole, 16)
        ).encode("ascii")
        self._state = (offset + whole, pending[whole:])
        return lines

    def finish(self) -> bytes:
        """The last partial row, then the total length as the final offset line (nothing at
        all for an empty reply, as `hexdump -C` prints nothing for empty input)."""
        offset, partial = self._state
        if not offset and not partial:
            return b""
        out = self._line(offset, partial) if partial else ""
        self._state = (offset + len(partial), b"")
        return (out + f"{offset + len(partial):08x}\n").encode("ascii")


@dataclass(frozen=True)
class Expectations:
    """What ends the read early ("expect"); all None: read until EOF or a timeout."""

    expect_bytes: int | None = None
    until: bytes | None = None
    until_regex: re.Pattern[bytes] | None = None
    expect_frames: int | None = None
    expect_datagrams: int | None = None

    @property
    def any(self) -> bool:
        return any(
            v is not None
            for v in (
                self.expect_bytes,
                self.until,
                self.until_regex,
                self.expect_frames,
                self.expect_datagrams,
            )
        )


class _Unknown(Exception):
    """Raised inside the pattern analysis: a construct it does not bound."""


# The bytes each class escape matches in a bytes pattern (no LOCALE), asked of `re` itself.
_CATEGORY_ESCAPES = {
    "CATEGORY_DIGIT": rb"\d",
    "CATEGORY_NOT_DIGIT": rb"\D",
    "CATEGORY_SPACE": rb"\s",
    "CATEGORY_NOT_SPACE": rb"\S",
    "CATEGORY_WORD": rb"\w",
    "CATEGORY_NOT_WORD": rb"\W",
}
_ALL_BYTES = frozenset(range(256))


@dataclass(frozen=True)
class _RegexProfile:
    """What bounds where a match can start, for --until-regex.

    A match attempt inspects at most `reach` bytes that are not in `free` from its start on
    (lookaheads and `$` included); `free` holds every byte an unbounded repeat can consume
    (empty for a pattern of bounded width: then `reach` bounds the bytes inspected).
    """

    reach: int
    free: frozenset[int]


def _regex_profile(pattern: re.Pattern[bytes]) -> _RegexProfile | None:
    """The pattern's profile, or None when it cannot be worked out."""
    try:
        # re._parser is private (CPython 3.11+). Anything unexpected in it means "no
        # profile", which is always correct, only slower.
        parser = importlib.import_module("re._parser")
        tree = parser.parse(pattern.pattern, pattern.flags)
        walker = _ProfileWalker(int(parser.MAXREPEAT))
        _width, reach, _bytes = walker.sequence(list(tree), pattern.flags, inside=False)
    except Exception:
        return None
    return _RegexProfile(reach, frozenset(walker.free))


class _ProfileWalker:
    """Walks a parsed pattern for _regex_profile.

    Each construct gives (width, reach, length): the most bytes outside `free` it consumes,
    the most it inspects past where it starts (an end-of-string test counts as inspecting
    a byte), and the most bytes it consumes at all (None: unbounded). A unit inside an
    unbounded repeat adds what it can match to `free` and counts (0, 1): it consumes free
    bytes only, but may inspect another byte and fail.
    """

    def __init__(self, unbounded: int) -> None:
        self.unbounded = unbounded
        self.free: set[int] = set()
        self.groups: dict[int, int | None] = {}

    def sequence(
        self, items: list[Any], flags: int, *, inside: bool
    ) -> tuple[int, int, int | None]:
        width = reach = 0
        length: int | None = 0
        for op, av in items:
            item_width, item_reach, item_length = self.item(str(op), av, flags, inside)
            reach = max(reach, width + item_reach)
            width += item_width
            length = None if length is None or item_length is None else length + item_length
        return width, reach, length

    def item(self, name: str, av: Any, flags: int, inside: bool) -> tuple[int, int, int | None]:
        if name in ("LITERAL", "NOT_LITERAL", "ANY", "IN"):
            if not inside:
                return 1, 1, 1
            self.free |= _unit_bytes(name, av, flags)
            return 0, 1, 1
        if name == "AT":
            return 0, 1, 0  # `$` and `\b` look at the next byte (or the end)
        if name == "SUBPATTERN":
            group, add_flags, del_flags, items = av
            found = self.sequence(list(items), (flags | add_flags) & ~del_flags, inside=inside)
            if group is not None:
                self.groups[group] = found[2]
            return found
        if name == "ATOMIC_GROUP":
            return self.sequence(list(av), flags, inside=inside)
        if name == "BRANCH":
            return _widest([self.sequence(list(b), flags, inside=inside) for b in av[1]])
        if name == "GROUPREF_EXISTS":
            no = self.sequence(list(av[2]), flags, inside=inside) if av[2] else (0, 0, 0)
            return _widest([self.sequence(list(av[1]), flags, inside=inside), no])
        if name == "GROUPREF":
            # It repeats the group's bytes, which may differ in case: count them all.
            length = self.groups.get(av)
            if length is None or (inside and length):
                raise _Unknown(name)
            return length, length, length
        if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            _low, high, items = av
            forever = high >= self.unbounded
            width, reach, length = self.sequence(list(items), flags, inside=inside or forever)
            if forever:
                if width:
                    raise _Unknown(name)
                return 0, reach, None if length else 0
            if not high:
                return 0, 0, 0
            return (
                high * width,
                (high - 1) * width + reach,
                None if length is None else high * length,
            )
        if name in ("ASSERT", "ASSERT_NOT"):
            direction, items = av
            # What a lookaround inspects is not consumed by an enclosing repeat: its bytes
            # count whatever they are.
            _width, reach, _length = self.sequence(list(items), flags, inside=False)
            if direction == 1:
                return 0, reach, 0
            if any(str(op) in ("ASSERT", "ASSERT_NOT") for op, _av in items):
                raise _Unknown("a lookaround inside a lookbehind")
            return 0, 1, 0  # a lookbehind inspects bytes before here (and `$` this one)
        raise _Unknown(name)


def _widest(found: list[tuple[int, int, int | None]]) -> tuple[int, int, int | None]:
    lengths = [f[2] for f in found]
    longest = None if None in lengths else max(n for n in lengths if n is not None)
    return max(f[0] for f in found), max(f[1] for f in found), longest


def _unit_bytes(name: str, av: Any, flags: int) -> frozenset[int]:
    """The bytes a single-byte construct may match (more is harmless: only less is wrong)."""
    if flags & re.LOCALE:
        return _ALL_BYTES
    if name == "ANY":
        return _ALL_BYTES if flags & re.DOTALL else _ALL_BYTES - {0x0A}
    if name == "NOT_LITERAL":
        return _ALL_BYTES - {av}
    items = [("LITERAL", av)] if name == "LITERAL" else [(str(op), arg) for op, arg in av]
    listed: set[int] = set()
    negate = False
    for op, arg in items:
        if op == "NEGATE":
            negate = True
        elif op == "LITERAL":
            listed.add(arg)
        elif op == "RANGE":
            listed.update(range(arg[0], arg[1] + 1))
        elif op == "CATEGORY" and str(arg) in _CATEGORY_ESCAPES:
            escape = re.compile(_CATEGORY_ESCAPES[str(arg)])
            listed.update(b for b in range(256) if escape.match(bytes([b])))
        else:
            return _ALL_BYTES
    if negate:
        # Case folding only takes more bytes out of a negated class.
        return _ALL_BYTES - listed
    if flags & re.IGNORECASE:
        listed.update(bytes(listed).swapcase())
    return frozenset(listed)


class _RegexCut:
    """--until-regex over a stream: passes bytes on until the first match, cut at its end.

    Strategy: the old code searched the whole window (the last REGEX_WINDOW bytes) after
    every chunk, which is quadratic. Here `search(window, pos)` (`^`, `\\b` and lookbehinds
    still see the bytes before `pos`) starts where a new match can start. The stream up to
    `cleared` is known to hold no match; an attempt at `s` can only turn out differently now
    if it inspects a byte at or past `cleared`, so all of `s..cleared` lies within one
    attempt. A pattern's profile (_RegexProfile) says an attempt inspects at most `reach`
    bytes outside `free`; so no match can start before the reach+1-th byte outside `free`
    counted back from `cleared`. For a bounded pattern that is `reach` bytes back; for
    `.*` the reach+1-th newline back; for `\\d+` the reach+1-th non-digit.

    - When that start is at most REGEX_RECENT back, the search from it is exact: the
      result is the whole window's, and all of it is cleared. This is the usual case.
    - Otherwise (a pattern without a profile, `(?s).*`, a long run of free bytes): each
      chunk is searched from REGEX_RECENT before it, so a match starting no further back is
      found at once, and the whole window is searched while it is at most REGEX_SMALL, and
      again whenever the stream has grown by 1/REGEX_REGROW of what the last whole search
      covered: the total work stays linear. Bytes no exact or whole search has cleared are
      held back, since a longer match may still end inside them; they are passed on once
      cleared, or by flush() at the end of the read. A match found by a partial search is
      searched for again over the whole window, so the leftmost one is taken.
    """

    def __init__(
        self,
        pattern: re.Pattern[bytes],
        *,
        window: int = REGEX_WINDOW,
        small: int = REGEX_SMALL,
        recent: int = REGEX_RECENT,
        regrow: int = REGEX_REGROW,
    ) -> None:
        self._pattern = pattern
        self._window_size = window
        self._small = small
        self._recent = recent
        self._regrow = regrow
        profile = _regex_profile(pattern)
        # How many bytes outside `free` to count back (one of margin costs nothing); None:
        # no useful profile (a count beyond REGEX_RECENT bytes would always fail).
        self._need: int | None = None
        if profile is not None and profile.free != _ALL_BYTES and profile.reach + 2 <= recent:
            self._need = profile.reach + 2
        self._table: bytes | None = None  # 1 for each byte outside `free`, for translate()
        if profile is not None and profile.free:
            self._table = bytes(0 if b in profile.free else 1 for b in range(256))
        self._window = bytearray()
        self._base = 0  # stream offset of the window's first byte
        # The first start a search tries: 1 once the front of the window was dropped, so `^`
        # and `\A` do not match at an arbitrary cut.
        self._floor = 0
        self._cleared = 0  # stream offset: the stream up to here holds no match
        self._released = 0  # stream offset: everything before it was passed on

    @property
    def held(self) -> int:
        """Bytes received but not passed on yet."""
        return self._base + len(self._window) - self._released

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        """Take a chunk; return the bytes that may be passed on now, and whether the pattern
        matched (then they end at the match's end, and nothing more may follow)."""
        window = self._window
        before = len(window)
        window += data
        start = self._first_start(self._cleared - self._base)
        if start is None:
            grown = self._base + len(window) - self._cleared
            searched = len(window) - grown  # what the last whole search covered
            whole = len(window) <= self._small or grown * self._regrow >= searched
            start = self._floor if whole else max(self._floor, before - self._recent)
            match = self._search(start)
            if match is not None and not whole:
                match = self._search(self._floor)
            elif match is None and not whole:
                return b"", False
        else:
            match = self._search(start)
        if match is not None:
            # With a lookahead the match may end before bytes already passed on (as before).
            return self._release(max(self._base + match.end(), self._released)), True
        self._cleared = self._base + len(window)
        out = self._release(self._cleared)
        excess = len(window) - self._window_size
        if excess > 0:
            del window[:excess]
            self._base += excess
            self._floor = 1
        return out, False

    def flush(self) -> tuple[bytes, bool]:
        """The read ended: search the whole window once more and pass on what was held back
        (cut at a match's end, when there is one); the same return as feed()."""
        if not self.held:
            return b"", False
        match = self._search(self._floor)
        if match is None:
            return self._release(self._base + len(self._window)), False
        return self._release(max(self._base + match.end(), self._released)), True

    def _first_start(self, cleared: int) -> int | None:
        """Where in the window a match not yet seen can start at the earliest (see the
        strategy), when that is at most REGEX_RECENT before `cleared`; else None."""
        need, floor = self._need, self._floor
        lowest = max(floor, cleared - self._recent)
        if need is None:
            start = -1
        elif self._table is None:
            start = cleared - need + 1
        else:
            start = -1
            span = 4 * need + 64
            while start < 0:
                low = max(lowest, cleared - span)
                counted = self._window[low:cleared].translate(self._table)
                at = len(counted)
                for _ in range(need):
                    at = counted.rfind(1, 0, at)
                    if at < 0:
                        break
                else:
                    start = low + at + 1
                if low == lowest:
                    break
                span *= 8
        if start >= lowest:
            return start
        # The window's first byte is as far back as any match can start.
        return floor if lowest == floor else None

    def _search(self, pos: int) -> re.Match[bytes] | None:
        return self._pattern.search(self._window, pos)

    def _release(self, upto: int) -> bytes:
        start = self._released - self._base
        self._released = upto
        return bytes(self._window[start : upto - self._base])


class _Receiver:
    """Consumes what the peer sends: cuts at an expectation, decodes frames, emits output."""

    def __init__(
        self,
        *,
        emit: Emit | None,
        expect: Expectations,
        decoder: Decoder | None,
        collect: bool,
        hexdump: bool,
        emit_bounded: Emit | None = None,
    ) -> None:
        self.emit = emit
        self.emit_bounded = emit_bounded
        self._emitting = False
        self.expect = expect
        self.decoder = decoder
        self.collect = collect
        self.hexdumper = HexDumper() if hexdump else None
        self.data = bytearray()
        self.frames: list[bytes] = []
        self.kept = 0  # bytes passed on (after cutting at an expectation)
        self.frame_count = 0
        self.met = False
        self.framing_error: str | None = None
        self._taken = 0  # bytes taken in, up to --expect-bytes (the regex may hold some back)
        self._tail = b""  # last len(until)-1 bytes, so a delimiter split across chunks is seen
        self._regex = _RegexCut(expect.until_regex) if expect.until_regex is not None else None

    def _cut(self, data: bytes) -> tuple[bytes, bool]:
        exp = self.expect
        stop = False
        if exp.expect_bytes is not None and self._taken + len(data) >= exp.expect_bytes:
            data, stop = data[: exp.expect_bytes - self._taken], True
        self._taken += len(data)
        if exp.until is not None:
            joined = self._tail + data
            where = joined.find(exp.until)
            if where >= 0:
                data, stop = data[: where + len(exp.until) - len(self._tail)], True
            else:
                keep = len(exp.until) - 1
                self._tail = joined[-keep:] if keep else b""
        if self._regex is not None:
            data, found = self._regex.feed(data)
            if stop and not found:
                # --expect-bytes ends the read here: what the regex held back goes out now.
                rest, found = self._regex.flush()
                data += rest
            stop = stop or found
        return data, stop

    def feed(self, data: bytes) -> bool:
        """Take one chunk from the peer; True when an expectation is met (stop reading)."""
        data, stop = self._cut(data)
        if self._pass(data):
            stop = True
        if stop and self.framing_error is None:
            self.met = True
        return stop

    def _pass(self, data: bytes) -> bool:
        """Output (or decode) bytes that survived the cut; True when --expect-frames is met or
        a frame is malformed."""
        self.kept += len(data)
        if self.decoder is None:
            self._output(data)
            return False
        if data:  # b"" would tell the decoder the stream ended
            self.decoder.feed(data)
        return self._take_frames()

    def release_held(self) -> None:
        """Pass on what --until-regex still holds back, cut at a match found in it (a last
        search over the whole window)."""
        if self._regex is None or self.met or self.framing_error is not None:
            return
        rest, found = self._regex.flush()
        if (self._pass(rest) or found) and self.framing_error is None:
            self.met = True

    def datagram(self, data: bytes, framing: FramingSpec | None, max_frame: int) -> bool:
        """Take one UDP datagram (decoded on its own with --framing, --max-frame enforced as
        over TCP)."""
        if framing is None:
            return self.feed(data)
        decoder = framing.decoder(max_frame)
        try:
            decoder.feed(data)
            decoder.feed(b"")
            for frame in decoder.frames():
                self._frame(frame)
        except FramingError as exc:
            self.framing_error = f"datagram of {len(data)} bytes: {exc}"
        self.kept += len(data)
        want = self.expect.expect_frames
        return want is not None and self.frame_count >= want

    def _frame(self, frame: bytes) -> None:
        self.frame_count += 1
        if self.collect:
            self.frames.append(frame)
        else:
            self._emit(frame + b"\n")

    def _take_frames(self) -> bool:
        assert self.decoder is not None
        want = self.expect.expect_frames
        try:
            for frame in self.decoder.frames():
                self._frame(frame)
                if want is not None and self.frame_count >= want:
                    return True
        except FramingError as exc:
            # The stream cannot be resynchronised after a bad frame: stop reading.
            self.framing_error = str(exc)
            return True
        return False

    def _output(self, data: bytes) -> None:
        if not data:
            return
        if self.collect:
            self.data += data
        elif self.hexdumper is not None:
            self._emit(self.hexdumper.feed(data))
        else:
            self._emit(data)

    def _emit(self, data: bytes) -> None:
        if data and self.emit is not None:
            self._emitting = True  # still True if a signal cuts this write
            self.emit(data)
            self._emitting = False

    def finish(self, peer_eof: bool, ended_by: str | None = None) -> None:
        """The read ended: flush the hexdump, check for a truncated frame at EOF, or at an
        idle timeout or timeout (half a frame is no reply, whether or not the peer closed)."""
        if ended_by == "interrupted" and self.emit is not None:
            # The signal was the run's end: what is left waits on stdout only a moment
            # (emit_bounded). Waiting on a reader that stopped had no signal left to end it (a
            # --hexdump's last line needed SIGKILL). After a write the signal cut, nothing.
            self.emit = None if self._emitting else (self.emit_bounded or self.emit)
        self.release_held()
        if self.hexdumper is not None and not self.collect:
            self._emit(self.hexdumper.finish())
        if self.decoder is None or self.met or self.framing_error:
            return
        if peer_eof:
            try:
                self.decoder.feed(b"")
                self._take_frames()
            except FramingError as exc:
                self.framing_error = str(exc)
        elif ended_by in ("idle-timeout", "timeout") and self.decoder.buffered:
            # Every whole frame was taken as it arrived: what the decoder holds is a partial one.
            when = "idle timeout" if ended_by == "idle-timeout" else "timeout"
            self.framing_error = (
                f"incomplete frame at {when}: {self.decoder.buffered} bytes of a frame"
            )


class Transcript:
    """Every chunk in either direction as one JSON line (debugging a protocol afterwards).

    Fields: direction ("send" or "recv"), monotonic (time.monotonic() seconds), t_ms (since
    the exchange started), size, data_b64; under --repeat also run (1, 2, ...: the run the
    chunk belongs to; t_ms then counts from that run's start).
    """

    def __init__(self, out: IO[str], name: str | None = None) -> None:
        self.out = out
        self.name = name if name is not None else getattr(out, "name", "transcript")
        self.start = time.monotonic()
        self.run: int | None = None

    def start_run(self, run: int) -> None:
        """Mark the chunks that follow as run `run` of a --repeat, timed from now."""
        self.run = run
        self.start = time.monotonic()

    def record(self, direction: str, data: bytes | memoryview) -> None:
        """Write one line (flushed at once).

        Raises:
            LocalError: the file cannot be written (a full disk, an I/O error).
        """
        now = time.monotonic()
        line: dict[str, Any] = {} if self.run is None else {"run": self.run}
        line.update(
            direction=direction,
            monotonic=round(now, 6),
            t_ms=round((now - self.start) * 1000, 3),
            size=len(data),
            data_b64=base64.b64encode(data).decode("ascii"),
        )
        try:
            self.out.write(json.dumps(line, separators=(", ", ": ")) + "\n")
            self.out.flush()
        except OSError as exc:
            name = errno_name(exc.errno) or "error"
            raise LocalError(
                f"--transcript {str(self.name)!r}: cannot write it: {name}: {exc.strerror or exc}",
                errno_name(exc.errno),
            ) from exc


# ---------------------------------------------------------------------------------------------
# One exchange
# ---------------------------------------------------------------------------------------------


@dataclass
class SendOptions:
    """Everything one exchange needs (the CLI fills it from the flags)."""

    target: Target
    source: InputSource
    family: int = 0
    udp: bool = False
    crlf: bool = False
    framing: FramingSpec | None = None
    max_frame: int = 16 * 1024 * 1024
    shutdown: bool = True
    timeout_s: float | None = None
    idle_timeout_s: float | None = 2.0
    expect: Expectations = field(default_factory=Expectations)
    collect: bool = False  # keep data/frames in the result (--json) instead of emitting
    hexdump: bool = False


@dataclass
class SendResult:
    """The outcome of one exchange; field names are the --json keys."""

    target: str
    address: str | None  # None: no connection was made
    proto: str
    bytes_sent: int = 0
    bytes_received: int = 0
    connect_ms: float | None = None
    first_byte_ms: float | None = None
    total_ms: float | None = 0.0
    ended_by: str = "eof"
    errno_name: str | None = None
    error: str | None = None  # the message of the error that ended the run
    expect_met: bool | None = None
    framing_error: str | None = None
    # The whole input went out (an upload stalled by a peer that stopped reading: False).
    input_complete: bool = True
    datagrams_sent: int | None = None
    datagrams_received: int | None = None
    data: bytes | None = None
    frames: list[bytes] | None = None

    def record(self) -> dict[str, Any]:
        """The --json object: data as UTF-8 text when it decodes, else data_b64."""
        rec: dict[str, Any] = {"kind": "send"}
        for key in (
            "target",
            "address",
            "proto",
            "bytes_sent",
            "bytes_received",
            "connect_ms",
            "first_byte_ms",
            "total_ms",
            "ended_by",
            "input_complete",
        ):
            rec[key] = getattr(self, key)
        for key in ("errno_name", "error", "expect_met", "framing_error"):
            if getattr(self, key) is not None:
                rec[key] = getattr(self, key)
        if self.datagrams_sent is not None:
            rec["datagrams_sent"] = self.datagrams_sent
            rec["datagrams_received"] = self.datagrams_received
        if self.frames is not None:
            texts = [_utf8(f) for f in self.frames]
            if all(t is not None for t in texts):
                rec["frames"] = texts
            else:
                rec["frames_b64"] = [base64.b64encode(f).decode("ascii") for f in self.frames]
        elif self.data is not None:
            text = _utf8(self.data)
            if text is not None:
                rec["data"] = text
            else:
                rec["data_b64"] = base64.b64encode(self.data).decode("ascii")
        return rec


def _utf8(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _addresses(opts: SendOptions) -> list[Resolved]:
    target = opts.target
    if target.path is not None:
        if opts.udp:
            raise UsageError(f"{target.text!r}: --udp works with HOST:PORT targets only")
        return [unix_address(target.path)]
    if target.ports is None or len(target.ports) != 1:
        raise UsageError(f"{target.text!r}: give exactly one port (HOST:PORT or [V6]:PORT)")
    if target.host is None or "/" in target.host:
        raise UsageError(f"{target.text!r}: send needs one host, not a CIDR block")
    return resolve_named(target.host, target.ports[0], family=opts.family)


def _is_unix(addr: Resolved) -> bool:
    # unix_address() stores the path itself where inet addresses keep a tuple.
    sockaddr: object = addr.sockaddr
    return isinstance(sockaddr, str)


def _shown(addr: Resolved) -> str:
    if _is_unix(addr):
        return format_sockaddr(addr.sockaddr)
    return format_hostport(addr.host, addr.port)


class _ResetOnConnect(PeerResetError):
    """connect() found the connection already reset by the peer (SO_ERROR ECONNRESET)."""

    def __init__(self, shown: str, errno_name: str | None, elapsed_s: float) -> None:
        super().__init__("connect", None, errno_name, shown)
        self.address = shown
        self.elapsed_s = elapsed_s


# connect(2) on a Unix socket path fails with these when the permissions of the file (or of a
# directory on its path) forbid it: this host refusing us, exit 6 as port-check's `error` row
# for the same path. Over TCP the same errnos come from an admin-prohibited route (a
# firewall's reject): unreachable, exit 1, as README documents for both commands.
_UNIX_PERMISSION_ERRNOS = frozenset({"EACCES", "EPERM"})


class _RefusedHereError(LocalError, ConnectError):
    """A connect this host refused: a Unix socket path's permissions, or an errno the socket
    core classifies as this host's own (EADDRNOTAVAIL: IPv6 disabled, no free local port).

    A LocalError for the exit code (6), and still a ConnectError, so the run is reported as
    any failed connect is (`--json`'s object, a counted `--repeat` run)."""

    def __init__(self, shown: str, errno_name: str | None, why: str = "") -> None:
        # NetworkError's constructor alone: LocalError's would reset errno_name to None.
        detail = f"{shown}: {why}" if why else shown
        ConnectError.__init__(self, "connect", None, errno_name, detail)


def _connect(addrs: list[Resolved], deadline: float) -> tuple[Any, Resolved, float]:
    """Try each address in turn; the first that connects wins. Failing all, what a target
    said (refused, timed out) is the outcome rather than this host's refusal of another
    address (::1 where IPv6 is disabled: exit 6 for a `localhost` whose 127.0.0.1 refused)."""
    last_error: Exception | None = None
    target_error: Exception | None = None
    for addr in addrs:
        outcome = connect_nonblocking(addr, deadline=deadline, keep=True)
        if outcome.state is ConnectState.OPEN and outcome.sock is not None:
            return outcome.sock, addr, outcome.elapsed_s
        shown = _shown(addr)
        if _is_unix(addr) and outcome.errno_name in _UNIX_PERMISSION_ERRNOS:
            last_error = _RefusedHereError(shown, outcome.errno_name)
        elif outcome.state is ConnectState.TIMEOUT:
            last_error = DeadlineExceeded(f"connect to {shown}")
        elif outcome.state is ConnectState.RESET:
            # The handshake completed, and the peer's RST came before we looked (a server that
            # accepts and aborts at once): a connection that ended by reset, not a failed one.
            raise _ResetOnConnect(shown, outcome.errno_name, outcome.elapsed_s)
        elif outcome.state is ConnectState.ERROR:
            # The errno->outcome table port-check and reset client use: this host's own
            # refusal (EADDRNOTAVAIL, ...) is exit 6, not the target saying no (exit 1).
            last_error = _RefusedHereError(shown, outcome.errno_name)
        else:
            last_error = ConnectError("connect", None, outcome.errno_name, shown)
        if not isinstance(last_error, _RefusedHereError):
            target_error = last_error
    assert last_error is not None
    raise target_error or last_error


def failed_result(
    opts: SendOptions, exc: NetworkError | DeadlineExceeded | KeyboardInterrupt
) -> SendResult:
    """The result of a run that never got a connection (same fields as any other run).

    `address` and the timings are None; ended_by is "timeout" for a connect timeout,
    "interrupted" for Ctrl-C (or SIGTERM) while connecting, else "error" with errno_name
    (ECONNREFUSED, EAI_NONAME, ...) and the error message.
    """
    proto = "unix" if opts.target.path is not None else ("udp" if opts.udp else "tcp")
    if isinstance(exc, KeyboardInterrupt):
        ended, errno_name_, error = "interrupted", None, None
    elif isinstance(exc, DeadlineExceeded):
        ended, errno_name_, error = "timeout", None, str(exc)
    else:
        ended, errno_name_, error = "error", exc.errno_name, str(exc)
    result = SendResult(
        opts.target.text,
        None,
        proto,
        total_ms=None,
        ended_by=ended,
        errno_name=errno_name_,
        error=error,
        input_complete=False,
    )
    if opts.udp:
        result.datagrams_sent = result.datagrams_received = 0
    return result


def _check_input(opts: SendOptions) -> None:
    """Encode every frame (or datagram) once, sending nothing, then seek back.

    So an input a framing cannot carry (a `line` payload containing a newline, 256 bytes for
    `len8`) is refused before a connection is opened. Only input that can be read twice is
    checked here (DATA, a regular file); a pipe is checked frame by frame as it is sent, so
    its earlier frames may already be on the wire.

    Raises:
        UsageError: a frame that cannot be encoded.
    """
    framing = opts.framing
    if (framing is not None and framing.name == "raw") or (framing is None and not opts.udp):
        return  # nothing can fail to encode (UDP cuts lines, which --max-frame bounds)
    start = opts.source.offset()
    if start is None:
        return
    try:
        if opts.udp:
            for _datagram in _datagrams(opts, [False]):
                pass
        else:
            read = _input_reader(
                opts.source, crlf=opts.crlf, framing=framing, max_frame=opts.max_frame
            )
            eof = False
            while not eof:
                _chunk, eof = read(PUMP_CHUNK)
    finally:
        opts.source.seek(start)


def exchange(
    opts: SendOptions,
    emit: Emit | None,
    transcript: Transcript | None = None,
    emit_bounded: Emit | None = None,
) -> SendResult:
    """Run one exchange: connect, send the input, read the reply until it ends.

    Input that can be read twice is encoded (checked) before the connect, so a payload the
    framing cannot carry is refused before anything is sent.

    Args:
        opts: what to send and how the read ends.
        emit: receives output bytes as they arrive (raw, hexdump or frame lines); None
            discards them (--repeat).
        transcript: records every chunk in both directions.
        emit_bounded: as emit, waiting at most a moment on stdout (the rest then dropped):
            used for the output left once a signal ended the run. None: emit.

    Returns:
        SendResult; how the read ended is in ended_by ("eof", "reset", "idle-timeout",
        "timeout", "expect", "error", "interrupted": Ctrl-C, or SIGTERM with
        cli/_run.sigterm_as_interrupt, during the exchange). UDP: an ICMP port unreachable is ended_by "error"
        with errno_name ECONNREFUSED (the datagrams sent before it are counted).

    Raises:
        UsageError: bad target or unframeable input. ResolveError: the name did not resolve.
        ConnectError: refused or unreachable (a Unix socket path whose permissions refuse
        us is also a LocalError: exit 6). DeadlineExceeded: the connect timed out.
    """
    _check_input(opts)
    return _exchange_checked(opts, emit, transcript, emit_bounded)


def _exchange_checked(
    opts: SendOptions,
    emit: Emit | None,
    transcript: Transcript | None,
    emit_bounded: Emit | None = None,
) -> SendResult:
    if opts.udp:
        return _exchange_udp(opts, emit, transcript, emit_bounded)
    addrs = _addresses(opts)
    start = time.monotonic()
    deadline = start + opts.timeout_s if opts.timeout_s is not None else None
    # Without --timeout a connect is bounded by the idle timeout: "nothing happened for 2 s".
    idle = opts.idle_timeout_s
    connect_deadline = deadline if deadline is not None else start + (idle or 10.0)
    # Built before the connect: DATA is encoded here, and nothing may raise between the
    # connect and the try/finally that closes the socket.
    read_input = _input_reader(
        opts.source, crlf=opts.crlf, framing=opts.framing, max_frame=opts.max_frame
    )
    try:
        sock, addr, connect_s = _connect(addrs, connect_deadline)
    except _ResetOnConnect as exc:
        # As a reset right after the connect is reported (ended_by "reset", exit 4), with
        # nothing sent or received.
        reset = SendResult(
            opts.target.text,
            exc.address,
            "tcp",
            connect_ms=_ms(exc.elapsed_s),
            total_ms=_ms(time.monotonic() - start) or 0.0,
            ended_by="reset",
            errno_name=exc.errno_name,
            input_complete=False,
            expect_met=False if opts.expect.any else None,
        )
        if opts.collect:
            reset.data = b""
            reset.frames = [] if opts.framing is not None else None
        return reset
    proto = "unix" if _is_unix(addr) else "tcp"
    result = SendResult(opts.target.text, _shown(addr), proto, connect_ms=_ms(connect_s))
    receiver = _Receiver(
        emit=emit,
        expect=opts.expect,
        decoder=opts.framing.decoder(opts.max_frame) if opts.framing is not None else None,
        collect=opts.collect,
        hexdump=opts.hexdump,
        emit_bounded=emit_bounded,
    )

    def on_received(data: bytes) -> bool:
        if transcript is not None:
            transcript.record("recv", data)
        return receiver.feed(data)

    def on_sent(data: memoryview) -> None:
        if transcript is not None:
            transcript.record("send", data)

    # A regular file sent as it is goes through sendfile(2): no copy through Python at all.
    src = opts.source
    zero_copy = (
        src.fd is not None
        and src.data is None
        and not src.pollable
        and not opts.crlf
        and opts.framing is None
        and transcript is None
    )
    pumped = PumpResult()
    try:
        pump_duplex(
            sock,
            # Also with sendfile: a file it cannot send (most of /proc) is read instead.
            read_input=read_input,
            sendfile_fd=src.fd if zero_copy else None,
            input_fd=src.fd if src.pollable else None,
            on_received=on_received,
            on_sent=on_sent if transcript is not None else None,
            deadline=deadline,
            idle_timeout_s=idle,
            shutdown_on_input_eof=opts.shutdown,
            # A peer's FIN may be a half-close (listen, `nc -N`): it still reads, so the rest
            # of the input goes out, as nc sends it. Stopping here cut uploads short silently.
            # (send never reads a terminal, so the input always ends.)
            stop_on_peer_eof=False,
            into=pumped,
        )
    except KeyboardInterrupt:
        # Ctrl-C (or SIGTERM, see cli/_run.sigterm_as_interrupt) mid-exchange: the run still
        # says how it ended, with what moved until then; the exit code comes from ended_by.
        pumped.ended_by = "interrupted"
    finally:
        sock.close()
    end = time.monotonic()
    while True:
        # A signal here, after the exchange (copying a 100 MB reply takes a while), used to
        # escape with the result unfilled: the report said nothing was sent or received.
        # It marks the run interrupted instead, and the result is filled again.
        try:
            receiver.finish(pumped.peer_eof, pumped.ended_by)  # may write: stdout can block
            result.bytes_sent = pumped.bytes_sent
            result.input_complete = pumped.input_done_at is not None
            result.bytes_received = pumped.bytes_received
            result.first_byte_ms = _ms(
                None if pumped.first_byte_at is None else pumped.first_byte_at - start
            )
            result.total_ms = _ms(end - start) or 0.0
            result.ended_by = "expect" if pumped.ended_by == "stopped" else pumped.ended_by
            if receiver.framing_error is not None:
                result.framing_error = receiver.framing_error
                if result.ended_by == "expect" and not receiver.met:
                    result.ended_by = "error"  # a malformed frame, not an expectation
            result.errno_name = pumped.errno_name
            result.expect_met = receiver.met if opts.expect.any else None
            if opts.collect:
                result.data = bytes(receiver.data)
                result.frames = receiver.frames if opts.framing is not None else None
            return result
        except KeyboardInterrupt:
            pumped.ended_by = "interrupted"


# The most one datagram carries over IPv4; raw input is cut into reads of at most this.
_MAX_DATAGRAM = 65507


class _UdpEnded(Exception):
    """The run ended (a reply met --expect, the deadline) while waiting for the input."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _read_ahead(read: Callable[[int], tuple[bytes, bool]]) -> Callable[[int], tuple[bytes, bool]]:
    """The same reader, its `eof` set with the last chunk rather than on the empty read after it
    (for inputs whose reads never block: a read ahead must not wait for more input)."""
    ahead: tuple[bytes, bool] | None = None

    def read_one(n: int) -> tuple[bytes, bool]:
        nonlocal ahead
        chunk, eof = ahead if ahead is not None else read(n)
        ahead = None
        if eof:
            return chunk, True
        ahead = read(n)
        if not ahead[0] and ahead[1]:
            ahead = None
            return chunk, True
        return chunk, False

    return read_one


def _datagrams(
    opts: SendOptions, last: list[bool], wait_input: Callable[[], None] | None = None
) -> Iterator[bytes]:
    """Each DATA, each input line, or each line as a --framing frame: one datagram. With
    --framing raw, each read of the input (at most 65,507 bytes) is one, bytes unchanged.

    `last[0]` is set before the final datagram is yielded, when the input's end is known by
    then: a reply that ends the run right after it (an ICMP refusal) must not make the input
    look unsent. `wait_input` is called before each read of a pollable input (it returns once
    the input is readable, or raises _UdpEnded): replies are taken while the input pauses."""
    source, spec = opts.source, opts.framing
    if source.data is not None:
        last[0] = True
        data = CrlfConverter().feed(source.data) if opts.crlf else source.data
        yield _encode_frame(spec, data, opts.max_frame) if spec is not None else data
        return
    read = source.chunks(PUMP_CHUNK)
    if wait_input is None:
        # A file never blocks: one read ahead tells whether this chunk is the last, so a
        # run ended by the reply to the final datagram still counts its input as complete.
        read = _read_ahead(read)
    raw = spec is not None and spec.name == "raw"
    splitter = LineSplitter(opts.max_frame)
    eof = False
    while not eof:
        if wait_input is not None:
            wait_input()
        chunk, eof = read(_MAX_DATAGRAM if raw else PUMP_CHUNK)
        if raw:
            # Lines would drop the newlines (as over TCP): the bytes go as they were read.
            last[0] = eof
            if chunk:
                yield chunk
            continue
        lines = splitter.feed(chunk, eof)
        if spec is not None and spec.name == "crlf":
            lines = [_line_of_crlf(line) for line in lines]
        for index, line in enumerate(lines):
            if opts.crlf:
                # The line's ending as CRLF; one that was CRLF already keeps its one CR.
                line = line.removesuffix(b"\r") + b"\r\n"
            last[0] = eof and index == len(lines) - 1
            yield _encode_frame(spec, line, opts.max_frame) if spec is not None else line


def _exchange_udp(
    opts: SendOptions,
    emit: Emit | None,
    transcript: Transcript | None,
    emit_bounded: Emit | None = None,
) -> SendResult:
    # A datagram goes to one address: the one every command takes for a name.
    addr = preferred(_addresses(opts))
    start = time.monotonic()
    deadline = start + opts.timeout_s if opts.timeout_s is not None else None
    try:
        sock = connect_udp(addr)
    except LocalError as exc:
        # As over TCP: the run still gets its --json object, and exit 6.
        why = str(exc).split(": ", 2)[-1]
        raise _RefusedHereError(_shown(addr), exc.errno_name, why) from exc
    result = SendResult(opts.target.text, _shown(addr), "udp", connect_ms=0.0)
    result.datagrams_sent = result.datagrams_received = 0
    receiver = _Receiver(
        emit=emit,
        expect=opts.expect,
        decoder=None,
        collect=opts.collect,
        hexdump=opts.hexdump,
        emit_bounded=emit_bounded,
    )
    first_byte_at: float | None = None
    last_activity = start
    want = opts.expect.expect_datagrams
    gate = CountingGate()  # a Ctrl-C waits until the datagram in hand is counted

    def take(until: float | None) -> str | None:
        """Read replies until `until` (None: only those already queued); an end reason."""
        nonlocal first_byte_at, last_activity
        while True:
            if not wait_readable([sock], until if until is not None else time.monotonic()):
                return None
            with gate:
                data, _src, _reply_from = recv_datagram(sock, None)
                now = time.monotonic()
                last_activity = now
                if first_byte_at is None:
                    first_byte_at = now
                assert result.datagrams_received is not None
                result.datagrams_received += 1
                result.bytes_received += len(data)
                with gate.unheld():  # writes to the transcript and stdout, which may block
                    if transcript is not None:
                        transcript.record("recv", data)
                    stop = receiver.datagram(data, opts.framing, opts.max_frame)
            last_activity = time.monotonic()  # a blocked stdout is not the peer being idle
            if stop or (want is not None and result.datagrams_received >= want):
                receiver.met = True
                return "expect"

    def failed(exc: NetworkError) -> str:
        # Network outcomes are data: the datagrams already sent stay counted.
        result.errno_name = exc.errno_name
        result.error = str(exc)
        if exc.errno_name == "ECONNREFUSED":
            detail = f"nothing listens on {result.address}/udp (ICMP port unreachable)"
            result.error = str(NetworkError(exc.op, exc.errno, exc.errno_name, detail))
        elif exc.errno_name == "EMSGSIZE":
            # "send: send: EMSGSIZE: Message too long" read as a stutter and said no limit.
            detail = "a UDP datagram carries at most 65,507 bytes (IPv6: 65,527)"
            result.error = str(NetworkError("datagram", exc.errno, exc.errno_name, detail))
        return "error"

    def wait_input() -> None:
        """Take replies while the input pauses; return once it is readable."""
        fd = opts.source.fd
        assert fd is not None
        while True:
            ready = wait_readable([sock, fd], deadline)
            if sock.fileno() in ready:
                reason = take(None)
                if reason is not None:
                    raise _UdpEnded(reason)
            if fd in ready:
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise _UdpEnded("timeout")

    pollable = opts.source.pollable and opts.source.fd is not None
    ended: str | None = None
    result.input_complete = False
    last = [False]
    try:
        with gate.watching():
            for datagram in _datagrams(opts, last, wait_input if pollable else None):
                if deadline is not None and time.monotonic() >= deadline:
                    ended = "timeout"
                    break
                with gate:
                    result.bytes_sent += send_datagram(sock, datagram)
                    assert result.datagrams_sent is not None
                    result.datagrams_sent += 1
                    result.input_complete = last[0]
                    last_activity = time.monotonic()
                if transcript is not None:
                    transcript.record("send", datagram)  # a write that may wait
                ended = take(None)
                if ended is not None:
                    break
            else:
                result.input_complete = True
            while ended is None:
                # The idle limit moves with each reply: reading up to a limit fixed before the
                # replies came made --idle-timeout an overall one (20 of 60 lines, exit 0).
                idle_at = last_activity + opts.idle_timeout_s if opts.idle_timeout_s else None
                limits = [t for t in (deadline, idle_at) if t is not None]
                until = min(limits) if limits else None
                # (No limit at all: block for a reply; only one, or --expect, ends the read.)
                if not wait_readable([sock], until):
                    ended = "timeout" if until == deadline else "idle-timeout"
                    break
                ended = take(None)
    except _UdpEnded as stop:
        ended = stop.reason
    except NetworkError as exc:
        # Linux: ECONNREFUSED on the recv (or the next send) after an ICMP port unreachable;
        # also EMSGSIZE, ENETUNREACH, ... from a send.
        ended = failed(exc)
    except KeyboardInterrupt:
        ended = "interrupted"  # as over TCP: the run is reported, then exits 130
    finally:
        sock.close()
    end = time.monotonic()
    while True:  # as over TCP: a signal after the exchange marks it interrupted, then fill
        try:
            receiver.finish(False, ended)  # may write: stdout can block
            result.ended_by = ended
            result.first_byte_ms = _ms(None if first_byte_at is None else first_byte_at - start)
            result.total_ms = _ms(end - start) or 0.0
            result.expect_met = receiver.met if opts.expect.any else None
            result.framing_error = receiver.framing_error
            if opts.collect:
                result.data = bytes(receiver.data)
                result.frames = receiver.frames if opts.framing is not None else None
            return result
        except KeyboardInterrupt:
            ended = "interrupted"


def exit_status_for(result: SendResult) -> ExitStatus:
    """0 completed; 4 reset; 3 timed out, no answer at all, or input left unsent at the idle
    timeout; 1 expectation not met at EOF, or a framing error (a partial frame at the idle
    timeout too)."""
    if result.ended_by == "interrupted":
        return ExitStatus.INTERRUPTED
    if result.ended_by == "reset":
        return ExitStatus.RESET
    if result.ended_by == "error":
        # This host's own refusal (EMSGSIZE for a datagram above 65,507 bytes, EMFILE,
        # EADDRNOTAVAIL, a Unix socket file's permissions, ...) is exit 6, as everywhere in
        # the suite; the peer's is 1.
        if result.proto == "unix" and result.errno_name in _UNIX_PERMISSION_ERRNOS:
            return ExitStatus.LOCAL
        code = getattr(errno, result.errno_name or "", None)
        # No connection made: the connect's errno (EINVAL there is a blackhole route).
        classify = classify_connect_errno if result.address is None else classify_errno
        if isinstance(code, int) and classify(code) is ConnectState.ERROR:
            return ExitStatus.LOCAL
        return ExitStatus.NOT_OPEN
    if result.ended_by == "timeout":
        return ExitStatus.TIMEOUT
    if result.framing_error is not None:
        return ExitStatus.NOT_OPEN
    if result.expect_met is False:
        return ExitStatus.TIMEOUT if result.ended_by == "idle-timeout" else ExitStatus.NOT_OPEN
    if result.ended_by == "idle-timeout" and not result.input_complete:
        return ExitStatus.TIMEOUT  # the peer stopped reading: the upload stalled halfway
    # The peer never answered. Not bytes_received == 0: an empty UDP datagram is an answer.
    answered = result.first_byte_ms is not None or result.bytes_received > 0
    if result.ended_by == "idle-timeout" and not answered:
        return ExitStatus.TIMEOUT
    return ExitStatus.OK


# ---------------------------------------------------------------------------------------------
# --repeat
# ---------------------------------------------------------------------------------------------


def percentile(sorted_values: list[float], pct: float) -> float:
    """Linear-interpolated percentile of an ascending list (numpy's default method)."""
    if not sorted_values:
        raise ValueError("no values")
    pos = (len(sorted_values) - 1) * pct / 100
    low = math.floor(pos)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (pos - low)


def latency_stats(results: list[SendResult]) -> dict[str, Any]:
    """The `send-stats` object of a --repeat: outcomes counted, and latency statistics.

    runs = completed (exit status 0) + failed. `ended_by` and `errno_name` count the runs'
    own values. connect_ms, first_byte_ms and total_ms are each {min, avg, p50, p90, p99,
    max, count} in ms over the runs that have that timing (a run that never connected has
    none; first_byte_ms needs a reply); with count 0 the other fields are null.
    """
    completed = sum(1 for r in results if exit_status_for(r) is ExitStatus.OK)
    stats: dict[str, Any] = {
        "kind": "send-stats",
        "runs": len(results),
        "completed": completed,
        "failed": len(results) - completed,
        "ended_by": {},
        "errno_name": {},
    }
    for r in results:
        stats["ended_by"][r.ended_by] = stats["ended_by"].get(r.ended_by, 0) + 1
        if r.errno_name is not None:
            stats["errno_name"][r.errno_name] = stats["errno_name"].get(r.errno_name, 0) + 1
    for metric in ("connect_ms", "first_byte_ms", "total_ms"):
        values = sorted(v for r in results if (v := getattr(r, metric)) is not None)
        row: dict[str, float | int | None] = dict.fromkeys(STAT_KEYS)
        row["count"] = len(values)
        if values:
            row.update(
                min=values[0],
                avg=round(sum(values) / len(values), 3),
                p50=round(percentile(values, 50), 3),
                p90=round(percentile(values, 90), 3),
                p99=round(percentile(values, 99), 3),
                max=values[-1],
            )
        stats[metric] = row
    return stats


def repeat_exchange(
    opts: SendOptions,
    count: int,
    interval_s: float,
    on_result: Callable[[SendResult], None] | None = None,
    transcript: Transcript | None = None,
) -> tuple[list[SendResult], ExitStatus]:
    """Run the exchange `count` times, a new connection each time, `interval_s` apart.

    The input is checked once, before the first run (as exchange() does). A run whose
    connect fails is a result too (failed_result(): address and timings None, ended_by
    "timeout" or "error" with errno_name) and the runs go on; resolution and usage errors
    end the loop at once. A transcript records every run, its lines numbered with `run`.

    Returns:
        (one result per run, the worst exit status); a Ctrl-C ends the runs there, with
        ExitStatus.INTERRUPTED (the run it cut short is a result, ended_by "interrupted").

    Raises:
        UsageError: the input cannot be replayed, or cannot be framed.
        LocalError: the transcript cannot be written.
    """
    from netprobe.exitcodes import exit_status_for_error, worst

    results: list[SendResult] = []
    statuses: list[ExitStatus] = []
    for run in range(count):
        try:
            if run and interval_s > 0:
                sleep(interval_s)  # not time.sleep: a signal just before it was slept through
        except KeyboardInterrupt:
            break  # between runs: the statistics of those done
        if not opts.source.rewind():
            raise UsageError("--repeat needs DATA, --file or a regular-file stdin to replay")
        if run == 0:
            try:
                _check_input(opts)  # reads a whole file: it can take a while
            except KeyboardInterrupt:
                break
        try:
            if transcript is not None:
                transcript.start_run(run + 1)
            result = _exchange_checked(opts, None, transcript)
            status = exit_status_for(result)
        except (ConnectError, PeerResetError, DeadlineExceeded) as exc:
            result = failed_result(opts, exc)
            status = exit_status_for_error(exc)
        except KeyboardInterrupt as exc:
            # While connecting: the run is reported as a single run would be.
            result = failed_result(opts, exc)
            status = ExitStatus.INTERRUPTED
        results.append(result)
        statuses.append(status)
        if on_result is not None:
            try:
                on_result(result)  # may write: stdout can block
            except KeyboardInterrupt:
                status = ExitStatus.INTERRUPTED
        if status is ExitStatus.INTERRUPTED:
            break
    else:
        return results, worst(statuses)
    return results, ExitStatus.INTERRUPTED
