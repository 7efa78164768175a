"""`netprobe reset serve|proxy|client`: provoke resets, FINs, hangs and slow peers. No I/O here.

The three commands share the trigger and action options; each command validates them into a
Trigger and a FaultSchedule (engines/reset_faults.py) before any socket opens.
"""

from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

from netprobe.cli._options import (
    MAX_BACKLOG,
    MIN_RATE,
    JsonOpt,
    QuietOpt,
    bind_host,
    duration,
    fraction,
    naming_host,
    per_second,
    rate_size,
    refuse_ip_options_with_unix,
    refuse_ipv4_mapped,
    refuse_ipv4_shorthand,
    size,
)
from netprobe.errors import UsageError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from netprobe.engines.reset_faults import FaultSchedule, Trigger, TriggerKind

__all__ = ["app"]

app = typer.Typer(
    help="Provoke connection resets: a misbehaving server, a fault proxy, an aborting client.",
    no_args_is_help=True,
)

SLOW_ACCEPT_RATE = 1.0  # accepts per second for --slow-accept without --accept-rate
_T = "Triggers (give one)"
_A = "Actions"

# The proxy's two at-once triggers: both wait for the upstream connect (see engines/reset.py).
OnAccept = Annotated[
    bool,
    typer.Option(
        "--on-accept",
        help="Act on each connection as soon as its upstream is connected.",
        rich_help_panel=_T,
    ),
]
OnConnect = Annotated[
    bool,
    typer.Option(
        "--on-connect",
        help="Act on each connection as soon as its upstream is connected.",
        rich_help_panel=_T,
    ),
]
# The triggers are shared by all three commands: where one name would be the only
# spelling, the other is its alias (the at-once trigger of serve, and of the client).
ServeAtOnce = Annotated[
    bool,
    typer.Option(
        "--on-accept", "--on-connect", help="Act at once on each connection.", rich_help_panel=_T
    ),
]
ClientAtOnce = Annotated[
    bool,
    typer.Option(
        "--on-connect", "--on-accept", help="Act at once on each connection.", rich_help_panel=_T
    ),
]
SentBytes = Annotated[
    str | None,
    typer.Option(
        "--after-bytes-out",
        metavar="N",
        help="After N bytes sent in the faulted direction: the bytes --after-bytes counts "
        "here (give one of the two).",
        rich_help_panel=_T,
    ),
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
        parser=fraction,
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
# The proxy's random jitter draws from the same seed, so a run can be replayed with it.
ProxySeed = Annotated[
    int | None,
    typer.Option(
        "--seed", metavar="S",
        help="Seed for --probability and --jitter (same seed, same connections and delays).",
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
Backlog = Annotated[
    int | None,
    typer.Option(
        "--backlog",
        min=0,
        max=MAX_BACKLOG,
        metavar="N",
        help="listen() backlog (raise it when many clients connect at once). Default: 128.",
        show_default=False,
    ),
]
_DEFAULT_BACKLOG = 128
Count = Annotated[
    int | None, typer.Option("--count", metavar="N", min=1, help="Stop after N connections.")
]
Duration = Annotated[
    str | None, typer.Option("--duration", metavar="D", help="Stop after D (10s, 1m).")
]


def _ms(value: str | None, option: str) -> float | None:
    """--after-ms: a bare number is milliseconds; a unit (250ms, 1.5s) is honoured. Parsed
    as every other duration is, so too long, negative and `-0` read the same everywhere."""
    return _duration_opt(value, option, bare=1e-3)


def _sent_is_counted() -> dict[TriggerKind, TriggerKind]:
    """The proxy and the client count bytes sent with --after-bytes already (the proxy sends
    what it receives; the client's count is of bytes sent): there, --after-bytes-out is that
    trigger."""
    from netprobe.engines.reset_faults import TriggerKind

    return {TriggerKind.AFTER_BYTES_OUT: TriggerKind.AFTER_BYTES}


def _size_opt(value: str | None, option: str) -> int | None:
    if value is None:
        return None
    text = value.strip()
    try:
        return size(text)
    except typer.BadParameter as exc:
        if text.startswith("-"):  # (`-0` is 0: parse_size takes it)
            raise UsageError(f"{option} {text}: must be 0 or more") from None
        raise UsageError(f"{option}: {exc}") from None


def _duration_opt(value: str | None, option: str, *, bare: float = 1.0) -> float | None:
    if value is None:
        return None
    try:
        return duration(value, bare=bare)
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
    action: str | None = None,
    plan: str | None = None,
    probability: float | None = None,
    seed: int | None = None,
    bandwidth: str | None = None,
    aliases: Mapping[TriggerKind, TriggerKind] | None = None,
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
        aliases=aliases,
    )
    if plan is not None and action is not None:
        raise UsageError("--plan and --action both name the action; put it in the plan")
    try:
        # Only a missing --action means rst: an empty one is a typo, and is refused as such.
        chosen = parse_action(action if action is not None else "rst")
    except UsageError as exc:
        raise UsageError(f"--action {exc}") from None  # parse_action names the value alone
    schedule = FaultSchedule.build(action=chosen, plan=plan, probability=probability, seed=seed)
    rate = _rate_opt(bandwidth, "--bandwidth")
    if schedule.uses_slow and rate is None:
        given = f"--plan {plan!r} has slow, which needs" if plan else "--action slow needs"
        raise UsageError(f"{given} --bandwidth (e.g. --bandwidth 1KB/s)")
    return trigger, schedule, rate


def _host_port(text: str, option: str, *, allow_port_zero: bool = True) -> tuple[str, int]:
    """--listen / --upstream: HOST:PORT, the bad-input line naming the option it came from
    (both take the same form, so the value alone does not say which one is wrong)."""
    from netprobe.errors import AddressError
    from netprobe.sockets import parse_host_port

    try:
        return parse_host_port(text, allow_port_zero=allow_port_zero)
    except AddressError as exc:
        message = str(exc)
        if not message.startswith(repr(text)):
            message = f"{text!r}: {message}"
        raise AddressError(f"{option} {message}") from None


def _is_own_listen_address(listen_host: str, listen_port: int, up_host: str, up_port: int) -> bool:
    """Whether the upstream is where the proxy itself listens: every connection it opened
    upstream would be one more client of its own, forwarded again, until the host runs out
    of ports or descriptors (one client set off thousands).

    Kept simple, on addresses alone: the same address and port; or a wildcard --listen and an
    upstream at an address of this host (loopback, or one of its interfaces') on that port.
    A wildcard takes only its own IP version: the listener is IPV6_V6ONLY (open_listener), so
    `[::]:P` in front of an IPv4 server on 127.0.0.1:P is a proxy, not a loop. An unspecified
    upstream (0.0.0.0, ::) is loopback: Linux connects it there. Names are resolved (only
    here, where the ports are the same already).
    """
    import ipaddress

    if listen_port == 0 or listen_port != up_port:
        return False  # port 0 binds a port nobody could have named as the upstream
    own = _ips(listen_host)
    for up in _ips(up_host):
        if up.is_unspecified:
            up = ipaddress.ip_address("127.0.0.1" if up.version == 4 else "::1")
        for ip in own:
            if ip == up:
                return True
            if ip.is_unspecified and ip.version == up.version and _is_this_host(up):
                return True
    return False


def _ips(host: str) -> list[Any]:
    """The addresses `host` stands for (an IPv4-mapped IPv6 address as IPv4); [] when a name
    does not resolve, which the bind or the connect reports in its own words."""
    import ipaddress

    from netprobe.errors import NetprobeError
    from netprobe.sockets import resolve

    texts = [host]
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        texts = []
        with contextlib.suppress(NetprobeError):
            texts = [found.host for found in resolve(host, 0)]
    ips: list[Any] = []
    for text in texts:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
        mapped = getattr(ip, "ipv4_mapped", None)
        ips.append(mapped if mapped is not None else ip)
    return ips


def _is_this_host(ip: Any) -> bool:
    if ip.is_loopback:
        return True
    try:
        import psutil

        interfaces = psutil.net_if_addrs().values()
    except Exception:  # psutil missing or refused (a sandbox): loopback is all we know
        return False
    return any(str(entry.address).split("%", 1)[0] == str(ip) for a in interfaces for entry in a)


def _emit_json(record: dict[str, Any], out: Any = None) -> None:
    from netprobe.render import dump_json

    out = sys.stdout if out is None else out
    out.write(dump_json(record) + "\n")
    out.flush()


@app.command()
def client(
    target: Annotated[str, typer.Argument(help="HOST:PORT or [V6]:PORT.")],
    data: Annotated[
        str | None,
        typer.Argument(
            help="Bytes to send (repeated up to --after-bytes); default: a generated stream."
        ),
    ] = None,
    on_connect: ClientAtOnce = False,
    after_bytes: AfterBytes = None,
    after_bytes_out: SentBytes = None,
    after_ms: AfterMs = None,
    count: Annotated[
        int, typer.Option("--count", metavar="N", min=1, help="Connections to make.")
    ] = 1,
    concurrency: Annotated[
        int, typer.Option("--concurrency", "-c", metavar="C", min=1, help="Connections at once.")
    ] = 1,
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout",
            "-t",
            parser=duration,
            metavar="T",
            show_default="5s",
            help="Connect/send timeout.",
        ),
    ] = 5.0,
    run_for: Duration = None,
    allow_remote: Annotated[
        bool, typer.Option("--allow-remote", help="Allow a non-loopback TARGET.")
    ] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Connect, send, then abort with RST at the trigger; report what the server did first.

    The trigger counts bytes *sent* (--after-bytes) or time since the connect (--after-ms);
    without one, the client resets right after DATA (or at once with no DATA). A non-loopback
    TARGET needs --allow-remote.

    Exit codes: 0 every connect succeeded, 4 the server reset first, else the worst connect
    outcome (1 refused, 3 timeout, 5 resolve); 2 bad input; 130 Ctrl-C, 143 SIGTERM.
    """
    from netprobe.cli._run import bounded_stdout, spare_a_stuck_stdout, stdout_takes_some
    from netprobe.engines.reset_client import (
        CLIENT_TRIGGERS,
        ClientReset,
        ClientSummary,
        Interrupted,
        run_reset_client,
    )
    from netprobe.engines.reset_faults import Trigger, TriggerKind, build_trigger
    from netprobe.exitcodes import ExitStatus, exit_status_for_state, worst
    from netprobe.render import Column, Renderer, choose_format, log
    from netprobe.results import to_record

    if timeout <= 0:
        raise UsageError(f"--timeout {timeout:g}: each connect and send needs a timeout above 0")
    trigger = build_trigger(
        allowed=CLIENT_TRIGGERS,
        on_connect=on_connect,
        after_bytes=_size_opt(after_bytes, "--after-bytes"),
        after_bytes_out=_size_opt(after_bytes_out, "--after-bytes-out"),
        after_ms=_ms(after_ms, "--after-ms"),
        aliases=_sent_is_counted(),
    )
    payload = None if data is None else data.encode("utf-8", "surrogateescape")
    if trigger is None:
        trigger = (
            Trigger(TriggerKind.ON_CONNECT)
            if not payload
            else Trigger(TriggerKind.AFTER_BYTES, len(payload))
        )
    resolved, shown = _client_target(target, allow_remote=allow_remote)
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
    cut_connects = made = 0

    def report(result: ClientReset) -> None:
        nonlocal cut_connects, made
        summary.add(result)
        if result.ended_by == "duration" and result.action == "none":
            # A connect the run's end gave up: it says nothing of the server (on a remote
            # target any connect in flight at that moment would fail the run), unless the
            # run made no connection at all (judged below).
            cut_connects += 1
        else:
            codes.append(exit_status_for_state(result.state))
            # A connection there was: we reset it, or the server ended it first.
            made += result.action == "rst" or result.ended_by.startswith("server-")
        record = {"event": "connection", **to_record(result)}
        try:
            writing[0] = True
            renderer.emit(record)
        except KeyboardInterrupt:
            writing[0] = False
            spare_a_stuck_stdout()  # the signal cut a write stuck on a reader that stopped
        finally:
            writing[0] = False

    import signal
    import threading

    # Ctrl-C only sets a flag the engine polls: raised as KeyboardInterrupt it could land in
    # the thread pool's own locking (pool.submit starting a worker) and end in exit 70, or
    # wait unseen behind an untimed lock until a connection ended (up to --after-ms).
    interrupt = threading.Event()
    terminated = threading.Event()  # SIGTERM: the same report, then 143 (it used to kill)
    # Inside report()'s write to a stdout that takes nothing (a reader that stopped) the
    # signal raises after all: that write was otherwise retried after the handler, forever
    # (8 of 8 runs). A write that goes through is never cut.
    writing = [False]

    def on_int(_signum: int, _frame: object) -> None:
        # From the first signal on, the report's writes are bounded (bounded_stdout): a later
        # one (timeout(1) sends two, ms apart) need not, and must not, cut them.
        first = not interrupt.is_set()
        interrupt.set()
        if first and writing[0] and not stdout_takes_some():
            raise KeyboardInterrupt

    def on_term(signum: int, frame: object) -> None:
        terminated.set()
        on_int(signum, frame)

    previous = signal.signal(signal.SIGINT, on_int)
    previous_term = signal.signal(signal.SIGTERM, on_term)
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
            interrupt=interrupt,
        ):
            report(result)
        if interrupt.is_set():  # after the last connection had ended: nothing was cut short
            codes.append(ExitStatus.INTERRUPTED)
            renderer.out = bounded_stdout(renderer.out)
    except Interrupted as exc:
        # Ctrl-C: the connections still running were aborted; they and the totals are
        # reported as for a finished run, then exit 130. A report that fills a pipe whose
        # reader stopped must not wait for a second signal.
        renderer.out = bounded_stdout(renderer.out)
        for result in exc.rest:
            report(result)
        codes.append(ExitStatus.INTERRUPTED)
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, previous_term)
        renderer.close()
    totals = {"event": "totals", "kind": "reset client", **to_record(summary)}
    if json_out and not quiet:
        _emit_json(totals, renderer.out)
    elif not quiet:
        log(
            f"totals: connections {summary.connections}, reset by us {summary.resets_sent}, "
            f"closed by the server first {summary.server_closed_first}, "
            f"reset by the server first {summary.server_reset_first}, failed {summary.failed}",
            always=True,
        )
    if cut_connects and not made:
        codes.append(ExitStatus.TIMEOUT)  # not one connect of the run was answered in time
    if terminated.is_set():
        raise typer.Exit(ExitStatus.TERMINATED)
    raise typer.Exit(int(worst(codes)))


def _client_target(text: str, *, allow_remote: bool) -> tuple[Any, str]:

    from netprobe.sockets import (
        format_hostport,
        is_loopback,
        not_loopback_why,
        parse_target,
        preferred,
        resolve_named,
    )

    parsed = parse_target(text)
    if parsed.path is not None:
        # AF_UNIX has no RST: the server would read a clean EOF (ECONNRESET only when the
        # client left bytes unread), while this command promises an abort.
        raise UsageError(
            f"{text!r}: a Unix socket has no RST (the server reads a clean EOF); reset client "
            "takes HOST:PORT (`netprobe send` closes a Unix connection)"
        )
    assert parsed.host is not None
    if not parsed.ports or len(parsed.ports) != 1 or "/" in parsed.host:
        raise UsageError(f"{text!r}: give one HOST:PORT or [V6]:PORT")
    port = parsed.ports[0]
    if not allow_remote and not is_loopback(parsed.host):
        # As backlog and the proxy: a name other than localhost is refused before any lookup
        # (resolving it would already send a DNS query off the host).
        raise UsageError(
            f"{text!r}: {not_loopback_why(parsed.host)} get aborts unless you pass --allow-remote"
        )
    resolved = preferred(resolve_named(parsed.host, port))
    # Checked on the resolved address, so a name that points off this host is caught too;
    # nothing has been sent to the target at this point.
    if not allow_remote and not is_loopback(resolved.host):
        raise UsageError(
            f"{text!r}: {resolved.host} is not a loopback address; reset client sends aborts "
            "only to 127.0.0.0/8 and ::1 unless you pass --allow-remote"
        )
    return resolved, format_hostport(parsed.host, port)


class _Output:
    """Announce line, per-connection records, toggles and totals (JSON Lines or text)."""

    def __init__(self, command: str, json_out: bool, quiet: bool) -> None:
        self.command = command
        self.json_out = json_out
        self.quiet = quiet
        self.faults: Any = None  # the run's FaultTotals, once the server exists
        self.extra: dict[str, Any] = {}  # run facts both totals carry (seed, upstream)
        from netprobe.render import ServerOutput

        self._io = ServerOutput(err_prefix=f"netprobe: {command}: ")

    def _write(self, stream: Any, line: str) -> None:
        self._io.write(stream, line)

    def finish(self) -> None:
        exc = self._io.finish()
        if exc is not None:
            from netprobe.cli._run import exit_local_io_error

            exit_local_io_error(self.command, exc, self._io.err)

    def ready(self, bound: Any) -> None:
        from netprobe.render import dump_json, shown

        if self.quiet:
            return
        self._write(
            sys.stdout,
            dump_json(bound.to_record()) if self.json_out else f"listening on {shown(str(bound))}",
        )

    def record(self, record: dict[str, Any]) -> None:
        from netprobe.render import dump_json

        if self.quiet:
            return
        if self.json_out:
            self._write(sys.stdout, dump_json(record))
            return
        fired = (
            f"{record['action']} at {record['fired_at_s']:.3f}s" if record["fired"] else "passed"
        )
        self._write(
            sys.stderr,
            f"#{record['conn_id']} {record['peer']} {record['trigger'] or '-'}: {fired}, "
            f"in={record['bytes_in']} out={record['bytes_out']} "
            f"{record['duration_s']:.3f}s {record['reason']}",
        )

    def toggled(self, enabled: bool, summary: Any) -> None:
        from netprobe.render import dump_json

        state = "on" if enabled else "off"
        if self.quiet:
            return  # -q prints nothing; the toggle itself still happens
        if self.json_out:
            self._write(sys.stdout, dump_json({"event": "faults", "enabled": enabled}))
        self._write(sys.stderr, f"netprobe: {self.command}: faults {state}")

    def _totals_record(self, summary: Any, *, final: bool) -> dict[str, Any]:
        # One object for SIGUSR1's running totals and the final ones: the same fields in both.
        record = {"event": "totals", "kind": self.command, **summary.to_record()}
        if self.faults is not None:
            record = self.faults.clients_only(record)
            record.update(self.faults.to_record())
        record.update(self.extra)
        record["final"] = final
        dropped = self._io.dropped
        if dropped:
            record["events_dropped"] = dropped
        return record

    def running(self, summary: Any) -> None:
        from netprobe.render import dump_json

        if self.quiet:
            return
        record = self._totals_record(summary, final=False)
        if self.json_out:
            self._write(sys.stdout, dump_json(record))  # as echo's, marked as running
            return
        self._write(sys.stderr, f"netprobe: {self.command}: {self._totals_text(record)}")

    def totals(self, summary: Any) -> None:
        from netprobe.render import dump_json

        # The queued lines first (a moment, then counted as dropped): the totals go out next.
        self._io.settle()
        if self.quiet:
            return
        record = self._totals_record(summary, final=True)
        if self.json_out:
            self._write(sys.stdout, dump_json(record))
        else:
            self._write(sys.stdout, self._totals_text(record))

    @staticmethod
    def _totals_text(record: dict[str, Any]) -> str:
        actions = ", ".join(f"{k} {v}" for k, v in sorted(record.get("actions", {}).items()))
        text = (
            f"totals: connections {record['connections']}, bytes in {record['bytes_in']}, "
            f"bytes out {record['bytes_out']}"
        )
        if "faulted" in record:
            text += f", faulted {record['faulted']} ({actions or '-'}), passed {record['passed']}"
        if record.get("seed") is not None:
            text += f", seed {record['seed']}"
        if record.get("events_dropped"):
            text += f", lines dropped {record['events_dropped']}"
        return text


def _default_trigger(
    trigger: Trigger | None, action: str | None, plan: str | None, probability: float | None
) -> Trigger | None:
    """Choosing an action, plan or probability without a trigger means: act at once."""
    from netprobe.engines.reset_faults import Trigger, TriggerKind

    if trigger is None and (action is not None or plan is not None or probability is not None):
        return Trigger(TriggerKind.ON_ACCEPT)
    return trigger


@app.command()
def serve(
    ctx: typer.Context,
    host: Annotated[
        str, typer.Option("--host", metavar="H", help="Address to bind.")
    ] = "127.0.0.1",
    port: Annotated[
        int,
        typer.Option(
            "--port", "-p", min=0, max=65535, metavar="P", help="Port (0 picks a free one)."
        ),
    ] = 0,
    unix: Annotated[
        str | None,
        typer.Option(
            "--unix",
            metavar="PATH",
            help="Listen on a Unix stream socket (@NAME: Linux's abstract namespace, no file).",
        ),
    ] = None,
    mode: Annotated[
        str,
        typer.Option(
            "--mode",
            metavar="MODE",
            help="Before the fault: echo, discard, or 'send BYTES' (a generated stream; 'send' alone: endless).",
        ),
    ] = "echo",
    on_accept: ServeAtOnce = False,
    after_bytes: AfterBytes = None,
    after_ms: AfterMs = None,
    after_frames: AfterFrames = None,
    framing: Framing = None,
    after_bytes_out: AfterBytesOut = None,
    on_idle: OnIdle = None,
    probability: Probability = None,
    seed: Seed = None,
    plan: Plan = None,
    action: Annotated[
        str | None,
        typer.Option(
            "--action",
            metavar="ACTION",
            help="rst (default: peer gets ECONNRESET), fin, half-close, hang, slow.",
            rich_help_panel=_A,
        ),
    ] = None,
    bandwidth: Bandwidth = None,
    slow_accept: Annotated[
        bool,
        typer.Option(
            "--slow-accept",
            help="One-slot backlog pre-filled by netprobe, accepting --accept-rate per second: connects beyond that rate wait for SYN retransmits (the first after about 1 s).",
        ),
    ] = False,
    no_accept: Annotated[
        bool,
        typer.Option(
            "--no-accept",
            help="Tiny backlog pre-filled by netprobe, never accepting: connects time out.",
        ),
    ] = False,
    accept_rate: Annotated[
        float | None,
        typer.Option(
            "--accept-rate",
            parser=per_second,
            metavar="R",
            show_default=False,
            help=f"Accepts per second with --slow-accept (default {SLOW_ACCEPT_RATE:g}, at least "
            f"{MIN_RATE:g}).",
        ),
    ] = None,
    backlog: Backlog = None,
    count: Count = None,
    run_for: Duration = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """A server that behaves (echo by default) until the trigger, then performs the action.

    The first stdout line announces the address (`listening on 127.0.0.1:PORT/tcp`, or a JSON
    object with --json). Each connection ends with a record (JSON on stdout, text on stderr):
    trigger, action, whether it fired and when, bytes each way. Totals at exit (SIGINT/SIGTERM,
    --count, --duration); SIGUSR1 prints running totals.

    Exit codes: 0 after a stop, 2 bad input, 5 --host does not resolve, 6 bind failed.
    """
    # The engine (asyncio, the server core) loads once the options are checked: bad input
    # exits without it.
    from netprobe.engines.reset_faults import SERVE_TRIGGERS, Action, ServeMode, parse_mode
    from netprobe.render import choose_format

    choose_format(json_out=json_out, csv_out=False, quiet=quiet, out=sys.stdout)  # -q xor --json
    host = bind_host(host)
    trigger, schedule, rate = _faults(
        SERVE_TRIGGERS,
        on_accept=on_accept,
        after_bytes=after_bytes,
        after_ms=after_ms,
        after_frames=after_frames,
        framing=framing,
        after_bytes_out=after_bytes_out,
        on_idle=on_idle,
        action=action,
        plan=plan,
        probability=probability,
        seed=seed,
        bandwidth=bandwidth,
    )
    trigger = _default_trigger(trigger, action, plan, probability)
    serve_mode, send_bytes = parse_mode(mode)
    # 0 acts at once (before any byte), so only a positive count can never be reached.
    if _size_opt(after_bytes_out, "--after-bytes-out") and serve_mode is ServeMode.DISCARD:
        raise UsageError(
            f"--after-bytes-out {after_bytes_out} counts bytes sent, and --mode discard sends "
            "none: the fault would never fire"
        )
    if slow_accept and no_accept:
        raise UsageError("--slow-accept and --no-accept exclude each other")
    refuse_ip_options_with_unix(ctx, unix, host=host, port=port)
    if unix is not None:
        from netprobe.sockets import check_listen_path

        check_listen_path(unix)  # a path that cannot be bound is the first thing to say
    if unix is not None and schedule.uses(Action.RST):
        # AF_UNIX has no RST: SO_LINGER 0 changes nothing, and the peer reads a clean EOF
        # (ECONNRESET only when the closing side left bytes unread), so `rst` would not do what
        # it promises.
        chosen = (
            f"--plan {plan!r} has rst"
            if plan is not None
            else ("--action rst" if action is not None else "the default action rst")
        )
        raise UsageError(
            f"{chosen}, and a Unix socket has no RST (its peer reads a clean EOF): choose "
            "--action fin, half-close, hang or slow with --unix"
        )
    if (slow_accept or no_accept) and unix is not None:
        raise UsageError("--slow-accept/--no-accept need TCP (a full Unix queue fails at once)")
    # Options that would change nothing are refused, not ignored: the user expects an effect.
    if no_accept and accept_rate is not None:
        raise UsageError("--no-accept never accepts: --accept-rate would change nothing")
    if not slow_accept and accept_rate is not None:
        raise UsageError(
            f"--accept-rate {accept_rate:g} paces --slow-accept: add it (`netprobe echo "
            "--accept-rate` is an accepting server with a rate)"
        )
    if rate is not None and not schedule.uses_slow:
        has = f"--plan {plan!r} has no slow" if plan else "there is no --action slow"
        raise UsageError(f"--bandwidth {bandwidth!r} paces the slow action, and {has}")
    if seed is not None and probability is None:
        raise UsageError(
            f"--seed {seed} chooses the connections of --probability; without it every "
            "connection is faulted and the seed changes nothing"
        )
    if backlog is not None and (slow_accept or no_accept):
        flag = "--slow-accept" if slow_accept else "--no-accept"
        raise UsageError(
            f"--backlog {backlog}: {flag} listens with a one-slot backlog it fills itself, so "
            "--backlog would change nothing"
        )
    run_s = _duration_opt(run_for, "--duration")
    from netprobe.engines.reset import ResetOptions, make_serve
    from netprobe.server import ServerConfig

    config = ServerConfig(
        late_signals_ignored=True,  # the process exits when the server is done
        host=host,
        port=port,
        path=unix,
        backlog=0
        if (slow_accept or no_accept)
        else (_DEFAULT_BACKLOG if backlog is None else backlog),
        pause_accept=no_accept,
        accept_rate=(SLOW_ACCEPT_RATE if accept_rate is None else accept_rate)
        if slow_accept
        else None,
        count=count,
        duration_s=run_s,
    )
    options = ResetOptions(
        trigger=trigger, schedule=schedule, slow_rate=rate, mode=serve_mode, send_bytes=send_bytes
    )
    out = _Output("reset serve", json_out, quiet)
    out.extra = {"seed": schedule.seed}
    server, faults, control = make_serve(
        config, options, on_record=out.record, on_ready=out.ready, on_totals=out.running
    )
    out.faults = faults
    with naming_host(host):
        server.listen()  # bind errors surface here (exit 6), before anything is printed
    try:
        if slow_accept or no_accept:
            control.prefill()
        summary = server.run()
    finally:
        control.release()
    out.totals(summary)
    out.finish()


@app.command()
def proxy(
    listen: Annotated[
        str,
        typer.Option("--listen", metavar="HOST:PORT", help="Where clients connect (port 0: any)."),
    ] = "127.0.0.1:0",
    upstream: Annotated[
        str | None, typer.Option("--upstream", metavar="HOST:PORT", help="Where to forward to.")
    ] = None,
    allow_remote: Annotated[
        bool, typer.Option("--allow-remote", help="Allow a non-loopback upstream.")
    ] = False,
    direction: Annotated[
        str,
        typer.Option(
            "--direction",
            metavar="DIR",
            help="Side the fault hits and whose bytes count: up (server), down (client), both.",
        ),
    ] = "both",
    on_accept: OnAccept = False,
    on_connect: OnConnect = False,
    after_bytes: AfterBytes = None,
    after_bytes_out: SentBytes = None,
    after_ms: AfterMs = None,
    after_frames: AfterFrames = None,
    framing: Framing = None,
    on_idle: OnIdle = None,
    probability: Probability = None,
    seed: ProxySeed = None,
    plan: Plan = None,
    action: Annotated[
        str | None,
        typer.Option(
            "--action",
            metavar="ACTION",
            help="rst (default), fin, half-close, hang, slow (at --bandwidth).",
            rich_help_panel=_A,
        ),
    ] = None,
    bandwidth: Bandwidth = None,
    latency: Annotated[
        str | None,
        typer.Option(
            "--latency",
            metavar="T",
            help="Delay every chunk by T (50ms).",
            rich_help_panel="Toxics",
        ),
    ] = None,
    jitter: Annotated[
        str | None,
        typer.Option(
            "--jitter", metavar="T", help="Vary the latency by up to ±T.", rich_help_panel="Toxics"
        ),
    ] = None,
    slice_size: Annotated[
        str | None,
        typer.Option(
            "--slice",
            metavar="N",
            help="Forward in writes of at most N bytes.",
            rich_help_panel="Toxics",
        ),
    ] = None,
    slice_delay: Annotated[
        str | None,
        typer.Option(
            "--slice-delay", metavar="T", help="Pause T between slices.", rich_help_panel="Toxics"
        ),
    ] = None,
    limit_bytes: Annotated[
        str | None,
        typer.Option(
            "--limit-bytes", metavar="N", help="Close after N bytes.", rich_help_panel="Toxics"
        ),
    ] = None,
    timeout: Annotated[
        str | None,
        typer.Option(
            "--timeout",
            metavar="T",
            help="Stop forwarding and close after T (above 0; no limit if left out).",
            rich_help_panel="Toxics",
        ),
    ] = None,
    connect_timeout: Annotated[
        float,
        typer.Option(
            "--connect-timeout",
            parser=duration,
            metavar="T",
            show_default="5s",
            help="Upstream connect timeout.",
        ),
    ] = 5.0,
    no_splice: Annotated[
        bool,
        typer.Option(
            "--no-splice",
            help="Never use the splice(2) relay for fault-free connections (Linux fast path).",
        ),
    ] = False,
    backlog: Backlog = None,
    count: Count = None,
    run_for: Duration = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """A TCP proxy that forwards faithfully until the trigger, then acts on the chosen side(s).

    Toxics (--latency, --jitter, --bandwidth, --slice, --limit-bytes, --timeout) apply to the
    --direction's bytes from the start. SIGUSR1 switches all faults off and on (the new state
    is printed). A non-loopback --upstream needs --allow-remote. An --upstream name is one
    address, its first IPv4 one, else its first (looked up at each connection with
    --allow-remote); no other address is tried.

    Exit codes: 0 after a stop, 2 bad input (a non-loopback --upstream without
    --allow-remote too), 5 --listen does not resolve, 6 bind failed.
    """
    # The engine (asyncio, the server core) loads once the options are checked (see serve).
    from netprobe.engines.reset_faults import PROXY_TRIGGERS, Direction, Toxics
    from netprobe.errors import AddressError
    from netprobe.render import choose_format
    from netprobe.sockets import (
        check_name,
        is_loopback,
        not_loopback_why,
        preferred,
        resolve_named,
        resolved_off_loopback,
    )

    choose_format(json_out=json_out, csv_out=False, quiet=quiet, out=sys.stdout)  # -q xor --json
    if upstream is None:
        raise UsageError("--upstream HOST:PORT is required")
    if connect_timeout <= 0:
        raise UsageError(
            f"--connect-timeout {connect_timeout:g}: each upstream connect needs a timeout above 0"
        )
    up_host, up_port = _host_port(upstream, "--upstream", allow_port_zero=False)
    if not allow_remote and not is_loopback(up_host):
        raise UsageError(
            f"--upstream {upstream}: {not_loopback_why(up_host)} are proxied to unless "
            "--allow-remote is given"
        )
    if not allow_remote:
        # The name passed the first gate (localhost); what it resolves to must pass too, and
        # that address, not the name, is what every connection then goes to.
        address = preferred(resolve_named(up_host, up_port)).host
        why = resolved_off_loopback(up_host, address)
        if why is not None:
            raise UsageError(f"--upstream {upstream}: {why}; pass --allow-remote to proxy to it")
        up_host = address
    else:
        # Looked up at each connect (Server.open_connection): a name the lookup refuses
        # outright ("a..b") left each client connected to nothing, past --connect-timeout.
        try:
            check_name(up_host)
        except AddressError as exc:
            raise AddressError(f"--upstream {upstream!r}: {exc}") from None
    listen_host, listen_port = _host_port(listen, "--listen")
    refuse_ipv4_mapped(listen_host, f"--listen {listen!r}")
    refuse_ipv4_shorthand(listen_host, f"--listen {listen!r}")
    if _is_own_listen_address(listen_host, listen_port, up_host, up_port):
        raise UsageError(
            f"--upstream {upstream!r} is the proxy's own --listen address ({listen}): each "
            "connection would be forwarded back to the proxy, again and again"
        )
    try:
        chosen = Direction(direction.strip().lower())
    except ValueError:
        raise UsageError(f"--direction {direction!r}: choose up, down or both") from None
    slow = (action or "").strip().lower() == "slow" or "slow" in (plan or "").lower()
    trigger, schedule, rate = _faults(
        PROXY_TRIGGERS,
        on_accept=on_accept,
        on_connect=on_connect,
        after_bytes=after_bytes,
        after_bytes_out=after_bytes_out,
        after_ms=after_ms,
        after_frames=after_frames,
        framing=framing,
        on_idle=on_idle,
        action=action,
        plan=plan,
        probability=probability,
        seed=seed,
        bandwidth=bandwidth,
        aliases=_sent_is_counted(),
    )
    trigger = _default_trigger(trigger, action, plan, probability)
    jitter_s = _duration_opt(jitter, "--jitter") or 0.0
    if seed is not None and probability is None and not jitter_s:
        raise UsageError(
            f"--seed {seed} drives --probability and --jitter; without them it changes nothing"
        )
    latency_s = _duration_opt(latency, "--latency") or 0.0
    slice_n = _size_opt(slice_size, "--slice")
    if slice_n == 0:
        raise UsageError("--slice 0: a slice must be at least 1 byte")
    if slice_delay is not None and slice_n is None:
        raise UsageError("--slice-delay needs --slice")
    timeout_s = _duration_opt(timeout, "--timeout")
    if timeout_s is not None and timeout_s <= 0:
        # As --connect-timeout 0: not "no limit" (leave --timeout out for that) but a proxy
        # that closes every connection as it comes.
        raise UsageError(
            f"--timeout {timeout_s:g}: must be above 0 (each connection is closed that long "
            "after it began; leave --timeout out for no limit)"
        )
    toxics = Toxics(
        latency_s=latency_s,
        jitter_s=jitter_s,
        bandwidth=None if slow else rate,
        slice_size=slice_n,
        slice_delay_s=_duration_opt(slice_delay, "--slice-delay") or 0.0,
        limit_bytes=_size_opt(limit_bytes, "--limit-bytes"),
        timeout_s=timeout_s,
    )
    from netprobe.engines.reset import ResetOptions, make_proxy
    from netprobe.server import ServerConfig

    config = ServerConfig(
        late_signals_ignored=True,  # the process exits when the server is done
        host=listen_host,
        port=listen_port,
        backlog=_DEFAULT_BACKLOG if backlog is None else backlog,
        count=count,
        duration_s=_duration_opt(run_for, "--duration"),
    )
    options = ResetOptions(
        trigger=trigger,
        schedule=schedule,
        slow_rate=rate,
        upstream=(up_host, up_port),
        direction=chosen,
        toxics=toxics,
        connect_timeout_s=connect_timeout,
        splice=not no_splice,
    )
    out = _Output("reset proxy", json_out, quiet)
    out.extra = {"seed": schedule.seed, "upstream": upstream}
    server, faults, _control = make_proxy(
        config, options, on_record=out.record, on_ready=out.ready, on_toggle=out.toggled
    )
    out.faults = faults
    with naming_host(listen_host, "--listen"):
        server.listen()
    summary = server.run()
    out.totals(summary)
    out.finish()
