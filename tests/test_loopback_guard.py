"""`backlog` and `reset proxy` judge a name by the address it resolves to, not by the name.

`localhost` passes the first gate (no resolution is done for other names), but a hosts file
or resolver may point it anywhere. These tests run the CLI in a private network and mount
namespace (`unshare -rnm`) whose /etc/hosts points localhost at 192.0.2.1 (TEST-NET-1): the
namespace has only its own loopback, so even a regression could send nothing off the machine.
Where the host does not allow such namespaces they are skipped, saying why.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import HAS_IPV6
from tests.helpers import LONG, ROOT, invoke

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux namespaces")


def _in_namespace(hosts: Path, argv: list[str]) -> subprocess.CompletedProcess[str]:
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if unshare is None or ip is None:
        pytest.skip("unshare or ip (iproute2) not installed")
    # sh -c SCRIPT HOSTS python -m netprobe ARGS...: $0 is the hosts file, "$@" the command.
    script = f'{ip} link set lo up && mount --bind "$0" /etc/hosts && exec "$@"'
    proc = subprocess.run(
        [unshare, "-rnm", "sh", "-c", script, str(hosts), sys.executable, "-m", "netprobe", *argv],
        capture_output=True,
        text=True,
        timeout=LONG * 4,
        cwd=ROOT,
        check=False,
    )
    if "unshare:" in proc.stderr or "mount:" in proc.stderr:
        pytest.skip(f"no private namespaces here: {proc.stderr.strip()[:200]}")
    return proc


@pytest.fixture
def hosts(tmp_path: Path) -> Path:
    path = tmp_path / "hosts"
    path.write_text("192.0.2.1 localhost\n")
    return path


def test_backlog_refuses_localhost_that_resolves_off_loopback(hosts: Path) -> None:
    proc = _in_namespace(hosts, ["backlog", "localhost:80", "-n", "2", "--timeout", "200ms"])
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1
    assert "localhost resolves to 192.0.2.1" in proc.stderr
    assert "--allow-remote" in proc.stderr


def test_reset_proxy_refuses_upstream_that_resolves_off_loopback(hosts: Path) -> None:
    proc = _in_namespace(
        hosts, ["reset", "proxy", "--listen", "127.0.0.1:0", "--upstream", "localhost:80"]
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1
    assert "localhost resolves to 192.0.2.1" in proc.stderr
    assert "--allow-remote" in proc.stderr


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("::ffff:127.0.0.1", True),
        ("::ffff:127.8.9.10", True),
        ("::ffff:7f00:1", True),
        ("::ffff:127.0.0.0/104", True),
        ("::ffff:10.0.0.1", False),
        ("::ffff:0.0.0.0/96", False),
    ],
)
def test_an_ipv4_mapped_address_is_judged_as_its_ipv4_address(host: str, loopback: bool) -> None:
    # Python 3.13 unwraps it in is_loopback; 3.11 and 3.12 do not: ::ffff:127.0.0.1 was refused
    # as "not a loopback address" there and taken on 3.13.
    from netprobe.sockets import is_loopback

    assert is_loopback(host) is loopback


def test_an_ipv4_mapped_address_is_spelled_as_the_kernel_spells_it() -> None:
    # "::ffff:7f00:1" on Python 3.11 and 3.12, "::ffff:127.0.0.1" on 3.13 and in inet_ntop.
    from netprobe.sockets import resolve

    [found] = resolve("::ffff:7f00:1", 80)
    assert found.host == "::ffff:127.0.0.1"
    [found] = resolve("::ffff:127.0.0.1", 80)
    assert found.host == "::ffff:127.0.0.1"


@pytest.mark.skipif(not HAS_IPV6, reason="no IPv6 on this host")
def test_reset_client_and_backlog_take_an_ipv4_mapped_loopback_address(closed_port: int) -> None:
    # Before (Python 3.11/3.12): exit 2, "::ffff:127.0.0.1 is not a loopback address".
    target = f"[::ffff:127.0.0.1]:{closed_port}"
    client = invoke(["reset", "client", target, "x", "--json"])
    assert client.exit_code == 1, client.stderr
    assert json.loads(client.stdout.splitlines()[0])["state"] == "refused"
    flood = invoke(["backlog", target, "-n", "1", "--json"])
    assert flood.exit_code == 0, flood.stderr
    summary = [json.loads(line) for line in flood.stdout.splitlines()][-1]
    assert (summary["target"], summary["refused"]) == (target, 1), summary
    check = invoke(["port-check", target, "--json"])
    assert json.loads(check.stdout.splitlines()[0])["address"] == "::ffff:127.0.0.1"
