"""`netprobe listeners`: listening sockets on this host with owners and queues. No I/O here."""

# No `from __future__ import annotations`: Typer reads the signature on every run, and
# string annotations would make it eval() each option (see cli/port_check.py).
import sys
from typing import Annotated

import typer

from netprobe.cli._options import CsvOpt, JsonOpt, QuietOpt

__all__ = ["listeners"]


def listeners(
    port: Annotated[
        int | None,
        typer.Option(
            "--port",
            "-p",
            min=1,
            max=65535,
            metavar="P",
            help="Only this local port.",
            show_default=False,
        ),
    ] = None,
    tcp: Annotated[bool, typer.Option("--tcp", help="TCP listeners only.")] = False,
    udp: Annotated[bool, typer.Option("--udp", help="Bound UDP sockets only.")] = False,
    unix: Annotated[bool, typer.Option("--unix", help="Listening Unix sockets only.")] = False,
    json_out: JsonOpt = False,
    csv_out: CsvOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """List listening sockets: address, port, proto, pid, process, user, accept queue.

    Recv-Q is the accept queue now and Send-Q its limit, as `ss -ltn` shows them.
    As a non-root user other users' processes are hidden: their rows have no pid
    or process (`process_known` false in JSON), and stderr says how many.

    Exit codes: 0 listeners found, 1 none matched, 2 bad input.
    """
    from netprobe.render import Column, Renderer, choose_format, log
    from netprobe.results import to_record

    if port is not None and unix:
        from netprobe.errors import UsageError

        raise UsageError(f"--port {port} and --unix exclude each other: Unix sockets have no port")
    out = sys.stdout
    fmt = choose_format(json_out=json_out, csv_out=csv_out, quiet=quiet, out=out)
    # psutil loads only once the options are checked: bad input exits without it.
    from netprobe.engines.listeners import is_root, list_listeners

    if not (tcp or udp or unix):
        tcp = udp = unix = True
    rows = list_listeners(port=port, tcp=tcp, udp=udp, unix=unix)
    columns = [
        Column("proto", "PROTO"),
        Column("address", "ADDRESS"),
        Column("port", "PORT", align_right=True),
        Column("recv_q", "RECV-Q", align_right=True),
        Column("send_q", "SEND-Q", align_right=True),
        Column("pid", "PID", align_right=True),
        Column("process", "PROCESS"),
        Column("user", "USER"),
    ]
    renderer = Renderer(fmt, out, columns)
    for row in rows:
        record = to_record(row)
        record = {"kind": "listeners", **record}
        renderer.emit(record)
    renderer.close()
    hidden = sum(1 for row in rows if not row.process_known)
    if hidden and not quiet:
        from netprobe.kernel import in_initial_user_namespace

        if in_initial_user_namespace() is False:
            # uid 0 here is root of this namespace only: the host's processes stay hidden.
            why = "in a user namespace: processes outside it are hidden"
        elif not is_root():
            why = "not root: other users' processes are hidden"
        else:
            why = (
                "no process holds them, they vanished, or their fds are unreadable even to "
                "root: see `netprobe doctor`, socket-owners"
            )
        log(
            f"netprobe: listeners: {hidden} of {len(rows)} rows lack process data ({why})",
            always=True,
        )
    if not rows:
        raise typer.Exit(1)
