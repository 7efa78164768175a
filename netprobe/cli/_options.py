"""Options shared by every command, spelled and documented once. No I/O."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Annotated

import typer

from netprobe.errors import UsageError

__all__ = [
    "MAX_BACKLOG",
    "MIN_RATE",
    "CsvOpt",
    "IPv4Opt",
    "IPv6Opt",
    "JsonOpt",
    "QuietOpt",
    "bind_host",
    "check_literal_family",
    "duration",
    "naming_host",
    "not_built",
    "per_second",
    "refuse_ip_options_with_unix",
    "size",
]

# The slowest pace a rate option takes: one event every 1000 s. A rate is turned into a wait
# of 1/R seconds, and a much smaller R (1e-300) overflows the timers and waits it reaches.
MIN_RATE = 0.001
# listen() takes a C int; the kernel clamps any backlog to net.core.somaxconn anyway.
MAX_BACKLOG = 2**31 - 1


def duration(value: str | float, *, bare: float = 1.0) -> float:
    """Typer parser for durations (`1.5`, `250ms`, `2s`, `1m`): bad input is a usage error.
    `bare`: the seconds a number without a unit stands for (sockets.parse_duration)."""
    if isinstance(value, float | int):
        return float(value)
    from netprobe.sockets import parse_duration  # lazy: start-up stays light

    try:
        return parse_duration(value, bare=bare)
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


def per_second(value: str | float) -> float:
    """Typer parser for a rate (events per second): a finite number of at least MIN_RATE.

    nan and inf are refused (float() takes them, and no pace can be made of them), and so is
    a rate so small that 1/R seconds overflows a timer.
    """
    import math

    if isinstance(value, float | int):
        number = float(value)
    else:
        from netprobe.sockets import parse_float

        try:
            number = parse_float(value)
        except ValueError:
            raise typer.BadParameter(f"{value!r} is not a number (per second)") from None
    if not math.isfinite(number):
        raise typer.BadParameter(f"{value!r} is not a finite number")
    if number <= 0:
        raise typer.BadParameter(f"{value!r}: a rate must be more than 0")
    if number < MIN_RATE:
        raise typer.BadParameter(
            f"{value!r} is too small: a rate must be at least {MIN_RATE:g} per second"
        )
    return number


def fraction(value: str | float) -> float:
    """Typer parser for a fraction (--probability): an ASCII number; the engine checks 0-1."""
    if isinstance(value, float | int):
        return float(value)
    from netprobe.sockets import parse_float

    try:
        return parse_float(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a number (0 to 1)") from None


def bind_host(text: str | None, *, family: int = 0, option: str = "--host") -> str:
    """The host a server binds: `text` checked, or (None) loopback in the family -4/-6 asks for.

    No I/O: a name is checked for its form only (a name that does not resolve fails at bind,
    see naming_host).

    Raises:
        UsageError: empty or malformed text (spaces, brackets, a port, a CIDR block, a Unix
            path), or an IP literal of the other family than `family`.
    """
    import socket

    if text is None:
        return "::1" if family == socket.AF_INET6 else "127.0.0.1"
    from netprobe.sockets import parse_target

    shown = f"{option} {text!r}"
    raw = text.strip()
    if not raw:
        raise UsageError(f"{shown} is empty: give an address or name to bind (e.g. 127.0.0.1)")
    if raw.startswith("["):
        inner = raw[1:].split("]", 1)[0] or "::1"
        inner = _ipv4_mapped(inner) or inner  # the hint must not be refused in turn
        raise UsageError(f"{shown}: give the address without brackets (e.g. {option} {inner})")
    try:
        target = parse_target(raw)
    except UsageError as exc:
        raise UsageError(f"{option} {exc}") from None
    if target.path is not None:
        raise UsageError(f"{shown} is not a host name or address (a Unix socket: --unix PATH)")
    host = target.host
    assert host is not None
    if target.ports is not None:
        raise UsageError(f"{shown}: give the host alone (the port goes in --port)")
    if "/" in host:
        raise UsageError(f"{shown} is a network block: give one address to bind")
    refuse_ipv4_mapped(host, shown)
    refuse_ipv4_shorthand(host, shown)
    check_literal_family(host, family, f"{option} {host}")
    return host


def refuse_ipv4_mapped(host: str, shown: str) -> None:
    """Servers bind IPv6 only (IPV6_V6ONLY), where the kernel refuses an IPv4-mapped address
    (EINVAL): it is an IPv4 address in IPv6 clothes, so the line names that address.

    Raises:
        UsageError: host is one (`shown` names the option and value).
    """
    mapped = _ipv4_mapped(host)
    if mapped is not None:
        raise UsageError(f"{shown} is an IPv4-mapped IPv6 address: bind {mapped} itself")


def refuse_ipv4_shorthand(host: str, shown: str) -> None:
    """A server binds an address written out. The C library reads `0`, `0.0` and `0x0` as
    0.0.0.0, every interface: `--host 0` (a slip for `--port 0`) exposed a test server the
    safe default keeps on loopback. (port-check refuses bare numbers as hosts too.)

    Raises:
        UsageError: host is IPv4 shorthand (`0`, `127.1`) or a bare number.
    """
    from netprobe.sockets import inet_aton_reading

    address = inet_aton_reading(host)
    if address is not None and address != host:
        every = " (every interface)" if address == "0.0.0.0" else ""
        raise UsageError(f"{shown} reads as the address {address}{every}: write it out")
    if address is None and host.isascii() and host.isdigit():
        raise UsageError(f"{shown} is a bare number, not a host name or address")


def _ipv4_mapped(host: str) -> str | None:
    import ipaddress

    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return str(mapped) if mapped is not None else None


def check_literal_family(host: str, family: int, given: str) -> None:
    """Refuse an IP literal of the other family than -4/-6 ask for: bad input, not a name
    that fails to resolve (a name is left to resolution, which picks among its addresses).

    Raises:
        UsageError: `-4` with an IPv6 literal, or `-6` with an IPv4 one; `given` names it.
    """
    import ipaddress
    import socket

    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return
    if family == socket.AF_INET and ip.version == 6:
        raise UsageError(f"-4 and {given} contradict each other: {host} is IPv6")
    if family == socket.AF_INET6 and ip.version == 4:
        raise UsageError(f"-6 and {given} contradict each other: {host} is IPv4")


@contextlib.contextmanager
def naming_host(host: str, option: str = "--host") -> Iterator[None]:
    """Around a bind: a name that does not resolve still exits 5, but the line names it."""
    from netprobe.errors import ResolveError

    try:
        yield
    except ResolveError as exc:
        # "resolve: EAI_NONAME: Name or service not known" -> keep the resolver's own words.
        parts = str(exc).split(": ", 2)
        detail = parts[2] if len(parts) == 3 else ""
        raise ResolveError(
            f"{option} {host!r}: cannot resolve", exc.errno, exc.errno_name, detail
        ) from exc


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


def refuse_ip_options_with_unix(ctx: typer.Context, path: str | None, **values: object) -> None:
    """A server on --unix PATH has no address, port or IP family: an IP option given with it
    would change nothing, so it is refused rather than silently ignored.

    values: parameter name -> value as given (host, port, ipv4, ipv6); only those the user set
    (command line or environment) count: `--port 7007` typed by hand counts although it equals
    the default. The error names the first one with its value.
    """
    if path is None:
        return
    flags = {"host": "--host", "port": "--port", "ipv4": "-4", "ipv6": "-6"}
    for name, value in values.items():
        source = ctx.get_parameter_source(name)
        if source is None or source.name not in ("COMMANDLINE", "ENVIRONMENT"):
            continue
        flag = flags[name]
        shown = flag if isinstance(value, bool) else f"{flag} {value}"
        raise UsageError(
            f"{shown} has no effect with --unix {path}: a Unix socket has no address, port or "
            "IP family (give one or the other)"
        )


def not_built(command: str) -> None:
    """Stub body for a command whose issue is not done yet."""
    raise UsageError(f"{command} is not built yet in this version")
