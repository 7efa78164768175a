"""The socket core: parsing of targets, ports, durations and sizes; resolution; one
non-blocking connect; deadline-aware send/receive; abortive and half close; listeners; limits.

Parsing functions do no I/O. Everything else here does, and this module (with connector.py and
server.py) is the only code in netprobe that touches sockets.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import re
import select
import signal
import socket
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from netprobe.errors import (
    AddressError,
    DeadlineExceeded,
    LocalError,
    NetworkError,
    PeerClosedError,
    PeerResetError,
    ResolveError,
    UsageError,
)
from netprobe.results import ConnectState

__all__ = [
    "AF_INET",
    "AF_UNIX",
    "DEFAULT_CIDR_CAP",
    "MAX_CIDR_HOSTS",
    "POLL_MAX_S",
    "PUMP_CHUNK",
    "SPLICE_AVAILABLE",
    "ConnectOutcome",
    "CountingGate",
    "HangupPoller",
    "NofileLimit",
    "PumpResult",
    "RelayResult",
    "Resolved",
    "Target",
    "WakePipe",
    "abort_connection",
    "accept_and_close",
    "accept_one",
    "address_range",
    "check_listen_path",
    "check_unix_path_size",
    "classify_connect_errno",
    "classify_errno",
    "connect_nonblocking",
    "connect_udp",
    "deadline_after",
    "drain_signal_wake",
    "errno_name",
    "expand_hosts",
    "fill_accept_queue",
    "format_hostport",
    "format_sockaddr",
    "half_close",
    "ignore_stop_signals",
    "inet_aton_reading",
    "is_loopback",
    "nofile_limit",
    "not_loopback_why",
    "open_listener",
    "open_udp",
    "parse_duration",
    "parse_host_port",
    "parse_ports",
    "parse_size",
    "parse_target",
    "poll_ms",
    "preferred",
    "probe_peer",
    "pump_duplex",
    "raise_nofile_limit",
    "range_addresses",
    "read_queued",
    "recv_datagram",
    "recv_exactly",
    "recv_some",
    "remaining",
    "resolve",
    "resolve_each",
    "resolved_off_loopback",
    "send_all",
    "send_datagram",
    "send_some",
    "sent_before_reset",
    "service_name",
    "set_linger_zero",
    "signal_wake_fd",
    "sleep",
    "sockaddr_host",
    "splice_relay",
    "udp_probe",
    "udp_probe_many",
    "unix_address",
    "unix_sockaddr",
    "wait_readable",
]

_T = TypeVar("_T")

# A CIDR block bigger than this is refused unless the caller allows it: a typo such as /8
# instead of /24 would otherwise start a 16-million-address scan.
DEFAULT_CIDR_CAP = 65_536
# --allow-large lifts DEFAULT_CIDR_CAP up to here: every address becomes a resolved host record
# before the first probe (measured: 2**20 addresses take about 15 s and 360 MiB), so an IPv6 /64
# would never start and never end.
MAX_CIDR_HOSTS = 1 << 20
# Address families for code outside the socket core (AF_UNIX: -1 where the platform has none).
AF_INET: int = socket.AF_INET
AF_UNIX: int = getattr(socket, "AF_UNIX", -1)

# ---------------------------------------------------------------------------------------------
# Parsing (no I/O)
# ---------------------------------------------------------------------------------------------

# ASCII only, as ports are: \d takes every Unicode digit (float() too), and Unicode case
# folding matches "\u017f" (long s) to the unit "s", which the unit table then lacks.
# An exponent is taken (`1e3`, `1.5e-3s`), as float() takes it where a bare number is read
# (`reset --after-ms`, rates): `1e30` is a duration that is too long, not something else. A
# minus sign is read so that `-0` can be 0, which it equals; any other negative is refused.
# A plus sign is read as float() reads it (`reset --after-ms +5` was 5 ms before this parser).
_DURATION_RE = re.compile(
    r"^\s*([+-]?)([0-9]+(?:\.[0-9]*)?(?:e[+-]?[0-9]+)?|\.[0-9]+(?:e[+-]?[0-9]+)?)\s*"
    r"(us|ms|s|m|h)?\s*$",
    re.IGNORECASE | re.ASCII,
)
_DURATION_UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
# About 31 years: far beyond any run, and inside what every timer and wait call accepts.
_MAX_DURATION_S = 1e9
# 4 EiB: any byte count a run can mean fits.
_MAX_SIZE = 2**62
# Digits before the point that _MAX_SIZE can hold (2**62 has 19); more is too large outright.
_MAX_SIZE_DIGITS = 19
# A fraction of k significant decimals is n / 10**k, n not ending in 0. No unit multiplies by
# more than 2**40 (T) or 10**12 (TB), and past k = 40 neither gives whole bytes: 10**k would
# have to divide n * 2**40, making n a multiple of 10. So a longer fraction never reaches int().
_MAX_WHOLE_DECIMALS = 40
# The most digits a port can have once leading zeros are gone: judged before int(), which
# refuses strings over 4300 digits.
_PORT_DIGITS = 5


def parse_float(text: str) -> float:
    """float() for command-line numbers: ASCII only, as durations and ports are (float() also
    reads an Arabic-Indic one as 1 and "1_000" as 1000). Exponents, nan and inf pass: callers refuse those.

    Raises:
        ValueError: not a number.
    """
    if not text.isascii() or "_" in text:
        raise ValueError(text)
    return float(text)


def parse_duration(text: str, *, bare: float = 1.0) -> float:
    """Parse `1.5`, `250ms`, `2s`, `1m`, `1e3` (also `us`, `h`) into seconds: the one parser
    of every duration option. `bare` is the seconds a number without a unit stands for
    (`reset --after-ms` reads one as milliseconds: 1e-3).

    Raises:
        UsageError: not a duration, negative (`-0` is 0, not negative), too long, or too
            short to tell from 0 (`1e-400`).
    """
    match = _DURATION_RE.match(text)
    if match is None:
        if text.strip().startswith("-"):
            raise UsageError(f"{text!r} is negative; a duration must be 0 or more")
        raise UsageError(f"{text!r} is not a duration (use e.g. 1.5, 250ms, 2s, 1m)")
    sign, number, unit = match.groups()
    scale = _DURATION_UNIT[unit.lower()] if unit else bare
    seconds = float(number) * scale
    if seconds == 0:
        if any(digit in "123456789" for digit in number.lower().partition("e")[0]):
            # `1e-400` is no duration a clock can count: taken as 0 it would mean "no limit"
            # to one option and be refused as 0 by another.
            raise UsageError(f"{text!r} is too short: it rounds to 0 (give 0 if 0 is meant)")
        return 0.0  # also for `-0`: never a -0.0 shown as "-0"
    if sign == "-":
        raise UsageError(f"{text!r} is negative; a duration must be 0 or more")
    if not seconds <= _MAX_DURATION_S:  # also inf from a 400-digit number or 1e400
        raise UsageError(
            f"{text!r} is too long; a duration must be at most {_MAX_DURATION_S:.0e} s"
        )
    return seconds


# Sizes follow coreutils: KB = 1000, K = KiB = 1024 (likewise M/MB/MiB, G/GB/GiB).
# ASCII only, as durations: no Unicode digits, no Kelvin sign for K.
_SIZE_RE = re.compile(
    r"^\s*([0-9]+(?:\.[0-9]*)?)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE | re.ASCII
)
_SIZE_POWER = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(text: str, *, per_second: bool = False) -> int:
    """Parse a byte count: `100`, `64K`, `64KB`, `1MiB`, `2G`, `1.5K`; `/s` allowed with
    per_second. A fraction must come to whole bytes once its unit applies (`1.5K` is 1536).

    Raises:
        UsageError: not a size, negative, too large, or not a whole number of bytes.
    """
    body = text.strip()
    if per_second and body.lower().endswith("/s"):
        body = body[:-2]
    match = _SIZE_RE.match(body)
    if match is None:
        if body.startswith("-"):
            # `-0` equals 0, and is 0 (as with durations); any other negative is refused.
            with contextlib.suppress(UsageError):
                if body[1:2].isdigit() and parse_size(body[1:]) == 0:
                    return 0
            raise UsageError(f"{text!r} is negative; a size must be 0 or more")
        example = "1KB/s, 64KiB/s" if per_second else "1500, 64K, 10MB, 1GiB"
        raise UsageError(f"{text!r} is not a size (use e.g. {example})")
    number, prefix, binary, byte = match.groups()
    prefix = prefix.lower()
    if binary and not prefix:
        raise UsageError(f"{text!r} is not a size (use e.g. 64KiB)")
    # "KB" with an explicit B and no i is decimal; a bare "K" or "KiB" is binary.
    base = 1000 if (byte and not binary and prefix) else 1024
    multiplier: int = base ** _SIZE_POWER[prefix]
    whole, _, fraction = number.partition(".")
    whole, fraction = whole.lstrip("0"), fraction.rstrip("0")
    too_large = f"{text!r} is too large; a size must be at most 4 EiB"
    # Exact integers, not float (1.1MB is 1100000 bytes, not 1100000.0000000002); the digit
    # counts are judged first, as int() refuses strings over 4300 digits.
    if len(whole) > _MAX_SIZE_DIGITS:
        raise UsageError(too_large)
    if len(fraction) <= _MAX_WHOLE_DECIMALS:
        scaled = int(whole + fraction or "0") * multiplier
        denominator: int = 10 ** len(fraction)
        if scaled > _MAX_SIZE * denominator:
            raise UsageError(too_large)
        if scaled % denominator == 0:
            return scaled // denominator
    unit = " per second" if per_second else ""
    raise UsageError(f"{text!r} is not a whole number of bytes{unit}")


def parse_ports(spec: str, *, open_ranges: bool = False) -> tuple[int, ...]:
    """Parse `22`, `1-1024`, `22,80,8000-8100` or `all` into ports, duplicates removed in order.

    With `open_ranges` (port-check, as nmap): `-` (all, as `-p-`), `60000-` (to 65535),
    `-1024` (from 1). Elsewhere `-1` is a typo, not ports 1-1.

    Raises:
        AddressError: empty, not a number, out of 1-65535, or a range that runs backwards.
    """
    text = spec.strip()
    if not text:
        raise AddressError("empty port list")
    if text.lower() == "all":
        return tuple(range(1, 65536))
    seen: dict[int, None] = {}
    for part in text.split(","):
        item = part.strip()
        if not item:
            raise AddressError(f"port list {spec!r} has an empty item")
        if item == "-" and open_ranges:
            seen.update(dict.fromkeys(range(1, 65536)))
        elif "-" in (item if open_ranges else item[1:]):
            low_text, _, high_text = item.partition("-")
            low = _parse_port(low_text, spec) if low_text.strip() or not open_ranges else 1
            high = _parse_port(high_text, spec) if high_text.strip() or not open_ranges else 65535
            if low > high:
                raise AddressError(f"port range {item!r} runs backwards ({low} > {high})")
            seen.update(dict.fromkeys(range(low, high + 1)))
        else:
            seen[_parse_port(item, spec)] = None
    return tuple(seen)


def _parse_port(text: str, context: str, *, allow_zero: bool = False) -> int:
    item = text.strip()
    if not (item.isascii() and item.isdigit()):  # "²".isdigit() is True, int("²") fails
        raise AddressError(f"{item!r} is not a port number (in {context!r})")
    digits = item.lstrip("0") or "0"
    low = 0 if allow_zero else 1
    if len(digits) > _PORT_DIGITS or not low <= int(digits) <= 65535:
        raise AddressError(f"port {digits} is out of range {low}-65535 (in {context!r})")
    return int(digits)


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed target: an inet host with optional ports, or a Unix socket path.

    Attributes:
        text: the target exactly as the user gave it.
        host: host name, IP literal or CIDR block (None for Unix sockets).
        ports: ports given with the target (`host:22,80`), or None.
        path: Unix socket path for `unix:/path` targets.
    """

    text: str
    host: str | None = None
    ports: tuple[int, ...] | None = None
    path: str | None = None

    @property
    def is_unix(self) -> bool:
        return self.path is not None


def inet_aton_reading(text: str) -> str | None:
    """The IPv4 address the C library reads in `text` (inet_aton: `2130706433`, octal
    `017700000001`, `127.1`), dotted; None when it is no address."""
    try:
        return socket.inet_ntoa(socket.inet_aton(text))
    except (OSError, ValueError):
        return None


def parse_target(text: str, *, open_ranges: bool = False) -> Target:
    """Parse `HOST`, `HOST:PORTS`, `[V6]`, `[V6]:PORTS`, bare IPv6, CIDR, `unix:/path`.
    (`open_ranges`: nmap's `60000-` in PORTS, see parse_ports.)

    Raises:
        AddressError: malformed target (the message names it and says why).
    """
    raw = text.strip()
    if not raw:
        raise AddressError("empty target")
    if raw.startswith("unix:"):
        path = raw[len("unix:") :]
        if not path:
            raise AddressError(f"{text!r}: unix: needs a socket path, e.g. unix:/tmp/app.sock")
        check_unix_path_size(path)
        return Target(text=text, path=path)
    if raw.startswith("["):
        close = raw.find("]")
        if close < 0:
            raise AddressError(f"{text!r}: '[' without a closing ']'")
        host = raw[1:close]
        _check_ipv6(host, text)
        rest = raw[close + 1 :]
        if not rest:
            return Target(text=text, host=host)
        if not rest.startswith(":") or len(rest) == 1:
            raise AddressError(f"{text!r}: expected ':PORT' after ']'")
        return Target(text=text, host=host, ports=_ports_in_target(rest[1:], text, open_ranges))
    if raw.count(":") >= 2:
        # Bare IPv6 (maybe a CIDR block): ports come from -p, never from a trailing ":N".
        _check_ipv6(raw.split("/", 1)[0], text)
        return Target(text=text, host=raw)
    host, sep, port_text = raw.partition(":")
    if not host:
        raise AddressError(f"{text!r}: missing host before ':'")
    _check_host(host, text)
    if not sep:
        return Target(text=text, host=host)
    return Target(text=text, host=host, ports=_ports_in_target(port_text, text, open_ranges))


def _ports_in_target(spec: str, text: str, open_ranges: bool) -> tuple[int, ...]:
    if not spec:
        raise AddressError(f"{text!r}: missing port after ':'")
    try:
        return parse_ports(spec, open_ranges=open_ranges)
    except AddressError as exc:
        raise AddressError(f"{text!r}: {exc}") from None


_HOST_RE = re.compile(r"^[A-Za-z0-9_.\-]+(/[0-9]{1,3})?$")


def _check_host(host: str, text: str) -> None:
    if not _HOST_RE.match(host):
        raise AddressError(f"{text!r}: {host!r} is not a host name or address")
    # Digits and dots are no name (no top-level domain is all digits): the resolver would be
    # asked for `999.1.1.1` and answer "does not resolve" (exit 5), a DNS server queried, for
    # an address with a number out of range.
    dotted = host.split("/", 1)[0]
    digits_and_dots = "." in dotted and all(part.isdigit() for part in dotted.split("."))
    if digits_and_dots and inet_aton_reading(dotted) is None:
        raise AddressError(f"{text!r}: {dotted!r} is not an IPv4 address (four numbers of 0-255)")
    if "/" in host:
        try:
            ipaddress.ip_network(host, strict=False)
        except ValueError as exc:
            raise AddressError(f"{text!r}: bad CIDR block: {exc}") from None


def _check_ipv6(host: str, text: str) -> None:
    low, dash, high = host.partition("-")
    if dash and "%" in low:  # a range of zoned addresses (fe80::1%lo-fe80::3%lo): each end
        _check_ipv6(low, text)
        _check_ipv6(high, text)
        return
    address, percent, zone = host.partition("%")  # a zone (fe80::1%eth0) is legal in a literal
    if percent and not zone.split("/", 1)[0]:
        # The resolver would say EAI_NONAME (exit 5), as if a name had failed to resolve.
        raise AddressError(f"{text!r}: {host!r} has an empty zone after %")
    try:
        ip = ipaddress.IPv6Address(address)
    except ValueError:
        raise AddressError(f"{text!r}: {host!r} is not an IPv6 address") from None
    # An interface name as zone is only taken for a link-local address (unicast fe80::/10,
    # multicast of interface or link scope): glibc refuses any other with EAI_NONAME, which
    # reads as "does not resolve" (exit 5) for what is a malformed address. A numeric zone it
    # takes on any address.
    name = zone.split("/", 1)[0]
    if zone and not _needs_zone(ip) and not name.isdigit():
        raise AddressError(
            f"{text!r}: a zone (%{zone}) applies only to a link-local address (fe80::/10)"
        )
    if zone and not _is_interface(name):
        # The resolver says EAI_NONAME for an unknown name ("does not resolve", exit 5), and
        # a connect to a scope id of no interface ENETUNREACH: a typo either way.
        raise AddressError(f"{text!r}: the zone %{name} names no network interface of this host")


def _is_interface(zone: str) -> bool:
    """Whether a zone (an interface name, or a numeric scope id) names an interface here."""
    try:
        if zone.isdigit():
            socket.if_indextoname(int(zone))
        else:
            socket.if_nametoindex(zone)
    except (OSError, OverflowError, ValueError):
        return False
    return True


def _needs_zone(ip: ipaddress.IPv6Address) -> bool:
    """Link-local unicast (fe80::/10) and multicast of interface or link scope: the address
    is on every link, so the kernel needs to know which (a zone, the scope id)."""
    return ip.is_link_local or (ip.is_multicast and ip.packed[1] & 0x0F in (1, 2))


def parse_host_port(text: str, *, allow_port_zero: bool = True) -> tuple[str, int]:
    """Parse one `HOST:PORT` or `[V6]:PORT` (for --listen, --upstream); port 0 allowed.

    Raises:
        AddressError: no port, several ports, a CIDR block, or malformed.
    """
    raw = text.strip()
    if raw.startswith("["):
        close = raw.find("]")
        if close < 0:
            raise AddressError(f"{text!r}: '[' without a closing ']'")
        host, rest = raw[1:close], raw[close + 1 :]
        _check_ipv6(host, text)
    else:
        if raw.count(":") != 1:
            raise AddressError(f"{text!r}: expected HOST:PORT or [IPV6]:PORT")
        host, _, port_text = raw.partition(":")
        rest = ":" + port_text
        if not host:
            raise AddressError(f"{text!r}: missing host before ':'")
        _check_host(host, text)
        if "/" in host:
            # Passed on, the block is looked up as a name: EAI_NONAME, exit 5, not bad input.
            raise AddressError(f"{text!r}: {host!r} is a block where one address is needed")
    if not rest.startswith(":") or len(rest) == 1:
        raise AddressError(f"{text!r}: missing port (HOST:PORT)")
    return host, _parse_port(rest[1:], text, allow_zero=allow_port_zero)


def address_range(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int] | None:
    """(first address, count) of a range `127.0.0.2-127.0.0.20`, or `127.0.0.2-20` (the last
    IPv4 octet, as nmap writes it); None when `text` is no range (an address, a name, even
    one with a dash in it).

    Raises:
        AddressError: a range that runs backwards or mixes families.
    """
    low_text, dash, high_text = text.partition("-")
    if not dash:
        return None
    try:
        low = ipaddress.ip_address(low_text.strip())
    except ValueError:
        return None
    high_text = high_text.strip()
    high: ipaddress.IPv4Address | ipaddress.IPv6Address
    if high_text.isascii() and high_text.isdigit() and low.version == 4:
        # The last octet, as nmap reads it (`-03` too); `127.0.0.1-300` is a range gone
        # wrong, not a name to look up.
        if int(high_text) > 255:
            raise AddressError(f"{text!r}: {high_text} is no octet")
        high = ipaddress.IPv4Address(int(low) & ~0xFF | int(high_text))
    else:
        try:
            high = ipaddress.ip_address(high_text)
        except ValueError:
            return None
    if high.version != low.version or int(high) < int(low):
        raise AddressError(f"{text!r}: the range runs backwards or mixes families")
    zones = {getattr(a, "scope_id", None) for a in (low, high)} - {None}
    if len(zones) > 1:
        raise AddressError(f"{text!r}: the two ends name different zones")
    if zones and getattr(low, "scope_id", None) is None:  # fe80::1-fe80::3%lo: lo for all
        low = ipaddress.ip_address(f"{low}%{zones.pop()}")
    return low, int(high) - int(low) + 1


def range_addresses(
    first: ipaddress.IPv4Address | ipaddress.IPv6Address, count: int
) -> Iterator[str]:
    """The `count` addresses from `first` on, as text, each with `first`'s zone (fe80::1%lo:
    an address's arithmetic drops it)."""
    if first.version == 4:
        # inet_ntoa over the integers: a third of the time ipaddress takes per address (a /12
        # is a million of them before the first probe).
        start = int(first)
        ntoa = socket.inet_ntoa
        for value in range(start, start + count):
            yield ntoa(value.to_bytes(4, "big"))
        return
    scope = getattr(first, "scope_id", None)
    zone = f"%{scope}" if scope else ""
    for offset in range(count):
        yield f"{first + offset}{zone}"


def expand_hosts(host: str, *, cap: int | None = DEFAULT_CIDR_CAP) -> Iterator[str]:
    """Yield the addresses of a CIDR block or an address range lazily, or the host itself.

    Every address of the block, its network and broadcast addresses too, as nmap scans them
    ("the 256 hosts between 192.168.10.0 and 192.168.10.255, inclusive"): on loopback
    127.0.0.0 is as reachable as any, and a /28 that left out .15 missed a listener there.

    Raises:
        AddressError: the block or range holds more than `cap` addresses (None: up to
            MAX_CIDR_HOSTS), or the range runs backwards.
    """
    if "/" not in host:
        span = address_range(host)
        if span is None:
            yield host
            return
        first, count = span
        _check_expansion_size(host, count, cap)
        yield from range_addresses(first, count)
        return
    try:
        network = ipaddress.ip_network(host, strict=False)
    except ValueError as exc:
        raise AddressError(f"{host!r}: bad CIDR block: {exc}") from None
    _check_expansion_size(host, network.num_addresses, cap)
    if network.version == 4:
        yield from range_addresses(network.network_address, network.num_addresses)
        return
    # The block's zone (fe80::%eth0/64) is every address's: without it a link-local connect
    # fails EINVAL (no interface given).
    scope = getattr(network.network_address, "scope_id", None)
    zone = f"%{scope}" if scope else ""
    for address in network:
        text = str(address)
        yield text if "%" in text else text + zone


def _check_expansion_size(host: str, count: int, cap: int | None) -> None:
    if count > MAX_CIDR_HOSTS:
        raise AddressError(
            f"{host!r} holds {count} addresses, above the {MAX_CIDR_HOSTS} "
            "netprobe expands even with --allow-large (split it into smaller blocks)"
        )
    if cap is not None and count > cap:
        raise AddressError(
            f"{host!r} holds {count} addresses, above the cap of {cap} "
            "(pass --allow-large to scan it anyway)"
        )


def not_loopback_why(host: str) -> str:
    """Why is_loopback(host) is False, for the refusal line: an address off loopback, or a
    name (only localhost is taken without resolving; resolving first would already send)."""
    try:
        ipaddress.ip_network(host.split("%", 1)[0], strict=False)
    except ValueError:
        return f"{host} is a name, and only loopback addresses (127.0.0.0/8, ::1) and localhost"
    return f"{host} is not a loopback address: only 127.0.0.0/8, ::1 and localhost"


def is_loopback(host: str) -> bool:
    """True when `host` is a loopback literal or `localhost` (no resolution is done).

    `localhost` passes only this first gate: what it resolves to must pass again
    (`resolved_off_loopback`), since a hosts file or a resolver may point it anywhere.
    """
    if host.lower() == "localhost":
        return True
    try:
        network = ipaddress.ip_network(host.split("%", 1)[0], strict=False)
    except ValueError:
        return False
    if isinstance(network, ipaddress.IPv6Network):
        # ::ffff:127.0.0.1 is 127.0.0.1 (a dual-stack socket's peer): Python >= 3.13 says so,
        # 3.11 and 3.12 do not, and refused it as "not a loopback address".
        first = network.network_address.ipv4_mapped
        last = network.broadcast_address.ipv4_mapped
        if first is not None and last is not None:
            return first.is_loopback and last.is_loopback
    return network.is_loopback


def resolved_off_loopback(host: str, address: str) -> str | None:
    """None when the address `host` resolved to is loopback; else the refusal's first words."""
    if is_loopback(address):
        return None
    return f"{host} resolves to {address}, which is not a loopback address (127.0.0.0/8, ::1)"


def format_hostport(host: str, port: int | None) -> str:
    """`host:port`, with brackets around IPv6 literals."""
    shown = f"[{host}]" if ":" in host else host
    return shown if port is None else f"{shown}:{port}"


def sockaddr_host(sockaddr: Any) -> str:
    """The host of an inet sockaddr (getsockname, accept) as text, with its `%zone` as
    Resolved.host spells it: a link-local address without it cannot be connected to."""
    family = socket.AF_INET6 if len(sockaddr) > 2 else socket.AF_INET
    return Resolved(family, tuple(sockaddr)).host


def format_sockaddr(sockaddr: Any) -> str:
    """Any sockaddr as users see it: `host:port`, `[v6%zone]:port`, `unix:/path`,
    `unix:@name` (abstract), or `unix` for an unnamed Unix socket (a client that never bound)."""
    if isinstance(sockaddr, tuple) and len(sockaddr) >= 2:
        return format_hostport(sockaddr_host(sockaddr), int(sockaddr[1]))
    if isinstance(sockaddr, bytes):
        sockaddr = os.fsdecode(sockaddr)  # Python gives abstract names as bytes
    if isinstance(sockaddr, str) and sockaddr:
        return "unix:" + ("@" + sockaddr[1:] if sockaddr.startswith("\0") else sockaddr)
    return "unix"


# ---------------------------------------------------------------------------------------------
# Errno names and classification
# ---------------------------------------------------------------------------------------------

# CPython on Windows keeps Winsock codes as errno values (PC/errmap.h). Mapping them to the
# POSIX names lets results, docs and tests use one vocabulary on every platform.
_WSA_NAMES = {
    10004: "EINTR",
    10013: "EACCES",
    10022: "EINVAL",
    10024: "EMFILE",
    10035: "EWOULDBLOCK",
    10036: "EINPROGRESS",
    10037: "EALREADY",
    10038: "ENOTSOCK",
    10048: "EADDRINUSE",
    10049: "EADDRNOTAVAIL",
    10050: "ENETDOWN",
    10051: "ENETUNREACH",
    10053: "ECONNABORTED",
    10054: "ECONNRESET",
    10055: "ENOBUFS",
    10056: "EISCONN",
    10057: "ENOTCONN",
    10060: "ETIMEDOUT",
    10061: "ECONNREFUSED",
    10064: "EHOSTDOWN",
    10065: "EHOSTUNREACH",
}
# getaddrinfo failures arrive as negative EAI_* codes on Linux; build the table by name so
# platforms that lack a name are simply skipped.
_EAI_NAMES = {
    getattr(socket, name): name
    for name in dir(socket)
    if name.startswith("EAI_") and isinstance(getattr(socket, name), int)
}


def errno_name(number: int | None) -> str | None:
    """Symbolic name of an OS error number (`111` -> `ECONNREFUSED`; WSA codes too)."""
    if number is None:
        return None
    if number >= 10000 and number in _WSA_NAMES:
        return _WSA_NAMES[number]
    if number < 0 and number in _EAI_NAMES:
        # getaddrinfo's codes (Linux: negative), met where a connect resolves a name itself.
        return _EAI_NAMES[number]
    name = errno.errorcode.get(number)
    if name is not None:
        return name.removeprefix("WSA")
    return f"E{number}"


def _eai_name(exc: socket.gaierror) -> str:
    code = exc.errno
    if code is not None and code in _EAI_NAMES:
        return _EAI_NAMES[code]
    return errno_name(code) or "EAI_FAIL"


def _names_to_numbers(*names: str) -> frozenset[int]:
    return frozenset(getattr(errno, name) for name in names if hasattr(errno, name))


_UNREACHABLE = _names_to_numbers(
    "EHOSTUNREACH", "ENETUNREACH", "EHOSTDOWN", "ENETDOWN", "ENONET", "EACCES", "EPERM"
)
# From connect() only, EINVAL: the route is a blackhole (`ip route add blackhole ...`), which
# Linux answers with EINVAL rather than an ICMP-like error (nmap calls such a port filtered),
# or a link-local address came without its zone: no route either way. Elsewhere (a send, a
# sendfile) EINVAL is this host's own error.
_UNREACHABLE_ON_CONNECT = _UNREACHABLE | _names_to_numbers("EINVAL")
_TIMEOUT = _names_to_numbers("ETIMEDOUT")
_REFUSED = _names_to_numbers("ECONNREFUSED")
_RESET = _names_to_numbers("ECONNRESET", "ECONNABORTED")


def classify_connect_errno(number: int | None) -> ConnectState:
    """classify_errno for the errno a connect() ended with (EINVAL: no route, see above)."""
    if number in _UNREACHABLE_ON_CONNECT:
        return ConnectState.UNREACHABLE
    return classify_errno(number)


def classify_errno(number: int | None) -> ConnectState:
    """Map the errno a connect ended with to a ConnectState (0 and EISCONN are OPEN).

    None (an OSError without an errno, such as "AF_UNIX path too long") is an ERROR: only a
    connect that said so is open.
    """
    if number is None:
        return ConnectState.ERROR
    if number == 0 or number == errno.EISCONN:
        return ConnectState.OPEN
    if number in _REFUSED:
        return ConnectState.REFUSED
    if number in _TIMEOUT:
        return ConnectState.TIMEOUT
    if number in _UNREACHABLE:
        return ConnectState.UNREACHABLE
    if number in _RESET:
        return ConnectState.RESET
    return ConnectState.ERROR


@contextlib.contextmanager
def _map_errors(op: str) -> Iterator[None]:
    """Turn OSError from one socket operation into netprobe's tree, keeping the errno."""
    try:
        yield
    except TimeoutError as exc:
        # settimeout() expiry has errno None; the kernel's own ETIMEDOUT carries 110.
        if exc.errno is None:
            raise DeadlineExceeded(op) from exc
        raise NetworkError(op, exc.errno, errno_name(exc.errno)) from exc
    except (ConnectionResetError, BrokenPipeError) as exc:
        raise PeerResetError(op, exc.errno, errno_name(exc.errno)) from exc
    except socket.gaierror as exc:
        raise ResolveError(op, exc.errno, _eai_name(exc), str(exc.strerror)) from exc
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE, errno.EADDRNOTAVAIL, errno.ENOBUFS):
            raise LocalError(_local_message(op, exc.errno), errno_name(exc.errno)) from exc
        raise NetworkError(op, exc.errno, errno_name(exc.errno), exc.strerror or "") from exc


def _local_message(op: str, number: int | None) -> str:
    name = errno_name(number)
    if number == errno.EMFILE:
        soft, hard = nofile_limit()
        return f"{op}: {name}: out of file descriptors (RLIMIT_NOFILE soft {soft}, hard {hard})"
    if number == errno.ENFILE:
        return f"{op}: {name}: the system-wide file table is full (fs.file-max)"
    if number == errno.EADDRNOTAVAIL and op == "connect":
        # A datagram socket's connect: it takes no port from ip_local_port_range here (out
        # of ports, its autobind says EAGAIN), so this is the destination's address.
        return (
            f"{op}: {name}: this host has no local address to reach that destination from "
            "(its address family disabled here, as IPv6 with disable_ipv6)"
        )
    if number == errno.EADDRNOTAVAIL:
        return f"{op}: {name}: cannot assign the requested address on this host"
    return f"{op}: {name}"


# ---------------------------------------------------------------------------------------------
# Deadlines
# ---------------------------------------------------------------------------------------------


def deadline_after(timeout_s: float | None) -> float | None:
    """Absolute monotonic deadline `timeout_s` from now (None: no deadline)."""
    return None if timeout_s is None else time.monotonic() + timeout_s


def remaining(deadline: float | None, op: str = "operation") -> float | None:
    """Seconds left before `deadline` (None: unbounded).

    Raises:
        DeadlineExceeded: the deadline has passed.
    """
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded(op)
    return left


# ---------------------------------------------------------------------------------------------
# Resolution
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Resolved:
    """One resolved address: family plus the sockaddr tuple for connect/bind."""

    family: int
    sockaddr: tuple[Any, ...]

    @property
    def host(self) -> str:
        """The address as text; an IPv6 address with a scope (link-local) keeps its `%zone`:
        fe80::1 on two interfaces is two different peers."""
        address = str(self.sockaddr[0])
        scope = self.sockaddr[3] if len(self.sockaddr) > 3 else 0
        if scope and "%" not in address:
            try:
                return f"{address}%{socket.if_indextoname(scope)}"
            except (OSError, AttributeError):
                return f"{address}%{scope}"
        return address

    @property
    def port(self) -> int:
        return int(self.sockaddr[1])


def resolve(
    host: str, port: int, *, family: int = 0, socktype: int = socket.SOCK_STREAM
) -> list[Resolved]:
    """Resolve host to addresses; numeric literals skip getaddrinfo (scans need that speed).

    A name is looked up in a thread while the caller waits in a poll that a signal ends:
    getaddrinfo() itself cannot be interrupted, and a Ctrl-C during a lookup whose resolver
    never answers waited until the resolver gave up (5 s and more).

    Args:
        family: 0 for any, socket.AF_INET (-4) or socket.AF_INET6 (-6).

    Raises:
        ResolveError: the name does not resolve (errno_name is EAI_NONAME, EAI_AGAIN, ...).
        AddressError: not a valid host name (an empty or over-long label).
    """
    found = _literal(host, port, family)
    if found is not None:
        return found
    check_name(host)
    [outcome] = _in_lookup_threads([_looker(host, port, family, socktype)])
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def resolve_each(
    hosts: Sequence[str],
    port: int,
    *,
    family: int = 0,
    socktype: int = socket.SOCK_STREAM,
    deadline: float | None = None,
) -> list[list[Resolved] | ResolveError | AddressError]:
    """resolve() for each of `hosts`, the names looked up at once (RESOLVE_THREADS at a
    time): a list of names costs about its slowest lookup, not the sum of them. Each result
    is the addresses, or the error resolve() would raise, in the order of `hosts`. A lookup
    still out at `deadline` (time.monotonic()) is a ResolveError EAI_AGAIN, as a resolver
    that gave up; its thread finishes on its own."""
    results: list[list[Resolved] | ResolveError | AddressError] = []
    names: list[int] = []
    for host in hosts:
        try:
            found = _literal(host, port, family)
        except ResolveError as exc:
            results.append(exc)
            continue
        bad = _bad_name(host) if found is None else None
        if bad is not None:
            results.append(bad)  # known before any lookup: the others need not finish first
            continue
        if found is None:
            names.append(len(results))
            found = []  # its place, filled below
        results.append(found)
    if names:
        jobs = [_looker(hosts[index], port, family, socktype) for index in names]
        for index, outcome in zip(names, _in_lookup_threads(jobs, deadline), strict=True):
            if outcome is _UNFINISHED:
                detail = f"{hosts[index]}: no answer by the deadline"
                results[index] = ResolveError("resolve", None, "EAI_AGAIN", detail)
            elif isinstance(outcome, (ResolveError, AddressError)):
                results[index] = outcome
            elif isinstance(outcome, BaseException):
                raise outcome  # a bug of ours, not the resolver's answer
            else:
                results[index] = outcome
    return results


def _literal(host: str, port: int, family: int) -> list[Resolved] | None:
    """An IP literal's one address (no lookup), or None for a name.

    Raises:
        ResolveError: a literal of the other family than `family` (EAI_FAMILY).
    """
    literal = host.split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(literal)
    except ValueError:
        return None
    if "%" in host:
        return None  # a zone: getaddrinfo turns the interface name into its scope id
    fam = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    if family and family != fam:
        want = "IPv4" if family == socket.AF_INET else "IPv6"
        raise ResolveError("resolve", None, "EAI_FAMILY", f"{host} is not an {want} address")
    # The canonical spelling ("0::1" is "::1"): duplicates are found by address, and rows
    # show the address as the kernel reports it.
    canonical = _spelled(ip)
    sockaddr: tuple[Any, ...] = (
        (canonical, port) if fam == socket.AF_INET else (canonical, port, 0, 0)
    )
    return [Resolved(fam, sockaddr)]


def _spelled(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """The address as the kernel (inet_ntop) and Python >= 3.13 spell it: an IPv4-mapped one
    as `::ffff:127.0.0.1` (Python 3.11 and 3.12 say `::ffff:7f00:1`)."""
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return f"::ffff:{mapped}" if mapped is not None else str(ip)


def preferred(answers: Sequence[Resolved]) -> Resolved:
    """The one address a name means where a command takes one (reset client, its proxy's
    upstream, backlog, a server's bind, port-check): the first IPv4 answer, else the first.
    The C library sorts ::1 before 127.0.0.1 for a `localhost` that has both (RFC 6724), and
    a command that took the first answer missed an IPv4-only server another command reached.
    (-4/-6 leave only that family's answers; send tries every answer in turn instead.)"""
    return next((found for found in answers if found.family == socket.AF_INET), answers[0])


def _bad_name(host: str) -> AddressError | None:
    """The error of a name getaddrinfo would refuse before any lookup: it IDNA-encodes the
    name first, and an empty or over-long label ("a..b") fails there. Bad input, not a
    network outcome."""
    try:
        host.encode("idna")
    except UnicodeError:
        return AddressError(f"{host!r} is not a valid host name (empty or too long label)")
    return None


def check_name(host: str) -> None:
    """Raise the AddressError of a name getaddrinfo would refuse before any lookup (for one
    looked up later, elsewhere: the proxy's --upstream)."""
    bad = _bad_name(host)
    if bad is not None:
        raise bad


def _looker(host: str, port: int, family: int, socktype: int) -> Callable[[], list[Resolved]]:
    return lambda: _lookup(host, port, family, socktype)


def _lookup(host: str, port: int, family: int, socktype: int) -> list[Resolved]:
    try:
        with _map_errors("resolve"):
            infos = socket.getaddrinfo(host, port, family, socktype)
    except UnicodeError:
        # getaddrinfo IDNA-encodes the name first; an empty or over-long label ("a..b")
        # fails there, before any lookup: that is bad input, not a network outcome.
        raise AddressError(f"{host!r} is not a valid host name (empty or too long label)") from None
    seen: dict[tuple[int, tuple[Any, ...]], None] = {}
    for fam, _type, _proto, _canon, addr in infos:
        seen[(int(fam), tuple(addr))] = None
    return [Resolved(fam, addr) for fam, addr in seen]


def _outcome_of(job: Callable[[], _T]) -> _T | BaseException:
    try:
        return job()
    except Exception as exc:
        return exc


# Lookups in flight at once (resolve_each): each holds a thread in getaddrinfo().
RESOLVE_THREADS = 32


# What _in_lookup_threads gives for a job not finished by its deadline.
_UNFINISHED: Any = object()


def _in_lookup_threads(
    jobs: Sequence[Callable[[], _T]], deadline: float | None = None
) -> list[_T | BaseException]:
    """Run blocking `jobs` in up to RESOLVE_THREADS daemon threads; each one's result or
    exception, in order (_UNFINISHED for those not done by `deadline`). The caller waits in
    wait_readable, so a signal's handler runs (and a KeyboardInterrupt leaves) at once; the
    threads still in a lookup are left to finish it on their own, take no further job, and
    die with the process. When every job is done, the threads are gone before this returns
    (a process that forks next must have none)."""
    if not jobs:
        return []
    try:
        pipe = WakePipe()
    except LocalError:  # out of fds: here, then, as before (not interruptible)
        return [_outcome_of(job) for job in jobs]
    count = len(jobs)
    outcomes: list[Any] = [_UNFINISHED] * count
    taken = iter(range(count))
    lock = threading.Lock()
    state = {"stopped": False, "done": 0}

    def work() -> None:
        while True:
            with lock:
                index = None if state["stopped"] else next(taken, None)
            if index is None:
                return
            try:
                outcome: Any = jobs[index]()
            except BaseException as exc:  # handed to the caller as a result
                outcome = exc
            with lock:
                if not state["stopped"]:
                    outcomes[index] = outcome
                    state["done"] += 1
            pipe.wake()  # a no-op once the caller has closed it

    threads: list[threading.Thread] = []
    with contextlib.suppress(RuntimeError):  # "can't start new thread": fewer will do
        while len(threads) < min(count, RESOLVE_THREADS):
            thread = threading.Thread(target=work, name="netprobe-resolve", daemon=True)
            thread.start()
            threads.append(thread)
    if not threads:
        pipe.close()
        return [_outcome_of(job) for job in jobs]  # here, then: not interruptible
    try:
        while state["done"] < count:
            pipe.wait(lambda: state["done"] >= count, deadline)
            if deadline is not None and time.monotonic() >= deadline:
                break
    finally:
        with lock:
            state["stopped"] = True
            # A job that ends from now on is not the caller's: its outcome is not taken.
            finished = list(outcomes)
            all_done = state["done"] >= count
        pipe.close()
    if all_done:
        for thread in threads:
            thread.join()  # each has no job left: it is on its way out
    return finished


def resolve_named(
    host: str, port: int, *, family: int = 0, socktype: int = socket.SOCK_STREAM
) -> list[Resolved]:
    """resolve(), its error naming the host: "resolve: EAI_NONAME: db.internal: Name or
    service not known" (a command with one target says which name failed).

    Raises:
        ResolveError: as resolve().
    """
    try:
        return resolve(host, port, family=family, socktype=socktype)
    except ResolveError as exc:
        parts = str(exc).split(": ", 2)  # "resolve", "EAI_...", the resolver's own words
        detail = f"{host}: {parts[2]}" if len(parts) == 3 else host
        raise ResolveError("resolve", exc.errno, exc.errno_name, detail) from exc


# ---------------------------------------------------------------------------------------------
# One non-blocking connect
# ---------------------------------------------------------------------------------------------


class Cancel(Protocol):
    """What `cancel` arguments need: threading.Event fits."""

    def is_set(self) -> bool: ...


# How often a wait that can be cancelled looks at its flag.
CANCEL_POLL_S = 0.05


@dataclass(slots=True)
class ConnectOutcome:
    """How one connect attempt ended.

    Attributes:
        state: the classification (OPEN, REFUSED, TIMEOUT, ...).
        errno_name: the errno's symbolic name; None for OPEN and for our own deadline.
        elapsed_s: from connect() to the verdict.
        sock: the connected socket when keep=True and state is OPEN (the caller closes it).
        cancelled: `cancel` was set while the connect was under way (state TIMEOUT: it had
            no answer by then).
    """

    state: ConnectState
    errno_name: str | None
    elapsed_s: float
    sock: socket.socket | None = None
    cancelled: bool = False


# TCP states (tcpi_state) in which our FIN is queued and not yet acknowledged: SIOCOUTQ counts
# it as one more byte (write_seq - snd_una), SIOCOUTQNSD too until it is sent.
_FIN_UNACKED_STATES = frozenset({4, 9, 11})  # FIN_WAIT1, LAST_ACK, CLOSING


# linux/sockios.h: the bytes of a socket's send queue not sent yet (SIOCOUTQ also counts the
# ones sent and not acknowledged). Python's termios does not name it.
_SIOCOUTQNSD = 0x894B


def send_queue_bytes(sock: socket.socket) -> int | None:
    """Data bytes in a TCP socket's kernel send queue the peer has not acknowledged (unsent
    plus in flight). None where the kernel cannot say (not TCP, no SIOCOUTQ)."""
    try:
        import termios

        request = termios.TIOCOUTQ  # TIOCOUTQ is SIOCOUTQ on sockets (Linux)
    except (ImportError, AttributeError):
        return None
    return _tcp_queue_bytes(sock, request)


def sent_before_reset(sock: socket.socket) -> int | None:
    """After the peer's RST: the data bytes the kernel had transmitted, each counted once
    (Linux TCP_INFO: tcpi_bytes_sent less tcpi_bytes_retrans, kernel 4.19+). The RST threw
    away the queue of what was never sent; what was sent reached the peer (on loopback; its
    ACK may lag, so what it acknowledged can be short of what it read). None where the
    kernel cannot say, or while the socket is not closed by a reset: a connection still
    open sends on, and a count now would come out short."""
    if sys.platform != "linux" or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SENT_END)
    except OSError:
        return None
    if len(info) < _TCP_INFO_SENT_END or info[0] != _TCP_CLOSE:
        return None
    sent, retransmitted = struct.unpack_from("=QQ", info, _TCP_INFO_SENT_END - 16)
    return int(sent - retransmitted)


_TCP_CLOSE = 7  # tcpi_state of a socket the peer's RST (or our disconnect) closed


# struct tcp_info: u64 tcpi_bytes_sent at offset 200, u64 tcpi_bytes_retrans at 208.
_TCP_INFO_SENT_END = 216


def unsent_bytes(sock: socket.socket) -> int | None:
    """Data bytes in a TCP socket's kernel send queue not sent yet: what an RST now keeps from
    the peer. Bytes sent and not yet acknowledged are not counted: they sit in the peer's
    receive queue (on loopback, where its ACK is merely delayed) or are on their way there,
    and a Linux peer still reads them after the RST (SOCKETS.md §5). Where the kernel has no
    SIOCOUTQNSD, the whole unacknowledged queue (send_queue_bytes). None: not TCP."""
    if sys.platform == "linux":
        queued = _tcp_queue_bytes(sock, _SIOCOUTQNSD)
        if queued is not None:
            return queued
    return send_queue_bytes(sock)


def _tcp_queue_bytes(sock: socket.socket, request: int) -> int | None:
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None  # AF_UNIX answers in buffer memory, not bytes
    try:
        import fcntl

        raw = fcntl.ioctl(sock.fileno(), request, b"\0\0\0\0")
    except (ImportError, OSError):
        return None
    queued = int.from_bytes(raw, sys.byteorder)
    if queued:
        with contextlib.suppress(OSError, AttributeError):
            # Our FIN, once queued, is counted as a byte (the last one, so while any is
            # counted it is): it is no data of ours.
            if sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] in _FIN_UNACKED_STATES:
                queued -= 1
    return queued


def set_linger_zero(sock: socket.socket) -> None:
    """Make close() send RST instead of FIN (and leave no TIME_WAIT)."""
    # struct linger is two ints on Linux/BSD/macOS; Windows uses two u_short.
    fmt = "HH" if sys.platform == "win32" else "ii"
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack(fmt, 1, 0))


def connect_nonblocking(
    target: Resolved,
    *,
    deadline: float | None,
    source: str | None = None,
    keep: bool = False,
    socktype: int = socket.SOCK_STREAM,
    cancel: Cancel | None = None,
) -> ConnectOutcome:
    """Connect once without blocking past `deadline`; never raises for network outcomes.

    Uses connect_ex, then waits for writability and reads SO_ERROR once (reading clears it).
    With `cancel` (a threading.Event, say, set by a Ctrl-C handler) the wait ends within
    CANCEL_POLL_S of it being set, as a TIMEOUT outcome marked `cancelled`.

    Raises:
        LocalError: no file descriptor (EMFILE/ENFILE) for the socket itself.
    """
    start = time.monotonic()
    with _map_errors("socket"):
        sock = socket.socket(target.family, socktype)
    handed_over = False
    try:
        sock.setblocking(False)
        if source is not None:
            _bind_source(sock, source)
        code: int | None = sock.connect_ex(target.sockaddr)
        if code in _CONNECT_PENDING:
            code = _wait_connected(sock, deadline, cancel)
        elapsed = time.monotonic() - start
        if code is None:
            cancelled = cancel is not None and cancel.is_set()
            return ConnectOutcome(ConnectState.TIMEOUT, None, elapsed, cancelled=cancelled)
        state = classify_connect_errno(code)
        if state is ConnectState.OPEN:
            if keep:
                handed_over = True  # ownership moves to the caller
                return ConnectOutcome(state, None, elapsed, sock)
            set_linger_zero(sock)
            return ConnectOutcome(state, None, elapsed)
        return ConnectOutcome(state, errno_name(code), elapsed)
    except OSError as exc:  # bind of the source address, or an odd connect_ex raise
        elapsed = time.monotonic() - start
        return ConnectOutcome(classify_errno(exc.errno), errno_name(exc.errno), elapsed)
    finally:
        if not handed_over:
            sock.close()


# A non-blocking connect still under way. Windows says WSAEWOULDBLOCK (10035); on Linux
# EWOULDBLOCK is EAGAIN, which there means "AF_UNIX listener's queue is full" and is final
# (SOCKETS.md section 3), so it must not be waited on.
_CONNECT_PENDING = frozenset(
    {errno.EINPROGRESS, errno.EALREADY}
    | ({errno.EWOULDBLOCK} if sys.platform == "win32" else set())
)


def _bind_source(sock: socket.socket, source: str) -> None:
    # IP_BIND_ADDRESS_NO_PORT delays the port choice to connect(), so one source address can
    # reuse a local port across different destinations (Linux >= 4.2).
    no_port = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", None)
    if no_port is not None:
        sock.setsockopt(socket.IPPROTO_IP, no_port, 1)
    sock.bind((source, 0))


# poll(2) takes an int of milliseconds: a deadline weeks away waits in slices of this.
POLL_MAX_S = (2**31 - 1) / 1000.0


def poll_ms(left_s: float) -> int:
    """A poll(2) timeout for `left_s` seconds: rounded up, at least 1 ms, at most POLL_MAX_S."""
    return max(1, int(min(left_s, POLL_MAX_S) * 1000 + 0.999))


def _wait_connected(
    sock: socket.socket, deadline: float | None, cancel: Cancel | None = None
) -> int | None:
    """Wait until a pending connect ends; its errno (0 = connected), None at the deadline
    (or once `cancel` is set)."""
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    wake = signal_wake_fd()
    if wake is not None:
        poller.register(wake, select.POLLIN)
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return None
        if cancel is not None:
            if cancel.is_set():
                return None
            left = CANCEL_POLL_S if left is None else min(left, CANCEL_POLL_S)
        for fd, _event in poller.poll(None if left is None else poll_ms(left)):
            if fd == wake:
                drain_signal_wake(fd)
            else:
                return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)


# ---------------------------------------------------------------------------------------------
# Streams: deadline-aware send/receive, half and abortive close
# ---------------------------------------------------------------------------------------------


def send_all(sock: socket.socket, data: bytes | memoryview, deadline: float | None) -> int:
    """Send every byte before `deadline`, handling partial sends; returns the count.

    Raises:
        DeadlineExceeded, PeerResetError, NetworkError.
    """
    view = memoryview(data)
    total = len(view)
    sent = 0
    while sent < total:
        sock.settimeout(remaining(deadline, "send"))
        with _map_errors("send"):
            sent += sock.send(view[sent:])
    return sent


def send_some(sock: socket.socket, data: bytes | memoryview, deadline: float | None) -> int:
    """One send: wait (until `deadline`) for room, hand the kernel what fits; returns the count.

    Raises:
        DeadlineExceeded, PeerResetError, NetworkError.
    """
    sock.settimeout(remaining(deadline, "send"))
    with _map_errors("send"):
        return sock.send(data)


def recv_some(sock: socket.socket, max_bytes: int, deadline: float | None) -> bytes:
    """Receive up to max_bytes; b"" means the peer closed (EOF).

    Raises:
        DeadlineExceeded, PeerResetError, NetworkError.
    """
    sock.settimeout(remaining(deadline, "recv"))
    with _map_errors("recv"):
        return sock.recv(max_bytes)


def read_queued(sock: socket.socket, limit: int = 64 << 20) -> int:
    """Read away what already sits in the receive queue, without waiting; return its size.

    After a send that took the peer's RST as its error, the bytes the peer sent before the
    RST are still readable (Linux keeps the queue): a count of what it sent needs them.
    Errors end the reading; `limit` bounds it.
    """
    total = 0
    while total < limit:
        try:
            data = sock.recv(min(65536, limit - total), socket.MSG_DONTWAIT)
        except OSError:
            break
        if not data:
            break
        total += len(data)
    return total


def recv_exactly(sock: socket.socket, count: int, deadline: float | None) -> bytes:
    """Receive exactly `count` bytes under one overall deadline.

    Raises:
        PeerClosedError: EOF before `count` bytes (the partial count is in the message).
        DeadlineExceeded, PeerResetError, NetworkError.
    """
    buffer = bytearray(count)
    view = memoryview(buffer)
    got = 0
    while got < count:
        sock.settimeout(remaining(deadline, "recv"))
        with _map_errors("recv"):
            n = sock.recv_into(view[got:])
        if n == 0:
            raise PeerClosedError("recv", None, "EOF", f"after {got} of {count} bytes")
        got += n
    return bytes(buffer)


def half_close(sock: socket.socket) -> None:
    """Send FIN (shutdown SHUT_WR) and keep reading; harmless if already disconnected."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)


# A lingering close ends once the peer was quiet this long with all our bytes acknowledged.
LINGER_QUIET_S = 0.05


def close_lingering(sock: socket.socket, cap_s: float) -> None:
    """Close a connection whose peer may still be sending, as a FIN rather than an RST.

    A close with received bytes unread makes the kernel answer RST at once, and the peer
    loses what it had not read yet of ours (SOCKETS.md §5). So: FIN after our bytes, then
    read and drop until the peer's FIN, or until it has been quiet LINGER_QUIET_S with every
    byte of ours acknowledged, or cap_s (then the close is what it is)."""
    half_close(sock)
    deadline = time.monotonic() + cap_s
    poller = select.poll()  # not select(): any fd number
    try:
        sock.setblocking(False)
        poller.register(sock, select.POLLIN)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if not poller.poll(poll_ms(min(left, LINGER_QUIET_S))):
                if not send_queue_bytes(sock):
                    break  # quiet, and nothing of ours left to lose
                continue
            try:
                if not sock.recv(65536):
                    break  # the peer's FIN
            except (BlockingIOError, InterruptedError):
                continue
    except OSError:
        pass  # reset or gone: nothing more to save
    finally:
        sock.close()


_LIBC: Any = None  # ctypes' handle on the C library (False: not to be had), loaded on use


def reset_counting_unsent(sock: socket.socket) -> int:
    """Send a TCP RST at once, the fd staying open, and return the data bytes the kernel
    had not sent by then: what the RST keeps from the peer.

    For a socket an event loop closes only later: until the RST the kernel goes on sending
    as the peer reads, so a count taken earlier comes out short. connect(2) with AF_UNSPEC
    disconnects (Linux tcp_disconnect: RST from an established or closing state, queues
    dropped) right after the count, and what was in flight at the RST is read after it.
    Elsewhere (not Linux, no ctypes) the count (unsent_bytes) is all it does, and the
    caller's close with SO_LINGER 0 resets."""
    global _LIBC
    if _LIBC is None and sys.platform == "linux":
        try:  # before the count: an import between it and the RST would let the kernel send
            import ctypes

            _LIBC = ctypes.CDLL(None, use_errno=True)
        except (ImportError, OSError):
            _LIBC = False
    if not _LIBC or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return unsent_bytes(sock) or 0
    if _raw_outq(sock) == 0:
        # Nothing queued or in flight (a FIN would count): nothing to lose, and the filter
        # (about 30 us) would double the cost of every RST a server sends.
        _disconnect(sock)
        return 0
    # A count right before the RST is not enough: an ACK from a peer reading on another CPU
    # between the two calls (a moment, longer when this thread is preempted) lets the kernel
    # send more, which the peer then reads (a proxy's upstream read 0.65 MB more than its
    # count, about ten 64 KiB segments). So from here on no ACK moves snd_una (a timer may
    # still send a segment), and what had been sent by the RST is read after it.
    queued = _raw_outq(sock) if _drop_incoming(sock) else None  # write_seq - snd_una
    fin_queued = _tcp_state(sock) in _FIN_UNACKED_STATES  # no ACK of it can come now
    unsent = unsent_bytes(sock) or 0  # the count if the kernel cannot tell us better
    _disconnect(sock)
    if queued is None or _tcp_state(sock) != _TCP_CLOSE:
        return unsent
    # tcp_disconnect leaves snd_una and snd_nxt as they were and moves write_seq on, the
    # same for both queues: their difference is what was in flight at the RST.
    outq, notsent = _raw_outq(sock), _raw_outq(sock, _SIOCOUTQNSD)  # ... - snd_nxt
    if outq is None or notsent is None or not 0 <= outq - notsent <= queued:
        return unsent  # a kernel that does otherwise
    dropped = queued - (outq - notsent)
    if fin_queued and dropped:
        dropped -= 1  # our FIN, last in the queue, was not sent either: not a data byte
    return min(dropped, unsent)


def _disconnect(sock: socket.socket) -> None:
    """connect(2) with AF_UNSPEC: Linux's tcp_disconnect, an RST at once, the fd kept."""
    with contextlib.suppress(OSError, AttributeError):
        unspec = struct.pack("=H14x", socket.AF_UNSPEC)  # struct sockaddr, family only
        _LIBC.connect(sock.fileno(), unspec, len(unspec))


_SO_ATTACH_FILTER = 26  # asm-generic/socket.h
_BPF_RET_K = 0x06  # classic BPF "return k": with k 0, a program that drops every packet


def _drop_incoming(sock: socket.socket) -> bool:
    """From now on the kernel drops every segment that reaches `sock` before TCP sees it (a
    socket filter): no ACK advances snd_una or opens the window. For a socket being reset."""
    try:
        import ctypes

        program = ctypes.create_string_buffer(struct.pack("=HBBI", _BPF_RET_K, 0, 0, 0))
        fprog = struct.pack("@HP", 1, ctypes.addressof(program))  # struct sock_fprog
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)
    except (ImportError, OSError):
        return False
    return True


def _raw_outq(sock: socket.socket, request: int | None = None) -> int | None:
    """SIOCOUTQ's (or `request`'s) answer as the kernel gives it: a queued FIN is a byte."""
    try:
        import fcntl
        import termios

        raw = fcntl.ioctl(sock.fileno(), request or termios.TIOCOUTQ, b"\0\0\0\0")
    except (ImportError, AttributeError, OSError):
        return None
    return int.from_bytes(raw, sys.byteorder)


def _tcp_state(sock: socket.socket) -> int | None:
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    except OSError:
        return None


def abort_connection(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER on, 0 s): the peer gets ECONNRESET, no TIME_WAIT here."""
    with contextlib.suppress(OSError):
        set_linger_zero(sock)
    sock.close()


# ---------------------------------------------------------------------------------------------
# Listeners
# ---------------------------------------------------------------------------------------------


def open_listener(
    host: str | None,
    port: int = 0,
    *,
    backlog: int = 128,
    path: str | None = None,
    family: int = 0,
    reuse_port: bool = False,
    new_reuse_group: bool = False,
    on_resolved: Callable[[], None] | None = None,
) -> socket.socket:
    """Bind and listen (TCP on host:port, or a Unix stream socket at `path`). `on_resolved`
    runs once the host has resolved (a lookup can take long), right before the bind.

    A stale Unix socket file is replaced only if nothing accepts connections on it.
    With reuse_port and new_reuse_group, the port must be free first: SO_REUSEPORT alone
    would let this socket join another program's group on that port (both serving half the
    clients) where a plain bind fails with EADDRINUSE.

    Raises:
        LocalError: bind/listen failed (EADDRINUSE, EACCES, ...), named in the message.
        ResolveError: host does not resolve.
    """
    if path is not None:
        if on_resolved is not None:
            on_resolved()
        return _open_unix_listener(path, backlog)
    assert host is not None
    addr = preferred(resolve(host, port, family=family, socktype=socket.SOCK_STREAM))
    if on_resolved is not None:
        on_resolved()
    if reuse_port and new_reuse_group and port != 0:
        # A bind without SO_REUSEPORT fails on a port anyone listens on, reuse group or not.
        probe = socket.socket(addr.family, socket.SOCK_STREAM)
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if addr.family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            _bind_or_explain(probe, addr.sockaddr, format_hostport(host, port))
        finally:
            probe.close()
    sock = socket.socket(addr.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port and hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if addr.family == socket.AF_INET6:
            # v6-only, whatever the host's bindv6only: `::` must not take IPv4 peers too
            # (as ncat and nginx); IPv4 is a second server on 0.0.0.0.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        _bind_or_explain(sock, addr.sockaddr, format_hostport(host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def open_udp(
    host: str,
    port: int = 0,
    *,
    family: int = 0,
    on_resolved: Callable[[], None] | None = None,
) -> socket.socket:
    """Bind a UDP socket on host:port (`on_resolved`: as open_listener's).

    Raises:
        LocalError: bind failed.
    """
    addr = preferred(resolve(host, port, family=family, socktype=socket.SOCK_DGRAM))
    if on_resolved is not None:
        on_resolved()
    sock = socket.socket(addr.family, socket.SOCK_DGRAM)
    try:
        if addr.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        _bind_or_explain(sock, addr.sockaddr, format_hostport(host, port) + "/udp")
    except BaseException:
        sock.close()
        raise
    return sock


def _bind_or_explain(sock: socket.socket, sockaddr: Any, shown: str) -> None:
    try:
        sock.bind(sockaddr)
    except OSError as exc:
        name = errno_name(exc.errno)
        if name == "EINVAL" and _zone_missing(sockaddr):
            # Such an address binds only on a named interface: the input is at fault, not this
            # host (exit 2, not 6), and the errno alone does not say what is missing.
            raise UsageError(
                f"cannot bind {shown}: {sockaddr[0]} is link-local and needs its %zone, the "
                f"interface it is on (e.g. {sockaddr[0]}%eth0)"
            ) from exc
        why = {
            "EADDRINUSE": "the address is already in use",
            "EACCES": (
                "permission denied (a socket file needs a directory we may write to)"
                if isinstance(sockaddr, str)
                else "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
            ),
            "EADDRNOTAVAIL": "that address is not on this host",
        }.get(name or "", exc.strerror or "bind failed")
        raise LocalError(f"cannot bind {shown}: {name}: {why}", name) from exc


def _zone_missing(sockaddr: Any) -> bool:
    if not isinstance(sockaddr, tuple) or len(sockaddr) < 4 or sockaddr[3]:
        return False
    try:
        return _needs_zone(ipaddress.IPv6Address(sockaddr[0]))
    except ValueError:
        return False


def check_unix_path_size(path: str) -> None:
    """Refuse a Unix socket path that cannot fit sun_path, before any socket call.

    sun_path holds 108 bytes on Linux (104 on macOS/BSD) with the NUL; a longer path fails
    bind() and connect() with an errno-less OSError("AF_UNIX path too long"): the user's
    input, not a network outcome. An abstract name (`@name`, Linux) has no closing NUL but a
    leading one, which its `@` stands for: 108 bytes with it.

    Raises:
        UsageError: the path is longer than 107 bytes (an abstract name: 108 with the @), or
            an abstract name where there are none.
    """
    size = len(os.fsencode(path))
    if path.startswith("@"):
        if not sys.platform.startswith("linux"):
            raise UsageError(
                f"unix:{path}: a leading @ names an abstract socket, which only Linux has "
                f"(a file whose name starts with @ is ./{path})"
            )
        if size > 108:
            raise UsageError(
                f"unix:{path}: the abstract name is {size} bytes with its leading NUL (the @); "
                "it may have 108"
            )
        if path == "@":  # the bare NUL: a name no one would mean (and autobind's form)
            raise UsageError("unix:@: an abstract socket needs a name after the @")
        return
    if size > 107:
        raise UsageError(f"unix:{path}: the path is {size} bytes; a Unix socket path may have 107")


def unix_sockaddr(path: str) -> str:
    """What bind()/connect() take for a Unix socket given as `path`: a leading `@` names the
    abstract namespace (as `ss` and listeners show it): NUL + name, no file."""
    return "\0" + path[1:] if path.startswith("@") else path


def file_identity(path: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file at PATH (not following a symlink), None if there is none
    (an abstract `@name` has none: a file of that name in the cwd is not ours to remove)."""
    if path.startswith("@"):
        return None
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def remove_own_socket_file(path: str, identity: tuple[int, int] | None) -> None:
    """Remove a Unix listener's socket file at exit, only if it is still the one we bound
    (`identity` from file_identity after the bind): another server may have replaced it."""
    if identity is not None and file_identity(path) == identity:
        with contextlib.suppress(OSError):
            os.unlink(path)


def check_listen_path(path: str) -> None:
    """Refuse a --unix PATH a listener cannot bind, before anything starts.

    Raises:
        AddressError: the path is empty (bind("") would autobind an abstract address on Linux
            and "succeed" with no file).
        UsageError: the path does not fit sun_path (check_unix_path_size).
    """
    if not path:
        raise AddressError("the Unix socket path is empty (give a path, e.g. --unix /tmp/x.sock)")
    check_unix_path_size(path)


def _open_unix_listener(path: str, backlog: int) -> socket.socket:
    if not hasattr(socket, "AF_UNIX"):
        raise LocalError("Unix sockets are not available on this platform")
    check_listen_path(path)
    shown = f"unix:{path}"
    if path.startswith("@"):
        # No file to look at or replace: a name in use fails the bind with EADDRINUSE.
        return _bind_unix(unix_sockaddr(path), shown, backlog)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise _path_error(shown, exc, "cannot look at the path") from exc
    else:
        if not stat.S_ISSOCK(info.st_mode):
            raise LocalError(f"cannot bind {shown}: EADDRINUSE: it exists and is not a socket")
        in_use = _unix_in_use(path)
        if in_use is not None:
            raise LocalError(f"cannot bind {shown}: {in_use}", in_use.split(":", 1)[0])
        # Stale: no socket is bound to it. Removed only if it is still that file: another
        # server starting now may have replaced it with its own since we looked.
        if file_identity(path) == (info.st_dev, info.st_ino):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise _path_error(shown, exc, "cannot remove the stale socket file") from exc
    return _bind_unix(path, shown, backlog)


def _bind_unix(sockaddr: str, shown: str, backlog: int) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        _bind_or_explain(sock, sockaddr, shown)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def _path_error(shown: str, exc: OSError, doing: str) -> LocalError:
    name = errno_name(exc.errno)
    return LocalError(f"cannot bind {shown}: {name}: {doing} ({exc.strerror})", name)


def _unix_in_use(path: str) -> str | None:
    """Why the socket file at path may not be replaced ("ERRNO: why"), or None when no
    socket is bound to it any more (a stale file).

    Asked without becoming anybody's client: a datagram connect() to a stream socket fails
    with EPROTOTYPE before any connection exists (a stream probe would be accepted: an `echo
    --unix --once` counted it as its one client and exited), to a datagram one it succeeds,
    and to a file no socket is bound to any more it fails with ECONNREFUSED. Any other answer
    (EACCES: we may not write to it) leaves the question open: a file that may be live is
    never removed."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return None
    except OSError as exc:
        if exc.errno not in (errno.EPROTOTYPE, errno.EAGAIN):
            name = errno_name(exc.errno) or "error"
            return f"{name}: cannot tell whether a socket is still bound to it ({exc.strerror})"
    finally:
        probe.close()
    return "EADDRINUSE: a live socket is bound to it"


def accept_and_close(listener: socket.socket, deadline: float) -> str | None:
    """Accept one queued connection and close it at once (FIN); for slow-accept servers.

    Returns:
        The peer as `host:port`, or None when nothing arrived before `deadline` or accept
        failed. EMFILE/ENFILE leave the connection queued (SOCKETS.md §6), so the listener
        stays readable: this waits until the deadline (at most 50 ms) before returning None,
        or a caller's loop would spin.
    """
    left = deadline - time.monotonic()
    if left <= 0:
        return None
    listener.settimeout(left)
    try:
        conn, peer = listener.accept()
    except OSError as exc:  # includes TimeoutError
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            time.sleep(max(0.0, min(0.05, deadline - time.monotonic())))
        return None
    conn.close()
    return format_sockaddr(peer)


def fill_accept_queue(listener: socket.socket, *, deadline: float) -> list[socket.socket]:
    """Fill a never-accepting listener's accept queue; returns the clients that got in.

    Connects clients one by one until a connect stays pending (its SYN was dropped), so any
    further connect to this listener times out. On Linux a listen(B) queue holds B+1.

    Raises:
        DeadlineExceeded: the queue was not full by the deadline.
    """
    sockname = listener.getsockname()
    family = listener.family
    target = Resolved(family, tuple(sockname) if family != socket.AF_UNIX else sockname)
    clients: list[socket.socket] = []
    try:
        while True:
            remaining(deadline, "fill accept queue")
            # On loopback a handshake with room in the queue completes within a few ms; a
            # dropped SYN is retried only after 1 s, so 200 ms tells the two apart.
            probe_deadline = min(deadline, time.monotonic() + 0.2)
            outcome = connect_nonblocking(target, deadline=probe_deadline, keep=True)
            if outcome.state is ConnectState.TIMEOUT:
                return clients
            if family == socket.AF_UNIX and outcome.errno_name == "EAGAIN":
                return clients  # a full Unix queue refuses at once instead of dropping SYNs
            if outcome.sock is None:
                raise NetworkError("fill accept queue", None, outcome.errno_name)
            clients.append(outcome.sock)
    except BaseException:
        for client in clients:
            client.close()
        raise


# ---------------------------------------------------------------------------------------------
# Peers that left a connection nobody reads (reset's hang)
# ---------------------------------------------------------------------------------------------

_POLLRDHUP = getattr(select, "POLLRDHUP", 0)
_POLL_GONE = (
    getattr(select, "POLLERR", 0) | getattr(select, "POLLHUP", 0) | getattr(select, "POLLNVAL", 0)
)


class HangupPoller:
    """Which watched sockets' peers sent FIN or RST, told without reading them.

    For connections that are deliberately not read (the event loop no longer watches them):
    a read would take bytes that must stay unread, and a MSG_PEEK sees a FIN only behind no
    unread byte. poll() reports a FIN as POLLRDHUP (Linux) and an RST as POLLERR/POLLHUP,
    whatever is queued. One zero-timeout poll covers every watched socket. Without poll()
    (Windows) `available` is False and nothing is ever reported.
    """

    def __init__(self) -> None:
        self._poll: Any = select.poll() if hasattr(select, "poll") else None
        self.available = self._poll is not None

    def add(self, fd: int, *, fin: bool = True) -> None:
        """Watch fd for an RST, and also for a FIN unless `fin` is False."""
        if self._poll is not None:
            self._poll.register(fd, _POLLRDHUP if fin else 0)

    def remove(self, fd: int) -> None:
        if self._poll is not None:
            with contextlib.suppress(KeyError):
                self._poll.unregister(fd)

    def ready(self) -> list[tuple[int, bool]]:
        """(fd, gone) for each socket whose peer sent FIN (gone False) or RST (gone True)."""
        if self._poll is None:
            return []
        return [(fd, bool(mask & _POLL_GONE)) for fd, mask in self._poll.poll(0)]


def probe_peer(sock: Any, idle_s: int = 1, interval_s: int = 1, count: int = 5) -> bool:
    """Send TCP keepalive probes on sock so that a peer which is gone shows as an error.

    A peer's FIN does not say whether it closed or only shut its write side (and still waits
    to read). A closed peer's kernel answers the probes for its FIN-WAIT-2 time
    (tcp_fin_timeout, 60 s by default), then resets one; a host that vanished answers none
    (ETIMEDOUT after `count` probes). False where keepalive cannot be set (not TCP).
    """
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (
            ("TCP_KEEPIDLE", idle_s),
            ("TCP_KEEPINTVL", interval_s),
            ("TCP_KEEPCNT", count),
        ):
            option = getattr(socket, name, None)
            if option is not None:
                sock.setsockopt(socket.IPPROTO_TCP, option, value)
    except OSError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Resource limits
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NofileLimit:
    """RLIMIT_NOFILE before and after an attempt to raise it (None: unknown platform)."""

    soft: int | None
    hard: int | None
    raised_from: int | None = None


def nofile_limit() -> tuple[int | None, int | None]:
    """The current (soft, hard) RLIMIT_NOFILE; (None, None) where unsupported."""
    try:
        import resource
    except ImportError:  # Windows
        return None, None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    inf = resource.RLIM_INFINITY
    return (None if soft == inf else soft), (None if hard == inf else hard)


def raise_nofile_limit(wanted: int) -> NofileLimit:
    """Raise the soft fd limit towards `wanted` (never above hard); report what holds now."""
    try:
        import resource
    except ImportError:
        return NofileLimit(None, None)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    inf = resource.RLIM_INFINITY
    if soft != inf and soft < wanted:
        target = wanted if hard == inf else min(wanted, hard)
        if target > soft:
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                return NofileLimit(target, None if hard == inf else hard, raised_from=soft)
    return NofileLimit(None if soft == inf else soft, None if hard == inf else hard)


# ---------------------------------------------------------------------------------------------
# Counts and signals: Ctrl-C never lands between a system call and the count of its result
# ---------------------------------------------------------------------------------------------

# The pipe signal.set_wakeup_fd writes to (None until first needed).
_signal_pipe: tuple[int, int] | None = None


def signal_wake_fd() -> int | None:
    """An fd that becomes readable when a signal with a Python handler arrives, for a wait in
    the main thread to poll beside its own fds (None elsewhere, or where an event loop owns
    the wake-up fd). Drain it with drain_signal_wake().

    Python runs a signal's handler between bytecodes. A Ctrl-C that lands after the last of
    them and before poll(2) starts only sets a flag, and a poll without a timeout then slept
    through it: `send` ignored its one SIGINT, about one run in 700. The C-level handler
    writes this fd at once, so the poll returns and the handler runs.

    Claimed again at each call (an asyncio loop in this thread takes the wake-up fd over and
    drops it when it closes): a few microseconds, so a wait that cannot block skips it."""
    global _signal_pipe
    if threading.current_thread() is not threading.main_thread():
        return None
    if _signal_pipe is None:
        try:
            _signal_pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:  # out of fds: the wait goes on without it (and tries again next time)
            return None
    read_end, write_end = _signal_pipe
    previous = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    if previous not in (-1, write_end):
        signal.set_wakeup_fd(previous)  # an asyncio loop's: its signals are its own
        return None
    return read_end


def ignore_stop_signals() -> None:
    """From an interrupt on, SIGINT and SIGTERM are ignored (main thread only): the run is
    ending and its report is on its way (a report whose writes are bounded, so that no
    reader can hold it). Not put back: a second signal a moment later (two from timeout(1),
    a Ctrl-C pressed twice) cut the report short, or killed the process as it exited. A
    signal that lands while this runs is itself the interrupt already handled."""
    if threading.current_thread() is not threading.main_thread():
        return
    while True:
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            return
        except KeyboardInterrupt:
            continue


def drain_signal_wake(fd: int) -> None:
    """Empty the wake-up fd after a poll reported it (the handler itself runs on its own)."""
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 512):
            pass


def _forget_signal_pipe() -> None:
    # A forked child must not share the parent's pipe: its waits would drain the byte the
    # parent's signal wrote, and the parent's poll would sleep through that signal again.
    # (Left set, the inherited wake-up fd would also read as an event loop's to the child.)
    global _signal_pipe
    if _signal_pipe is None:
        return
    read_end, write_end = _signal_pipe
    _signal_pipe = None
    with contextlib.suppress(ValueError):
        previous = signal.set_wakeup_fd(-1)
        if previous != write_end:
            signal.set_wakeup_fd(previous)
    for fd in (read_end, write_end):
        with contextlib.suppress(OSError):
            os.close(fd)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_signal_pipe)


def sleep(seconds: float) -> None:
    """time.sleep() for the main thread that a signal always cuts short: a Ctrl-C landing
    just before the sleep's system call would otherwise wait out the whole pause (the
    interval of --repeat, -c, --wait). Elsewhere it simply sleeps."""
    if seconds > 0:
        wait_readable([], time.monotonic() + seconds)


class CountingGate:
    """Holds SIGINT and SIGTERM while the result of a system call is being counted.

    Python raises KeyboardInterrupt between any two bytecodes. Landing after a recv() returned
    and before its bytes were counted, it lost that chunk from the report (a sent chunk from
    bytes_sent, a datagram from the datagram count). Code that counts wraps the call and the
    count in `with gate:`; a signal that arrives inside is handled as the block ends, so the
    exception comes with the counts complete. A stretch inside that may wait (handing data to
    a stdout that can block) goes in `with gate.unheld():`, where signals act at once (one
    held until then too: the count is complete, and a supervisor's single SIGTERM must not
    wait on a stuck stdout).

    Signals are held only inside `gate.watching()`, in the main thread, and only those whose
    handler is Python code (KeyboardInterrupt; cli/_run.sigterm_as_interrupt): a default or
    ignored disposition is left as it is. Outside `unheld()` a block must not wait
    (non-blocking calls only), so a held signal waits a few bytecodes at most.
    """

    __slots__ = ("_depth", "_held", "_previous", "_thread")

    def __init__(self) -> None:
        self._depth = 0
        self._held: int | None = None
        self._previous: dict[int, Callable[[int, Any], Any]] = {}
        self._thread = threading.main_thread().ident

    def __enter__(self) -> None:
        self._depth += 1

    def __exit__(self, *_exc: object) -> None:
        self._depth -= 1
        if self._depth == 0 and self._held is not None:
            signum, self._held = self._held, None
            self._previous[signum](signum, None)

    def _handle(self, signum: int, frame: Any) -> None:
        if not self._depth:
            self._previous[signum](signum, frame)
        elif self._held != signal.SIGTERM:  # SIGTERM then Ctrl-C still exits as terminated
            self._held = signum

    @contextlib.contextmanager
    def unheld(self, *, held_first: bool = True) -> Iterator[None]:
        """Within a block, a stretch that may wait (a write to a stuck stdout): signals act at
        once there, one held before it included (held_first=False: that one waits for the
        block's end, after the stretch: a report to write first)."""
        depth, self._depth = self._depth, 0
        try:
            if held_first and self._held is not None:
                signum, self._held = self._held, None
                self._previous[signum](signum, None)
            yield
        finally:
            self._depth = depth

    @contextlib.contextmanager
    def watching(self) -> Iterator[CountingGate]:
        """Within the block, blocks of `with gate:` hold the stop signals (main thread only)."""
        if self._previous or threading.get_ident() != self._thread:
            yield self  # already watching, or a thread signals never reach
            return
        wanted = (signal.SIGINT, signal.SIGTERM)
        self._previous = {n: h for n in wanted if callable(h := signal.getsignal(n))}
        try:
            for signum in self._previous:
                signal.signal(signum, self._handle)
            yield self
        finally:
            # Both put back, whatever arrives meanwhile: blocked, a signal waits for the end
            # of the restore and then meets the handler it had before.
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, self._previous)
            try:
                for signum, handler in self._previous.items():
                    signal.signal(signum, handler)
                self._previous = {}
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


# ---------------------------------------------------------------------------------------------
# Both directions at once (send, listen): one poll loop over the socket and an input fd
# ---------------------------------------------------------------------------------------------

# 256 KiB per read/send: big enough that Python's per-call cost vanishes next to the copy
# (1 GiB is ~4k iterations), small enough that memory stays flat whatever the input size.
PUMP_CHUNK = 256 * 1024


class _SendfileUnsupported(Exception):
    """sendfile(2) refused the input file itself (no splice support): read it instead."""


# What sendfile(2) answers for an input file it cannot read from (most of /proc: EINVAL).
_SENDFILE_UNSUPPORTED = frozenset(
    getattr(errno, name) for name in ("EINVAL", "ENOSYS", "EOPNOTSUPP") if hasattr(errno, name)
)

# sendfile(2) copies inside the kernel, so one call may move as much as the socket buffer takes.
SENDFILE_CHUNK = 16 * 1024 * 1024


@dataclass(slots=True)
class PumpResult:
    """How pump_duplex ended.

    Attributes:
        ended_by: "eof" (the peer closed, and we were done or stop_on_peer_eof), "reset",
            "timeout" (the overall deadline), "idle-timeout", "stopped" (on_received asked to
            stop), "error" (any other network error; see errno_name).
        bytes_sent: bytes the kernel accepted from us.
        bytes_received: bytes read from the peer.
        first_byte_at: monotonic time of the first received byte (None: nothing came).
        input_done_at: monotonic time the input ended and was fully sent (None: it did not).
        peer_eof: the peer's FIN was seen.
        errno_name: errno name for "reset" and "error".
        output_pending: at the end, input read (or a file being sent, or bytes in the kernel's
            send queue) was still waiting for the peer to take it: a stalled upload rather
            than an input with nothing to say.
    """

    ended_by: str = "eof"
    bytes_sent: int = 0
    bytes_received: int = 0
    first_byte_at: float | None = None
    input_done_at: float | None = None
    peer_eof: bool = False
    errno_name: str | None = None
    output_pending: bool = False


def pump_duplex(
    sock: socket.socket,
    *,
    read_input: Callable[[int], tuple[bytes, bool]] | None,
    input_fd: int | None,
    on_received: Callable[[bytes], bool],
    on_sent: Callable[[memoryview], None] | None = None,
    deadline: float | None = None,
    idle_timeout_s: float | None = None,
    shutdown_on_input_eof: bool = True,
    stop_on_peer_eof: bool = True,
    idle_while_input: bool = False,
    chunk_size: int = PUMP_CHUNK,
    sendfile_fd: int | None = None,
    into: PumpResult | None = None,
) -> PumpResult:
    """Copy input to the socket while copying the socket to on_received, until one side ends.

    Memory stays at about two chunks: input is read only when the previous chunk has been
    sent, so a slow peer slows the reader down (back-pressure) instead of filling a buffer.

    Args:
        sock: a connected stream socket (made non-blocking here).
        read_input: returns (data, eof) for up to n bytes; None: nothing to send.
        input_fd: the fd behind read_input, polled before reading (None: reading never blocks,
            as for a regular file or in-memory data).
        on_received: called with each chunk from the peer (already counted); returning True
            stops the pump. It may block (a stuck stdout): a signal still ends it at once.
        on_sent: called with each slice the kernel accepted, after it is counted in the
            result (transcripts).
        deadline: absolute monotonic deadline for the whole pump.
        idle_timeout_s: end when nothing moved for this long.
        shutdown_on_input_eof: send FIN (SHUT_WR) once the input is sent.
        stop_on_peer_eof: end at the peer's FIN even if input remains (send); otherwise keep
            sending until the input ends too (listen).
        idle_while_input: count the idle time also while waiting on the input (listen);
            otherwise a slow input (a pipe that pauses) never counts as idle (send).
        chunk_size: the most bytes read or sent per call.
        sendfile_fd: send the input from this regular file with sendfile(2) (zero-copy, from
            its current offset) instead of read_input.
        into: the PumpResult to count in (returned): the caller still has the counts when an
            exception (Ctrl-C) ends the pump.

    Returns:
        PumpResult. Network outcomes are data, never exceptions.
    """
    sock.setblocking(False)
    sfd = sock.fileno()
    poller = select.poll()
    masks: dict[int, int] = {}
    result = into if into is not None else PumpResult()
    gate = CountingGate()
    pending = memoryview(b"")
    input_open = read_input is not None or sendfile_fd is not None
    input_done = False
    last_activity = time.monotonic()

    def set_mask(fd: int, mask: int) -> None:
        old = masks.get(fd, 0)
        if mask == old:
            return
        if mask == 0:
            poller.unregister(fd)
            del masks[fd]
        elif old == 0:
            poller.register(fd, mask)
            masks[fd] = mask
        else:
            poller.modify(fd, mask)
            masks[fd] = mask

    def end(how: str, exc: OSError | None = None) -> PumpResult:
        result.ended_by = how
        if exc is not None:
            result.errno_name = errno_name(exc.errno)
        # Ours still waiting: in the pump's hands, in the file being sent, or taken by the
        # kernel but not acknowledged by the peer (a peer that stopped reading).
        result.output_pending = (
            bool(pending)
            or (sendfile_fd is not None and input_open)
            or bool(send_queue_bytes(sock))
        )
        return result

    def finish_input() -> None:
        nonlocal input_done, last_activity
        input_done = True
        result.input_done_at = last_activity = time.monotonic()
        # The end of the input is activity: a peer that answers after our FIN gets the whole
        # idle time from it, however long the input paused before it ended.
        if shutdown_on_input_eof:
            half_close(sock)

    def take_input() -> None:
        nonlocal pending, input_open
        assert read_input is not None
        data, eof = read_input(chunk_size)
        if data:
            pending = memoryview(data)
        if eof:
            input_open = False

    def attempt(call: Callable[[], int]) -> int | str | None:
        """A send's count; None: it would block; "reset"/"error": it ended the pump."""
        try:
            return call()
        except (BlockingIOError, InterruptedError):
            return None
        except (BrokenPipeError, ConnectionResetError) as exc:
            end("reset", exc)
            return "reset"
        except OSError as exc:
            if (
                exc.errno in _SENDFILE_UNSUPPORTED
                and sendfile_fd is not None
                and not result.bytes_sent
                and read_input is not None
            ):
                raise _SendfileUnsupported from exc
            end("error", exc)
            return "error"

    def try_sendfile() -> str | None:
        nonlocal input_open, last_activity, sendfile_fd
        assert sendfile_fd is not None
        fd = sendfile_fd
        with gate:
            try:
                n = attempt(lambda: os.sendfile(sfd, fd, None, SENDFILE_CHUNK))
            except _SendfileUnsupported:
                # A regular file of a file system without splice support (most of /proc) is
                # read and sent as any input instead: nothing was taken from it yet.
                sendfile_fd = None
                return None
            if not isinstance(n, int):
                return n
            if n == 0:
                input_open = False
            else:
                result.bytes_sent += n
                last_activity = time.monotonic()
        return None

    def try_send() -> str | None:
        nonlocal pending, last_activity
        with gate:
            n = attempt(lambda: sock.send(pending))
            if not isinstance(n, int):
                return n
            sent, pending = pending[:n], pending[n:]
            if n:
                result.bytes_sent += n
                last_activity = time.monotonic()
        if n and on_sent is not None:
            on_sent(sent)  # a transcript: a write that may wait, so signals act at once
        return None

    with gate.watching():
        wake = signal_wake_fd()
        if wake is not None:
            poller.register(wake, select.POLLIN)  # not in `masks`: it is no work of the pump's
        if not input_open:
            finish_input()
        while True:
            now = time.monotonic()
            if not input_done and not input_open and not pending:
                finish_input()
            if result.peer_eof and (stop_on_peer_eof or input_done):
                return end("eof")
            if deadline is not None and now >= deadline:
                return end("timeout")
            file_input = sendfile_fd is not None and input_open
            instant_input = input_open and not pending and input_fd is None and sendfile_fd is None
            if instant_input:
                take_input()
                if pending and try_send() is not None:
                    return result
                continue_now = input_open and not pending
            else:
                continue_now = False
            if not input_done and not input_open and not pending:
                finish_input()  # before waiting: the peer may wait for our FIN to answer
            set_mask(
                sfd,
                (0 if result.peer_eof else select.POLLIN)
                | (select.POLLOUT if pending or file_input else 0),
            )
            if input_fd is not None and sendfile_fd is None:
                set_mask(input_fd, select.POLLIN if input_open and not pending else 0)
            if not masks:
                if continue_now:
                    continue
                return end("eof")
            limits: list[tuple[float, str]] = []
            if deadline is not None:
                limits.append((deadline - now, "timeout"))
            waiting_on_input = input_open and not pending and sendfile_fd is None
            if idle_timeout_s is not None and (idle_while_input or not waiting_on_input):
                limits.append((last_activity + idle_timeout_s - now, "idle-timeout"))
            timeout_ms: int | None = None
            if limits:
                left, why = min(limits)
                if left <= 0:
                    return end(why)
                timeout_ms = poll_ms(left)
            if continue_now:
                timeout_ms = 0
            for fd, event in poller.poll(timeout_ms):
                if fd == wake:
                    drain_signal_wake(fd)
                elif fd == sfd:
                    if (
                        event & (select.POLLIN | select.POLLERR | select.POLLHUP)
                        and not result.peer_eof
                    ):
                        with gate:
                            try:
                                data = sock.recv(chunk_size)
                            except (BlockingIOError, InterruptedError):
                                data = None
                            except ConnectionResetError as exc:
                                return end("reset", exc)
                            except OSError as exc:
                                return end("error", exc)
                            if data == b"":
                                result.peer_eof = True
                            elif data is not None:
                                now = time.monotonic()
                                last_activity = now
                                if result.first_byte_at is None:
                                    result.first_byte_at = now
                                result.bytes_received += len(data)
                                # Counted. A signal held above acts now, before the hand-over
                                # (which may wait on a stuck stdout); one that comes while
                                # on_received waits acts at once.
                                with gate.unheld():
                                    stop = on_received(data)
                                if stop:
                                    return end("stopped")
                                # Time spent handing the chunk over (a stdout whose reader pauses) is
                                # ours, not the peer's: the idle clock starts again once it is taken.
                                last_activity = time.monotonic()
                    if event & (select.POLLOUT | select.POLLERR) and pending:
                        if try_send() is not None:
                            return result
                    elif event & (select.POLLOUT | select.POLLERR) and file_input:
                        if try_sendfile() is not None:
                            return result
                    elif event & select.POLLERR and result.peer_eof:
                        if stop_on_peer_eof or input_done:
                            # The FIN came with the RST our last write provoked (the peer had
                            # closed): ended as at the peer's FIN, as nc's run is.
                            return end("eof")
                        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if code:
                            # EPIPE: the RST came after the peer's FIN. It is the peer's doing.
                            result.errno_name = errno_name(code)
                            return end("reset" if code in _RELAY_RESET else "error")
                elif fd == input_fd:
                    take_input()
                    if pending and try_send() is not None:
                        return result


def wait_readable(items: Sequence[int | socket.socket], deadline: float | None) -> list[int]:
    """Wait until some of `items` (fds or sockets) can be read; their fds ([] at the deadline)."""
    poller = select.poll()
    for item in items:
        poller.register(item, select.POLLIN)
    # (A look that cannot wait, as UDP send's after each datagram, has no race to guard.)
    wake = signal_wake_fd() if deadline is None or deadline > time.monotonic() else None
    if wake is not None:
        poller.register(wake, select.POLLIN)
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            timeout_ms: int | None = 0
        else:
            timeout_ms = None if left is None else poll_ms(left)
        ready = [fd for fd, _event in poller.poll(timeout_ms)]
        if wake in ready:
            # A signal whose handler returned (it did not end the wait): wait on.
            drain_signal_wake(wake)
            ready.remove(wake)
            if not ready:
                continue
        if ready or timeout_ms == 0 or (left is not None and left <= POLL_MAX_S):
            return ready


class WakePipe:
    """Wakes a wait of the main thread for worker threads' hand-overs.

    A threading lock or queue wait is no place for a Ctrl-C: a KeyboardInterrupt that lands
    inside Condition.wait between its release and its try leaves the lock released, and the
    `with` around it then fails with "release unlocked lock" in place of the interrupt.
    wait() polls this pipe beside the signal wake-up fd (wait_readable), so the handler runs
    at once, in our code.

    Workers hand over (a deque's append is atomic), then call wake(); the waiter calls
    wait(ready) with a check of what was handed over. A wake-up byte is written only while
    the waiter waits or is about to: a burst of hand-overs costs no write each, and so no
    switch to the waiter between them. close() may come while workers still run (an
    interrupted run leaves its daemon threads behind): a later wake() does nothing, and
    never writes to a reused fd number."""

    __slots__ = ("_closed", "_lock", "_waiting", "_write_end", "fd")

    def __init__(self) -> None:
        """Raises LocalError: out of file descriptors."""
        with _map_errors("pipe"):
            self.fd, self._write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._lock = threading.Lock()
        self._closed = False
        self._waiting = False

    def wake(self) -> None:
        # The waiter sets _waiting before it looks at what was handed over, and a worker
        # hands over before it reads _waiting: one of the two always sees the other.
        if self._waiting:
            with self._lock:
                if not self._closed:
                    # A full pipe already has a byte waiting: nothing is lost.
                    with contextlib.suppress(BlockingIOError):
                        os.write(self._write_end, b".")

    def wait(self, ready: Callable[[], object], deadline: float | None) -> None:
        """Return once ready() is true, a worker woke us, or at `deadline` (main thread)."""
        self._waiting = True
        try:
            if not ready() and wait_readable([self.fd], deadline):
                with contextlib.suppress(BlockingIOError):
                    while os.read(self.fd, 4096):
                        pass
        finally:
            self._waiting = False

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                os.close(self._write_end)
            finally:
                os.close(self.fd)


def accept_one(listener: socket.socket, deadline: float | None) -> tuple[socket.socket, str]:
    """Accept one connection before `deadline`; returns it and the peer as text.

    Raises:
        DeadlineExceeded: nobody connected in time.
        LocalError: out of file descriptors.
    """
    listener.setblocking(False)
    while True:
        # Not a blocking accept(): a Ctrl-C just before it was slept through (signal_wake_fd).
        remaining(deadline, "accept")
        if not wait_readable([listener], deadline):
            continue  # remaining() raises once the deadline has passed
        with _map_errors("accept"):
            try:
                conn, addr = listener.accept()
            except BlockingIOError:
                continue  # gone again before we took it (the peer reset it, say)
        break
    conn.setblocking(True)
    return conn, format_sockaddr(addr)


def unix_address(path: str) -> Resolved:
    """A Resolved for a Unix stream socket path, for connect_nonblocking."""
    if not hasattr(socket, "AF_UNIX"):
        raise LocalError("Unix sockets are not available on this platform")
    check_unix_path_size(path)
    sockaddr: Any = unix_sockaddr(path)  # AF_UNIX addresses are plain paths, not tuples
    return Resolved(socket.AF_UNIX, sockaddr)


# A control message that makes a reply leave from a given local address (sendmsg).
ReplyFrom = tuple[int, int, bytes]

# Linux's IP_PKTINFO (Python 3.11's socket module lacks the name).
_IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
_PKTINFO_SPACE = socket.CMSG_SPACE(20) if hasattr(socket, "CMSG_SPACE") else 0


def enable_pktinfo(sock: socket.socket) -> bool:
    """For a UDP socket bound to a wildcard address (0.0.0.0, ::): ask the kernel for each
    datagram's destination address (Linux IP_PKTINFO / IPV6_RECVPKTINFO), so that
    recv_datagram_to can say which address a reply must leave from. A reply sent plainly
    leaves from the route's address instead (127.0.0.1 for a datagram to 127.0.0.5), which a
    client whose socket is connected to the address it used never sees. False where that
    does not apply (a specific address) or is not available."""
    if sys.platform != "linux" or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    if sock.getsockname()[0] not in ("0.0.0.0", "::"):
        return False
    try:
        if sock.family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_IP, _IP_PKTINFO, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
    except OSError:
        return False
    return True


def recv_datagram_to(sock: socket.socket) -> tuple[bytes, Any, ReplyFrom | None]:
    """One datagram from a socket that enable_pktinfo() set up (non-blocking use: raises
    BlockingIOError when none waits): its bytes, its sender, and what makes a reply leave
    from the address it came to (None if the kernel did not say)."""
    data, ancillary, _flags, addr = sock.recvmsg(65536, _PKTINFO_SPACE)
    for level, kind, raw in ancillary:
        if level == socket.IPPROTO_IP and kind == _IP_PKTINFO and len(raw) >= 12:
            # in_pktinfo: ifindex, spec_dst, addr. spec_dst is the kernel's pick of our
            # address: the datagram's destination, or for a broadcast the interface's own
            # (a reply cannot leave from 127.255.255.255). ifindex 0: the route picks the way.
            return data, addr, (level, kind, b"\0\0\0\0" + raw[4:8] + b"\0\0\0\0")
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(raw) >= 20:
            # in6_pktinfo: addr, ifindex (which keeps a link-local reply on its link).
            return data, addr, (level, kind, raw[:20])
    return data, addr, None


def send_datagram(
    sock: socket.socket, data: bytes, addr: Any = None, reply_from: ReplyFrom | None = None
) -> int:
    """Send one datagram (to `addr`, or to the connected peer); from the local address
    `reply_from` names (see recv_datagram_to), if given.

    Raises:
        NetworkError: EMSGSIZE and friends; ECONNREFUSED from an earlier ICMP reply.
    """
    sock.settimeout(None)
    with _map_errors("send"):
        if reply_from is not None:
            return sock.sendmsg([data], [reply_from], 0, addr)
        return sock.sendto(data, addr) if addr is not None else sock.send(data)


def recv_datagram(
    sock: socket.socket, deadline: float | None, *, with_reply_from: bool = False
) -> tuple[bytes, Any, ReplyFrom | None]:
    """Receive one datagram (up to 64 KiB) with its source address, and (with_reply_from,
    on a socket enable_pktinfo() set up) what makes a reply leave from the address it came
    to; else None.

    Raises:
        DeadlineExceeded, NetworkError (ECONNREFUSED after an ICMP port unreachable).
    """
    sock.settimeout(remaining(deadline, "recv"))
    with _map_errors("recv"):
        if with_reply_from:
            return recv_datagram_to(sock)
        data, addr = sock.recvfrom(65536)
    return data, addr, None


def connect_udp(target: Resolved) -> socket.socket:
    """A UDP socket connected to `target` (only its replies arrive; ICMP errors surface).

    On Linux a connected UDP socket gets ECONNREFUSED on its next recv after the peer's host
    answered a datagram with ICMP port unreachable (SOCKETS.md §4).

    Raises:
        LocalError: no file descriptor; NetworkError: connect() failed (no route, ...).
    """
    with _map_errors("socket"):
        sock = socket.socket(target.family, socket.SOCK_DGRAM)
    try:
        with _map_errors("connect"):
            sock.connect(target.sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock


# ---------------------------------------------------------------------------------------------
# Port-check helpers: UDP probes and service names
# ---------------------------------------------------------------------------------------------

_UDP_IN_PROGRESS = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR})
# Probes started between two looks at the answers: a probe's latency is measured when its
# answer is read, so starting the whole concurrency (thousands) first would add the time
# spent starting the others to the first ones' latencies (an ICMP error on loopback arrives
# inside send()). A few dozen starts cost well under a millisecond; a poll with no wait every
# that many keeps the figures honest at the same throughput.
_UDP_STARTS_PER_POLL = 32


class _ReadPoller:
    """Readiness for udp_probe_many: epoll where there is one, else poll().

    With epoll a look at the answers costs what is ready, not what is registered, so looking
    every few dozen starts stays cheap with thousands of silent probes waiting out the timeout.
    """

    def __init__(self) -> None:
        self._epoll = select.epoll() if hasattr(select, "epoll") else None
        self._poll = select.poll() if self._epoll is None else None
        # A signal ends the wait at once (main thread), as in wait_readable.
        self._wake = signal_wake_fd()
        if self._wake is not None:
            self.register(self._wake)

    def register(self, fd: int) -> None:
        if self._epoll is not None:
            self._epoll.register(fd, select.EPOLLIN | select.EPOLLERR)
        else:
            assert self._poll is not None
            self._poll.register(fd, select.POLLIN | select.POLLERR)

    def unregister(self, fd: int) -> None:
        if self._epoll is not None:
            self._epoll.unregister(fd)
        else:
            assert self._poll is not None
            self._poll.unregister(fd)

    def wait(self, left_s: float) -> list[tuple[int, int]]:
        events = self._wait(left_s)
        if self._wake is not None and any(fd == self._wake for fd, _ in events):
            drain_signal_wake(self._wake)
            events = [(fd, ev) for fd, ev in events if fd != self._wake]
        return events

    def _wait(self, left_s: float) -> list[tuple[int, int]]:
        """The ready fds, waiting at most `left_s` seconds (0 or less: not at all)."""
        if self._epoll is not None:
            return self._epoll.poll(min(left_s, POLL_MAX_S) if left_s > 0 else 0)
        assert self._poll is not None
        return self._poll.poll(poll_ms(left_s) if left_s > 0 else 0)

    def close(self) -> None:
        if self._epoll is not None:
            self._epoll.close()


def udp_probe_many(
    items: Iterable[tuple[Any, Resolved]],
    payload: bytes,
    *,
    timeout_s: float,
    concurrency: int = 256,
    rate: float | None = None,
) -> Iterator[tuple[Any, ConnectState, str | None, float]]:
    """Probe many UDP ports with one datagram each; yield (key, state, errno_name, elapsed_s).

    Each probe is a connected UDP socket, so the kernel reports an ICMP port unreachable as
    ECONNREFUSED on it (SOCKETS.md §4). States: OPEN (a reply arrived), REFUSED (ICMP port
    unreachable), TIMEOUT (silence until the timeout: open or filtered), UNREACHABLE/ERROR
    for other errnos. Results come in completion order; at most `concurrency` sockets exist,
    and with `rate` at most that many datagrams leave per second (the run ends with its last
    probe: no wait for a rate slot after it). elapsed_s runs from the probe's start until its
    answer is read, which happens at most _UDP_STARTS_PER_POLL starts later.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    poller = _ReadPoller()
    live: dict[int, tuple[Any, socket.socket, float, tuple[str, int], tuple[str, int]]] = {}
    ours: dict[tuple[str, int], int] = {}  # live probes' own addresses: replies from us
    order: list[tuple[float, int]] = []  # (deadline, fd) in start order
    head = 0
    pending_items = iter(items)
    # The next item, fetched before its turn (rate) or its start (the per-poll cap): whether
    # one is left is known without waiting for the next rate slot.
    ahead: tuple[Any, Resolved] | None = None
    exhausted = False
    interval = 1.0 / rate if rate else 0.0
    next_start = time.monotonic()
    try:
        while True:
            more_now = False  # stopped starting for a look at the answers: poll without waiting
            starts = 0
            while not exhausted and len(live) < concurrency:
                item = ahead if ahead is not None else next(pending_items, None)
                ahead = None
                if item is None:
                    exhausted = True
                    break
                if starts == _UDP_STARTS_PER_POLL:
                    ahead = item
                    more_now = True
                    break
                if interval:
                    now = time.monotonic()
                    if now < next_start:
                        ahead = item
                        break
                    next_start = max(next_start + interval, now - 1.0)
                starts += 1
                key, target = item
                started = time.monotonic()
                try:
                    sock = socket.socket(target.family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
                except OSError as exc:
                    yield key, classify_errno(exc.errno), errno_name(exc.errno), 0.0
                    continue
                connected = False
                try:
                    sock.connect(target.sockaddr)
                    connected = True
                    local = _host_port(sock.getsockname())
                    # The kernel's spelling of the peer (0.0.0.0 is this host's address,
                    # ::ffff:7f00:1 reads ::ffff:127.0.0.1), as getsockname() spells ours.
                    aimed = _host_port(sock.getpeername())
                    if local == aimed or aimed in ours:
                        # The port is this scan's own probe socket (the kernel gave it the
                        # port we probe): its datagram would come back from us and read as
                        # "open". Nothing else can be bound there, so it is closed.
                        sock.close()
                        yield key, ConnectState.REFUSED, None, time.monotonic() - started
                        continue
                    sock.send(payload)
                except OSError as exc:
                    sock.close()
                    elapsed = time.monotonic() - started
                    classify = classify_errno if connected else classify_connect_errno
                    yield key, classify(exc.errno), errno_name(exc.errno), elapsed
                    continue
                fd = sock.fileno()
                ours[local] = fd
                live[fd] = (key, sock, started, local, aimed)
                order.append((started + timeout_s, fd))
                poller.register(fd)
            if exhausted and not live:
                return
            while head < len(order) and order[head][1] not in live:
                head += 1
            if more_now:
                left = 0.0
            else:
                left = order[head][0] - time.monotonic() if head < len(order) else 0.0
                if interval and not exhausted and len(live) < concurrency:
                    until_next = next_start - time.monotonic()
                    left = min(left, until_next) if live else until_next
            events = poller.wait(left)
            now = time.monotonic()
            for fd, _mask in events:
                entry = live.pop(fd, None)
                if entry is None:
                    continue
                key, sock, started, local, aimed = entry
                poller.unregister(fd)
                ours.pop(local, None)
                verdict = _udp_verdict(sock)
                if aimed in ours and verdict[0] is ConnectState.OPEN:
                    # A probe started after this one took the port it probes, and its own
                    # datagram (from that port, so accepted here) is what arrived.
                    verdict = (ConnectState.REFUSED, None)
                sock.close()  # before the yield: a consumer may stop iterating right there
                yield (key, *verdict, now - started)
            while head < len(order) and order[head][0] <= now:
                _deadline, fd = order[head]
                head += 1
                entry = live.pop(fd, None)
                if entry is None:
                    continue
                key, sock, started, local, _aimed = entry
                poller.unregister(fd)
                ours.pop(local, None)
                sock.close()
                yield key, ConnectState.TIMEOUT, None, now - started
            if head > 4096:  # keep the start-order list from growing without bound
                del order[:head]
                head = 0
    finally:
        for _key, sock, *_rest in live.values():
            sock.close()
        poller.close()


def _host_port(sockaddr: Any) -> tuple[str, int]:
    """(host, port) of an IPv4 or IPv6 socket address (flow info and scope left out)."""
    return str(sockaddr[0]), int(sockaddr[1])


def _udp_verdict(sock: socket.socket) -> tuple[ConnectState, str | None]:
    """Read what woke a UDP probe: a datagram (OPEN) or a queued ICMP error."""
    try:
        sock.recv(65536)
    except OSError as exc:
        if exc.errno in _UDP_IN_PROGRESS:  # spurious wake-up: nothing was there after all
            return ConnectState.TIMEOUT, None
        return classify_errno(exc.errno), errno_name(exc.errno)
    return ConnectState.OPEN, None


def udp_probe(
    target: Resolved, payload: bytes, deadline: float
) -> tuple[ConnectState, str | None, float]:
    """Probe one UDP port before `deadline`; (state, errno_name, elapsed_s). See udp_probe_many."""
    timeout_s = max(0.0, deadline - time.monotonic())
    probes = udp_probe_many([(None, target)], payload, timeout_s=timeout_s)
    for _key, state, name, elapsed in probes:
        return state, name, elapsed
    raise AssertionError("udp_probe_many yielded nothing")  # pragma: no cover


# Service names: getservbyport() reads /etc/services from the top on every call (about 40 us
# with glibc), which would add seconds to a 65,535-row listing. So the first lookups go through
# getservbyport() and, past a handful of misses, the whole file is read once into the cache.
_SERVICES: dict[tuple[int, str], str | None] = {}
_SERVICE_LOOKUPS_BEFORE_BULK = 32
_services_file_state: list[bool] = []  # [True] once the file was read whole, [False] if it failed


def service_name(port: int, proto: str = "tcp") -> str | None:
    """The system services database's name for port/proto (`22`/`tcp` -> `ssh`), cached."""
    key = (port, proto)
    if key in _SERVICES:
        return _SERVICES[key]
    if not _services_file_state and len(_SERVICES) >= _SERVICE_LOOKUPS_BEFORE_BULK:
        _services_file_state.append(_load_services_file("/etc/services"))
        if key in _SERVICES:
            return _SERVICES[key]
    if _services_file_state and _services_file_state[0]:
        _SERVICES[key] = None  # the file was read whole: absent means unknown
        return None
    try:
        name: str | None = socket.getservbyport(port, proto)
    except (OSError, OverflowError):
        name = None
    _SERVICES[key] = name
    return name


def _load_services_file(path: str) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            lines = handle.readlines()
    except OSError:
        return False
    for line in lines:
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2 or "/" not in fields[1]:
            continue
        port_text, _, proto = fields[1].partition("/")
        if port_text.isascii() and port_text.isdigit():
            # The first entry wins, as getservbyport() returns the first match.
            _SERVICES.setdefault((int(port_text), proto), fields[0])
    return True


# ---------------------------------------------------------------------------------------------
# Zero-copy relay (Linux splice)
# ---------------------------------------------------------------------------------------------

SPLICE_AVAILABLE = hasattr(os, "splice") and hasattr(os, "pipe2")
# F_SETPIPE_SZ (Linux 2.6.35+): a 1 MiB pipe moves a bulk stream in fewer system calls.
_F_SETPIPE_SZ = 1031


@dataclass(frozen=True, slots=True)
class RelayResult:
    """How a splice_relay ended.

    Attributes:
        a_to_b, b_to_a: bytes moved each way.
        ended: "eof" (both directions finished), "reset" (one side failed: reset_by says
            which), "stop" (wake_fd became readable) or "error".
        reset_by: "a" or "b" for "reset"/"error".
        errno_name: the errno behind "reset"/"error".
    """

    a_to_b: int
    b_to_a: int
    ended: str
    reset_by: str | None = None
    errno_name: str | None = None


class _SpliceWay:
    __slots__ = ("dst", "eof", "moved", "pending", "pipe_r", "pipe_w", "src")

    def __init__(self, src: int, dst: int, pipe_size: int) -> None:
        self.src, self.dst = src, dst
        self.pipe_r, self.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            import fcntl

            fcntl.fcntl(self.pipe_w, _F_SETPIPE_SZ, pipe_size)
        self.pending = 0  # bytes in the pipe, not yet in dst
        self.eof = False
        self.moved = 0

    @property
    def done(self) -> bool:
        return self.eof and not self.pending

    def close(self) -> None:
        os.close(self.pipe_r)
        os.close(self.pipe_w)


def _shut_write(fd: int) -> None:
    # shutdown() needs a socket object. One over the caller's fd, detached afterwards, leaves
    # the fd open and needs no new descriptor (a dup failed with EMFILE in a process at its
    # limit, and the FIN was silently not passed on).
    sock = socket.socket(fileno=fd)
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the peer is gone already: nothing to tell it
    finally:
        sock.detach()


def splice_relay(
    fd_a: int,
    fd_b: int,
    *,
    wake_fd: int,
    on_moved: Callable[[bool, int], None] | None = None,
    chunk: int = 1 << 20,
) -> RelayResult:
    """Copy both ways between two connected stream sockets with splice(2), in the kernel.

    For a thread of its own: blocks until both directions reached EOF (each EOF is passed
    on as a FIN once its bytes are out), one side failed, or `wake_fd` became readable.
    Both sockets must be non-blocking (as asyncio leaves them; a blocking one could stall
    the relay inside splice). They stay open: the caller owns and closes them.

    Args:
        fd_a, fd_b: the two sockets' file descriptors.
        wake_fd: make it readable (write to its pipe) to stop the relay from another thread.
        on_moved: called with (a_to_b, count) after each count bytes reached a destination.
        chunk: the most bytes moved per system call (also the pipe size asked for).

    Returns:
        RelayResult. Network outcomes are data, never exceptions.
    """
    flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
    first = _SpliceWay(fd_a, fd_b, chunk)
    try:
        second = _SpliceWay(fd_b, fd_a, chunk)
    except OSError:
        first.close()  # out of fds for the second pipe: give back the first one's pair
        raise
    ways = [first, second]
    names = {fd_a: "a", fd_b: "b"}
    poller = select.poll()
    registered: dict[int, int] = {}  # fd -> event mask now registered

    def result(ended: str, fd: int | None = None, number: int | None = None) -> RelayResult:
        return RelayResult(
            ways[0].moved,
            ways[1].moved,
            ended,
            None if fd is None else names[fd],
            errno_name(number),
        )

    ready: set[int] | None = None  # fds poll reported (None: try every way)
    try:
        while True:
            for index, way in enumerate(ways):
                if ready is not None and way.src not in ready and way.dst not in ready:
                    continue
                short = False
                try:
                    while True:
                        if way.pending:
                            sent = os.splice(way.pipe_r, way.dst, way.pending, flags=flags)
                            way.pending -= sent
                            way.moved += sent
                            if on_moved is not None:
                                on_moved(index == 0, sent)
                            continue
                        # A short read has most likely emptied the socket: ask poll before
                        # reading again (saves a failing call per message in a ping-pong).
                        if way.eof or short:
                            break
                        got = os.splice(way.src, way.pipe_w, chunk, flags=flags)
                        if got == 0:
                            way.eof = True
                            _shut_write(way.dst)
                            break
                        way.pending = got
                        short = got < chunk
                except BlockingIOError:
                    pass
                except OSError as exc:
                    # A failed read blames the source, a failed write the destination.
                    culprit = way.dst if way.pending else way.src
                    ended = "reset" if exc.errno in _RELAY_RESET else "error"
                    return result(ended, culprit, exc.errno)
            if all(way.done for way in ways):
                return result("eof")
            wanted: dict[int, int] = {wake_fd: select.POLLIN}
            for way in ways:
                if way.pending:
                    wanted[way.dst] = wanted.get(way.dst, 0) | select.POLLOUT
                elif not way.eof:
                    wanted[way.src] = wanted.get(way.src, 0) | select.POLLIN
            # Touch the poll set only where the interest changed (less work per wake-up).
            for fd in registered.keys() - wanted.keys():
                poller.unregister(fd)
            for fd, mask in wanted.items():
                if fd not in registered:
                    poller.register(fd, mask)
                elif registered[fd] != mask:
                    poller.modify(fd, mask)
            registered = wanted
            events = poller.poll()
            if any(fd == wake_fd for fd, _ in events):
                return result("stop")
            bad = [fd for fd, ev in events if ev & select.POLLNVAL]
            if bad:
                return result("error", bad[0], errno.EBADF)
            ready = {fd for fd, _ in events}
    finally:
        for way in ways:
            way.close()


_RELAY_RESET = _names_to_numbers("ECONNRESET", "EPIPE", "ECONNABORTED", "ETIMEDOUT")
