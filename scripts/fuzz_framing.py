#!/usr/bin/env python3
"""Fuzz every netprobe framing decoder with hostile input. Pure: no sockets.

Each example picks a decoder (every --framing name plus extra delimiters), a max_frame, a
byte string (garbage, or valid frames with a few bytes flipped, cut or appended) and a
chunking, then feeds the chunks and drains frames after each one. It checks:

- nothing but a FramingError subclass ever escapes (the only allowed failure);
- memory: after a feed the decoder holds at most max_frame + the codec's fixed overhead
  (length header, partial delimiter, netstring digits: <= 10 bytes) + the largest chunk fed
  so far, and after draining at most max_frame + that overhead;
- consistency: the frames taken, re-encoded, plus trailing_data are exactly the bytes fed
  (so no byte is lost, invented or reordered, even in garbage).

Engines: atheris (coverage-guided libFuzzer) when it is importable, otherwise hypothesis.

    python scripts/fuzz_framing.py --examples 100000      # the full run (see the note)
    python scripts/fuzz_framing.py --smoke                # a few seconds, as CI runs it

Exit status 0 when every example passed; a failing example raises with its input shown.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import random
import resource
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from netprobe.errors import FramingError

if TYPE_CHECKING:
    from netprobe.framing import Decoder

SMOKE_EXAMPLES = 600


@dataclass(frozen=True)
class Target:
    """One decoder under fuzz; ``fixed`` is its overhead beyond max_frame (None: netstring,
    whose overhead is the digits of max_frame plus the ':')."""

    name: str
    make: Callable[[int], Decoder]
    encode: Callable[[bytes], bytes]
    fixed: int | None

    def overhead(self, max_frame: int) -> int:
        return len(str(max_frame)) + 1 if self.fixed is None else self.fixed


def load_targets() -> list[Target]:
    """Import netprobe.framing (atheris instruments it on the way in) and list the decoders."""
    from netprobe.framing import FRAMING_NAMES, DelimiterDecoder, encode_delimited, parse_framing

    fixed: dict[str, int | None] = {"raw": 0, "line": 0, "crlf": 1, "netstring": None}
    out = [
        Target(name, parse_framing(name).decoder, parse_framing(name).encode, fixed.get(name))
        for name in FRAMING_NAMES
        if name in fixed
    ]
    out += [
        Target(name, parse_framing(name).decoder, parse_framing(name).encode, int(name[3:]) // 8)
        for name in FRAMING_NAMES
        if name.startswith("len")
    ]
    for delimiter in (b"\x00", b"--END--"):
        out.append(
            Target(
                f"delim={delimiter!r}",
                partial(DelimiterDecoder, delimiter),
                partial(encode_delimited, delimiter=delimiter),
                len(delimiter) - 1,
            )
        )
    return out


TARGETS: list[Target] = []


class Stats:
    def __init__(self) -> None:
        self.examples = 0
        self.frames = 0
        self.outcomes: Counter[str] = Counter()


STATS = Stats()


def check_one(target: Target, max_frame: int, chunks: list[bytes], eof: bool) -> None:
    """Run one example; raises AssertionError (or any unexpected exception) on a bug."""
    decoder = target.make(max_frame)
    rest = max_frame + target.overhead(max_frame)
    taken: list[bytes] = []
    accepted = bytearray()  # what the decoder was given before any error
    largest = 0
    outcome = "clean"
    try:
        for chunk in chunks:
            if not chunk:
                continue  # b"" would be EOF: an empty recv-loop turn just drains
            largest = max(largest, len(chunk))
            decoder.feed(chunk)
            accepted += chunk
            assert decoder.buffered <= rest + largest, (decoder.buffered, rest, largest)
            taken.extend(decoder.frames())
            assert decoder.buffered <= rest, (decoder.buffered, rest)
        if eof:
            decoder.feed(b"")
            taken.extend(decoder.frames())
    except FramingError as exc:
        outcome = type(exc).__name__
    trailing, _ = decoder.trailing_data
    assert len(trailing) == decoder.buffered
    replay = b"".join(target.encode(frame) for frame in taken) + trailing
    assert replay == accepted, "frames + trailing_data differ from the bytes fed"
    STATS.examples += 1
    STATS.frames += len(taken)
    STATS.outcomes[outcome] += 1


def split(data: bytes, sizes: list[int]) -> list[bytes]:
    chunks = []
    pos = 0
    for size in sizes:
        chunks.append(data[pos : pos + size])
        pos += size
    chunks.append(data[pos:])
    return chunks


def valid_stream(target: Target, rng: random.Random, payload: bytes) -> bytes:
    """Frames cut from ``payload``, encoded (skipping any the codec cannot carry)."""
    out = bytearray()
    pos = 0
    while pos < len(payload):
        size = rng.randrange(0, 40)
        with contextlib.suppress(ValueError):  # a payload holding the delimiter
            out += target.encode(payload[pos : pos + size])
        pos += size or 1
    return bytes(out)


def mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randrange(0, 4)):
        op = rng.randrange(3)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf and pos < len(buf):
            buf[pos] = rng.randrange(256)
        elif op == 1:
            del buf[pos : pos + rng.randrange(1, 4)]
        else:
            buf[pos:pos] = rng.choice([b"\n", b"\r\n", b":", b",", b"0", b"9", b"--END--", b"\xff"])
    return bytes(buf)


def pick_max_frame(choice: int, value: int) -> int:
    # Mostly tiny caps, so limits trigger often; sometimes the default-sized ones.
    return (value % 48, value % 400, value % 70_000, 16 * 1024 * 1024)[choice % 4]


# --- atheris (coverage-guided) ------------------------------------------------------------


def run_atheris(examples: int, seed: int, report: Callable[[], None]) -> None:
    atheris: Any = importlib.import_module("atheris")

    def one_input(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        target = TARGETS[fdp.ConsumeIntInRange(0, len(TARGETS) - 1)]
        max_frame = pick_max_frame(fdp.ConsumeIntInRange(0, 3), fdp.ConsumeIntInRange(0, 1 << 24))
        eof = fdp.ConsumeBool()
        as_frames = fdp.ConsumeBool()
        sizes = [fdp.ConsumeIntInRange(0, 80) for _ in range(fdp.ConsumeIntInRange(0, 12))]
        body = fdp.ConsumeBytes(fdp.remaining_bytes())
        if as_frames:
            rng = random.Random(body)
            body = mutate(valid_stream(target, rng, body), rng)
        check_one(target, max_frame, split(body, sizes), eof)
        if STATS.examples == examples:
            report()  # libFuzzer ends the process with exit(), skipping Python's atexit

    with atheris.instrument_imports(include=["netprobe.framing"]):
        TARGETS.extend(load_targets())
    atheris.Setup(
        [
            sys.argv[0],
            f"-runs={examples}",
            f"-seed={seed or 1}",  # libFuzzer takes 0 as "seed from the clock"
            "-max_len=4096",
            "-len_control=0",  # long inputs from the start: they reach the max_frame paths
            "-print_final_stats=1",
        ],
        one_input,
    )
    atheris.Fuzz()  # libFuzzer exits the process when the runs are done


# --- hypothesis -----------------------------------------------------------------------------


def run_hypothesis(examples: int, seed: int) -> None:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed
    from hypothesis import strategies as st

    fragments = st.sampled_from([b"\n", b"\r\n", b"\x00", b"--END--", b"0", b"5:", b",", b":"])
    headers = st.integers(0, 2**64 - 1).map(lambda n: n.to_bytes(8, "big"))
    garbage = st.lists(st.one_of(st.binary(max_size=40), fragments, headers), max_size=20).map(
        b"".join
    )

    @hseed(seed)
    @settings(
        max_examples=examples,
        database=None,
        deadline=None,
        phases=[Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @given(
        index=st.integers(0, len(TARGETS) - 1),
        cap=st.tuples(st.integers(0, 3), st.integers(0, 1 << 24)),
        body=garbage,
        as_frames=st.booleans(),
        sizes=st.lists(st.integers(0, 80), max_size=12),
        eof=st.booleans(),
        rng_seed=st.integers(0, 2**32),
    )
    def fuzz(
        index: int,
        cap: tuple[int, int],
        body: bytes,
        as_frames: bool,
        sizes: list[int],
        eof: bool,
        rng_seed: int,
    ) -> None:
        target = TARGETS[index]
        if as_frames:
            rng = random.Random(rng_seed)
            body = mutate(valid_stream(target, rng, body), rng)
        check_one(target, pick_max_frame(*cap), split(body, sizes), eof)

    fuzz()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--examples", type=int, default=None, help="examples to run")
    parser.add_argument("--smoke", action="store_true", help=f"{SMOKE_EXAMPLES} examples")
    parser.add_argument("--engine", choices=["auto", "atheris", "hypothesis"], default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    examples = args.examples or (SMOKE_EXAMPLES if args.smoke else 100_000)
    engine = args.engine
    if engine == "auto":
        engine = "atheris" if importlib.util.find_spec("atheris") else "hypothesis"
    started = time.monotonic()

    def report() -> None:
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(
            f"fuzz_framing: engine={engine} examples={STATS.examples} frames={STATS.frames} "
            f"outcomes={dict(sorted(STATS.outcomes.items()))} "
            f"time={time.monotonic() - started:.1f}s peak_rss={peak_kib / 1024:.1f}MiB",
            flush=True,
        )

    if engine == "atheris":
        run_atheris(examples, args.seed, report)
    else:
        TARGETS.extend(load_targets())
        run_hypothesis(examples, args.seed)
        report()
        if STATS.examples < examples:
            print(f"fuzz_framing: only {STATS.examples} of {examples} examples ran", flush=True)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
