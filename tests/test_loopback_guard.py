"""`backlog` and `reset proxy` judge a name by the address it resolves to, not by the name.

`localhost` passes the first gate (no resolution is done for other names), but a hosts file
or resolver may point it anywhere. These tests run the CLI in a private network and mount
namespace (`unshare -rnm`) whose /etc/hosts points localhost at 192.0.2.1 (TEST-NET-1): the
namespace has only its own loopback, so even a regression could send nothing off the machine.
Where the host does not allow such namespaces they are skipped, saying why.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import LONG, ROOT

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
