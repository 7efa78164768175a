"""`netprobe echo`: a bounded, observable TCP/UDP/Unix echo (or discard) server. No I/O here
beyond printing; the engine serves."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from netprobe.cli._options import (
    MAX_BACKLOG,
    MIN_RATE,
    JsonOpt,
    bind_host,
    duration,
    naming_host,
    per_second,
    refuse_ip_options_with_unix,
    size,
)
from netprobe.errors import UsageError

DEFAULT_BACKLOG = 128
DEFAULT_BUSY_POLL_S = 50e-6

if TYPE_CHECKING:
    from netprobe.server import Bound, ConnEvent, ServerSummary

__all__ = ["echo"]


def echo(
    ctx: typer.Context,
    host: Annotated[
        str,
        typer.Option(
            "--host",
            metavar="H",
            help="Address to bind (0.0.0.0: all IPv4 interfaces; ::, all IPv6 ones).",
        ),
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", "-p", metavar="P", help="Port (0 picks a free one).")
    ] = 7007,
    udp: Annotated[bool, typer.Option("--udp", help="Echo UDP datagrams.")] = False,
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
            "--mode", metavar="echo|discard", help="echo (send back) or discard (read and drop)."
        ),
    ] = "echo",
    framing: Annotated[
        str,
        typer.Option(
            "--framing",
            metavar="NAME",
            help="raw, line, crlf, len8, len16, len32, len64 or netstring.",
        ),
    ] = "raw",
    max_frame: Annotated[
        int | None,
        typer.Option(
            "--max-frame",
            parser=size,
            metavar="SIZE",
            help="Largest frame (raw: chunk) accepted; a larger one closes the connection (default 16MiB).",
        ),
    ] = None,
    delay: Annotated[
        float | None,
        typer.Option("--delay", parser=duration, metavar="DURATION", help="Wait before each echo."),
    ] = None,
    max_conns: Annotated[
        int | None,
        typer.Option(
            "--max-conns", metavar="N", help="Clients above this many are closed at once."
        ),
    ] = None,
    idle_timeout: Annotated[
        float | None,
        typer.Option(
            "--idle-timeout",
            parser=duration,
            metavar="DURATION",
            help="Close a client that sent nothing for this long (above 0).",
        ),
    ] = None,
    max_bytes: Annotated[
        int | None,
        typer.Option(
            "--max-bytes",
            parser=size,
            metavar="SIZE",
            help="Close a connection after it sent this many bytes.",
        ),
    ] = None,
    once: Annotated[bool, typer.Option("--once", help="Serve one client, then exit.")] = False,
    count: Annotated[
        int | None,
        typer.Option("--count", metavar="N", help="Exit after N clients (UDP: datagrams)."),
    ] = None,
    run_for: Annotated[
        float | None,
        typer.Option(
            "--duration", parser=duration, metavar="DURATION", help="Exit after this long."
        ),
    ] = None,
    backlog: Annotated[
        int | None,
        typer.Option(
            "--backlog",
            metavar="N",
            help=f"listen() backlog (0 to {MAX_BACKLOG}; the kernel caps it). Default: 128.",
            show_default=False,
        ),
    ] = None,
    accept_rate: Annotated[
        float | None,
        typer.Option(
            "--accept-rate",
            parser=per_second,
            metavar="R",
            help=f"Accept at most R connections per second (at least {MIN_RATE:g}).",
        ),
    ] = None,
    pause_accept: Annotated[
        bool, typer.Option("--pause-accept", help="Listen but never accept (the backlog fills).")
    ] = False,
    allow: Annotated[
        list[str] | None,
        typer.Option(
            "--allow",
            metavar="CIDR",
            help="Serve only these peers (repeatable); others are closed.",
        ),
    ] = None,
    ready_file_text: Annotated[
        str | None,
        typer.Option(
            "--ready-file", metavar="FILE", help="Write the listening JSON object here when ready."
        ),
    ] = None,
    workers: Annotated[
        int,
        typer.Option(
            "--workers",
            metavar="N",
            help="Processes sharing the listener (TCP/Unix; uses more cores; 1 to 64). Default: 1.",
            show_default=False,
        ),
    ] = 1,
    busy_poll: Annotated[
        float | None,
        typer.Option(
            "--busy-poll",
            parser=duration,
            metavar="DURATION",
            help="While one client is connected, keep reading it for this long after each "
            "message before sleeping (lower round-trip latency for CPU; 0 turns it off). "
            "Default: 50us.",
            show_default=False,
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Echo (RFC 862) or discard (RFC 863) server for testing clients and proxies.

    Binds 127.0.0.1:7007 unless told otherwise; --port 0 picks a free port.

    The first stdout line announces the address: `listening on HOST:PORT/tcp`,
    or with --json `{"event": "listening", "proto": ..., "host": ..., "port": ...}`.

    Events (accept, close with reason, reject) go to stderr; with --json they are
    JSON lines on stdout. SIGUSR1 prints running totals; SIGINT/SIGTERM stop the
    server and print the totals.

    Exit codes: 0 after a stop (signal, --once, --count, --duration), 2 bad input,
    5 --host does not resolve, 6 bind failed.
    """
    from netprobe.framing import DEFAULT_MAX_FRAME

    _check_range("--port", port, 0, 65535)
    _check_range("--max-conns", max_conns, 1)
    _check_range("--count", count, 1)
    _check_range("--backlog", backlog, 0, MAX_BACKLOG)
    host = bind_host(host)
    _check_range("--workers", workers, 1, 64)
    if workers > 1:
        for flag, given in (
            ("--udp", udp),
            ("--once", once),
            ("--count", count is not None),
            ("--max-conns", max_conns is not None),
            ("--accept-rate", accept_rate is not None),
            ("--pause-accept", pause_accept),
        ):
            if given:
                raise UsageError(f"--workers {workers} cannot be combined with {flag}")
    if udp and unix is not None:
        raise UsageError("--udp and --unix exclude each other")
    refuse_ip_options_with_unix(ctx, unix, host=host, port=port)
    if pause_accept and accept_rate is not None:
        raise UsageError("--pause-accept never accepts: --accept-rate would change nothing")
    if unix is not None and allow:
        raise UsageError("--allow filters IP peers; a Unix socket has none (use its file mode)")
    if delay and mode.strip().lower() == "discard":
        raise UsageError("--delay waits before each echo: --mode discard sends none")
    if udp:
        for flag, given in (
            ("--max-conns", max_conns is not None),
            ("--idle-timeout", idle_timeout is not None),
            ("--max-bytes", max_bytes is not None),
            ("--accept-rate", accept_rate is not None),
            ("--pause-accept", pause_accept),
            ("--backlog", backlog is not None),  # no listen() for datagrams
            ("--busy-poll", busy_poll is not None),
            # A datagram is its own frame: --max-frame applies, a stream framing does not.
            (f"--framing {framing}", framing.strip().lower() != "raw"),
        ):
            if given:
                raise UsageError(f"{flag} applies to TCP and Unix streams, not to --udp")
    if once and count is not None and count != 1:
        raise UsageError(f"--once and --count {count} contradict each other")
    if max_frame is not None and max_frame < 1:
        raise UsageError(f"--max-frame {max_frame} must be at least 1 byte")
    if max_bytes is not None and max_bytes < 1:
        raise UsageError(f"--max-bytes {max_bytes} must be at least 1 byte")
    if busy_poll is None:
        busy_poll = DEFAULT_BUSY_POLL_S
    if backlog is None:
        backlog = DEFAULT_BACKLOG
    if not 0 <= busy_poll <= 0.01:
        # In the unit that keeps the number plain: 1h is 3600s, not 3.6e+06ms.
        shown = f"{busy_poll:g}s" if abs(busy_poll) >= 1 else f"{busy_poll * 1e3:g}ms"
        raise UsageError(f"--busy-poll {shown}: must be between 0 and 10ms")
    if idle_timeout is not None and idle_timeout <= 0:
        raise UsageError(f"--idle-timeout {idle_timeout:g}s must be more than 0")
    ready_file = _check_ready_file(ready_file_text) if ready_file_text is not None else None
    if unix is not None and ready_file is not None:
        # Its write (a rename over the path) would replace the socket: every client refused;
        # or it is written first at FILE.tmp, which the socket would be (exit 6 after the bind).
        for path, what in ((ready_file, "path"), (_tmp_path(ready_file), "temporary file")):
            if _same_path(unix, path):
                raise UsageError(
                    f"--ready-file {ready_file_text!r}: its {what} is the --unix socket's path"
                )
    if unix is not None:
        # The bind would refuse these too, but only after the old ready file is gone.
        from netprobe.sockets import check_listen_path

        check_listen_path(unix)
    # The engine (asyncio, the server core) loads once the options are checked: bad input
    # exits without it.
    from netprobe.engines.echo import EchoOptions, make_server
    from netprobe.server import ServerConfig

    config = ServerConfig(
        late_signals_ignored=True,  # the process exits when the server is done
        host=host,
        port=port,
        path=unix,
        udp=udp,
        backlog=backlog,
        max_conns=max_conns,
        idle_timeout_s=idle_timeout,
        max_bytes=max_bytes,
        accept_rate=accept_rate,
        pause_accept=pause_accept,
        allow=_allow_for(host, allow or ()),
        count=1 if once else count,
        duration_s=run_for,
        workers=workers,
        busy_poll_s=busy_poll,
    )
    options = EchoOptions(
        mode=mode,
        framing=framing,
        max_frame=max_frame if max_frame is not None else DEFAULT_MAX_FRAME,
        delay_s=delay or 0.0,
    )
    out = _Output(json_out, ready_file)
    server = make_server(  # checks --mode and --framing
        config, options, on_event=out.event, on_ready=out.ready, on_totals=out.running_totals
    )
    out.event_loop = "asyncio" if server.config.loop_factory is None else "uvloop"
    out.native_echo = server.config.native_echo
    server.on_worker_exit = out.worker_exit
    # Only now, with every option checked: bad input must leave an old ready file alone. A
    # file left by an earlier run would say "listening" for a server that may still fail to
    # bind: it exists only while this one listens.
    _remove_ready_file(ready_file)
    try:
        with naming_host(host):
            bound = server.listen()  # bind errors (exit 6) surface here, before any output
        if config.allow and bound.host:
            # A name's family is known now: `--host localhost --allow ::1/128` refuses all.
            try:
                _check_allow_family(host, bound.host, config.allow, allow or ())
            except UsageError:
                server.unlisten()
                raise
        summary = server.run()
    finally:
        _remove_ready_file(ready_file)  # nobody listens any more
    out.final_totals(summary, lost_elsewhere=out.workers_lost(server.worker_counters))
    for lost in server.lost_workers:
        out.note(f"netprobe: echo: {lost}: what it served is missing from the totals")
    out.finish()


def _allow_for(host: str, specs: Sequence[str]) -> tuple[Any, ...]:
    """--allow blocks; refused when none is of the family the server listens on (an IPv4
    --host serves only IPv4 peers, an IPv6 one only IPv6: it binds v6-only), since every
    client would then be turned away."""
    from netprobe.server import parse_allow

    networks = parse_allow(specs)
    _check_allow_family(host, host, networks, specs)
    return networks


def _check_allow_family(
    host: str, address: str, networks: Sequence[Any], specs: Sequence[str]
) -> None:
    """Refuse --allow blocks none of which is of `address`'s family (`host` as given)."""
    import ipaddress

    try:
        version = ipaddress.ip_address(address.split("%", 1)[0]).version
    except ValueError:
        return  # a name: its family is known only once it resolves (checked after the bind)
    if networks and all(net.version != version for net in networks):
        blocks = " ".join(specs)
        shown = host if host == address else f"{host} ({address})"
        raise UsageError(
            f"--allow {blocks}: no IPv{version} block, and --host {shown} serves only "
            f"IPv{version} peers: every client would be refused"
        )


def _check_ready_file(text: str) -> Path:
    # Checked now: failing later, after the bind, would be exit 6 for what is bad input. No
    # side effects here: the old file is removed only once every option has been checked.
    shown = f"--ready-file {text!r}"
    if not text:
        raise UsageError(f"{shown}: the path is empty (give a file, e.g. /tmp/echo.json)")
    ready_file = Path(text)
    try:
        # Path("/") and Path(".") have no name to put ".tmp" after: both are directories.
        if not ready_file.name or ready_file.is_dir():
            raise UsageError(f"{shown}: {text} is a directory, not a file")
        tmp = _tmp_path(ready_file)
        if tmp.is_dir():
            raise UsageError(f"{shown}: {tmp} is a directory, not a file")
    except OSError as exc:  # is_dir() raises ENAMETOOLONG (a name over 255 bytes), ELOOP
        raise UsageError(f"{shown}: cannot write it: {exc.strerror or exc}") from None
    if not os.access(ready_file.parent, os.W_OK):
        raise UsageError(f"{shown}: cannot write in {ready_file.parent}")
    # os.access says yes to root everywhere, /proc included: only a write tells.
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass  # a leftover of an earlier run: the real write replaces it
    except OSError as exc:
        raise UsageError(f"{shown}: cannot write {tmp}: {exc.strerror or exc}") from None
    else:
        os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
    return ready_file


def _same_path(unix: str, ready_file: Path) -> bool:
    if unix.startswith("@"):
        return False  # an abstract name: no file
    try:
        return os.path.realpath(unix) == os.path.realpath(ready_file)
    except (OSError, ValueError):
        return False


def _remove_ready_file(ready_file: Path | None) -> None:
    if ready_file is not None:
        with contextlib.suppress(FileNotFoundError, OSError):
            ready_file.unlink()


def _tmp_path(ready_file: Path) -> Path:
    return ready_file.with_name(ready_file.name + ".tmp")


def _check_range(flag: str, value: int | None, low: int, high: int | None = None) -> None:
    if value is None:
        return
    if value < low or (high is not None and value > high):
        span = f"{low}-{high}" if high is not None else f"{low} or more"
        raise UsageError(f"{flag} {value} is out of range ({span})")


class _Output:
    """Where announce, events and totals go: JSON lines on stdout, or text (events on stderr)."""

    def __init__(self, json_out: bool, ready_file: Path | None) -> None:
        from netprobe.render import ServerOutput

        self.json_out = json_out
        self.ready_file = ready_file
        self.event_loop = "asyncio"
        self.native_echo = False
        self._io = ServerOutput()

    def ready(self, bound: Bound) -> None:
        from netprobe.render import dump_json, shown

        record = {
            **bound.to_record(),
            "event_loop": self.event_loop,
            "native_echo": self.native_echo,
        }
        if self.ready_file is not None:
            # Write then rename, so a script polling for the file never reads half of it.
            tmp = _tmp_path(self.ready_file)
            try:
                tmp.write_text(dump_json(record) + "\n")
                tmp.replace(self.ready_file)
            except OSError as exc:
                from netprobe.errors import LocalError

                # Never leave the half-done file behind (unlink refuses a directory).
                with contextlib.suppress(OSError):
                    tmp.unlink(missing_ok=True)

                raise LocalError(
                    f"cannot write --ready-file {self.ready_file}: {exc.strerror or exc}"
                ) from exc
        self._write(
            sys.stdout, dump_json(record) if self.json_out else f"listening on {shown(str(bound))}"
        )

    def event(self, event: ConnEvent) -> None:
        if self.json_out:
            from netprobe.render import dump_json

            self._write(sys.stdout, dump_json(event.to_record()))
            return
        if event.event == "close":
            text = (
                f"close #{event.conn_id} {event.peer} {event.reason} "
                f"in={event.bytes_in} out={event.bytes_out} {event.duration_s:.3f}s"
            )
        elif event.event == "reject":
            text = f"reject {event.peer} {event.reason}"
        else:
            text = f"{event.event} #{event.conn_id} {event.peer}"
        self._write(sys.stderr, text)

    def running_totals(self, summary: ServerSummary) -> None:
        self._totals(summary, final=False)

    def final_totals(self, summary: ServerSummary, lost_elsewhere: int = 0) -> None:
        """The totals line, after the event lines still queued (given a moment, then counted
        as dropped): it goes out next, and says how many never did (`lost_elsewhere`: the
        workers' own)."""
        self.settle()
        self._totals(summary, final=True, lost_elsewhere=lost_elsewhere)

    def settle(self) -> int:
        """Let the queued lines go out (bounded); returns how many were dropped in all."""
        return self._io.settle()

    def _totals(self, summary: ServerSummary, *, final: bool, lost_elsewhere: int = 0) -> None:
        record: dict[str, Any] = summary.to_record()
        record["final"] = final
        dropped = self._io.dropped + lost_elsewhere
        if dropped:
            record["events_dropped"] = dropped
        if self.json_out:
            from netprobe.render import dump_json

            self._write(sys.stdout, dump_json(record))
            return
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(summary.reasons.items())) or "-"
        which = f" (worker {summary.worker}/{summary.workers})" if summary.worker else ""
        text = (
            f"totals{which}: connections {summary.connections}, active {summary.active}, "
            f"rejected {summary.rejected}, bytes in {summary.bytes_in}, "
            f"bytes out {summary.bytes_out}, resets {summary.resets}, errors {summary.errors}, "
        )
        if summary.datagrams_in or summary.datagrams_out:
            text += f"datagrams in {summary.datagrams_in}, out {summary.datagrams_out}, "
        text += f"reasons: {reasons}, {summary.duration_s:.3f}s"
        if dropped:
            text += f", event lines dropped {dropped}"
        # Final totals are the run's result (stdout); running totals are a log line.
        self._write(sys.stdout if final else sys.stderr, text)

    def _write(self, stream: Any, line: str) -> None:
        self._io.write(stream, line)

    def note(self, line: str) -> None:
        self._io.err.write(line)

    def finish(self) -> None:
        exc = self._io.finish()
        if exc is not None:
            from netprobe.cli._run import exit_local_io_error

            exit_local_io_error("echo", exc, self._io.err)

    def worker_exit(self) -> dict[str, int]:
        return self._io.worker_exit()

    def workers_lost(self, counters: dict[str, int]) -> int:
        """The workers' lost lines, those the stream has not told of yet noted for the next
        "dropped" line; returns how many were lost."""
        self._io.out.add_unreported(counters.get("lines_unmarked", 0))
        return counters.get("lines_lost", 0)
