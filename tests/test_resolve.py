"""Name lookups against a DNS server of the test's own (tests/dns_world.py), in a user, mount
and network namespace made for each test: there /etc/resolv.conf names 127.0.0.1 only."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ROOT

WORLD = ROOT / "tests" / "dns_world.py"


def in_dns_world(tmp_path: Path, mode: list[str], argv: list[str]) -> dict[str, Any]:
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare")
    conf = tmp_path / "resolv.conf"
    # The resolver's longest wait (30 s a try, five tries): longer than the world lets a run
    # last, so a run that waits for it is killed and says so.
    conf.write_text("nameserver 127.0.0.1\noptions timeout:30 attempts:5\n")
    script = (
        "ip link set lo up 2>/dev/null || exit 99\n"
        'mount --bind "$1" /etc/resolv.conf 2>/dev/null || exit 99\n'
        "shift\n"
        'exec "$@"\n'
    )
    world = [sys.executable, str(WORLD), *mode, "--", *argv]
    proc = subprocess.run(
        [unshare, "-rnm", "sh", "-c", script, "sh", str(conf), *world],
        capture_output=True,
        timeout=90,
        cwd=ROOT,
        check=False,
    )
    if proc.returncode == 99:
        pytest.skip("cannot make a user, mount and network namespace here")
    assert proc.returncode == 0, proc.stderr.decode()
    report: dict[str, Any] = json.loads(proc.stdout)
    if not report["names"]:
        pytest.skip("the resolver here does not ask the server /etc/resolv.conf names")
    return report


def test_port_check_looks_its_names_up_at_once(tmp_path: Path) -> None:
    # The server answers nothing until all 20 names are asked at once. Before: one lookup
    # after another, the run waited for each (a name whose resolver never answered held up
    # every other for the resolver's whole timeout).
    names = [f"host{i}.np.test:PORT" for i in range(20)]
    report = in_dns_world(tmp_path, ["hold", "20"], ["port-check", *names, "--json"])
    assert report["most_at_once"] == 20, report
    rows = [json.loads(line) for line in report["stdout"].splitlines()]
    assert [(row["target"], row["address"], row["state"]) for row in rows] == [
        (f"host{i}.np.test:{row['port']}", f"127.0.0.{i + 1}", "open") for i, row in enumerate(rows)
    ]
    assert len(rows) == 20
    assert report["code"] == 0, report


def test_wait_looks_names_that_did_not_resolve_up_again_at_once(tmp_path: Path) -> None:
    # No name is known for the first second (NXDOMAIN: a service not up yet); then the server
    # answers only once all ten are asked at once. Before: each round looked the names up
    # again one after another.
    names = [f"host{i}.np.test:PORT" for i in range(10)]
    argv = ["port-check", *names, "--wait", "--deadline", "20s", "--interval", "100ms"]
    report = in_dns_world(tmp_path, ["late", "1", "10"], argv)
    assert report["nxdomains"] >= 10, report
    assert report["most_at_once"] == 10, report
    assert report["code"] == 0, report


@pytest.mark.parametrize(
    ("argv", "signame", "code", "said"),
    [
        (["port-check", "never.np.test:80"], "SIGINT", 130, "looking up names"),
        (["port-check", "never.np.test:80"], "SIGTERM", 143, "looking up names"),
        (["port-check", "never.np.test:80", "x.np.test:80", "127.0.0.1:PORT"], "SIGINT", 130, ""),
        (
            ["port-check", "never.np.test:80", "--wait", "--deadline", "20s"],
            "SIGINT",
            130,
            "nothing checked",
        ),
        (["send", "never.np.test:80", "hello"], "SIGINT", 130, "before the exchange began"),
        (["backlog", "never.np.test:80", "-n", "1", "--allow-remote"], "SIGINT", 130, ""),
    ],
    ids=["port-check", "port-check-term", "port-check-many", "wait", "send", "backlog"],
)
def test_a_signal_during_a_lookup_ends_the_run(
    tmp_path: Path, argv: list[str], signame: str, code: int, said: str
) -> None:
    # The server never answers and the resolver would wait minutes; the signal comes with the
    # first query. Before: getaddrinfo() cannot be interrupted, and the run waited for the
    # resolver to give up (the world kills it at 30 s).
    report = in_dns_world(tmp_path, ["silent", signame], argv)
    assert report["signalled"], report
    assert report["code"] == code, report
    assert said in report["stderr"], report
    assert "Traceback" not in report["stderr"], report


def test_resolve_each_keeps_order_and_reports_each_failure() -> None:
    # Literals need no lookup; a bad name is an AddressError of its own place, not the call's.
    from netprobe.sockets import resolve_each

    results = resolve_each(["127.0.0.1", "a..b", "::1", "127.0.0.2"], 7, family=0)
    assert [type(r).__name__ for r in results] == ["list", "AddressError", "list", "list"]
    assert [r[0].sockaddr[:2] for r in results if isinstance(r, list)] == [
        ("127.0.0.1", 7),
        ("::1", 7),
        ("127.0.0.2", 7),
    ]
    [wrong_family] = resolve_each(["::1"], 7, family=2)
    assert type(wrong_family).__name__ == "ResolveError"
