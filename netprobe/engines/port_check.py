"""port-check: expand targets and check TCP/UDP ports (latency probes and wait-until-open are
in netprobe.engines.port_check_modes, built on this module).

Does I/O through netprobe.connector (TCP) and netprobe.sockets (resolution, UDP probes);
never prints. Parsing, the expectation policy, the exit-status choice and the latency
statistics are pure functions, tested without sockets.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import ipaddress
import itertools
import os
import signal
import threading
import time
from collections.abc import Callable, Container, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TextIO

from netprobe.connector import ConnectJob, ConnectorStats, run_connects
from netprobe.errors import AddressError, ResolveError, UsageError
from netprobe.exitcodes import ExitStatus, worst
from netprobe.results import ConnectState
from netprobe.sockets import (
    AF_INET,
    AF_UNIX,
    DEFAULT_CIDR_CAP,
    Resolved,
    expand_hosts,
    format_hostport,
    inet_aton_reading,
    parse_target,
    preferred,
    raise_nofile_limit,
    resolve,
    resolve_each,
    service_name,
    udp_probe_many,
    unix_sockaddr,
    wait_readable,
)
from netprobe.sockets import sleep as sockets_sleep

__all__ = [
    "DEFAULT_CONCURRENCY",
    "MAX_TARGET_LINE",
    "CheckConfig",
    "Expect",
    "HostSpec",
    "PortCheckResult",
    "PortState",
    "Tally",
    "TargetSpec",
    "build_hosts",
    "expectation_met",
    "parse_require",
    "parse_targets",
    "plan_concurrency",
    "read_targets",
    "read_targets_numbered",
    "run_checks",
    "sort_key",
    "status_for",
]

# Sockets in flight by default: enough to keep a LAN scan busy at a 1 s timeout, and cut to
# what RLIMIT_NOFILE allows (raised first when the hard limit permits).
DEFAULT_CONCURRENCY = 4096
_FD_RESERVE = 64  # descriptors kept free for stdio, the poller, pipes and imports
# A run this large is split over two processes (the kernel's connect path is the cost).
_FORK_THRESHOLD = 4096
# The longest --targets-file line, in characters: a target with a long port list fits many
# times over, and a file without newlines is refused after this much, not read into memory.
MAX_TARGET_LINE = 4096
# A --require count with more digits is beyond any run's checks (2**20 addresses of a block
# times 65535 ports is 11 digits), and int() refuses strings over 4300 digits.
_MAX_REQUIRE_DIGITS = 18


class PortState(StrEnum):
    """What a port-check reports, in nmap's vocabulary (SOCKETS.md §3, §4)."""

    OPEN = "open"  # TCP handshake completed / a UDP reply arrived
    CLOSED = "closed"  # RST to the SYN / ICMP port unreachable
    FILTERED = "filtered"  # no answer in time, after retries
    UNREACHABLE = "unreachable"  # EHOSTUNREACH, ENETUNREACH, admin-prohibited
    ERROR = "error"  # anything else, with its errno name (EAI_* for resolution)
    OPEN_FILTERED = "open|filtered"  # UDP silence: a silent service or a firewall drop


class Expect(StrEnum):
    OPEN = "open"
    CLOSED = "closed"


_TCP_STATE = {
    ConnectState.OPEN: PortState.OPEN,
    ConnectState.REFUSED: PortState.CLOSED,
    ConnectState.TIMEOUT: PortState.FILTERED,
    ConnectState.UNREACHABLE: PortState.UNREACHABLE,
    # A reset right after the handshake still proves something accepted the connection.
    ConnectState.RESET: PortState.OPEN,
    ConnectState.ERROR: PortState.ERROR,
    ConnectState.RESOLVE: PortState.ERROR,
}
_UDP_STATE = {**_TCP_STATE, ConnectState.TIMEOUT: PortState.OPEN_FILTERED}
# connect(2) on a Unix socket path ends at once with its own errnos (SOCKETS.md §3): a missing
# file means nothing listens there (closed, like a refusal); EAGAIN is a full accept queue, so
# something listens (open); EACCES is the file's permissions, not a firewall (error);
# EPROTOTYPE is a live socket of another type (a datagram one): no stream listener (closed).
_UNIX_STATE = {
    "ENOENT": ConnectState.REFUSED,
    "ENOTSOCK": ConnectState.REFUSED,
    "EPROTOTYPE": ConnectState.REFUSED,
    "EAGAIN": ConnectState.OPEN,
    "EWOULDBLOCK": ConnectState.OPEN,
    "EACCES": ConnectState.ERROR,
    "EPERM": ConnectState.ERROR,
}
# States that satisfy "closed": nothing accepts a connection there.
_NOT_OPEN = frozenset({PortState.CLOSED, PortState.FILTERED, PortState.UNREACHABLE})


# ---------------------------------------------------------------------------------------------
# Parsing and planning (no I/O)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TargetSpec:
    """One TARGET as given: host (name, literal or CIDR) or Unix socket path (`unix` True),
    optional ports, expectation."""

    text: str
    host: str
    ports: tuple[int, ...] | None
    expect: Expect | None  # None: the command-wide --expect applies
    unix: bool = False


def parse_targets(texts: Iterable[str]) -> list[TargetSpec]:
    """Parse TARGET strings: `HOST`, `HOST:PORTS`, `[V6]:PORTS`, CIDR, each with `=closed`.

    Raises:
        UsageError: a malformed target or expectation (the message names it).
    """
    specs = []
    for text in texts:
        body, expect = text, None
        if "=" in text:
            body, _, suffix = text.rpartition("=")
            try:
                expect = Expect(suffix.strip().lower())
            except ValueError:
                if not text.strip().startswith("unix:"):  # a socket path may hold a '='
                    raise UsageError(
                        f"{text!r}: expectation {suffix!r} must be 'open' or 'closed'"
                    ) from None
                body = text
            if "=" in body and not body.strip().startswith("unix:"):
                # `:80=closed=open`: the first one's error named '80=closed' a bad port.
                raise UsageError(f"{text!r}: one expectation at most (=open or =closed)")
        target = parse_target(body, open_ranges=True)
        if target.path is not None:
            specs.append(TargetSpec(body.strip(), target.path, None, expect, unix=True))
            continue
        assert target.host is not None
        if target.host.isascii() and target.host.isdigit():
            # `port-check HOST 8080`, as `nc -z HOST PORT` takes it: the resolver reads 8080
            # as the address 0.0.31.144 and the run probes that, a host nobody meant.
            address = inet_aton_reading(target.host)  # 017700000001: octal; 4294967296: none
            reads = f"as an address it reads {address}" if address else "nor an address"
            hint = (
                f"write the address itself ({address})"
                if target.ports and address
                else "give HOST:PORT, or the ports with -p"
            )
            raise UsageError(
                f"{body.strip()!r}: {target.host} is a bare number, not a host ({reads}): {hint}"
            )
        specs.append(TargetSpec(body.strip(), target.host, target.ports, expect))
    return specs


def read_targets(stream: TextIO) -> list[str]:
    """Targets from a --targets-file stream (see read_targets_numbered)."""
    return [text for _number, text in read_targets_numbered(stream)]


def read_targets_numbered(stream: TextIO) -> list[tuple[int, str]]:
    """(line number, target) from a --targets-file stream: one target per line; blank lines
    and `#` comments skipped; a byte-order mark before the first line dropped.

    Blanks do not separate targets (as they do for nmap -iL): `HOST:PORT =closed` is one
    target, and `localhost 5432` must not become two hosts (`5432` being 0.0.21.56).

    Each read stops after MAX_TARGET_LINE characters (plus a line end), so a stream without
    newlines (/dev/zero, a binary file) is refused at once instead of filling memory.

    Raises:
        UsageError: a line (comments too) longer than MAX_TARGET_LINE characters; the message
            gives its line number.
    """
    found: list[tuple[int, str]] = []
    number = 0
    while line := stream.readline(MAX_TARGET_LINE + 2):  # room for "\r\n" after a full line
        number += 1
        if number == 1:
            line = line.removeprefix("\ufeff")  # Windows editors write one
        if len(line.removesuffix("\n").removesuffix("\r")) > MAX_TARGET_LINE:
            raise UsageError(
                f"line {number} is longer than {MAX_TARGET_LINE} characters (one target per line)"
            )
        text = line.split("#", 1)[0].strip()
        if text:
            found.append((number, text))
    return found


def parse_require(text: str) -> int | None:
    """`all` -> None, `any` -> 1, `N` -> N (at least 1).

    Raises:
        UsageError: anything else, or a count of more than 18 digits.
    """
    value = text.strip().lower()
    if value == "all":
        return None
    if value == "any":
        return 1
    if value.isascii() and value.isdigit():
        digits = value.lstrip("0")
        # Judged before int(), which refuses strings over 4300 digits.
        if len(digits) > _MAX_REQUIRE_DIGITS:
            raise UsageError(f"--require {text!r} is more checks than any run holds")
        if digits:
            return int(digits)
    raise UsageError(f"--require {text!r}: use all, any or a count of at least 1")


def expectation_met(state: PortState, expect: Expect) -> bool:
    """Whether a state satisfies an expectation ("closed" means nothing accepts there)."""
    if expect is Expect.OPEN:
        return state is PortState.OPEN
    return state in _NOT_OPEN


def answered(state: PortState) -> bool:
    """Whether a verdict of this state came from an answer (a handshake, an RST, an ICMP
    error), so its time is a latency: not a timeout, and not a local error."""
    return state not in (PortState.FILTERED, PortState.OPEN_FILTERED, PortState.ERROR)


def status_for(state: PortState, errno_name: str | None, ok: bool) -> ExitStatus:
    """The exit status one check stands for (OK when its expectation held)."""
    if ok:
        return ExitStatus.OK
    if state in (PortState.FILTERED, PortState.OPEN_FILTERED):
        return ExitStatus.TIMEOUT
    if state is PortState.ERROR:
        if errno_name is not None and errno_name.startswith("EAI_"):
            return ExitStatus.RESOLVE
        return ExitStatus.LOCAL
    return ExitStatus.NOT_OPEN  # closed, unreachable, or open where closed was expected


def plan_concurrency(requested: int | None, jobs: int) -> int:
    """Sockets in flight: the request (or the default), raised fd limit permitting."""
    wanted = requested if requested is not None else DEFAULT_CONCURRENCY
    wanted = max(1, min(wanted, max(jobs, 1)))
    limit = raise_nofile_limit(wanted + _FD_RESERVE)
    if limit.soft is not None:
        wanted = min(wanted, max(1, limit.soft - _FD_RESERVE))
    return wanted


@dataclass(frozen=True, slots=True)
class HostSpec:
    """One address to check (a target expands to one per CIDR member).

    Attributes:
        target: the TARGET text as given (without its `=expect` suffix).
        name: the host this entry stands for (the name, or one member of a CIDR block).
        address: the resolved address, or None when resolution failed.
        family: the address family (0 when unresolved).
        ports: the ports to check there.
        expect: what counts as success for these ports.
        error: the EAI_* name when resolution failed.
        sockaddr: the resolved sockaddr with port 0 (the port is filled in per job).
    """

    target: str
    name: str
    address: str | None
    family: int
    ports: tuple[int, ...]
    expect: Expect
    error: str | None = None
    sockaddr: tuple[Any, ...] = ()

    def address_for(self, port: int) -> Any:
        if self.family == AF_UNIX:
            return self.sockaddr[0]  # the path
        return (self.sockaddr[0], port, *self.sockaddr[2:])

    @property
    def unix(self) -> bool:
        return self.family == AF_UNIX


def build_hosts(
    specs: Sequence[TargetSpec],
    *,
    ports: tuple[int, ...] | None,
    family: int,
    expect: Expect,
    resolver: Callable[[str, int], list[Resolved]] | None = None,
    cidr_cap: int | None = DEFAULT_CIDR_CAP,
    deadline: float | None = None,
) -> list[HostSpec]:
    """Expand CIDR blocks, resolve names (one address each, as nmap: see _host_spec), attach
    ports.

    A name that does not resolve becomes a HostSpec with `error` set (a per-target result,
    exit 5), not an exception; so does one still being looked up at `deadline` (EAI_AGAIN).

    Raises:
        UsageError: a target without a port and no -p, or a CIDR block over the cap.
    """
    hosts: list[HostSpec] = []
    # Expand every block first, so an over-large CIDR fails before any probe is sent.
    expanded: list[tuple[TargetSpec, tuple[int, ...], list[str]]] = []
    for spec in specs:
        if spec.unix:  # a socket path: no ports, nothing to resolve
            expanded.append((spec, (0,), [spec.host]))
            continue
        spec_ports = spec.ports or ports
        if not spec_ports:
            raise UsageError(f"{spec.text!r} has no port: give HOST:PORT or -p PORTS")
        expanded.append((spec, spec_ports, list(expand_hosts(spec.host, cap=cidr_cap))))
    # Names come one to a target; a block's or range's members are literals, looked at one
    # by one below (a /12 is a million of them: no table of answers for those).
    names = [
        members[0] for spec, _ports, members in expanded if not spec.unix and len(members) == 1
    ]
    answers = _resolve_all(names, family, resolver, deadline)
    for spec, spec_ports, members in expanded:
        want = spec.expect or expect
        if spec.unix:
            path = spec.host
            sockaddr = (unix_sockaddr(path),)  # `@name`: the abstract name, not a file
            hosts.append(HostSpec(spec.text, path, path, AF_UNIX, (0,), want, None, sockaddr))
            continue
        ipv4_members = "." in members[0] and ":" not in members[0]
        if len(members) > 1 and ipv4_members and resolver is None and family in (0, AF_INET):
            # An IPv4 block's or range's members are canonical literals already: what
            # resolve() answers for each, without parsing it again (a /12 took 19 s of
            # set-up before its first probe, most of it here).
            hosts.extend(
                HostSpec(spec.text, m, m, AF_INET, spec_ports, want, None, (m, 0)) for m in members
            )
            continue
        for member in members:
            answer = answers.get(member) or _answer(member, family, resolver)
            if isinstance(answer, AddressError):
                # An empty or over-long label, refused before any lookup.
                raise AddressError(f"{spec.text!r}: {member!r} is not a valid host name")
            hosts.append(_host_spec(spec.text, member, spec_ports, want, answer))
    return _without_duplicates(hosts)


def resolve_again(
    hosts: Sequence[HostSpec],
    family: int,
    resolver: Callable[[str, int], list[Resolved]] | None = None,
    *,
    which: Container[int],
    deadline: float | None = None,
) -> list[HostSpec]:
    """`hosts`, the names of those at the indexes in `which` looked up again (all at once,
    as build_hosts does), in the same places: a name may resolve only now, or to another
    address than before (a container made anew). Literals and Unix paths stay."""
    names = [
        host.name
        for index, host in enumerate(hosts)
        if index in which and not host.unix and host.name != host.address
    ]
    if not names:
        return list(hosts)
    answers = _resolve_all(names, family, resolver, deadline)
    again: list[HostSpec] = []
    for host in hosts:
        answer = answers.get(host.name)
        if answer is None or isinstance(answer, AddressError):
            again.append(host)
        else:
            again.append(_host_spec(host.target, host.name, host.ports, host.expect, answer))
    return again


def _host_spec(
    target: str,
    member: str,
    ports: tuple[int, ...],
    expect: Expect,
    answer: list[Resolved] | ResolveError,
) -> HostSpec:
    if isinstance(answer, ResolveError):
        return HostSpec(target, member, None, 0, ports, expect, answer.errno_name or "EAI_FAIL")
    # One address, as nmap checks (IPv4 unless -6), by the rule every command follows.
    first = preferred(answer)
    return HostSpec(target, member, first.host, first.family, ports, expect, None, first.sockaddr)


def _answer(
    member: str, family: int, resolver: Callable[[str, int], list[Resolved]] | None
) -> list[Resolved] | ResolveError | AddressError:
    """One block member's address (a literal: no lookup), or its error."""
    try:
        return resolver(member, family) if resolver else resolve(member, 0, family=family)
    except (ResolveError, AddressError) as exc:
        return exc


def _resolve_all(
    names: list[str],
    family: int,
    resolver: Callable[[str, int], list[Resolved]] | None,
    deadline: float | None = None,
) -> dict[str, list[Resolved] | ResolveError | AddressError]:
    """Each distinct name's addresses or error; the names looked up at once (resolve_each)."""
    distinct = list(dict.fromkeys(names))
    if resolver is None:
        found = resolve_each(distinct, 0, family=family, deadline=deadline)
        return dict(zip(distinct, found, strict=True))
    answers: dict[str, list[Resolved] | ResolveError | AddressError] = {}
    for name in distinct:
        try:
            answers[name] = resolver(name, family)
        except (ResolveError, AddressError) as exc:
            answers[name] = exc
        except UnicodeError:
            answers[name] = AddressError(f"{name!r} is not a valid host name")
    return answers


def _identity(host: HostSpec) -> tuple[int, str]:
    # A name that did not resolve stands for itself: given twice, it is one row too.
    return (host.family, host.address) if host.address is not None else (-1, host.name)


def _without_duplicates(hosts: list[HostSpec]) -> list[HostSpec]:
    """Each address:port once, where it first appears (two targets naming the same address,
    overlapping CIDR blocks or port lists, a name that did not resolve given twice): one row
    and one check each.

    Raises:
        UsageError: the same address:port expected open by one target and closed by another.
    """
    counts: dict[tuple[int, str], int] = {}
    for host in hosts:
        key = _identity(host)
        counts[key] = counts.get(key, 0) + 1
    if all(count == 1 for count in counts.values()):
        return hosts  # the usual case, a full-range scan included: nothing to compare
    seen: dict[tuple[int, str], dict[int, Expect]] = {}
    kept = []
    for host in hosts:
        key = _identity(host)
        if counts[key] == 1:
            kept.append(host)
            continue
        done = seen.setdefault(key, {})
        for port in host.ports:
            if done.get(port, host.expect) is not host.expect:
                where = (
                    f"unix:{host.name}"
                    if host.family == AF_UNIX
                    else format_hostport(host.address or host.name, port)
                )
                raise UsageError(f"{where} is checked twice, expected open and closed")
        ports = tuple(port for port in host.ports if port not in done)
        if not ports:
            continue
        done.update(dict.fromkeys(ports, host.expect))
        kept.append(
            host if len(ports) == len(host.ports) else dataclasses.replace(host, ports=ports)
        )
    return kept


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PortCheckResult:
    """One checked port (or one unresolvable target).

    Attributes:
        target: the TARGET as given.
        address: the address probed (None when the name did not resolve).
        port: the port (None for an unresolvable target with several ports).
        proto: "tcp" or "udp".
        state: open, closed, filtered, unreachable, error or open|filtered.
        errno_name: the errno (ECONNREFUSED, EHOSTUNREACH, EAI_NONAME, ...), if any.
        latency_ms: time to the verdict; None when no answer came (filtered) or on error.
        service: the services database's name for the port, if any.
        expect: the expectation checked.
        ok: whether the expectation held.
        attempts: connects or datagrams sent (more than 1 after --retries).
    """

    target: str
    address: str | None
    port: int | None
    proto: str
    state: PortState
    errno_name: str | None
    latency_ms: float | None
    service: str | None
    expect: Expect
    ok: bool
    attempts: int = 1


@dataclass(slots=True)
class Tally:
    """Running totals over results: counts per state, the requirement, the exit status."""

    required: int | None = None  # None: every check must hold
    expected: int | None = None  # how many checks the run makes, where known beforehand
    total: int = 0
    ok: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    failing: set[ExitStatus] = field(default_factory=set)
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    _seen: set[tuple[PortState, str | None]] = field(default_factory=set, repr=False)

    def add(self, result: PortCheckResult) -> None:
        self.count(result.state, result.errno_name, result.ok)

    def count(self, state: PortState, errno_name: str | None, ok: bool, number: int = 1) -> None:
        """Count checks without building their results (the --open-only fast path)."""
        self.total += number
        # A StrEnum member hashes and compares as its value, so it can key the str dict.
        self.counts[state] = self.counts.get(state, 0) + number
        if ok:
            self.ok += number
        elif (state, errno_name) not in self._seen:
            self._seen.add((state, errno_name))
            self.failing.add(status_for(state, errno_name, False))

    def merge(self, other: Tally) -> None:
        """Add another tally's counts (a worker process's share of a scan)."""
        self.total += other.total
        self.ok += other.ok
        for state, number in other.counts.items():
            self.counts[state] = self.counts.get(state, 0) + number
        self.failing |= other.failing
        self._seen |= other._seen

    def holds(self) -> bool:
        """Whether the --require condition holds over the results so far."""
        if self.required is None:
            return self.total > 0 and self.ok == self.total
        return self.ok >= self.required

    def exit_status(self) -> ExitStatus:
        if self.holds():
            return ExitStatus.OK
        return worst(self.failing) if self.failing else ExitStatus.NOT_OPEN

    def decided(self) -> ExitStatus | None:
        """The exit status for a run cut short, once the results so far settle pass or fail
        (more results cannot turn it): success once --require N checks held; a failure when
        every check must hold and one did not, with the worst failure code so far (a later
        result might have been graver: a resolve or local error); success when every check
        must hold and all `expected` did. None while it is open."""
        if self.required is None:
            if self.failing:
                return worst(self.failing)
            held = self.expected is not None and self.ok >= self.expected
            return ExitStatus.OK if held else None
        return ExitStatus.OK if self.ok >= self.required else None

    def finish(self) -> None:
        self.ended = time.monotonic()

    @property
    def elapsed_s(self) -> float:
        return (self.ended if self.ended is not None else time.monotonic()) - self.started

    def summary(self) -> str:
        """`65535 ports: 50 open, 65485 closed in 0.52 s (126024 ports/s)`."""
        order = [s.value for s in PortState]
        parts = [f"{self.counts[s]} {s}" for s in order if self.counts.get(s)]
        elapsed = self.elapsed_s
        rate = self.total / elapsed if elapsed > 0 else 0.0
        noun = "port" if self.total == 1 else "ports"
        counts = ", ".join(parts) if parts else "nothing checked"
        return f"{self.total} {noun}: {counts} in {elapsed:.2f} s ({rate:.0f} ports/s)"


@dataclass(frozen=True)
class CheckConfig:
    """Options shared by every mode (the CLI builds one)."""

    timeout_s: float = 1.0
    concurrency: int | None = None
    retries: int = 0
    rate: float | None = None
    udp: bool = False
    payload: bytes = b""
    workers: int | None = None  # None: two for large TCP runs on a multi-core host


def _result(
    host: HostSpec,
    port: int | None,
    proto: str,
    state: PortState,
    errno_name: str | None,
    elapsed_s: float | None,
    attempts: int,
) -> PortCheckResult:
    if host.family == AF_UNIX:
        proto, port = "unix", None
    latency = None
    if elapsed_s is not None and answered(state):
        latency = round(elapsed_s * 1000.0, 3)
    return PortCheckResult(
        host.target,
        host.address,
        port,
        proto,
        state,
        errno_name,
        latency,
        service_name(port, proto) if port is not None else None,
        host.expect,
        expectation_met(state, host.expect),
        attempts,
    )


def _unresolved(host: HostSpec, proto: str) -> PortCheckResult:
    port = host.ports[0] if len(host.ports) == 1 else None
    return _result(host, port, proto, PortState.ERROR, host.error, None, 1)


# ---------------------------------------------------------------------------------------------
# One pass over every port (the default mode)
# ---------------------------------------------------------------------------------------------


# A check is keyed by one int: host index << 16 | port. Keys and jobs are lazy sequences, so a
# /16 times 65,535 ports costs no memory up front, and forked workers fetch only their share.


class _AllKeys(Sequence[int]):
    """Every (resolved host, port) key, in order, computed on access."""

    def __init__(self, hosts: Sequence[HostSpec]) -> None:
        self._hosts = [(i, h.ports) for i, h in enumerate(hosts) if h.error is None]
        self._starts = list(itertools.accumulate((len(p) for _i, p in self._hosts), initial=0))

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, index: Any) -> Any:
        if not isinstance(index, int) or not 0 <= index < len(self):
            raise IndexError(index)
        if len(self._hosts) == 1:  # the common single-host scan: no search needed
            host_index, ports = self._hosts[0]
            return (host_index << 16) | ports[index]
        slot = bisect.bisect_right(self._starts, index) - 1
        host_index, ports = self._hosts[slot]
        return (host_index << 16) | ports[index - self._starts[slot]]

    def __iter__(self) -> Iterator[int]:
        for host_index, ports in self._hosts:
            base = host_index << 16
            for port in ports:
                yield base | port


class _KeyedJobs(Sequence[ConnectJob]):
    """The connect job of each key, built on access."""

    def __init__(self, hosts: Sequence[HostSpec], keys: Sequence[int]) -> None:
        self._hosts = hosts
        self._keys = keys

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, index: Any) -> Any:
        return self._job(self._keys[index])

    def _job(self, key: int) -> ConnectJob:
        host = self._hosts[key >> 16]
        return ConnectJob(key, host.family, host.address_for(key & 0xFFFF))

    def __iter__(self) -> Iterator[ConnectJob]:
        # The hot loop of a scan: one job per port, so per-host parts are looked up once.
        hosts, last, family, address, unix = self._hosts, -1, 0, "", False
        tail: tuple[Any, ...] = ()
        for key in self._keys:
            index = key >> 16
            if index != last:
                host, last = hosts[index], index
                family, address, tail = host.family, host.sockaddr[0], tuple(host.sockaddr[2:])
                unix = family == AF_UNIX
            if unix:  # the path is the whole address
                yield ConnectJob(key, family, address)
                continue
            port = key & 0xFFFF
            yield ConnectJob(key, family, (address, port, *tail) if tail else (address, port))


def _all_keys(hosts: Sequence[HostSpec]) -> _AllKeys:
    return _AllKeys(hosts)


def _probe(
    hosts: Sequence[HostSpec],
    keys: Sequence[int],
    config: CheckConfig,
    *,
    concurrency: int,
    timeout_s: float,
    stats: ConnectorStats | None = None,
    on_refused: Callable[[ConnectJob], None] | None = None,
) -> Iterator[tuple[int, ConnectState, str | None, float]]:
    """One attempt per key: (key, state, errno_name, elapsed_s) in completion order.

    With `on_refused` (TCP only), refused attempts go there instead of being yielded."""
    if config.udp:
        items = ((key, _udp_target(hosts, key)) for key in keys)
        yield from udp_probe_many(
            items,
            config.payload,
            timeout_s=timeout_s,
            concurrency=concurrency,
            rate=config.rate,
        )
        return
    results = run_connects(
        _KeyedJobs(hosts, keys),
        concurrency=concurrency,
        timeout_s=timeout_s,
        rate=config.rate,
        stats=stats,
        on_refused=on_refused,
    )
    unix = {i for i, host in enumerate(hosts) if host.family == AF_UNIX}
    if not unix:
        yield from ((r.job.key, r.state, r.errno_name, r.elapsed_s) for r in results)
        return
    for r in results:
        state = r.state
        if r.job.key >> 16 in unix:
            state = _UNIX_STATE.get(r.errno_name or "", state)
        yield r.job.key, state, r.errno_name, r.elapsed_s


def _udp_target(hosts: Sequence[HostSpec], key: int) -> Resolved:
    host = hosts[key >> 16]
    return Resolved(host.family, host.address_for(key & 0xFFFF))


def _job_count(hosts: Sequence[HostSpec]) -> int:
    return sum(len(h.ports) for h in hosts if h.error is None)


def _workers_for(config: CheckConfig, jobs: int) -> int:
    if config.workers is not None:
        return config.workers
    if config.udp or config.rate or jobs < _FORK_THRESHOLD:
        return 1
    from netprobe.kernel import runnable_tasks, usable_cpus

    # Inside `taskset -c 0` or a one-CPU container a second process only takes turns with us.
    if usable_cpus() < 2:
        return 1
    cores = os.cpu_count() or 1
    # A second process only pays when a core is idle; on a busy host it only adds work
    # (measured on 2 cores: up to 2x slower at load 3-6, 1.6-1.9x faster when idle). What
    # counts is now: the runnable tasks at this instant besides us, host-wide as the count is.
    # The 1-minute load average still carries work that ended seconds ago (a scan just before
    # this one, say).
    running = runnable_tasks()
    if running is not None:
        return 2 if running - 1 <= cores - 2 else 1
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return 2 if busy < cores else 1


def run_checks(
    hosts: Sequence[HostSpec],
    config: CheckConfig,
    stats: ConnectorStats | None = None,
    *,
    tally: Tally | None = None,
    open_only: bool = False,
) -> Generator[PortCheckResult, None, None]:
    """Check every port of every host once (plus retries of timeouts); yield as they end.

    Results stream in completion order; attempts that time out are retried `config.retries`
    times and reported after their last attempt. With `tally`, every result is counted there;
    `open_only` then yields only open ports (the others are counted without being built).
    A large open-only TCP scan is split over forked processes when cores are idle (see
    _split_checks).
    """
    proto = "udp" if config.udp else "tcp"
    for host in hosts:
        if host.error is not None:
            result = _unresolved(host, proto)
            if tally is not None:
                tally.add(result)
            if not open_only:
                yield result
    jobs = _job_count(hosts)
    if not jobs:
        return
    keys = _all_keys(hosts)
    workers = _workers_for(config, jobs)
    if workers > 1 and open_only and tally is not None and _can_fork():
        yield from _split_checks(hosts, config, keys, workers, stats, tally)
        return
    yield from _one_pass(hosts, config, keys, stats, tally, open_only)


def _one_pass(
    hosts: Sequence[HostSpec],
    config: CheckConfig,
    keys: Sequence[int],
    stats: ConnectorStats | None,
    tally: Tally | None,
    open_only: bool,
) -> Iterator[PortCheckResult]:
    proto = "udp" if config.udp else "tcp"
    concurrency = plan_concurrency(config.concurrency, len(keys))
    silent: list[int] = []
    states = _UDP_STATE if config.udp else _TCP_STATE
    # Ports left out by open_only are counted here in bulk and folded into the tally at the end.
    skipped: dict[tuple[PortState, str | None, Expect], int] = {}
    timeout, is_open = ConnectState.TIMEOUT, PortState.OPEN
    # An open-only TCP scan counts refusals per host without building a result for each:
    # closed ports are most of a scan.
    count_refused = open_only and not config.udp
    refused = [0] * len(hosts) if count_refused else []

    def on_refused(job: ConnectJob) -> None:
        refused[job.key >> 16] += 1

    try:
        for attempt in range(1, config.retries + 2):
            last = attempt == config.retries + 1
            silent = []
            started = time.monotonic()
            for key, state, errno_name, elapsed in _probe(
                hosts,
                keys,
                config,
                concurrency=concurrency,
                timeout_s=config.timeout_s,
                stats=stats,
                on_refused=on_refused if count_refused else None,
            ):
                if state is timeout and not last:
                    silent.append(key)
                    continue
                mapped = states[state]
                if open_only and mapped is not is_open:
                    bucket = (mapped, errno_name, hosts[key >> 16].expect)
                    skipped[bucket] = skipped.get(bucket, 0) + 1
                    continue
                result = _result(
                    hosts[key >> 16], key & 0xFFFF, proto, mapped, errno_name, elapsed, attempt
                )
                if tally is not None:
                    tally.add(result)
                yield result
            if not silent:
                return
            if config.rate:
                # --rate holds across passes: the pass started its attempts 1/rate apart, and
                # a retry must not follow its pass's last one sooner (a new connector pass
                # would start at once).
                rest = started + len(keys) / config.rate - time.monotonic()
                if rest > 0:
                    sockets_sleep(rest)
            keys = sorted(silent)
    finally:
        if count_refused:
            closed = _TCP_STATE[ConnectState.REFUSED]
            for index, number in enumerate(refused):
                if number:
                    bucket = (closed, "ECONNREFUSED", hosts[index].expect)
                    skipped[bucket] = skipped.get(bucket, 0) + number
        if tally is not None:
            for (mapped, errno_name, expect), number in skipped.items():
                tally.count(mapped, errno_name, expectation_met(mapped, expect), number)


class _Stride(Sequence[int]):
    """Every `step`-th key from `start`: one worker's share, computed on access."""

    def __init__(self, keys: Sequence[int], start: int, step: int) -> None:
        self._keys, self._start, self._step = keys, start, step

    def __len__(self) -> int:
        return max(0, (len(self._keys) - self._start + self._step - 1) // self._step)

    def __getitem__(self, index: Any) -> Any:
        if not isinstance(index, int) or not 0 <= index < len(self):
            raise IndexError(index)
        return self._keys[self._start + index * self._step]

    def __iter__(self) -> Iterator[int]:
        # Skipping inside the keys' own iterator: indexing _AllKeys per key costs a search
        # and two Python calls, a fifth of a worker's time per port.
        return itertools.islice(iter(self._keys), self._start, None, self._step)


def _can_fork() -> bool:
    # fork() in a threaded process can deadlock the child (a lock held by another thread is
    # never released there), so threaded callers (tests, backlog's worker) scan in-process.
    return hasattr(os, "fork") and threading.active_count() == 1


def _split_checks(
    hosts: Sequence[HostSpec],
    config: CheckConfig,
    keys: Sequence[int],
    workers: int,
    stats: ConnectorStats | None,
    tally: Tally,
) -> Iterator[PortCheckResult]:
    """An open-only scan over `workers` processes: key i is checked in process i % workers.

    The kernel's connect path is most of a loopback scan's cost, and this process's Python
    loop the rest, so each forked worker runs its share with its own tally and sends back only
    what open-only output needs: the open results and its counts (a pickle over a pipe, once
    at the end). A worker that fails has its share checked again here: nothing is dropped.
    Interrupted (Ctrl-C, or SIGTERM as KeyboardInterrupt), the workers are stopped too and
    what they checked so far is yielded and counted before the interrupt goes on.
    """
    children: list[tuple[int, int, int]] = []  # (worker, pid, read end of its pipe)
    received: dict[int, bytearray] = {}  # per pipe: what was read of its report so far
    done: set[int] = set()  # pipes whose report was taken

    def merge(report: _Report) -> list[PortCheckResult]:
        results, counts, extra, _whole = report
        tally.merge(counts)
        if stats is not None:
            for name, value in extra.items():
                if name != "workers":
                    stats.extra[name] = stats.extra.get(name, 0) + value
            stats.extra["workers"] = workers
        return results

    try:
        for worker in range(1, workers):
            read_fd, write_fd = os.pipe()
            # The worker is born with its stop signals held, so one that comes before its
            # handlers are set waits for them instead of killing it with its share; here they
            # wait until the worker is on the list the cleanup below stops.
            held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, *_WORKER_STOPS})
            try:
                pid = os.fork()
                if pid == 0:  # pragma: no cover - the child never returns
                    os.close(read_fd)
                    for _worker, _pid, fd in children:
                        os.close(fd)
                    _child_checks(hosts, config, _Stride(keys, worker, workers), write_fd)
                os.close(write_fd)
                children.append((worker, pid, read_fd))
                received[read_fd] = bytearray()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
        try:
            yield from _one_pass(hosts, config, _Stride(keys, 0, workers), stats, tally, True)
            for worker, _pid, fd in children:
                report = _read_report(fd, received[fd])
                done.add(fd)
                if report is None or not report[3]:
                    # Died, or stopped by a signal of its own (SIGTERM to it alone) while this
                    # run goes on: its whole share is checked here instead.
                    yield from _one_pass(
                        hosts, config, _Stride(keys, worker, workers), stats, tally, True
                    )
                    continue
                yield from merge(report)
        except KeyboardInterrupt:
            # The interrupted run still reports every port checked so far: the workers' open
            # ones too, found maybe long ago (the table's rows and the counts would leave them
            # out). A worker stops on SIGUSR1 and sends what it has.
            late = [(pid, fd) for _worker, pid, fd in children if fd not in done]
            for pid, _fd in late:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGUSR1)
            give_up = time.monotonic() + _WORKER_REPORT_S
            for _pid, fd in late:
                report = _read_report(fd, received[fd], give_up)
                done.add(fd)
                if report is not None:
                    yield from merge(report)
            raise
    finally:
        for _worker, pid, fd in children:
            with contextlib.suppress(OSError):
                os.close(fd)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)  # a no-op for a worker that already exited
            with contextlib.suppress(OSError):
                os.waitpid(pid, 0)


# How long an interrupted split scan waits for its workers' reports (a worker stops within a
# connect timeout's poll; a stuck one is killed and its share is left out of the counts).
_WORKER_REPORT_S = 1.0
# What stops a worker early, its report still sent: SIGUSR1 from the parent when the run is
# interrupted, SIGTERM sent to the whole process group.
_WORKER_STOPS = frozenset((signal.SIGUSR1, signal.SIGTERM))
# A worker's report: its open results, its counts, its connector figures, and whether it
# checked its whole share (False: a signal stopped it).
_Report = tuple[list[PortCheckResult], "Tally", dict[str, int], bool]


def _read_report(fd: int, received: bytearray, give_up: float | None = None) -> _Report | None:
    """A worker's report from its pipe, read to EOF into `received` (kept by the caller, so a
    read that an interrupt cut short goes on where it was); None: none came whole (or none
    before `give_up`, a monotonic time)."""
    import pickle  # only split scans need it; kept off the start-up path

    while True:
        if give_up is not None and not wait_readable([fd], give_up):
            return None
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        received += chunk
    try:
        report = pickle.loads(bytes(received))
    except Exception:  # a worker that died mid-write leaves a truncated pickle
        return None
    return report if isinstance(report, tuple) and len(report) == 4 else None


# In a worker: set once it stops (or has checked its share), so a later stop does nothing.
_worker_done: list[bool] = []


def _stop_worker(_signum: int, _frame: Any) -> None:  # pragma: no cover - in a forked worker
    # Once: a second stop (SIGTERM to the group, then the parent's SIGUSR1 ms later) must not
    # cut the first one's cleanup, which folds the closed ports into the counts. (Setting
    # SIG_IGN here instead makes CPython print "Signal 15 ignored due to race condition" for
    # one already on its way.)
    if _worker_done:
        return
    _worker_done.append(True)
    raise KeyboardInterrupt


def _child_checks(
    hosts: Sequence[HostSpec], config: CheckConfig, keys: Sequence[int], write_fd: int
) -> None:  # pragma: no cover - runs in a forked worker
    import pickle

    code = 1
    try:
        # The parent owns Ctrl-C: it stops the run, and then this worker with SIGUSR1, whose
        # report of what it checked until then the parent still shows and counts. The stop
        # signals are held since the fork (see _split_checks) until their handler is set.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stats = ConnectorStats()
        tally = Tally()
        results: list[PortCheckResult] = []
        whole = False
        for stop in _WORKER_STOPS:
            signal.signal(stop, _stop_worker)
        try:
            # Inside the try: a stop that waited since the fork acts here, at once.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _WORKER_STOPS)
            # Kept one by one (not list()): an interrupt keeps what came before it.
            for result in _one_pass(hosts, config, keys, stats, tally, True):
                results.append(result)  # noqa: PERF402
            _worker_done.append(True)
            whole = True
        except KeyboardInterrupt:
            pass
        payload = memoryview(pickle.dumps((results, tally, stats.extra, whole)))
        while payload:
            payload = payload[os.write(write_fd, payload) :]
        code = 0
    except BaseException:
        code = 1
    finally:
        os._exit(code)


def sort_key(address: str | None, port: int | None, target: str) -> tuple[Any, ...]:
    """Table order: by address (numerically, IPv4 before IPv6), then port; names last."""
    if address is None:
        return (2, 0, target, port or 0)
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return (2, 0, address, port or 0)
    return (0 if ip.version == 4 else 1, int(ip), "", port or 0)
