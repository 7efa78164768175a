"""The pure half of `netprobe reset`: triggers, actions, plans and the seeded choice. No I/O.

Strategy: a run has one *trigger* (when a connection is faulted) and one *schedule* (which
connections are faulted, and with which action). Both are plain data validated once, up front,
so bad input is a usage error before any socket opens. Per connection, a TriggerState counts
bytes and frames and answers "does the trigger fire inside this chunk, and where?", which lets
the I/O side forward exactly the bytes before the trigger and then act.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from netprobe.errors import UsageError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from netprobe.framing import Decoder

__all__ = [
    "PROXY_TRIGGERS",
    "SERVE_TRIGGERS",
    "Action",
    "Direction",
    "FaultSchedule",
    "ServeMode",
    "Toxics",
    "Trigger",
    "TriggerKind",
    "TriggerState",
    "build_trigger",
    "check_probability",
    "fault_chosen",
    "parse_action",
    "parse_mode",
    "parse_plan",
]


class Action(StrEnum):
    """What happens to a connection when its trigger fires."""

    RST = "rst"  # SO_LINGER 0 then close: the peer gets ECONNRESET
    FIN = "fin"  # graceful close: the peer reads EOF
    HALF_CLOSE = "half-close"  # shut the write side, keep reading
    HANG = "hang"  # stop reading and writing, keep the socket open: the peer times out
    SLOW = "slow"  # keep going, but trickle the output at --bandwidth
    OK = "ok"  # (plans only) leave this connection alone


class TriggerKind(StrEnum):
    """When the action happens; the names are the options that select them."""

    ON_ACCEPT = "on-accept"
    ON_CONNECT = "on-connect"
    AFTER_BYTES = "after-bytes"
    AFTER_MS = "after-ms"
    AFTER_FRAMES = "after-frames"
    AFTER_BYTES_OUT = "after-bytes-out"
    ON_IDLE = "on-idle"


# Triggers that count up to their value. At 0 there is nothing to wait for: they act at once,
# not at the first data, nor (after-bytes-out) at the first write, which a discard server or
# an echo whose client stays silent never makes.
_COUNTING = frozenset(
    {
        TriggerKind.AFTER_BYTES,
        TriggerKind.AFTER_BYTES_OUT,
        TriggerKind.AFTER_FRAMES,
        TriggerKind.AFTER_MS,
    }
)


@dataclass(frozen=True, slots=True)
class Trigger:
    """One trigger: its kind and its value (bytes, frames or seconds; None for at-once).

    Attributes:
        kind: which trigger.
        value: N bytes/frames, or seconds for after-ms and on-idle; None for on-accept/connect.
        framing: the framing spec name for after-frames (e.g. "line"), else None.
    """

    kind: TriggerKind
    value: int | float | None = None
    framing: str | None = None

    @property
    def at_once(self) -> bool:
        return self.kind in (TriggerKind.ON_ACCEPT, TriggerKind.ON_CONNECT) or (
            self.kind in _COUNTING and self.value == 0
        )

    def describe(self) -> str:
        """`after-bytes 1000`, `after-ms 0.25`, `on-accept`: for logs."""
        if self.value is None:
            return str(self.kind)
        if self.kind is TriggerKind.AFTER_MS:
            return f"after-ms {self.value * 1000:g}"
        if self.kind is TriggerKind.ON_IDLE:
            return f"on-idle {self.value:g}s"
        return f"{self.kind} {self.value}"


def build_trigger(
    *,
    allowed: frozenset[TriggerKind] | set[TriggerKind],
    on_accept: bool = False,
    on_connect: bool = False,
    after_bytes: int | None = None,
    after_ms: float | None = None,
    after_frames: int | None = None,
    after_bytes_out: int | None = None,
    on_idle: float | None = None,
    framing: str | None = None,
    aliases: Mapping[TriggerKind, TriggerKind] | None = None,
) -> Trigger | None:
    """Validate the trigger options of one command and return the one trigger (or None).

    Args:
        allowed: the triggers this command supports; others are a usage error.
        after_ms / on_idle: seconds (already parsed from `250ms`, `2s`, ...).
        aliases: options that are another trigger in this command (the proxy and the client
            send what --after-bytes counts: --after-bytes-out is that trigger). Errors name
            the option as typed; the trigger returned is the one it stands for.

    Raises:
        UsageError: a negative value, two triggers at once, a trigger the command does not
            support, `--after-frames` without `--framing` (or the reverse).
    """
    given: list[Trigger] = []
    if on_accept:
        given.append(Trigger(TriggerKind.ON_ACCEPT))
    if on_connect:
        given.append(Trigger(TriggerKind.ON_CONNECT))
    for kind, value in (
        (TriggerKind.AFTER_BYTES, after_bytes),
        (TriggerKind.AFTER_FRAMES, after_frames),
        (TriggerKind.AFTER_BYTES_OUT, after_bytes_out),
    ):
        if value is None:
            continue
        if value < 0:
            raise UsageError(f"--{kind} {value}: must be 0 or more")
        given.append(Trigger(kind, int(value)))
    for kind, seconds in ((TriggerKind.AFTER_MS, after_ms), (TriggerKind.ON_IDLE, on_idle)):
        if seconds is None:
            continue
        if not math.isfinite(seconds):  # nan passes every comparison and never fires
            raise UsageError(f"--{kind} {seconds}: must be a finite time")
        if seconds < 0:
            raise UsageError(f"--{kind} {seconds}: must be 0 or more")
        if kind is TriggerKind.ON_IDLE and seconds == 0:
            raise UsageError("--on-idle 0: an idle time must be more than 0")
        given.append(Trigger(kind, float(seconds)))
    aliases = aliases or {}
    for trigger in given:
        if aliases.get(trigger.kind, trigger.kind) not in allowed:
            choices = ", ".join(f"--{k}" for k in TriggerKind if k in allowed or k in aliases)
            raise UsageError(f"--{trigger.kind} is not a trigger here (choose from {choices})")
    if len(given) > 1:
        if len({aliases.get(t.kind, t.kind) for t in given}) == 1:
            names = " and ".join(f"--{t.kind} {t.value:g}" for t in given)
            raise UsageError(f"{names} are one trigger here (bytes sent): give one")
        names = " and ".join(f"--{t.kind}" for t in given)
        raise UsageError(f"{names} are two triggers at once; give only one")
    chosen: Trigger | None = given[0] if given else None
    if chosen is not None and chosen.kind in aliases:
        chosen = Trigger(aliases[chosen.kind], chosen.value)
    if chosen is not None and chosen.kind is TriggerKind.AFTER_FRAMES:
        if framing is None:
            raise UsageError("--after-frames needs --framing (e.g. --framing line)")
        return Trigger(chosen.kind, chosen.value, framing)
    if framing is not None:
        raise UsageError("--framing is only used with --after-frames")
    return chosen


def parse_action(text: str, *, allow_ok: bool = False) -> Action:
    """`rst`, `fin`, `half-close`, `hang`, `slow` (and `ok` inside a plan).

    Raises:
        UsageError: anything else.
    """
    name = text.strip().lower()
    try:
        action = Action(name)
    except ValueError:
        action = None
    if action is None or (action is Action.OK and not allow_ok):
        names = [a.value for a in Action if allow_ok or a is not Action.OK]
        raise UsageError(f"{text!r} is not an action (choose from {', '.join(names)})")
    return action


def parse_plan(text: str) -> tuple[Action, ...]:
    """Parse `rst,rst,ok` into the per-connection sequence (it repeats).

    Raises:
        UsageError: empty, an empty item, or an unknown action.
    """
    items = text.split(",")
    if not text.strip() or any(not item.strip() for item in items):
        raise UsageError(f"--plan {text!r}: give actions separated by commas, e.g. rst,rst,ok")
    try:
        return tuple(parse_action(item, allow_ok=True) for item in items)
    except UsageError as exc:
        raise UsageError(f"--plan {text!r}: {exc}") from None


def check_probability(value: float) -> float:
    """Return `value` if it is a probability (0 to 1), else raise UsageError."""
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise UsageError(f"--probability {value}: must be between 0 and 1")
    return value


def fault_chosen(probability: float, seed: int, index: int) -> bool:
    """Whether connection number `index` (0-based) is faulted, reproducibly for one seed.

    Each index is decided on its own (a hash of seed and index, not one shared random
    stream), so the same connections are chosen however many run concurrently and in
    whatever order they finish.
    """
    if probability >= 1.0:
        return True
    if probability <= 0.0:
        return False
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < probability


@dataclass(frozen=True, slots=True)
class FaultSchedule:
    """Which connections get which action: a plan, a probability, or every one.

    Attributes:
        action: the action for chosen connections (ignored with a plan).
        plan: the repeating per-connection sequence, or None.
        probability: the fraction of connections faulted (1.0: all).
        seed: the seed of the choice (shown in totals so a run can be replayed).
    """

    action: Action = Action.RST
    plan: tuple[Action, ...] | None = None
    probability: float = 1.0
    seed: int = 0

    @classmethod
    def build(
        cls,
        *,
        action: Action = Action.RST,
        plan: str | None = None,
        probability: float | None = None,
        seed: int | None = None,
    ) -> FaultSchedule:
        """Validate the options; without --seed a random one is drawn (and reported).

        Raises:
            UsageError: a bad plan or probability, or a plan together with a probability.
        """
        if plan is not None and probability is not None:
            raise UsageError("--plan and --probability both choose connections; give only one")
        if action is Action.OK:
            raise UsageError("--action ok: 'ok' is only meaningful inside --plan")
        steps = parse_plan(plan) if plan is not None else None
        chance = 1.0 if probability is None else check_probability(probability)
        if seed is None:
            seed = int.from_bytes(os.urandom(4), "big")
        return cls(action=action, plan=steps, probability=chance, seed=seed)

    def action_for(self, index: int) -> Action:
        """The action for connection number `index` (0-based, in arrival order); OK: none."""
        if self.plan is not None:
            return self.plan[index % len(self.plan)]
        if fault_chosen(self.probability, self.seed, index):
            return self.action
        return Action.OK

    @property
    def uses_slow(self) -> bool:
        return self.uses(Action.SLOW)

    def uses(self, action: Action) -> bool:
        """Whether some connection can get `action` (from the plan, or the one action)."""
        steps = self.plan if self.plan is not None else (self.action,)
        return action in steps


class TriggerState:
    """Per-connection progress towards the trigger (pure: the caller feeds counts and data).

    `cut_in(data)` / `cut_out(n)` answer with the number of bytes of this chunk that come
    *before* the trigger when it fires inside the chunk, else None. Time-based triggers
    (after-ms, on-idle) are timers the caller runs; this class only says which one.
    """

    def __init__(self, trigger: Trigger | None, decoder: Decoder | None = None) -> None:
        self.trigger = trigger
        self.fired = False
        self._bytes_in = 0
        self._bytes_out = 0
        self._frames = 0
        self._decoder = decoder
        self._fed = 0

    def _limit(self, kind: TriggerKind) -> int | None:
        trig = self.trigger
        if self.fired or trig is None or trig.kind is not kind or trig.value is None:
            return None
        return int(trig.value)

    def cut_in(self, data: bytes) -> int | None:
        """Bytes of `data` (received in the faulted direction) before the trigger, or None."""
        limit = self._limit(TriggerKind.AFTER_BYTES)
        if limit is not None:
            before = self._bytes_in
            self._bytes_in += len(data)
            if self._bytes_in >= limit:
                return self._fire(max(0, limit - before))
            return None
        limit = self._limit(TriggerKind.AFTER_FRAMES)
        if limit is not None and self._decoder is not None:
            return self._cut_frames(data, limit)
        return None

    def _cut_frames(self, data: bytes, limit: int) -> int | None:
        from netprobe.framing import NEED_DATA

        assert self._decoder is not None
        if limit == 0:
            return self._fire(0)
        start = self._fed
        self._fed += len(data)
        if data:
            self._decoder.feed(data)
        while True:
            frame = self._decoder.next_frame()
            if frame is NEED_DATA:
                return None
            self._frames += 1
            if self._frames >= limit:
                unconsumed = len(self._decoder.trailing_data[0])
                return self._fire(max(0, self._fed - unconsumed - start))

    def cut_out(self, count: int) -> int | None:
        """Bytes of an outgoing chunk of `count` bytes before after-bytes-out fires, or None."""
        limit = self._limit(TriggerKind.AFTER_BYTES_OUT)
        if limit is None:
            return None
        before = self._bytes_out
        self._bytes_out += count
        if self._bytes_out >= limit:
            return self._fire(max(0, limit - before))
        return None

    def _fire(self, cut: int) -> int:
        self.fired = True
        return cut


# The options of `reset serve` and `reset proxy` that the CLI checks before it loads the
# engine (engines.reset: asyncio and the server core), so bad input exits fast.
SERVE_TRIGGERS = frozenset(TriggerKind) - {TriggerKind.ON_CONNECT}
PROXY_TRIGGERS = frozenset(TriggerKind) - {TriggerKind.AFTER_BYTES_OUT}


class Direction(StrEnum):
    """Which side a proxy fault hits: down (towards the client), up (towards upstream)."""

    UP = "up"
    DOWN = "down"
    BOTH = "both"


class ServeMode(StrEnum):
    ECHO = "echo"
    DISCARD = "discard"
    SEND = "send"


def parse_mode(text: str) -> tuple[ServeMode, int | None]:
    """`echo`, `discard`, `send` or `send BYTES` (also `send:BYTES`): mode and byte count.

    Raises:
        UsageError: an unknown mode or a bad size.
    """
    from netprobe.errors import UsageError
    from netprobe.sockets import parse_size

    name, _, rest = text.strip().replace(":", " ").replace("=", " ").partition(" ")
    try:
        mode = ServeMode(name.lower())
    except ValueError:
        raise UsageError(f"--mode {text!r}: choose echo, discard, send or 'send BYTES'") from None
    if not rest.strip():
        return mode, None
    if mode is not ServeMode.SEND:
        raise UsageError(f"--mode {text!r}: only 'send' takes a byte count")
    try:
        return mode, parse_size(rest.strip())
    except UsageError as exc:
        raise UsageError(f"--mode {text!r}: {exc}") from None


@dataclass(frozen=True, slots=True)
class Toxics:
    """toxiproxy-style faults on forwarded bytes (0/None: off)."""

    latency_s: float = 0.0
    jitter_s: float = 0.0
    bandwidth: int | None = None  # bytes per second
    slice_size: int | None = None
    slice_delay_s: float = 0.0
    limit_bytes: int | None = None
    timeout_s: float | None = None

    @property
    def shaping(self) -> bool:
        return bool(self.latency_s or self.jitter_s or self.bandwidth or self.slice_size)
