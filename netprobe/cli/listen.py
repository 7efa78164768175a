"""`netprobe listen`: the `nc -l` of the suite. stdout carries only the peer's bytes; the
address announcement and peer outcomes go to stderr. The work is netprobe.engines.listen.
"""

from __future__ import annotations

import sys
from typing import IO, Annotated, Any, cast

import typer

from netprobe.cli._options import (
    IPv4Opt,
    IPv6Opt,
    bind_host,
    duration,
    family_of,
    naming_host,
    refuse_ip_options_with_unix,
    size,
)
from netprobe.cli._run import note_closed_stdout, sigterm_as_interrupt, silence_stdout

__all__ = ["listen"]


def _describe(event: dict[str, Any]) -> str:
    kind = event["event"]
    if kind == "listening":
        if event["proto"] == "unix":
            from netprobe.render import shown

            return f"listening on unix:{shown(event['path'])}"
        from netprobe.sockets import format_hostport

        return f"listening on {format_hostport(event['host'], event['port'])}/{event['proto']}"
    if kind == "accept":
        return f"accepted {event['peer']}"
    if kind == "peer":
        return f"datagrams from {event['peer']}"
    if kind == "idle":
        return f"nobody came within {event['waited_ms']} ms"
    line = (
        f"peer {event['peer']} ended: {event['ended_by']}"
        f" (received {event['bytes_in']} B, sent {event['bytes_out']} B,"
        f" {event['duration_ms']:.1f} ms)"
    )
    if event.get("errno_name"):
        line += f" {event['errno_name']}"
    return line


def listen(
    ctx: typer.Context,
    host: Annotated[
        str | None,
        typer.Option(
            "--host",
            metavar="H",
            help="Address to bind. Default: 127.0.0.1 (::1 with -6).",
            show_default=False,
        ),
    ] = None,
    port: Annotated[
        int,
        typer.Option(
            "--port", "-p", min=0, max=65535, metavar="P", help="Port (0 picks a free one)."
        ),
    ] = 0,
    udp: Annotated[bool, typer.Option("--udp", help="Receive UDP datagrams.")] = False,
    unix: Annotated[
        str | None,
        typer.Option(
            "--unix",
            metavar="PATH",
            help="Listen on a Unix stream socket (@NAME: Linux's abstract namespace, no file).",
        ),
    ] = None,
    keep_open: Annotated[
        bool,
        typer.Option("--keep-open", "-k", help="After a peer leaves, accept the next one."),
    ] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="Announcement and peer events as JSON on stderr.")
    ] = False,
    max_bytes: Annotated[
        int | None,
        typer.Option(
            "--max-bytes", parser=size, metavar="SIZE", help="Stop after receiving this many bytes."
        ),
    ] = None,
    idle_timeout: Annotated[
        float | None,
        typer.Option(
            "--idle-timeout",
            parser=duration,
            metavar="DURATION",
            help="Give up when nothing happens for this long (no peer, no data); "
            "0 disables it (the default), as for send.",
        ),
    ] = None,
    ipv4: IPv4Opt = False,
    ipv6: IPv6Opt = False,
) -> None:
    """Accept one peer; its bytes go to stdout, stdin goes to it (both at once).

    The first stderr line announces the address (`listening on 127.0.0.1:PORT/tcp`, or a
    JSON object with --json). On stdin EOF the write side is half-closed. How the peer
    ended (eof or reset) is reported on stderr. Exit codes: 0 the peer ended cleanly, 2 bad
    input, 3 no peer within --idle-timeout, 4 the peer reset the connection, 5 --host does not
    resolve, 6 cannot bind, 130 Ctrl-C, 143 SIGTERM (both after the peer's report).
    """
    from netprobe.engines.listen import ListenOptions
    from netprobe.engines.listen import listen as run_listen
    from netprobe.engines.send import InputSource
    from netprobe.errors import UsageError
    from netprobe.exitcodes import ExitStatus
    from netprobe.render import dump_json

    if udp and unix is not None:
        raise UsageError("--udp and --unix exclude each other")
    refuse_ip_options_with_unix(ctx, unix, host=host, port=port, ipv4=ipv4, ipv6=ipv6)
    if max_bytes is not None and max_bytes < 1:
        raise UsageError(f"--max-bytes {max_bytes} must be at least 1 byte")
    family = family_of(ipv4, ipv6)
    bind = bind_host(host, family=family)
    stdin = sys.stdin
    source = None
    interactive = False
    if stdin is not None:
        interactive = stdin.isatty()
        source = InputSource.from_stream(cast("IO[bytes]", getattr(stdin, "buffer", stdin)))
    out = cast("IO[bytes]", getattr(sys.stdout, "buffer", sys.stdout))

    def emit(chunk: bytes) -> None:
        if chunk:
            out.write(chunk)
            out.flush()

    def on_event(event: dict[str, Any]) -> None:
        sys.stderr.write((dump_json(event) if json_out else _describe(event)) + "\n")
        if event["event"] == "listening":
            note_closed_stdout()
        sys.stderr.flush()

    opts = ListenOptions(
        host=bind,
        port=port,
        family=family,
        udp=udp,
        unix_path=unix,
        keep_open=keep_open,
        max_bytes=max_bytes,
        # 0 is no limit, as send's --idle-timeout 0: a script can pass the same value to both.
        idle_timeout_s=idle_timeout if idle_timeout else None,
        source=source,
        interactive=interactive,
    )
    # SIGTERM: the engine reports the peer as it does for Ctrl-C (`interrupted`).
    with sigterm_as_interrupt() as term:
        try:
            with naming_host(bind):
                summary = run_listen(opts, emit, on_event)
        except KeyboardInterrupt:
            # After the report: what a blocked stdout still holds is dropped, so the exit
            # neither waits on a reader that stopped reading nor fails on one that left.
            silence_stdout()
            if term.terminated:  # as if killed
                raise typer.Exit(ExitStatus.TERMINATED) from None
            raise
    raise typer.Exit(int(summary.exit_status()))
