"""`netprobe port-check`: TCP/UDP port checks, latency probes, wait-until-open. No network I/O
here (netprobe.engines.port_check does it); this module reads --targets-file, renders, and runs
the `-- COMMAND` of wait mode.
"""

# No `from __future__ import annotations` here: Typer reads the command's signature on every
# run, and string annotations would make it eval() each of the ~30 options (measured: most of a
# one-port check's start-up after imports).
import contextlib
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Any, cast

import typer

from netprobe.cli._options import (
    MIN_RATE,
    CsvOpt,
    IPv4Opt,
    IPv6Opt,
    JsonOpt,
    QuietOpt,
    duration,
    family_of,
    per_second,
)
from netprobe.errors import UsageError

if TYPE_CHECKING:
    from netprobe.engines.port_check import CheckConfig, PortCheckResult, Tally, TargetSpec
    from netprobe.engines.port_check_modes import LatencySummary, Probe
    from netprobe.render import Renderer

__all__ = ["port_check"]


def _command_after_dashes(targets: list[str]) -> tuple[list[str], list[str]]:
    """Split `TARGET... -- COMMAND ARGS...` (Click drops the `--` itself)."""
    from netprobe.cli._run import current_argv

    if "--" not in current_argv:
        return targets, []
    tail = current_argv[current_argv.index("--") + 1 :]
    if tail and len(tail) <= len(targets) and targets[-len(tail) :] == tail:
        return targets[: -len(tail)], tail
    return targets, []


def _read_targets_file(path: str, ports_given: bool) -> list["TargetSpec"]:
    from netprobe.engines.port_check import parse_targets, read_targets_numbered

    if path == "-" and sys.stdin is None:  # started with stdin closed (`<&-`)
        raise UsageError("--targets-file '-': stdin is closed")
    try:
        if path == "-":
            entries = read_targets_numbered(sys.stdin)
        else:
            with open(path, encoding="utf-8") as handle:
                entries = read_targets_numbered(handle)
    except UsageError as exc:  # a line over the limit: read_targets gives its number
        raise UsageError(f"--targets-file {path!r}: {exc}") from None
    except OSError as exc:
        raise UsageError(f"--targets-file {path!r}: cannot read it: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        bad = exc.object[exc.start]
        raise UsageError(f"--targets-file {path!r}: not UTF-8 text (byte {bad:#04x})") from None
    specs = []
    for number, text in entries:
        try:
            parsed = parse_targets([text])
            for spec in parsed:
                if not spec.unix and not spec.ports and not ports_given:
                    raise UsageError(f"{spec.text!r} has no port: give HOST:PORT or -p PORTS")
            specs.extend(parsed)
        except UsageError as exc:  # the file and line, so the bad entry can be found
            blanks = len(text.split()) > 1 and "expectation" not in str(exc)
            hint = " (one target per line)" if blanks else ""
            raise UsageError(f"--targets-file {path!r} line {number}: {exc}{hint}") from None
    return specs


def _payload(text: str | None, hex_text: str | None, udp: bool) -> bytes:
    if text is not None and hex_text is not None:
        raise UsageError("give --payload or --payload-hex, not both")
    if (text is not None or hex_text is not None) and not udp:
        raise UsageError("--payload and --payload-hex need --udp")
    if hex_text is not None:
        try:
            data = bytes.fromhex(hex_text.replace(" ", "").replace(":", ""))
        except ValueError as exc:
            raise UsageError(f"--payload-hex {hex_text!r} is not a hex string: {exc}") from None
    else:
        data = (text or "").encode("utf-8", "surrogateescape")
    if len(data) > _MAX_UDP_PAYLOAD:
        flag = "--payload-hex" if hex_text is not None else "--payload"
        raise UsageError(
            f"{flag}: {len(data)} bytes do not fit one UDP datagram ({_MAX_UDP_PAYLOAD} at most)"
        )
    return data


_MAX_UDP_PAYLOAD = 65507  # 65,535 - 8 (UDP header) - 20 (IPv4 header)


def _record(
    result: "PortCheckResult | Probe | LatencySummary",
    kind: str,
    keys: Sequence[str] | None = None,
) -> dict[str, Any]:
    # Built by hand: dataclasses.asdict costs ~10 us a row, too much for a 65,535-port scan.
    # A table keeps every row until the end, so it gets only its columns (`keys`): a full-range
    # listing on a terminal then stays well under 80 MB.
    record: dict[str, Any] = {} if keys is not None else {"kind": kind}
    for name in keys if keys is not None else getattr(type(result), "__slots__", ()):
        value = getattr(result, name)
        record[name] = value.value if hasattr(value, "value") else value
    return record


def _renderer(
    fmt: Any, columns: Sequence[tuple[str, str, bool]], csv_extra: Sequence[str] = ()
) -> "Renderer":
    from netprobe.engines.port_check import sort_key
    from netprobe.render import Column, OutputFormat, Renderer

    def order(record: Mapping[str, Any]) -> Any:
        return sort_key(record.get("address"), record.get("port"), str(record.get("target")))

    cols = [Column(key, header, align_right=right) for key, header, right in columns]
    if fmt is OutputFormat.CSV:
        # CSV is for programs, as JSON is: every field JSON has, the extra ones after the
        # columns the other formats share (their positions stay put).
        cols += [Column(key, key) for key in csv_extra]
    return Renderer(fmt, sys.stdout, cols, sort_key=order)


_RESULT_COLUMNS = [
    ("target", "TARGET", False),
    ("address", "ADDRESS", False),
    ("port", "PORT", True),
    ("proto", "PROTO", False),
    ("state", "STATE", False),
    ("errno_name", "ERRNO", False),
    ("latency_ms", "MS", True),
    ("service", "SERVICE", False),
]
_RESULT_CSV_EXTRA = ("expect", "ok", "attempts")
_LATENCY_COLUMNS = [
    ("target", "TARGET", False),
    ("address", "ADDRESS", False),
    ("port", "PORT", True),
    ("state", "STATE", False),
    ("sent", "SENT", True),
    ("loss_pct", "LOSS%", True),
    ("min_ms", "MIN", True),
    ("avg_ms", "AVG", True),
    ("max_ms", "MAX", True),
    ("stddev_ms", "STDDEV", True),
    ("p50_ms", "P50", True),
    ("p90_ms", "P90", True),
    ("p99_ms", "P99", True),
]
_LATENCY_CSV_EXTRA = ("proto", "errno_name", "received", "expect", "ok")


def port_check(
    targets: Annotated[
        list[str] | None,
        typer.Argument(
            help="HOST, HOST:PORTS, [IPV6]:PORTS, CIDR or unix:/PATH (a Unix stream socket); "
            "append =closed (or =open) to set the expectation per target. After `--`: a COMMAND "
            "to run once the check holds.",
            show_default=False,
        ),
    ] = None,
    ports: Annotated[
        str | None,
        typer.Option(
            "--ports",
            "-p",
            metavar="PORTS",
            help="Ports for targets without one: 22,80,8000-8100, all (or -p- as nmap; 60000-).",
        ),
    ] = None,
    targets_file: Annotated[
        str | None,
        typer.Option(
            "--targets-file",
            metavar="FILE",
            help="Read targets from FILE (- for stdin), one a line, # comments.",
        ),
    ] = None,
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout", "-t", parser=duration, show_default="1s", help="Per attempt (250ms, 2s)."
        ),
    ] = 1.0,
    concurrency: Annotated[
        int | None,
        typer.Option(
            "--concurrency",
            min=1,
            metavar="N",
            help="Sockets in flight (default 4096, capped by the file-descriptor limit).",
        ),
    ] = None,
    retries: Annotated[
        int,
        typer.Option(
            "--retries",
            min=0,
            metavar="N",
            help="Retry attempts that time out N more times (a check only, not -c or --wait).",
        ),
    ] = 0,
    rate: Annotated[
        float | None,
        typer.Option(
            "--rate",
            parser=per_second,
            metavar="N",
            help=f"At most N attempts per second (at least {MIN_RATE:g}).",
        ),
    ] = None,
    ipv4: IPv4Opt = False,
    ipv6: IPv6Opt = False,
    open_only: Annotated[bool, typer.Option("--open-only", help="Show open ports only.")] = False,
    allow_large: Annotated[
        bool, typer.Option("--allow-large", help="Allow CIDR blocks over 65,536 addresses.")
    ] = False,
    json_out: JsonOpt = False,
    csv_out: CsvOpt = False,
    quiet: QuietOpt = False,
    udp: Annotated[bool, typer.Option("--udp", help="UDP: reply=open, ICMP=closed.")] = False,
    payload: Annotated[
        str | None, typer.Option("--payload", metavar="TEXT", help="UDP datagram to send (text).")
    ] = None,
    payload_hex: Annotated[
        str | None, typer.Option("--payload-hex", metavar="HEX", help="UDP datagram to send (hex).")
    ] = None,
    require: Annotated[
        str, typer.Option("--require", metavar="all|any|N", help="all, any or N checks must hold.")
    ] = "all",
    expect: Annotated[
        str,
        typer.Option(
            "--expect", metavar="open|closed", help="open or closed (per target: HOST:PORT=closed)."
        ),
    ] = "open",
    count: Annotated[
        int | None,
        typer.Option(
            "--count", "-c", min=1, metavar="N", help="Latency mode: N probes per target."
        ),
    ] = None,
    interval_opt: Annotated[
        float | None,
        typer.Option(
            "--interval",
            parser=duration,
            show_default="1s",
            help="Between latency probes; the longest pause between wait rounds.",
        ),
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Retry until --require holds or --deadline passes.")
    ] = False,
    deadline_opt: Annotated[
        float | None,
        typer.Option(
            "--deadline", parser=duration, show_default="30s", help="Wait mode: give up after this."
        ),
    ] = None,
    until_opt: Annotated[
        str | None,
        typer.Option(
            "--until",
            metavar="open|closed",
            show_default="open",
            help="Wait mode: wait until targets are open or closed.",
        ),
    ] = None,
) -> None:
    """Check TCP/UDP ports and Unix sockets: open, closed, filtered; latency probes; wait until open.

    Exit codes: 0 the requirement holds; else the worst failure: 1 closed/unreachable or not
    as expected, 3 only timeouts, 5 resolution, 6 local error; 2 bad input; 124 wait
    deadline; with `-- COMMAND`, the command's status; 130 Ctrl-C, 141 stdout closed before
    the verdict was known, 143 SIGTERM.
    """
    import time

    from netprobe.cli._run import sigterm_exits_143
    from netprobe.engines.port_check import (
        CheckConfig,
        Expect,
        build_hosts,
        parse_require,
        parse_targets,
    )
    from netprobe.render import choose_format, log
    from netprobe.sockets import DEFAULT_CIDR_CAP, parse_ports

    given, command = _command_after_dashes(list(targets or []))
    from_file = (
        _read_targets_file(targets_file, ports is not None) if targets_file is not None else []
    )
    if not given and not from_file:
        raise UsageError("no targets: give TARGET... or --targets-file")
    if not wait:
        # Silently ignored, `--until closed` would report an open port as a success.
        for flag, value in (("--deadline", deadline_opt), ("--until", until_opt)):
            if value is not None:
                raise UsageError(f"{flag} is for wait mode: add --wait")
    if interval_opt is not None and not wait and count is None:
        raise UsageError("--interval paces latency probes (-c) or wait rounds (--wait): add one")
    if retries and (wait or count is not None):
        mode = "--wait" if wait else "-c"
        raise UsageError(f"--retries {retries} is for a check: {mode} repeats attempts itself")
    interval = 1.0 if interval_opt is None else interval_opt
    deadline = 30.0 if deadline_opt is None else deadline_opt
    until = "open" if until_opt is None else until_opt
    try:
        default_expect = Expect(expect.lower())
        wait_expect = Expect(until.lower())
    except ValueError:
        bad = expect if expect.lower() not in ("open", "closed") else until
        raise UsageError(f"{bad!r} is not open or closed") from None
    if until_opt is not None and default_expect is Expect.CLOSED and wait_expect is Expect.OPEN:
        # Waiting for "open" while expecting "closed" ended at once on a closed port (exit 0).
        raise UsageError(f"--expect {expect} and --until {until_opt} contradict each other")
    if timeout <= 0:
        raise UsageError(f"--timeout {timeout:g}: each attempt needs a timeout above 0")
    if count is not None and wait:
        raise UsageError("--count and --wait exclude each other")
    if command and count is not None:
        raise UsageError("-- COMMAND needs a check or --wait, not --count")
    specs = parse_targets(given) + from_file
    if udp and any(spec.unix for spec in specs):
        unix = next(spec.text for spec in specs if spec.unix)
        raise UsageError(f"{unix!r}: --udp checks UDP ports; unix: targets are stream sockets")
    port_list = parse_ports(ports, open_ranges=True) if ports is not None else None
    required = parse_require(require)
    family = family_of(ipv4, ipv6)
    if family and any(spec.unix for spec in specs):
        # As send: the flag would change nothing for it, silently.
        unix = next(spec.text for spec in specs if spec.unix)
        flag = "-4" if ipv4 else "-6"
        raise UsageError(f"{flag} has no effect with {unix!r}: a Unix socket has no IP family")
    config = CheckConfig(
        timeout_s=timeout,
        concurrency=concurrency,
        retries=retries,
        rate=rate,
        udp=udp,
        payload=_payload(payload, payload_hex, udp),
    )
    fmt = choose_format(json_out=json_out, csv_out=csv_out, quiet=quiet, out=sys.stdout)
    if wait:
        expect_now = wait_expect if until.lower() != "open" else default_expect
        if allow_large:
            raise UsageError("--allow-large is for scans, not --wait")
        with sigterm_exits_143():
            outcome = _wait(
                specs, config, port_list, family, expect_now, required, deadline, interval, quiet
            )
        raise typer.Exit(_finish(outcome, command, fmt, quiet, open_only))
    looking_up = time.monotonic()
    try:
        with sigterm_exits_143():
            hosts = build_hosts(
                specs,
                ports=port_list,
                family=family,
                expect=default_expect,
                cidr_cap=None if allow_large else DEFAULT_CIDR_CAP,
            )
    except (KeyboardInterrupt, typer.Exit):  # Exit: SIGTERM (143)
        if not quiet:
            log("port-check: interrupted before the first check (looking up names)", always=True)
        raise
    lookups_s = time.monotonic() - looking_up
    units = sum(len(h.ports) for h in hosts)
    if required is not None and required > units:
        raise UsageError(f"--require {required} is more than the {units} checks given")
    if open_only and not quiet:
        # Their rows are not shown: a failed name would leave only exit 5 (nmap says too).
        for host in hosts:
            if host.error is not None:
                log(f"port-check: {host.name}: cannot resolve ({host.error})", always=True)
    with sigterm_exits_143():
        if count is not None:
            code = _latency(hosts, config, count, interval, fmt, quiet, required, open_only)
            raise typer.Exit(code)
        code = _checks(hosts, config, fmt, open_only, quiet, required, units, lookups_s)
    raise typer.Exit(_run_command(command, code) if command else code)


# A terminal table keeps every row until the end (to sort and align it). Past this many closed
# ports it lists only the others and says how many closed ones it left out, as nmap does: a
# full-range table would otherwise hold ~65,000 rows (87 MB measured). Pipes, --json and --csv
# always get every row, streamed.
_TABLE_CLOSED_MAX = 1000


def _checks(
    hosts: Any,
    config: "CheckConfig",
    fmt: Any,
    open_only: bool,
    quiet: bool,
    required: int | None,
    units: int,
    lookups_s: float = 0.0,
) -> int:
    from netprobe.engines.port_check import PortState, Tally, run_checks
    from netprobe.render import OutputFormat, log

    renderer = _renderer(fmt, _RESULT_COLUMNS, _RESULT_CSV_EXTRA)
    tally = Tally(required=required)
    # -q shows nothing, so the engine may skip building rows it would show (its fast path).
    skip_rows = open_only or fmt is OutputFormat.QUIET
    table = fmt is OutputFormat.TABLE
    keys = [key for key, _header, _right in _RESULT_COLUMNS] if table else None
    closed_rows: list[dict[str, Any]] = []  # table only: held back until their count is known
    hidden = 0

    def finish() -> None:
        for row in closed_rows:
            renderer.emit(row)
        tally.finish()
        renderer.close()
        if hidden and not quiet:
            log(
                f"port-check: not shown: {hidden} closed ports (--json, --csv or a pipe list "
                "every row)",
                always=True,
            )

    def show(result: Any) -> None:
        nonlocal hidden
        record = _record(result, "port-check", keys)
        if table and result.state is PortState.CLOSED:
            if hidden:
                hidden += 1
            else:
                closed_rows.append(record)
                if len(closed_rows) > _TABLE_CLOSED_MAX:
                    hidden = len(closed_rows)
                    closed_rows.clear()
            return
        renderer.emit(record)

    results = run_checks(hosts, config, tally=tally, open_only=skip_rows)
    try:
        for result in results:
            show(result)
    except KeyboardInterrupt:
        # Interrupted here rather than in the engine: it still hands over what a split scan's
        # workers checked before they stopped (their rows, and their counts into the tally).
        with contextlib.suppress(KeyboardInterrupt, StopIteration):
            show(results.throw(KeyboardInterrupt()))
            for result in results:
                show(result)
        finish()  # a table shows what was checked before Ctrl-C
        if not quiet:
            log(f"port-check: interrupted: {tally.summary()}", always=True)
        raise
    except BrokenPipeError:
        # The row that met the closed pipe was tallied: when it was the last check, the
        # verdict is whole.
        return _output_closed(tally, quiet, complete=tally.total >= units)
    try:
        finish()  # CSV's header, a table's rows: they can meet the closed pipe too
    except BrokenPipeError:
        return _output_closed(tally, quiet, complete=True)
    if not quiet:
        # The checks' own time and rate; name lookups before them apart (nmap's "scanned in"
        # counts them too, and a slow resolver showed nowhere).
        took = ""
        if lookups_s >= _LOOKUPS_SHOWN_S:
            # Without a name among the targets the time went into listing a block's addresses.
            names = any(not host.unix and host.name != host.address for host in hosts)
            took = f", after {lookups_s:.2f} s of {'name lookups' if names else 'set-up'}"
        log(f"port-check: {tally.summary()}{took}", always=True)
    return int(tally.exit_status())


# Name lookups that took this long are named in the summary line.
_LOOKUPS_SHOWN_S = 0.5


def _latency(
    hosts: Any,
    config: "CheckConfig",
    count: int,
    interval: float,
    fmt: Any,
    quiet: bool,
    required: int | None,
    open_only: bool = False,
) -> int:
    from netprobe.cli._run import bounded_stdout
    from netprobe.engines.port_check import PortState, Tally, answered
    from netprobe.engines.port_check_modes import LatencySummary, run_latency
    from netprobe.render import log
    from netprobe.sockets import ignore_stop_signals

    renderer = _renderer(fmt, _LATENCY_COLUMNS, _LATENCY_CSV_EXTRA)
    # One summary per address:port, and one per name that did not resolve.
    checks = sum(1 if host.error is not None else len(host.ports) for host in hosts)
    tally = Tally(required=required, expected=checks)
    probes = replies = opened = 0
    summing_up = False  # the probes are over: the summaries are coming

    def show(event: "Probe | LatencySummary") -> None:
        nonlocal probes, replies, opened, summing_up
        if isinstance(event, LatencySummary):
            summing_up = True
            tally.add(event.as_result())
        else:
            probes += 1
            # An RST is an answer too (as a result's latency_ms); "open" is what the
            # summary's loss counts.
            replies += answered(event.state)
            opened += event.state is PortState.OPEN
        if open_only and event.state is not PortState.OPEN:
            return  # counted above, not shown
        _show_latency_event(event, fmt, renderer)

    def interrupted() -> None:
        # The report of an interrupted run waits on no reader that stopped reading, so no
        # second signal is needed to end it, and none may cut it (timeout(1) sends two, ms
        # apart: the second lost the summaries in 1 of 20 runs).
        ignore_stop_signals()
        renderer.out = bounded_stdout(renderer.out)

    events = run_latency(hosts, config, count=count, interval_s=interval, on_interrupt=interrupted)
    try:
        try:
            for event in events:
                show(event)
        except KeyboardInterrupt:
            # Landed here (printing), not in the engine, which sums up the probes so far
            # (as ping's statistics) and raises again: hand it over. Once the engine has
            # raised it (or before it began), there is nothing more to show.
            import inspect

            interrupted()
            if inspect.getgeneratorstate(events) == inspect.GEN_SUSPENDED:
                with contextlib.suppress(KeyboardInterrupt, StopIteration):
                    show(events.throw(KeyboardInterrupt()))
                    for event in events:
                        show(event)
            raise
    except KeyboardInterrupt:
        renderer.close()  # a table shows the rows it had
        if not quiet:
            log(
                f"port-check: interrupted: {_probe_counts(probes, replies, opened)}",
                always=True,
            )
        raise
    except BrokenPipeError:
        # stdout's reader left. The verdict may be settled all the same: by the summaries
        # still to come, once the probes are over; before, by the targets a probe already
        # found open (their summary says open whatever comes next).
        if summing_up:
            for event in events:
                tally.add(cast(LatencySummary, event).as_result())
            return _output_closed(tally, quiet, complete=True)
        import inspect

        if inspect.getgeneratorstate(events) == inspect.GEN_SUSPENDED:
            with contextlib.suppress(KeyboardInterrupt, StopIteration):
                summary = events.throw(KeyboardInterrupt())  # the probes' summaries so far
                while True:
                    if isinstance(summary, LatencySummary) and summary.state is PortState.OPEN:
                        tally.add(summary.as_result())
                    summary = next(events)
        counts = _probe_counts(probes, replies, opened)
        return _output_closed(tally, quiet, counts=counts)
    tally.finish()
    try:
        renderer.close()
    except BrokenPipeError:
        return _output_closed(tally, quiet, complete=True)
    return int(tally.exit_status())


def _probe_counts(probes: int, replies: int, opened: int) -> str:
    return f"{probes} probe{'' if probes == 1 else 's'} ended, {replies} answered, {opened} open"


def _output_closed(
    tally: "Tally", quiet: bool, *, complete: bool = False, counts: str | None = None
) -> int:
    """stdout's reader left (`| head`, `| grep -q`): the run stops there. Its exit code is
    the verdict if the results settle it (all of them: `complete`), else 141 (128 + SIGPIPE,
    as a tool killed by the broken pipe would end): never 0 for checks nobody made."""
    from netprobe.cli._run import silence_stdout
    from netprobe.exitcodes import ExitStatus
    from netprobe.render import log

    silence_stdout()
    tally.finish()
    status = tally.exit_status() if complete else tally.decided()
    if not quiet:
        verdict = "verdict settled" if status is not None else "verdict unknown"
        log(f"port-check: output closed ({verdict}): {counts or tally.summary()}", always=True)
    return int(status if status is not None else ExitStatus.OUTPUT_CLOSED)


def _show_latency_event(event: Any, fmt: Any, renderer: Any) -> None:
    from netprobe.engines.port_check_modes import LatencySummary
    from netprobe.render import OutputFormat

    if isinstance(event, LatencySummary):
        renderer.emit(_record(event, "port-check.latency"))
    elif fmt is OutputFormat.JSON:
        renderer.emit(_record(event, "port-check.probe"))
    elif fmt in (OutputFormat.TABLE, OutputFormat.PLAIN):
        # As ping and tcping: a line per probe in a pipe too (`-c 100 | tee log` was silent
        # until the end).
        shown = f"{event.latency_ms:.3f} ms" if event.latency_ms is not None else ""
        why = f" ({event.errno_name})" if event.errno_name else ""
        if event.port is None:  # unix:/path
            where = event.target
        elif event.address is not None and ":" in event.address:
            where = f"[{event.address}]:{event.port}"
        else:
            where = f"{event.address or event.target}:{event.port}"
        sys.stdout.write(
            f"{where} {event.proto} seq={event.seq} {event.state.value}{why} {shown}".rstrip()
            + "\n"
        )
        sys.stdout.flush()


def _wait(
    specs: Any,
    config: "CheckConfig",
    ports: tuple[int, ...] | None,
    family: int,
    expect: Any,
    required: int | None,
    deadline: float,
    interval: float,
    quiet: bool = False,
) -> tuple[int, Any]:
    import time

    from netprobe.engines.port_check_modes import WaitOutcome, run_wait
    from netprobe.exitcodes import ExitStatus
    from netprobe.render import StatusLine, log

    started = time.monotonic()
    state = "nothing checked yet"
    line = StatusLine()  # one line rewritten each round, not a line per round
    try:
        for event in run_wait(
            specs,
            config,
            ports=ports,
            family=family,
            expect=expect,
            required=required,
            deadline_s=deadline,
            interval_s=interval,
        ):
            if isinstance(event, WaitOutcome):
                line.clear()
                status = ExitStatus.OK if event.held else ExitStatus.WAIT_DEADLINE
                return int(status), event
            waiting = ", ".join(event.waiting[:5]) + (" ..." if len(event.waiting) > 5 else "")
            progress = f"{event.satisfied}/{event.needed} {expect.value}"
            if not quiet:
                line.show(f"port-check: waiting: {progress}, {event.left_s:.1f} s left ({waiting})")
            state = f"{progress} (waiting for {waiting})"
    except KeyboardInterrupt:
        line.clear()
        if not quiet:
            elapsed = time.monotonic() - started
            log(f"port-check: interrupted after {elapsed:.2f} s: {state}", always=True)
        raise
    finally:
        line.clear()  # an error line that follows starts at column 0
    raise AssertionError("run_wait ended without an outcome")  # pragma: no cover


def _finish(
    code_and_outcome: tuple[int, Any],
    command: list[str],
    fmt: Any,
    quiet: bool,
    open_only: bool = False,
) -> int:
    from netprobe.cli._run import error_line
    from netprobe.engines.port_check import PortState
    from netprobe.render import log

    code, outcome = code_and_outcome
    if not command:
        renderer = _renderer(fmt, _RESULT_COLUMNS, _RESULT_CSV_EXTRA)
        try:
            for result in outcome.results:
                if open_only and result.state is not PortState.OPEN:
                    continue
                renderer.emit(_record(result, "port-check"))
            renderer.close()
        except BrokenPipeError:
            # The wait is over and its outcome final: the reader's leaving changes nothing.
            from netprobe.cli._run import silence_stdout

            silence_stdout()
    if outcome.held:
        if not quiet:
            log(f"port-check: condition held after {outcome.elapsed_s:.2f} s", always=True)
        return _run_command(command, code) if command else code
    if not quiet:
        shown = _NEVER_SHOWN
        never = ", ".join(outcome.never[:shown])
        if len(outcome.never) > shown:
            never += f" and {len(outcome.never) - shown} more"
        error_line(
            "port-check", f"deadline passed after {outcome.elapsed_s:.2f} s; never held: {never}"
        )
    return code


# The checks a deadline line names (a wait on a /24 would print them all on one line).
_NEVER_SHOWN = 10


def _run_command(command: list[str], code: int) -> int:
    """Once the check held, become the `-- COMMAND` (exec, as wait-for-it): signals from a
    supervisor (`docker stop`, systemd) reach it, and its exit status is the run's. Run as a
    child, it was left running when netprobe got SIGTERM."""
    import os
    import signal

    from netprobe.cli._run import error_line

    if code != 0:
        return code
    sys.stdout.flush()
    sys.stderr.flush()
    # Python starts with SIGPIPE and SIGXFSZ ignored, and an ignored signal stays ignored
    # across exec: `yes | head` in the command would no longer end.
    restore = [s for s in (getattr(signal, "SIGPIPE", None), getattr(signal, "SIGXFSZ", None)) if s]
    before = {sig: signal.signal(sig, signal.SIG_DFL) for sig in restore}
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        error_line("port-check", f"cannot run {command[0]!r}: {exc.strerror}")
        return 127 if isinstance(exc, FileNotFoundError) else 126
    raise AssertionError("exec returned")  # pragma: no cover
