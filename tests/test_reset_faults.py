"""Pure parts of `netprobe reset`: trigger validation, plans, the seeded choice, cut points."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netprobe.engines.reset_faults import (
    Action,
    FaultSchedule,
    Trigger,
    TriggerKind,
    TriggerState,
    build_trigger,
    check_probability,
    fault_chosen,
    parse_action,
    parse_plan,
)
from netprobe.errors import UsageError

ALL = frozenset(TriggerKind)


def test_no_trigger_is_none() -> None:
    assert build_trigger(allowed=ALL) is None


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"on_accept": True}, Trigger(TriggerKind.ON_ACCEPT)),
        ({"after_bytes": 1000}, Trigger(TriggerKind.AFTER_BYTES, 1000)),
        ({"after_ms": 0.25}, Trigger(TriggerKind.AFTER_MS, 0.25)),
        ({"after_bytes_out": 5}, Trigger(TriggerKind.AFTER_BYTES_OUT, 5)),
        ({"on_idle": 2.0}, Trigger(TriggerKind.ON_IDLE, 2.0)),
        (
            {"after_frames": 3, "framing": "line"},
            Trigger(TriggerKind.AFTER_FRAMES, 3, "line"),
        ),
    ],
)
def test_one_trigger(kwargs: dict[str, object], expected: Trigger) -> None:
    assert build_trigger(allowed=ALL, **kwargs) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"after_bytes": -1}, "--after-bytes -1"),
        ({"after_ms": -0.1}, "--after-ms"),
        ({"on_idle": 0.0}, "--on-idle 0"),
        ({"after_ms": float("nan")}, "--after-ms nan: must be a finite time"),
        ({"after_ms": float("inf")}, "--after-ms inf: must be a finite time"),
        ({"on_idle": float("nan")}, "--on-idle nan: must be a finite time"),
        ({"after_bytes": 1, "after_ms": 1.0}, "two triggers"),
        ({"on_accept": True, "after_bytes_out": 3}, "two triggers"),
        ({"after_frames": 2}, "needs --framing"),
        ({"framing": "line"}, "only used with --after-frames"),
    ],
)
def test_bad_triggers(kwargs: dict[str, object], words: str) -> None:
    with pytest.raises(UsageError, match=words):
        build_trigger(allowed=ALL, **kwargs)  # type: ignore[arg-type]


def test_trigger_not_allowed_names_the_choices() -> None:
    allowed = {TriggerKind.ON_CONNECT, TriggerKind.AFTER_BYTES}
    with pytest.raises(UsageError, match=r"--on-idle is not a trigger here.*--on-connect"):
        build_trigger(allowed=allowed, on_idle=1.0)


def test_describe() -> None:
    assert Trigger(TriggerKind.AFTER_MS, 0.25).describe() == "after-ms 250"
    assert Trigger(TriggerKind.AFTER_BYTES, 7).describe() == "after-bytes 7"
    assert Trigger(TriggerKind.ON_ACCEPT).describe() == "on-accept"
    assert Trigger(TriggerKind.ON_IDLE, 2.0).describe() == "on-idle 2s"


def test_parse_action_and_plan() -> None:
    assert parse_action("half-close") is Action.HALF_CLOSE
    with pytest.raises(UsageError, match="not an action"):
        parse_action("ok")
    with pytest.raises(UsageError, match="not an action"):
        parse_action("explode")
    assert parse_plan("rst,rst,ok") == (Action.RST, Action.RST, Action.OK)
    assert parse_plan(" fin , hang ") == (Action.FIN, Action.HANG)
    for bad in ("", "rst,,ok", "rst,boom"):
        with pytest.raises(UsageError, match="--plan"):
            parse_plan(bad)


def test_plan_cycles_from_the_first_connection() -> None:
    schedule = FaultSchedule.build(plan="rst,rst,ok")
    got = [schedule.action_for(i) for i in range(7)]
    assert got == [Action.RST, Action.RST, Action.OK] * 2 + [Action.RST]


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan")])
def test_probability_range(bad: float) -> None:
    with pytest.raises(UsageError, match="between 0 and 1"):
        check_probability(bad)


def test_plan_and_probability_exclude_each_other() -> None:
    with pytest.raises(UsageError, match="--plan and --probability"):
        FaultSchedule.build(plan="rst", probability=0.5)
    with pytest.raises(UsageError, match="ok"):
        FaultSchedule.build(action=Action.OK)


def test_seeded_choice_is_reproducible_and_about_half() -> None:
    first = [fault_chosen(0.5, 7, i) for i in range(200)]
    again = [fault_chosen(0.5, 7, i) for i in range(200)]
    assert first == again
    assert 70 <= sum(first) <= 130  # binomial(200, 0.5): far outside 5 sigma
    other = [fault_chosen(0.5, 8, i) for i in range(200)]
    assert other != first
    schedule = FaultSchedule.build(probability=0.5, seed=7)
    assert [schedule.action_for(i) is Action.RST for i in range(200)] == first


def test_unseeded_schedule_draws_and_keeps_a_seed() -> None:
    schedule = FaultSchedule.build(probability=0.5)
    assert [schedule.action_for(i) for i in range(50)] == [
        FaultSchedule.build(probability=0.5, seed=schedule.seed).action_for(i) for i in range(50)
    ]


@given(st.floats(0.0, 1.0), st.integers(0, 2**32), st.integers(0, 10_000))
def test_choice_edges(probability: float, seed: int, index: int) -> None:
    chosen = fault_chosen(probability, seed, index)
    if probability == 0.0:
        assert not chosen
    if probability == 1.0:
        assert chosen


@given(st.lists(st.binary(max_size=300), max_size=20), st.integers(1, 2000))
def test_cut_in_is_exact_for_any_chunking(chunks: list[bytes], limit: int) -> None:
    state = TriggerState(Trigger(TriggerKind.AFTER_BYTES, limit))
    passed = b""
    for chunk in chunks:
        cut = state.cut_in(chunk)
        if cut is not None:
            passed += chunk[:cut]
            break
        passed += chunk
    stream = b"".join(chunks)
    if len(stream) >= limit:
        assert state.fired
        assert passed == stream[:limit]
    else:
        assert not state.fired
        assert passed == stream


def test_cut_out() -> None:
    state = TriggerState(Trigger(TriggerKind.AFTER_BYTES_OUT, 10))
    assert state.cut_in(b"x" * 100) is None  # inbound bytes do not count
    assert state.cut_out(6) is None
    assert state.cut_out(6) == 4
    assert state.cut_out(6) is None  # fired once only


def test_cut_frames() -> None:
    from netprobe.framing import parse_framing

    spec = parse_framing("line")
    state = TriggerState(Trigger(TriggerKind.AFTER_FRAMES, 2, "line"), spec.decoder())
    assert state.cut_in(b"one\ntw") is None
    assert state.cut_in(b"o\nthree\n") == 2
    assert state.fired


def test_zero_frames_acts_at_once_like_zero_bytes() -> None:
    assert Trigger(TriggerKind.AFTER_FRAMES, 0, "line").at_once
    assert Trigger(TriggerKind.AFTER_BYTES, 0).at_once
    assert not Trigger(TriggerKind.AFTER_FRAMES, 1, "line").at_once


def test_zero_bytes_out_acts_at_once_like_zero_bytes() -> None:
    # A discard server never writes: waiting for the first write would never fire.
    assert Trigger(TriggerKind.AFTER_BYTES_OUT, 0).at_once
    assert not Trigger(TriggerKind.AFTER_BYTES_OUT, 1).at_once
