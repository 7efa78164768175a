"""Options shared by every command, spelled and documented once. No I/O."""

from __future__ import annotations

from typing import Annotated

import typer

from netprobe.errors import UsageError

__all__ = [
    "CsvOpt",
    "IPv4Opt",
    "IPv6Opt",
    "JsonOpt",
    "QuietOpt",
    "duration",
    "not_built",
    "size",
]


def duration(value: str | float) -> float:
    """Typer parser for durations (`1.5`, `250ms`, `2s`, `1m`): bad input is a usage error."""
    if isinstance(value, float | int):
        return float(value)
    from netprobe.sockets import parse_duration  # lazy: start-up stays light

    try:
        return parse_duration(value)
    except UsageError as exc:
        raise typer.BadParameter(str(exc)) from None


def size(value: str | int) -> int:
    """Typer parser for byte counts (`1500`, `64K`, `10MB`, `1GiB`)."""
    if isinstance(value, int):
        return value
    from netprobe.sockets import parse_size

    try:
        return parse_size(value)
    except UsageError as exc:
        raise typer.BadParameter(str(exc)) from None


def rate_size(value: str | int) -> int:
    """Typer parser for bandwidths (`64KB/s`, `1MiB/s`)."""
    if isinstance(value, int):
        return value
    from netprobe.sockets import parse_size

    try:
        return parse_size(value, per_second=True)
    except UsageError as exc:
        raise typer.BadParameter(str(exc)) from None


JsonOpt = Annotated[
    bool, typer.Option("--json", help="JSON Lines on stdout: one object per result or event.")
]
CsvOpt = Annotated[
    bool, typer.Option("--csv", help="CSV on stdout: a header row, then one row per result.")
]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="Print nothing; the exit code tells.")
]
IPv4Opt = Annotated[bool, typer.Option("-4", help="IPv4 only.")]
IPv6Opt = Annotated[bool, typer.Option("-6", help="IPv6 only.")]


def family_of(ipv4: bool, ipv6: bool) -> int:
    """socket family for -4/-6 (0: either)."""
    import socket

    if ipv4 and ipv6:
        raise UsageError("-4 and -6 exclude each other")
    if ipv4:
        return socket.AF_INET
    if ipv6:
        return socket.AF_INET6
    return 0


def not_built(command: str) -> None:
    """Stub body for a command whose issue is not done yet."""
    raise UsageError(f"{command} is not built yet in this version")
