"""The Typer application: one thin command per subcommand, composed here. No network I/O.

Command modules import their engines inside the command body, so `netprobe --help` and a
one-port check load only what they use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import typer

from netprobe import __version__
from netprobe.cli import backlog, doctor, echo, listen, listeners, port_check, reset, send
from netprobe.cli._run import main

__all__ = ["app", "main"]

_STUB = {"allow_extra_args": True, "ignore_unknown_options": True}

app = typer.Typer(
    name="netprobe",
    help="Test and diagnose TCP, UDP and Unix-socket networking.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"netprobe {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")
    ] = False,
) -> None:
    """Test and diagnose TCP, UDP and Unix-socket networking.

    Exit codes: 0 OK, 1 not open, 2 usage, 3 timeout, 4 reset, 5 resolve, 6 local,
    70 internal, 124 wait deadline, 130 interrupted.
    """


def _register(name: str, func: Callable[..., object], stub: bool) -> None:
    settings = _STUB if stub else {}
    app.command(name, context_settings=settings)(func)


_register("port-check", port_check.port_check, stub=False)
_register("echo", echo.echo, stub=False)
_register("send", send.send, stub=False)
_register("listen", listen.listen, stub=False)
_register("backlog", backlog.backlog, stub=False)
_register("listeners", listeners.listeners, stub=False)
_register("doctor", doctor.doctor, stub=False)
app.add_typer(reset.app, name="reset")
