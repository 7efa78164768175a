"""Which address a name means: every command that takes one address of a name takes its first
IPv4 one, else its first (`sockets.preferred`); `send` tries each in turn.

With a Debian-style /etc/hosts (`127.0.0.1 localhost`, `::1 localhost ip6-localhost`) the C
library gives ::1 first. These tests bind such a file over /etc/hosts in a private user, mount
and network namespace (`unshare -rnm`, tests/hosts_world.py), where an IPv4-only server listens
on 127.0.0.1: before, reset client, backlog and reset proxy went to [::1] (refused) and a
server of netprobe's own bound ::1 alone, while send and port-check reached 127.0.0.1.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from netprobe.sockets import Resolved
from tests.helpers import ROOT, in_name_world

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux namespaces")

WORLD = ROOT / "tests" / "hosts_world.py"
DEBIAN_HOSTS = "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n"


def in_hosts_world(tmp_path: Path, mode: str, argv: list[str]) -> dict[str, Any]:
    # /etc/hosts alone answers (nsswitch `files`).
    files = {"/etc/hosts": DEBIAN_HOSTS, "/etc/nsswitch.conf": "hosts: files\n"}
    report = in_name_world(tmp_path, WORLD, [mode, "--", *argv], files)
    if report["localhost_first"] != "::1":
        pytest.skip("the C library here does not give ::1 first for localhost (gai.conf)")
    return report


def _json(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in report["stdout"].splitlines()]


def test_preferred_is_the_first_ipv4_answer_else_the_first() -> None:
    from netprobe.sockets import preferred

    v6 = Resolved(socket.AF_INET6, ("::1", 80, 0, 0))
    v4 = Resolved(socket.AF_INET, ("127.0.0.1", 80))
    other = Resolved(socket.AF_INET, ("127.0.0.2", 80))
    assert preferred([v6, v4, other]) is v4
    assert preferred([v6]) is v6


def test_reset_client_takes_the_ipv4_address_of_localhost(tmp_path: Path) -> None:
    report = in_hosts_world(tmp_path, "run", ["reset", "client", "localhost:PORT", "hi", "--json"])
    first = _json(report)[0]
    # Before: state "refused" (it connected to [::1]), exit 1.
    assert (report["code"], first["state"], first["ended_by"]) == (0, "open", "client-rst"), report


def test_backlog_floods_the_ipv4_address_of_localhost(tmp_path: Path) -> None:
    argv = ["backlog", "localhost:PORT", "-n", "2", "--json"]
    report = in_hosts_world(tmp_path, "run", argv)
    summary = next(row for row in _json(report) if row["kind"] == "backlog")
    # Before: "[::1]:PORT", both attempts refused.
    assert summary["target"].startswith("127.0.0.1:"), report
    assert (summary["established"], summary["refused"]) == (2, 0), summary


@pytest.mark.parametrize("extra", [[], ["--allow-remote"]], ids=["loopback", "allow-remote"])
def test_reset_proxy_connects_upstream_to_the_ipv4_address_of_localhost(
    tmp_path: Path, extra: list[str]
) -> None:
    argv = ["reset", "proxy", "--listen", "127.0.0.1:0", "--upstream", "localhost:PORT", *extra]
    report = in_hosts_world(tmp_path, "proxy", argv)
    # Before: each upstream connect went to [::1] (ECONNREFUSED), the client got nothing.
    assert report["reply"] == "hi", report


def test_reset_proxy_allow_remote_does_not_try_the_other_addresses(tmp_path: Path) -> None:
    # The echo server listens on [::1] alone, where `port-check localhost:P` (127.0.0.1) says
    # closed: so does the proxy. Before: with --allow-remote the name went to the event
    # loop's create_connection, which tried each address in turn and reached [::1].
    argv = ["reset", "proxy", "--upstream", "localhost:PORT", "--allow-remote", "--json"]
    report = in_hosts_world(tmp_path, "proxy6", argv)
    record = next(row for row in _json(report) if row["event"] == "connection")
    assert (report["reply"], record["reason"]) == ("", "connect-error"), report
    assert record["upstream_errno"] == "ECONNREFUSED", report


def test_reset_proxy_allow_remote_still_looks_an_upstream_up_per_connection(
    tmp_path: Path,
) -> None:
    # README: "an --upstream name that does not resolve is not an exit"; each connection's
    # record says so (no resolver here: /etc/hosts alone answers).
    argv = ["reset", "proxy", "--upstream", "nothere.invalid:PORT", "--allow-remote", "--json"]
    report = in_hosts_world(tmp_path, "proxy", argv)
    record = next(row for row in _json(report) if row["event"] == "connection")
    assert (report["code"], report["reply"], record["reason"]) == (0, "", "connect-error"), report
    assert record["upstream_errno"] == "EAI_NONAME", report


def test_a_server_bound_to_localhost_listens_where_port_check_looks(tmp_path: Path) -> None:
    argv = ["echo", "--host", "localhost", "--port", "0", "--duration", "0.1"]
    report = in_hosts_world(tmp_path, "run", argv)
    # Before: "listening on [::1]:P/tcp", and `port-check localhost:P` called it closed.
    assert report["stdout"].startswith("listening on 127.0.0.1:"), report
    assert report["code"] == 0, report


def test_send_udp_sends_to_the_ipv4_address_of_localhost(tmp_path: Path) -> None:
    argv = ["send", "--udp", "localhost:PORT", "hi", "--json"]
    report = in_hosts_world(tmp_path, "run", argv)
    [row] = _json(report)
    # Before: to [::1], answered by an ICMP port unreachable (ECONNREFUSED), exit 1.
    assert row["address"].startswith("127.0.0.1:"), report
    assert (report["code"], row.get("data")) == (0, "hi"), report
