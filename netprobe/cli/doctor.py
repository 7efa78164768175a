"""`netprobe doctor`: host facts and a loopback self-test. Thin: parse, run, render."""

from __future__ import annotations

import sys
import time
from typing import Annotated

import typer

from netprobe.cli._options import JsonOpt, QuietOpt

__all__ = ["doctor"]


def doctor(
    json_out: JsonOpt = False,
    quick: Annotated[
        bool, typer.Option("--quick", help="Only the fast checks (under 3 s in all).")
    ] = False,
    quiet: QuietOpt = False,
) -> int:
    """Check this host's limits and run a loopback self-test of every subcommand.

    Host facts (kernel, loopback, somaxconn, SYN backlog, syncookies,
    abort_on_overflow, port range, RLIMIT_NOFILE, socket owners, queue view)
    get a verdict and a hint; each self-test is a real exchange with the real
    engines on loopback (port 0, stopped after). Nothing needs root.

    Exit codes: 0 no check failed (warnings do not fail), 1 a check failed, 2 bad options,
    130 Ctrl-C.
    """
    from netprobe.engines.doctor import Verdict, run_doctor
    from netprobe.exitcodes import ExitStatus
    from netprobe.render import Column, Renderer, choose_format, dump_json
    from netprobe.results import to_record

    fmt = choose_format(json_out=json_out, csv_out=False, quiet=quiet, out=sys.stdout)
    columns = [
        Column("group", "GROUP"),
        Column("check", "CHECK"),
        Column("verdict", "VERDICT"),
        Column("figure", "FIGURE"),
        Column("hint", "HINT"),
    ]
    renderer = Renderer(fmt, sys.stdout, columns)
    start = time.monotonic()
    counts = {v.value: 0 for v in Verdict}
    for result in run_doctor(quick=quick):
        counts[result.verdict.value] += 1
        renderer.emit(to_record(result))
    renderer.close()
    elapsed = time.monotonic() - start
    ok = counts["fail"] == 0
    summary = {
        "kind": "doctor-summary",
        "ok": ok,
        "quick": quick,
        "checks": sum(counts.values()),
        **counts,
        "elapsed_s": round(elapsed, 3),
    }
    if json_out and not quiet:
        sys.stdout.write(dump_json(summary) + "\n")
    elif not quiet:
        parts = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
        sys.stderr.write(f"doctor: {'OK' if ok else 'FAILED'}: {parts} in {elapsed:.2f} s\n")
    return ExitStatus.OK if ok else ExitStatus.NOT_OPEN
