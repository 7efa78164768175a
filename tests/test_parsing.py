"""Target, port, duration and size parsing: pure functions, no sockets."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

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
from tests.helpers import invoke


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
        ("--5", "is not a port"),
        ("-5", "'-5' is not a port"),
        ("1-", "'' is not a port"),
        ("1-x", "'x' is not a port"),
        ("5-1-", "runs backwards|is not a port"),
    ],
)
def test_parse_ports_rejects(spec: str, needle: str) -> None:
    with pytest.raises(AddressError, match=needle):
        parse_ports(spec)


def test_parse_ports_takes_nmaps_open_ranges_for_port_check_only() -> None:
    # nmap's `-p-`, `-p 60000-` and `-p -1024` were refused ("'-' is not a port number").
    assert parse_ports("-", open_ranges=True) == tuple(range(1, 65536))
    assert parse_ports("65530-", open_ranges=True) == (65530, 65531, 65532, 65533, 65534, 65535)
    assert parse_ports("-3,22", open_ranges=True) == (1, 2, 3, 22)
    # Elsewhere (`send 127.0.0.1:-1`) a leading or trailing '-' is a typo, not a range.
    for spec in ("-", "-1", "65535-"):
        with pytest.raises(AddressError, match="is not a port"):
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
    # Inclusive, as nmap: the network and broadcast addresses are hosts to check too.
    assert list(expand_hosts("192.0.2.0/30")) == [f"192.0.2.{i}" for i in range(4)]
    assert list(expand_hosts("192.0.2.7/32")) == ["192.0.2.7"]
    assert list(expand_hosts("192.0.2.6/31")) == ["192.0.2.6", "192.0.2.7"]
    assert list(expand_hosts("example.org")) == ["example.org"]
    assert len(list(expand_hosts("2001:db8::/120"))) == 256
    with pytest.raises(AddressError, match="above the cap"):
        list(expand_hosts("10.0.0.0/15"))
    assert next(expand_hosts("10.0.0.0/12", cap=None)) == "10.0.0.0"  # 2**20: the most
    with pytest.raises(AddressError, match="even with --allow-large"):
        next(expand_hosts("10.0.0.0/8", cap=None))
    with pytest.raises(AddressError, match="even with --allow-large"):
        next(expand_hosts("2001:db8::/64", cap=None))  # used to expand for ever


@given(st.integers(0, 2**32 - 1), st.integers(22, 32))
def test_expand_hosts_of_an_ipv4_block_is_what_ipaddress_lists(base: int, prefix: int) -> None:
    # IPv4 blocks are listed with inet_ntoa over integers, not ipaddress objects (speed).
    block = f"{ipaddress.IPv4Address(base)}/{prefix}"
    expected = [str(address) for address in ipaddress.ip_network(block, strict=False)]
    assert list(expand_hosts(block)) == expected


def test_expand_hosts_takes_address_ranges_as_nmap_does() -> None:
    # `127.0.0.1-3` was looked up as a name (EAI_AGAIN, exit 5) while `backlog --source`
    # took the same range.
    assert list(expand_hosts("127.0.0.1-3")) == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    assert list(expand_hosts("127.0.0.1-02")) == ["127.0.0.1", "127.0.0.2"]  # as nmap
    assert list(expand_hosts("127.0.0.254-127.0.1.1")) == [
        "127.0.0.254",
        "127.0.0.255",
        "127.0.1.0",
        "127.0.1.1",
    ]
    assert list(expand_hosts("::1-::2")) == ["::1", "::2"]
    assert list(expand_hosts("my-host.example")) == ["my-host.example"]  # a name, dash and all
    assert list(expand_hosts("fe80::1%lo-fe80::2%lo")) == ["fe80::1%lo", "fe80::2%lo"]
    assert list(expand_hosts("fe80::1-fe80::2%lo")) == ["fe80::1%lo", "fe80::2%lo"]
    with pytest.raises(AddressError, match="different zones"):
        list(expand_hosts("fe80::1%lo-fe80::2%eth9"))
    with pytest.raises(AddressError, match="runs backwards"):
        list(expand_hosts("127.0.0.9-3"))
    with pytest.raises(AddressError, match="300 is no octet"):
        list(expand_hosts("127.0.0.1-300"))  # was looked up as a name
    with pytest.raises(AddressError, match="above the cap"):
        list(expand_hosts("10.0.0.0-10.1.0.0"))


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


# A port that int() cannot even convert (Python refuses strings over 4300 digits) used to
# surface as `internal error: ValueError`; the digits are judged before any conversion.
@pytest.mark.parametrize("spec", ["9" * 5000, "1-" + "9" * 5000, "9" * 5000 + "-1", "100000"])
def test_parse_ports_refuses_a_port_of_any_length(spec: str) -> None:
    with pytest.raises(AddressError, match="is out of range 1-65535"):
        parse_ports(spec)


def test_parse_ports_reads_through_leading_zeros() -> None:
    assert parse_ports("0" * 5000 + "80") == (80,)
    assert parse_ports("065535") == (65535,)
    with pytest.raises(AddressError, match="port 65536 is out of range"):
        parse_ports("0065536")


@pytest.mark.parametrize(
    "text", ["127.0.0.1:" + "9" * 5000, "[::1]:" + "9" * 5000, "127.0.0.1:0" + "9" * 5000]
)
def test_parse_host_port_refuses_a_port_of_any_length(text: str) -> None:
    with pytest.raises(AddressError, match="is out of range 0-65535"):
        parse_host_port(text)
    with pytest.raises(AddressError, match="is out of range 1-65535"):
        parse_target(text)


@pytest.mark.parametrize("text", ["127.0.0.0/8:80", "192.0.2.0/30:0", "127.0.0.1/32:80"])
def test_parse_host_port_refuses_a_block(text: str) -> None:
    with pytest.raises(AddressError, match="a block where one address is needed"):
        parse_host_port(text)


@pytest.mark.parametrize("text", ["[::1%]:80", "::1%", "[fe80::1%]", "fe80::1%/128"])
def test_empty_ipv6_zone_is_refused(text: str) -> None:
    with pytest.raises(AddressError, match="empty zone after %"):
        parse_target(text)


def test_empty_ipv6_zone_is_refused_for_one_address() -> None:
    with pytest.raises(AddressError, match="empty zone after %"):
        parse_host_port("[::1%]:80")
    assert parse_host_port("[fe80::1%lo]:80") == ("fe80::1%lo", 80)


@pytest.mark.parametrize(
    ("text", "count"),
    [
        ("1.5K", 1536),
        ("0.5KiB", 512),
        ("1.1MB", 1_100_000),  # a float would make it 1100000.0000000002
        ("2.0", 2),
        ("3.", 3),
        ("1." + "0" * 5000, 1),
        ("0.000001MB", 1),
        ("0" * 5000 + "7", 7),
    ],
)
def test_parse_size_takes_fractions_that_come_out_whole(text: str, count: int) -> None:
    assert parse_size(text) == count


@pytest.mark.parametrize(
    "text", ["0.5", "1.5", "0.1K", "1.0000001MB", "1." + "5" * 5000, "0.0000001MB"]
)
def test_parse_size_refuses_a_fraction_of_a_byte(text: str) -> None:
    with pytest.raises(UsageError, match=r"is not a whole number of bytes"):
        parse_size(text)


def test_parse_size_names_the_value_as_given() -> None:
    with pytest.raises(UsageError, match=r"^' 0.5 ' is not a whole number of bytes"):
        parse_size(" 0.5 ")
    with pytest.raises(UsageError, match=r"^'0.5/s' is not a whole number of bytes per second"):
        parse_size("0.5/s", per_second=True)


# \d matches every Unicode digit (float() takes them too); the port parser refuses them, and
# durations and sizes now do as well.
# Case-insensitive matching is ASCII-only too: Unicode folding let "1\u017f" (long s) match
# the unit "s" and then miss the unit table (`internal error: KeyError`).
@pytest.mark.parametrize(
    "text", ["\uff15s", "\u0663s", "1\uff10ms", ".\u0665", "1\u017f", "1m\u017f", "1\u212a"]
)
def test_parse_duration_takes_ascii_only(text: str) -> None:
    with pytest.raises(UsageError, match="is not a duration"):
        parse_duration(text)


@pytest.mark.parametrize("text", ["\uff11K", "\u0663", "1.\uff15K", "1\u212a", "1K\u0131B"])
def test_parse_size_takes_ascii_only(text: str) -> None:
    with pytest.raises(UsageError, match="is not a size"):
        parse_size(text)


def test_cidr_prefix_takes_ascii_digits_only() -> None:
    with pytest.raises(AddressError, match="is not a host name or address"):
        parse_target("127.0.0.0/\u0668:80")


@pytest.mark.parametrize("text", ["[::1%lo]:80", "::1%lo", "2001:db8::1%eth0", "[ff05::1%lo]"])
def test_a_zone_on_an_address_that_is_not_link_local_is_refused(text: str) -> None:
    # The resolver refuses it (EAI_NONAME): it read as "does not resolve" (exit 5).
    with pytest.raises(AddressError, match="applies only to a link-local address"):
        parse_target(text)


@pytest.mark.parametrize(
    "text", ["[fe80::1%lo]:80", "fe80::1%lo", "[ff02::1%lo]", "ff12::1%lo", "ff01::1%lo"]
)
def test_a_zone_on_a_link_local_address_is_kept(text: str) -> None:
    assert "%lo" in (parse_target(text).host or "")


@pytest.mark.parametrize("text", ["[::1%1]:80", "2001:db8::1%1"])
def test_a_numeric_zone_is_kept_on_any_address(text: str) -> None:
    # glibc takes a numeric zone on any address: refusing it broke what used to work.
    assert "%1" in (parse_target(text).host or "")


@pytest.mark.parametrize(
    "text",
    ["[fe80::1%no-such-if]:80", "fe80::1%nosuch", "[fe80::1%4000000]:80", "[::1%4000000]:80"],
)
def test_a_zone_that_names_no_interface_is_refused(text: str) -> None:
    # An unknown name read as "does not resolve" (EAI_NONAME, exit 5), a scope id of no
    # interface as "unreachable" (ENETUNREACH, exit 1): a typo, bad input as other zone slips.
    with pytest.raises(AddressError, match="names no network interface of this host"):
        parse_target(text)


@pytest.mark.parametrize(
    "argv",
    [
        ["port-check", "[fe80::1%no-such-if]:80"],
        ["echo", "--host", "fe80::1%nosuch"],
        ["send", "[fe80::1%nosuch]:80", "x"],
    ],
)
def test_a_zone_that_names_no_interface_is_exit_2(argv: list[str]) -> None:
    result = invoke(argv)
    assert result.exit_code == 2, result.stderr
    assert "names no network interface" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize(
    "text", ["fe80::1%lo-fe80::3%lo", "fe80::1%lo-fe80::3", "[fe80::1%lo-fe80::3%lo]:80"]
)
def test_a_range_of_zoned_addresses_is_still_a_target(text: str) -> None:
    # The zone check read `lo-fe80::3%lo` as one interface name and refused the range.
    parse_target(text)
    with pytest.raises(AddressError, match="%eth9 names no network interface"):
        parse_target(text.replace("%lo", "%eth9", 1))


def test_a_link_local_block_keeps_its_zone_on_every_address() -> None:
    # Without the zone a link-local connect fails EINVAL: the scan reported every port `error`.
    assert list(expand_hosts("fe80::%lo/127")) == ["fe80::%lo", "fe80::1%lo"]
    assert list(expand_hosts("fe80::/127")) == ["fe80::", "fe80::1"]


@pytest.mark.parametrize("text", ["999.1.1.1:80", "256.0.0.1", "1.2.3.4.5:80", "300.0.0.0/8"])
def test_digits_and_dots_out_of_range_are_no_address_and_no_name(text: str) -> None:
    # They went to the resolver as names: "does not resolve" (exit 5), a DNS query sent.
    from netprobe.errors import AddressError
    from netprobe.sockets import parse_target

    with pytest.raises(AddressError, match=r"is not an IPv4 address \(four numbers of 0-255\)"):
        parse_target(text)


@pytest.mark.parametrize(
    "argv",
    [
        ["port-check", "999.1.1.1:80"],
        ["send", "999.1.1.1:80"],
        ["echo", "--host", "999.1.1.1", "--port", "0", "--duration", "0.2"],
        ["reset", "client", "999.1.1.1:80"],
    ],
    ids=["port-check", "send", "echo", "reset-client"],
)
def test_an_out_of_range_address_is_bad_input(argv: list[str]) -> None:
    from tests.helpers import bad_input_line

    assert "'999.1.1.1' is not an IPv4 address" in bad_input_line(argv)
