"""Target, port, duration and size parsing: pure functions, no sockets."""

from __future__ import annotations

import pytest

from netprobe.errors import AddressError, UsageError
from netprobe.sockets import (
    expand_hosts,
    format_hostport,
    is_loopback,
    parse_duration,
    parse_host_port,
    parse_ports,
    parse_size,
    parse_target,
)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("22", (22,)),
        ("1-3", (1, 2, 3)),
        ("22,80,8000-8002", (22, 80, 8000, 8001, 8002)),
        ("80,22,80,21-23", (80, 22, 21, 23)),  # duplicates removed, order kept
        (" 443 ", (443,)),
    ],
)
def test_parse_ports(spec: str, expected: tuple[int, ...]) -> None:
    assert parse_ports(spec) == expected


def test_parse_ports_all() -> None:
    ports = parse_ports("all")
    assert ports[0] == 1
    assert ports[-1] == 65535
    assert len(ports) == 65535


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("", "empty"),
        ("abc", "'abc' is not a port"),
        ("99999", "99999 is out of range"),
        ("0", "0 is out of range"),
        ("10-5", "runs backwards"),
        ("22,,80", "empty item"),
        ("-5", "'-5' is not a port"),
        ("1-", "'' is not a port"),
    ],
)
def test_parse_ports_rejects(spec: str, needle: str) -> None:
    with pytest.raises(AddressError, match=needle):
        parse_ports(spec)


@pytest.mark.parametrize(
    ("text", "host", "ports", "path"),
    [
        ("example.org", "example.org", None, None),
        ("127.0.0.1:22", "127.0.0.1", (22,), None),
        ("localhost:80,443", "localhost", (80, 443), None),
        ("[::1]:8080", "::1", (8080,), None),
        ("[::1]", "::1", None, None),
        ("::1", "::1", None, None),
        ("fe80::1%lo", "fe80::1%lo", None, None),
        ("2001:db8::/126", "2001:db8::/126", None, None),
        ("192.0.2.0/30", "192.0.2.0/30", None, None),
        ("192.0.2.0/30:22", "192.0.2.0/30", (22,), None),
        ("unix:/tmp/x.sock", None, None, "/tmp/x.sock"),
    ],
)
def test_parse_target(
    text: str, host: str | None, ports: tuple[int, ...] | None, path: str | None
) -> None:
    target = parse_target(text)
    assert (target.host, target.ports, target.path) == (host, ports, path)
    assert target.text == text


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("host:99999", "out of range"),
        ("host:abc", "not a port"),
        ("host:10-5", "runs backwards"),
        ("[::1", "without a closing"),
        ("[::1]x", "expected ':PORT'"),
        ("[nothex]:80", "not an IPv6 address"),
        ("unix:", "needs a socket path"),
        ("", "empty target"),
        (":80", "missing host"),
        ("host:", "missing port"),
        ("bad host:80", "not a host name"),
        ("10.0.0.0/99", "bad CIDR"),
        ("1:2:3", "not an IPv6 address"),
    ],
)
def test_parse_target_rejects(text: str, needle: str) -> None:
    with pytest.raises(AddressError, match=needle):
        parse_target(text)


def test_parse_host_port() -> None:
    assert parse_host_port("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_host_port("[::1]:9") == ("::1", 9)
    with pytest.raises(AddressError, match="HOST:PORT"):
        parse_host_port("127.0.0.1")
    with pytest.raises(AddressError, match="out of range"):
        parse_host_port("127.0.0.1:70000")


def test_expand_hosts() -> None:
    assert list(expand_hosts("192.0.2.0/30")) == ["192.0.2.1", "192.0.2.2"]
    assert list(expand_hosts("192.0.2.7/32")) == ["192.0.2.7"]
    assert list(expand_hosts("192.0.2.6/31")) == ["192.0.2.6", "192.0.2.7"]
    assert list(expand_hosts("example.org")) == ["example.org"]
    assert len(list(expand_hosts("2001:db8::/120"))) == 255
    with pytest.raises(AddressError, match="above the cap"):
        list(expand_hosts("10.0.0.0/15"))
    assert next(expand_hosts("10.0.0.0/12", cap=None)) == "10.0.0.1"  # 2**20: the most
    with pytest.raises(AddressError, match="even with --allow-large"):
        next(expand_hosts("10.0.0.0/8", cap=None))
    with pytest.raises(AddressError, match="even with --allow-large"):
        next(expand_hosts("2001:db8::/64", cap=None))  # used to expand for ever


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1.5", 1.5), ("250ms", 0.25), ("2s", 2.0), ("1m", 60.0), ("0", 0.0), ("100us", 1e-4)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(("text", "needle"), [("soon", "not a duration"), ("-1", "negative")])
def test_parse_duration_rejects(text: str, needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "count"),
    [
        ("100", 100),
        ("64K", 65536),
        ("64KiB", 65536),
        ("64KB", 64000),
        ("1MB", 10**6),
        ("2G", 2 << 30),
    ],
)
def test_parse_size(text: str, count: int) -> None:
    assert parse_size(text) == count


def test_parse_size_per_second() -> None:
    assert parse_size("1KB/s", per_second=True) == 1000
    with pytest.raises(UsageError, match="not a size"):
        parse_size("1KB/s")
    with pytest.raises(UsageError, match="negative"):
        parse_size("-3")


def test_loopback_and_format() -> None:
    assert is_loopback("127.0.0.2")
    assert is_loopback("::1")
    assert is_loopback("localhost")
    assert not is_loopback("192.0.2.1")
    assert not is_loopback("example.org")
    assert format_hostport("::1", 80) == "[::1]:80"
    assert format_hostport("127.0.0.1", None) == "127.0.0.1"
