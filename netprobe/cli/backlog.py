"""`netprobe backlog`: parse options, run the flood engine, render the report. No I/O here."""

# No `from __future__ import annotations`: Typer reads the signature on every run, and
# string annotations would make it eval() each option (see cli/port_check.py).
import sys
from typing import TYPE_CHECKING, Annotated, Any, TextIO

import typer

from netprobe.cli._options import (
    MAX_BACKLOG,
    MIN_RATE,
    IPv4Opt,
    IPv6Opt,
    JsonOpt,
    QuietOpt,
    check_literal_family,
    duration,
    family_of,
    per_second,
)

if TYPE_CHECKING:
    from netprobe.engines.backlog import BacklogConfig, BacklogSummary, LatencyHistogram, Tick

__all__ = ["backlog"]


def backlog(
    target: Annotated[
        str | None,
        typer.Argument(
            help="HOST:PORT to flood (loopback only unless --allow-remote).", show_default=False
        ),
    ] = None,
    lab: Annotated[
        bool, typer.Option("--lab", help="Flood netprobe's own loopback listener (listen(B)).")
    ] = False,
    backlog_arg: Annotated[
        int | None,
        typer.Option(
            "--backlog",
            metavar="B",
            help=f"The --lab listener's listen() backlog (0 to {MAX_BACKLOG}). Default: 128.",
            show_default=False,
        ),
    ] = None,
    accept_rate: Annotated[
        float | None,
        typer.Option(
            "--accept-rate",
            parser=per_second,
            metavar="R",
            help=f"--lab listener accepts this many per second (at least {MIN_RATE:g}; "
            "default: never).",
            show_default=False,
        ),
    ] = None,
    accept_delay: Annotated[
        float | None,
        typer.Option(
            "--accept-delay",
            parser=duration,
            metavar="DURATION",
            help="--lab listener starts accepting after this long.",
            show_default=False,
        ),
    ] = None,
    connections: Annotated[
        int | None,
        typer.Option(
            "--connections",
            "-n",
            metavar="N",
            help="Total attempts (default: 200; a ramp: rate x step per step).",
            show_default=False,
        ),
    ] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(
            "--concurrency",
            "-c",
            metavar="C",
            help="Attempts in flight (default: min(connections, 1000)).",
            show_default=False,
        ),
    ] = None,
    rate: Annotated[
        float | None,
        typer.Option(
            "--rate",
            parser=per_second,
            metavar="R",
            help=f"New attempts per second (at least {MIN_RATE:g}; default: as fast as possible).",
            show_default=False,
        ),
    ] = None,
    duration_s: Annotated[
        float,
        typer.Option(
            "--duration",
            parser=duration,
            metavar="DURATION",
            show_default="30s",
            help="Hard cap on the run.",
        ),
    ] = 30.0,
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout",
            "-t",
            parser=duration,
            metavar="DURATION",
            show_default="3s",
            help="Per-connect timeout.",
        ),
    ] = 3.0,
    hold: Annotated[
        float,
        typer.Option(
            "--hold",
            parser=duration,
            metavar="DURATION",
            show_default="0",
            help="Keep established connections open this long.",
        ),
    ] = 0.0,
    source: Annotated[
        list[str] | None,
        typer.Option(
            "--source",
            metavar="SPEC",
            help="Source addresses: 127.0.0.2-127.0.0.20, a /28, or a list (repeatable).",
            show_default=False,
        ),
    ] = None,
    ipv4: IPv4Opt = False,
    ipv6: IPv6Opt = False,
    allow_remote: Annotated[
        bool, typer.Option("--allow-remote", help="Permit a target outside 127.0.0.0/8 and ::1.")
    ] = False,
    fail_if: Annotated[
        list[str] | None,
        typer.Option(
            "--fail-if",
            metavar="GATE",
            help="Exit 1 when true, e.g. 'p99>200ms', 'timed_out>0' (repeatable).",
            show_default=False,
        ),
    ] = None,
    ramp: Annotated[
        str | None,
        typer.Option(
            "--ramp",
            metavar="R1,R2,...",
            help="Rate steps, e.g. 100,200,400 (each lasts --step).",
            show_default=False,
        ),
    ] = None,
    step: Annotated[
        float | None,
        typer.Option(
            "--step",
            parser=duration,
            metavar="DURATION",
            help="Length of each --ramp step. Default: 5s.",
            show_default=False,
        ),
    ] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Flood a listener with connects and report what the kernel did (accept queue, drops).

    Exit codes: 0 run completed, 1 a --fail-if gate failed, 2 bad input or a non-loopback
    target without --allow-remote (nothing sent), 5 TARGET does not resolve, 6 local
    failure (the lab listener could not bind); 130 Ctrl-C, 143 SIGTERM.
    """
    from netprobe.cli._run import bounded_stdout, error_line, sigterm_exits_143
    from netprobe.engines.backlog import (
        BacklogConfig,
        parse_gate,
        parse_ramp,
        parse_sources,
        run_backlog,
    )
    from netprobe.errors import UsageError
    from netprobe.exitcodes import ExitStatus
    from netprobe.render import StatusLine, choose_format, dump_json
    from netprobe.sockets import parse_host_port

    choose_format(json_out=json_out, csv_out=False, quiet=quiet, out=sys.stdout)  # -q xor --json
    host: str | None = None
    port: int | None = None
    if target is not None:
        host, port = parse_host_port(target, allow_port_zero=False)
        check_literal_family(host, family_of(ipv4, ipv6), f"TARGET {target}")
    # Options that would change nothing are refused, not ignored.
    if backlog_arg is not None and not lab:
        raise UsageError(
            f"--backlog {backlog_arg} sets the --lab listener's listen(); TARGET's backlog is "
            "its own (add --lab, or leave --backlog out)"
        )
    if step is not None and ramp is None:
        raise UsageError("--step is the length of each --ramp step: add --ramp")
    sources: list[str] = []
    for spec in source or []:
        sources.extend(parse_sources(spec))
    cfg = BacklogConfig(
        host=host,
        port=port,
        lab=lab,
        backlog=128 if backlog_arg is None else backlog_arg,
        accept_rate=accept_rate,
        accept_delay_s=accept_delay,
        connections=connections,
        concurrency=concurrency,
        rate=rate,
        duration_s=duration_s,
        timeout_s=timeout,
        hold_s=hold,
        sources=list(dict.fromkeys(sources)),
        family=family_of(ipv4, ipv6),
        allow_remote=allow_remote,
        ramp=parse_ramp(ramp) if ramp is not None else [],
        step_s=5.0 if step is None else step,
        gates=[parse_gate(text) for text in fail_if or []],
    )
    out = sys.stdout
    err = sys.stderr
    status = StatusLine(err)
    terminal = _isatty(out)
    progress = status.enabled and not quiet
    with sigterm_exits_143() as term:  # (an interrupt before the flood began comes out here)
        summary = _run(cfg, run_backlog, json_out, quiet, progress, status, out, err)
    status.clear()
    if summary.record["interrupted"]:
        # Later signals are ignored (none may cut the report): no write may wait on a
        # reader that stopped, not even one the report itself fills.
        out = bounded_stdout(out)
    if json_out and not quiet:
        out.write(dump_json(summary.record) + "\n")
    elif not quiet:
        _report(out, summary, charts=terminal)
    out.flush()
    if summary.record["interrupted"]:  # gates judge a whole run, not a part of one
        raise typer.Exit(ExitStatus.TERMINATED if term.terminated else ExitStatus.INTERRUPTED)
    for gate in summary.record["gates"] if not quiet else ():
        if gate["failed"]:
            error_line("backlog", f"gate failed: {gate['gate']} ({_measured(gate)})")
    if summary.failed_gates:
        raise typer.Exit(1)


def _run(
    cfg: "BacklogConfig",
    run_backlog: Any,
    json_out: bool,
    quiet: bool,
    progress: bool,
    status: Any,
    out: TextIO,
    err: TextIO,
) -> "BacklogSummary":
    """Run the flood, printing the preflight and the progress; the summary (an interrupted
    run's too)."""
    import inspect

    from netprobe.cli._run import bounded_stdout
    from netprobe.engines.backlog import Preflight, Tick, effective_connections
    from netprobe.render import dump_json
    from netprobe.sockets import ignore_stop_signals

    summary: BacklogSummary | None = None
    attempts_so_far = 0
    total = effective_connections(cfg)
    events = run_backlog(cfg)

    def show(event: Any) -> None:
        nonlocal attempts_so_far, out
        if isinstance(event, Preflight):
            if json_out and progress:
                # stdout holds JSON only; a person watching still sees the prediction.
                err.write(f"preflight: {event.text}\n")
                err.flush()
            if not json_out and not quiet:
                out.write(f"backlog {event.target}{_lab_text(cfg)}\n")
                out.write(f"preflight: {event.text}\n")
                for cap in event.caps:
                    out.write(f"preflight: capped: {cap}\n")
                out.flush()
        elif isinstance(event, Tick):
            if event.interrupted:
                out = bounded_stdout(out)
            if json_out and not quiet:
                out.write(dump_json(event.as_record()) + "\n")
                out.flush()
            attempts_so_far += event.attempts
            if progress:
                status.show(_progress(event, attempts_so_far, total))

    try:
        for event in events:
            if isinstance(event, Preflight | Tick):
                show(event)
            else:
                summary = event
    except KeyboardInterrupt:
        # It landed here (printing a tick), not in the engine, which turns it into the
        # report so far: hand it over there. (Before the flood starts, it comes back.)
        # As the engine does on an interrupt, first of all: a second signal (timeout(1)
        # sends two, ms apart) must not cut the report, not even while stdout is looked at.
        ignore_stop_signals()
        if summary is not None or inspect.getgeneratorstate(events) != inspect.GEN_SUSPENDED:
            raise
        # The engine yields the partial second's tick first, then the summary (later
        # signals are ignored by then: so no write may wait on a reader that stopped).
        out = bounded_stdout(out)
        event = events.throw(KeyboardInterrupt())
        while isinstance(event, Preflight | Tick):
            show(event)
            event = next(events)
        summary = event
        events.close()
    assert summary is not None
    return summary


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _measured(gate: dict[str, Any]) -> str:
    if gate["value"] is None:
        return "not measured in this run: the gate cannot pass"
    unit = f" {gate['unit']}" if gate["unit"] else ""
    return "measured " + _num(gate["value"]) + unit


def _lab_text(cfg: Any) -> str:
    if not cfg.lab:
        return ""
    if cfg.accept_rate:
        how = f"accepts {cfg.accept_rate:g}/s"
    elif cfg.accept_delay_s is not None:
        how = "accepts as fast as it can"
    else:
        how = "never accepts"
    if cfg.accept_delay_s:
        how += f" after {cfg.accept_delay_s:g}s"
    return f" (lab: listen({cfg.backlog}), {how})"


def _progress(tick: "Tick", done: int, total: int) -> str:
    width = 20
    filled = min(width, width * done // max(1, total))
    bar = "#" * filled + "." * (width - filled)
    queue = "" if tick.accept_queue is None else f"  queue {tick.accept_queue}"
    return (
        f"[{bar}] {done}/{total}  {tick.t}s  +{tick.established} established  "
        f"+{tick.failures} failed  in flight {tick.in_flight}  held {tick.held}{queue}"
    )


def _report(out: TextIO, summary: "BacklogSummary", *, charts: bool) -> None:
    rec = summary.record
    w = out.write
    w(
        f"client: attempted {rec['attempted']}  established {rec['established']}  "
        f"refused {rec['refused']}  reset {rec['reset']}  timed out {rec['timed_out']}  "
        f"errors {rec['errors']}"
    )
    if rec["errors_by_errno"]:
        w(" (" + ", ".join(f"{k} {v}" for k, v in rec["errors_by_errno"].items()) + ")")
    w(f"  in {rec['duration_s']:.2f}s ({_num(rec['connects_per_s'])}/s)\n")
    lat = rec["latency_ms"]
    w(
        "connect latency ms: "
        + "  ".join(
            f"{label} {_num(lat[key])}"
            for key, label in (
                ("p50", "p50"),
                ("p90", "p90"),
                ("p99", "p99"),
                ("p999", "p99.9"),
                ("max", "max"),
            )
        )
        + "\n"
    )
    server = rec["server"]
    if server is not None:
        owner = f"pid {_num(server['pid'])} ({server['process'] or '?'})"
        if not server["listening"]:
            w(f"server: {server['address']}: no listener on this host\n")
        else:
            members = server.get("reuseport_members") or 1
            if members > 1:
                owner += f", {members} SO_REUSEPORT listeners, figures summed"
            w(
                f"server: {server['address']} {owner}  backlog limit (Send-Q) "
                f"{_num(server['backlog_limit'])}  accept queue peak {_num(server['accept_queue_max'])}"
                f"  SYN-RECV peak {_num(server['syn_recv_max'])}  listener drops "
                f"+{_num(server['listener_drops_delta'])}"
            )
            if server["accepted"] is not None:
                w(f"  accepted {server['accepted']}")
            w("\n")
        counters = rec["counters"] or {}
        shown = "  ".join(
            f"{name.split('.', 1)[1]} +{_num(value)}" for name, value in counters.items() if value
        )
        w(f"kernel counters (packets, system-wide): {shown or 'no change'}\n")
    host = rec["host"]
    port_range = host["ip_local_port_range"]
    w(
        f"host: somaxconn {_num(host['somaxconn'])}  tcp_max_syn_backlog "
        f"{_num(host['tcp_max_syn_backlog'])}  tcp_syncookies {_num(host['tcp_syncookies'])}  "
        f"tcp_abort_on_overflow {_num(host['tcp_abort_on_overflow'])}  ip_local_port_range "
        f"{'-'.join(map(str, port_range)) if port_range else '-'}  nofile "
        f"{_num(host['nofile_soft'])}/{_num(host['nofile_hard'])}\n"
    )
    pred = rec["prediction"]
    verdict = {True: "held", False: "did NOT hold", None: "not checkable"}[pred["held"]]
    w(f"prediction {verdict}: {pred['detail']}\n")
    for line in rec["interpretation"]:
        w(f"  {line}\n")
    if rec.get("steps"):
        w("ramp steps:\n")
        w("  rate/s  attempted  established  timed out  refused  p99 ms  queue peak  overflows\n")
        for s in rec["steps"]:
            w(
                f"  {_num(s['rate']):>6}  {s['attempted']:>9}  {s['established']:>11}  "
                f"{s['timed_out']:>9}  {s['refused']:>7}  {_num(s['latency_ms']['p99']):>6}  "
                f"{_num(s['accept_queue_max']):>10}  {_num(s['listen_overflows_delta']):>9}\n"
            )
    if charts:
        _histogram(out, summary.histogram)
        _timeline(out, summary.timeline)
    for gate in rec["gates"]:
        state = "not judged" if gate["failed"] is None else "FAILED" if gate["failed"] else "passed"
        w(f"gate {gate['gate']}: {state} ({_measured(gate)})\n")


def _histogram(out: TextIO, hist: "LatencyHistogram") -> None:
    bands = hist.coarse()
    if not bands:
        return
    top = max(b["count"] for b in bands)
    out.write("latency histogram (ms, upper edge):\n")
    for band in bands:
        bar = "#" * max(1, round(40 * band["count"] / top))
        out.write(f"  <= {band['le_ms']:>10.3f}  {bar} {band['count']}\n")


def _timeline(out: TextIO, ticks: "list[Tick]") -> None:
    if not ticks:
        return
    out.write("timeline (per second):\n")
    out.write(
        "     t  attempts  established  failures  in flight  held  queue  syn-recv  accepted\n"
    )
    for t in ticks:
        # The last second of a run cut short covers less: its counts are not per second.
        partial = f"  (last {t.span_s:.2f} s only)" if t.span_s < 0.995 else ""
        out.write(
            f"  {t.t:>4}  {t.attempts:>8}  {t.established:>11}  {t.failures:>8}  "
            f"{t.in_flight:>9}  {t.held:>4}  {_num(t.accept_queue):>5}  {_num(t.syn_recv):>8}  {_num(t.accepted):>8}{partial}\n"
        )
