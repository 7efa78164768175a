"""The Typer application: one thin command per subcommand, composed here. No network I/O.

Start-up matters (a port check in a shell loop runs netprobe thousands of times), so the
application is built per run with only the command asked for: Typer turns each command's
signature into Click parameters when the app is called, and doing that for all ten commands
cost more than the port check itself. `--help`, a bare `netprobe`, completion and unknown
commands get the full application. Command modules import their engines inside the command body.
"""

from __future__ import annotations

import importlib
import os
from typing import Annotated, Any

import typer

from netprobe import __version__
from netprobe.cli._run import main

__all__ = ["build_app", "main"]

# command name -> module under netprobe.cli holding it; "reset" is a group of three commands.
_COMMANDS: dict[str, str] = {
    "port-check": "port_check",
    "echo": "echo",
    "send": "send",
    "listen": "listen",
    "backlog": "backlog",
    "listeners": "listeners",
    "reset": "reset",
    "doctor": "doctor",
}


def _version(value: bool) -> None:
    if value:
        print(f"netprobe {__version__}")
        raise typer.Exit(0)


def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
    debug: Annotated[
        bool,
        typer.Option(
            "--debug", help="Also show the traceback of an error (exit codes stay the same)."
        ),
    ] = False,
) -> None:
    """Test and diagnose TCP, UDP and Unix-socket networking (the app's help says more)."""


def _ascii_int(value: Any) -> int:
    # Typer's whole-number options convert with int(), which also takes other scripts' digits
    # (Arabic-Indic U+0661), underscores ("5_000") and surrounding spaces; netprobe's numbers
    # are ASCII digits, as its sizes, durations and ports are. ValueError is Click's "is not a
    # valid int".
    if isinstance(value, int):
        return value
    text = str(value)
    digits = text[1:] if text[:1] in ("-", "+") else text
    if not (digits.isascii() and digits.isdigit()):
        raise ValueError(text)
    return int(text)


def build_app(command: str | None = None) -> typer.Typer:
    """The netprobe application with `command` only (None, or an unknown name: every command)."""
    from typer._click.types import IntParamType

    IntParamType._number_class = staticmethod(_ascii_int)  # type: ignore[assignment]  # see _ascii_int
    from netprobe.exitcodes import SHORT_MEANING

    codes = ", ".join(f"{int(code)} {meaning}" for code, meaning in SHORT_MEANING.items())
    app = typer.Typer(
        name="netprobe",
        help="Test and diagnose TCP, UDP and Unix-socket networking.",
        epilog=f"Exit codes: {codes}. Each command's --help says which it uses.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    app.callback()(_root)
    completing = any(key.endswith("_COMPLETE") for key in os.environ)
    names = [command] if command in _COMMANDS and not completing else list(_COMMANDS)
    for name in names:
        assert name is not None
        module = importlib.import_module(f"netprobe.cli.{_COMMANDS[name]}")
        if name == "reset":
            app.add_typer(module.app, name="reset")
        else:
            app.command(name)(getattr(module, _COMMANDS[name]))
    return app


def __getattr__(name: str) -> Any:
    # `netprobe.cli.app` (the full application) for tools and tests that want the Typer object.
    if name == "app":
        return build_app()
    raise AttributeError(name)
