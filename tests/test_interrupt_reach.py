"""A Ctrl-C must reach the `except KeyboardInterrupt` (or `finally`) meant for it.

CPython 3.11 raises a KeyboardInterrupt that lands on a loop's jump back to its head as if it
were raised at the instruction before that head (gh-108214). When the loop is the first thing
in a `try`, that instruction is outside the try: the interrupt skips the handler. That is how
`port-check -c` lost its summaries about one Ctrl-C in a few hundred (run_latency's loop began
its try). 3.12 and 3.13 have the same flaw in other shapes, so the code keeps such loops in a
frame of their own; this test checks, in the bytecode of every netprobe module, that no loop
jumps back to a head whose previous instruction has another handler than the jump itself.
"""

from __future__ import annotations

import dis
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent / "netprobe"

# Functions that run only in threads of their own: Python runs signal handlers in the main
# thread, so no KeyboardInterrupt is ever raised there.
THREAD_ONLY = {("sockets.py", "splice_relay")}

pytestmark = pytest.mark.skipif(
    sys.version_info[:2] != (3, 11),
    reason="checks CPython 3.11's bytecode (where the flaw's shape is known and verified)",
)


def _handler(entries: list[Any], offset: int) -> int | None:
    for entry in entries:
        if entry.start <= offset < entry.end:
            return int(entry.target)
    return None


def _misplaced_jumps(code: types.CodeType) -> Iterator[tuple[str, int]]:
    """(function, line) of each backward jump that checks for signals and whose target's
    previous instruction has another exception handler than the jump itself."""
    bytecode = dis.Bytecode(code)
    entries = bytecode.exception_entries  # type: ignore[attr-defined]  # (typeshed lacks it)
    for instruction in bytecode:
        name = instruction.opname
        if "JUMP_BACKWARD" not in name or name == "JUMP_BACKWARD_NO_INTERRUPT":
            continue
        target = instruction.argval
        if _handler(entries, instruction.offset) != _handler(entries, target - 2):
            line = instruction.positions.lineno if instruction.positions else None
            yield code.co_qualname, line or 0
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _misplaced_jumps(const)


def _findings(source: str, filename: str) -> list[tuple[str, int]]:
    return list(_misplaced_jumps(compile(source, filename, "exec")))


def test_the_check_sees_a_loop_that_begins_its_try() -> None:
    shape = (
        "def f(flag):\n"
        "    n = 0\n"
        "    try:\n"
        "{first}"
        "        while flag[0]:\n"
        "            n += 1\n"
        "            if n & 1:\n"
        "                continue\n"
        "            n += 2\n"
        "    except KeyboardInterrupt:\n"
        "        return n\n"
    )
    assert _findings(shape.format(first=""), "bad.py") == [("f", 7)]  # the continue
    assert _findings(shape.format(first="        n = 1\n"), "good.py") == []


def test_no_netprobe_loop_lets_an_interrupt_skip_its_handler() -> None:
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        for function, line in _findings(path.read_text(encoding="utf-8"), str(path)):
            if (path.name, function) not in THREAD_ONLY:
                found.append(f"{path.relative_to(ROOT.parent)}:{line} in {function}")
    assert found == []
