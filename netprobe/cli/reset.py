"""`netprobe reset serve|proxy|client`: provoke resets, FINs, hangs and slow peers. No I/O here.

The three commands share the trigger and action options; each command validates them into a
Trigger and a FaultSchedule (engines/reset_faults.py) before any socket opens.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

from netprobe.cli._options import JsonOpt, QuietOpt, duration, rate_size, size
from netprobe.errors import UsageError

if TYPE_CHECKING:
    from netprobe.engines.reset_faults import FaultSchedule, Trigger, TriggerKind

__all__ = ["app"]

app = typer.Typer(
    help="Provoke connection resets: a misbehaving server, a fault proxy, an aborting client.",
    no_args_is_help=True,
)

_T = "Triggers (give one)"
_A = "Actions"

OnAccept = Annotated[
    bool, typer.Option("--on-accept", help="Act at once on each connection.", rich_help_panel=_T)
]
OnConnect = Annotated[
    bool, typer.Option("--on-connect", help="Act at once on each connection.", rich_help_panel=_T)
]
AfterBytes = Annotated[
    str | None,
    typer.Option(
        "--after-bytes",
        metavar="N",
        help="Act after N bytes in the faulted direction (64K, 1MB, ...).",
        rich_help_panel=_T,
    ),
]
AfterMs = Annotated[
    str | None,
    typer.Option(
        "--after-ms",
        metavar="T",
        help="Act T milliseconds after the connection began (or 1.5s, 250ms).",
        rich_help_panel=_T,
    ),
]
AfterFrames = Annotated[
    int | None,
    typer.Option(
        "--after-frames",
        metavar="N",
        help="Act after N frames (needs --framing).",
        rich_help_panel=_T,
    ),
]
Framing = Annotated[
    str | None,
    typer.Option(
        "--framing",
        metavar="SPEC",
        help="Framing for --after-frames: raw, line, crlf, len8..len64, netstring.",
        rich_help_panel=_T,
    ),
]
AfterBytesOut = Annotated[
    str | None,
    typer.Option(
        "--after-bytes-out",
        metavar="N",
        help="Act mid-response, after N bytes sent to the peer.",
        rich_help_panel=_T,
    ),
]
OnIdle = Annotated[
    str | None,
    typer.Option(
        "--on-idle", metavar="T", help="Act after T without data (2s, 500ms).", rich_help_panel=_T
    ),
]
Probability = Annotated[
    float | None,
    typer.Option(
        "--probability",
        metavar="P",
        help="Fault only this fraction of connections (0 to 1).",
        rich_help_panel=_T,
    ),
]
Seed = Annotated[
    int | None,
    typer.Option(
        "--seed", metavar="S", help="Seed for --probability (same seed, same connections).",
        rich_help_panel=_T,
    ),
]  # fmt: skip
Plan = Annotated[
    str | None,
    typer.Option(
        "--plan",
        metavar="LIST",
        help="Per-connection actions, repeated: e.g. rst,rst,ok fails two then passes one.",
        rich_help_panel=_T,
    ),
]
ActionOpt = Annotated[
    str,
    typer.Option(
        "--action",
        metavar="ACTION",
        help="rst (peer gets ECONNRESET), fin, half-close, hang, slow.",
        rich_help_panel=_A,
    ),
]
Bandwidth = Annotated[
    str | None,
    typer.Option(
        "--bandwidth",
        metavar="RATE",
        help="Bytes per second: for --action slow (and the proxy's bandwidth toxic), e.g. 1KB/s.",
        rich_help_panel=_A,
    ),
]
Count = Annotated[
    int | None, typer.Option("--count", metavar="N", min=1, help="Stop after N connections.")
]
Duration = Annotated[
    str | None, typer.Option("--duration", metavar="D", help="Stop after D (10s, 1m).")
]


def _ms(value: str | None, option: str) -> float | None:
    """--after-ms: a bare number is milliseconds; a unit (250ms, 1.5s) is honoured."""
    if value is None:
        return None
    from netprobe.sockets import parse_duration

    text = value.strip()
    try:
        return float(text) / 1000.0 if _is_number(text) else parse_duration(text)
    except UsageError as exc:
        raise UsageError(f"{option}: {exc}") from None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _size_opt(value: str | None, option: str) -> int | None:
    if value is None:
        return None
    text = value.strip()
    if text.startswith("-"):
        raise UsageError(f"{option} {text}: must be 0 or more")
    try:
        return size(text)
    except typer.BadParameter as exc:
        raise UsageError(f"{option}: {exc}") from None


def _duration_opt(value: str | None, option: str) -> float | None:
    if value is None:
        return None
    try:
        return duration(value)
    except typer.BadParameter as exc:
        raise UsageError(f"{option}: {exc}") from None


def _rate_opt(value: str | None, option: str) -> int | None:
    if value is None:
        return None
    try:
        rate = rate_size(value)
    except typer.BadParameter as exc:
        raise UsageError(f"{option}: {exc}") from None
    if rate <= 0:
        raise UsageError(f"{option} {value}: must be more than 0 bytes per second")
    return rate


def _faults(
    allowed: frozenset[TriggerKind],
    *,
    on_accept: bool = False,
    on_connect: bool = False,
    after_bytes: str | None = None,
    after_ms: str | None = None,
    after_frames: int | None = None,
    framing: str | None = None,
    after_bytes_out: str | None = None,
    on_idle: str | None = None,
    action: str = "rst",
    plan: str | None = None,
    probability: float | None = None,
    seed: int | None = None,
    bandwidth: str | None = None,
) -> tuple[Trigger | None, FaultSchedule, int | None]:
    from netprobe.engines.reset_faults import FaultSchedule, build_trigger, parse_action

    if after_frames is not None and after_frames < 0:
        raise UsageError(f"--after-frames {after_frames}: must be 0 or more")
    if framing is not None:
        from netprobe.framing import parse_framing

        parse_framing(framing)
    trigger = build_trigger(
        allowed=allowed,
        on_accept=on_accept,
        on_connect=on_connect,
        after_bytes=_size_opt(after_bytes, "--after-bytes"),
        after_ms=_ms(after_ms, "--after-ms"),
        after_frames=after_frames,
        after_bytes_out=_size_opt(after_bytes_out, "--after-bytes-out"),
        on_idle=_duration_opt(on_idle, "--on-idle"),
        framing=framing,
    )
    schedule = FaultSchedule.build(
        action=parse_action(action), plan=plan, probability=probability, seed=seed
    )
    rate = _rate_opt(bandwidth, "--bandwidth")
    if schedule.uses_slow and rate is None:
        raise UsageError("--action slow needs --bandwidth (e.g. --bandwidth 1KB/s)")
    return trigger, schedule, rate


def _emit_json(record: dict[str, Any]) -> None:
    from netprobe.render import dump_json

    sys.stdout.write(dump_json(record) + "\n")
    sys.stdout.flush()


@app.command()
def client(
    target: Annotated[str, typer.Argument(help="HOST:PORT, [V6]:PORT or unix:/path.")],
    data: Annotated[
        str | None,
        typer.Argument(
            help="Bytes to send (repeated up to --after-bytes); default: a generated stream."
        ),
    ] = None,
    on_connect: OnConnect = False,
    after_bytes: AfterBytes = None,
    after_ms: AfterMs = None,
    count: Annotated[
        int, typer.Option("--count", metavar="N", min=1, help="Connections to make.")
    ] = 1,
    concurrency: Annotated[
        int, typer.Option("--concurrency", "-c", metavar="C", min=1, help="Connections at once.")
    ] = 1,
    timeout: Annotated[
        float,
        typer.Option("--timeout", "-t", parser=duration, metavar="T", help="Connect/send timeout."),
    ] = 5.0,
    run_for: Duration = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Connect, send, then abort with RST at the trigger; report what the server did first.

    The trigger counts bytes *sent* (--after-bytes) or time since the connect (--after-ms);
    without one, the client resets right after DATA (or at once with no DATA). Exit 0 when every
    connect succeeded, 4 when the server reset first, else the worst connect outcome.
    """
    from netprobe.engines.reset_client import CLIENT_TRIGGERS, ClientSummary, run_reset_client
    from netprobe.engines.reset_faults import Trigger, TriggerKind, build_trigger
    from netprobe.exitcodes import ExitStatus, exit_status_for_state, worst
    from netprobe.render import Column, Renderer, choose_format, log
    from netprobe.results import to_record

    trigger = build_trigger(
        allowed=CLIENT_TRIGGERS,
        on_connect=on_connect,
        after_bytes=_size_opt(after_bytes, "--after-bytes"),
        after_ms=_ms(after_ms, "--after-ms"),
    )
    payload = None if data is None else data.encode("utf-8", "surrogateescape")
    if trigger is None:
        trigger = (
            Trigger(TriggerKind.ON_CONNECT)
            if not payload
            else Trigger(TriggerKind.AFTER_BYTES, len(payload))
        )
    resolved, shown = _client_target(target)
    fmt = choose_format(json_out=json_out, csv_out=False, quiet=quiet, out=sys.stdout)
    columns = [
        Column("conn", "CONN", align_right=True),
        Column("target", "TARGET"),
        Column("ended_by", "ENDED BY"),
        Column("bytes_out", "SENT", align_right=True),
        Column("bytes_in", "RECEIVED", align_right=True),
        Column("elapsed_s", "SECONDS", align_right=True),
    ]
    renderer = Renderer(fmt, sys.stdout, columns)
    summary = ClientSummary()
    codes = [ExitStatus.OK]
    try:
        for result in run_reset_client(
            resolved,
            shown,
            trigger=trigger,
            data=payload,
            count=count,
            concurrency=concurrency,
            timeout_s=timeout,
            duration_s=_duration_opt(run_for, "--duration"),
        ):
            summary.add(result)
            codes.append(exit_status_for_state(result.state))
            renderer.emit({"event": "connection", **to_record(result)})
    finally:
        renderer.close()
    totals = {"event": "totals", "kind": "reset client", **to_record(summary)}
    if json_out and not quiet:
        _emit_json(totals)
    elif not quiet:
        log(
            f"{summary.connections} connections: {summary.resets_sent} reset by us, "
            f"{summary.server_closed_first} closed by the server first, "
            f"{summary.server_reset_first} reset by the server first, {summary.failed} failed",
            always=True,
        )
    raise typer.Exit(int(worst(codes)))


def _client_target(text: str) -> tuple[Any, str]:
    import socket

    from netprobe.sockets import Resolved, format_hostport, parse_target, resolve

    parsed = parse_target(text)
    if parsed.path is not None:
        return Resolved(socket.AF_UNIX, parsed.path), f"unix:{parsed.path}"  # type: ignore[arg-type]
    assert parsed.host is not None
    if not parsed.ports or len(parsed.ports) != 1 or "/" in parsed.host:
        raise UsageError(f"{text!r}: give one HOST:PORT (or unix:/path)")
    port = parsed.ports[0]
    resolved = resolve(parsed.host, port)[0]
    return resolved, format_hostport(parsed.host, port)


@app.command()
def serve(ctx: typer.Context) -> None:
    """Not built yet."""
    raise UsageError("reset serve is not built yet in this version")


@app.command()
def proxy(ctx: typer.Context) -> None:
    """Not built yet."""
    raise UsageError("reset proxy is not built yet in this version")
