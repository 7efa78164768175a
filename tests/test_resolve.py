"""Name lookups against a DNS server of the test's own (tests/dns_world.py), in a user, mount
and network namespace made for each test: there /etc/resolv.conf names 127.0.0.1 only."""

from __future__ import annotations

import fcntl
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ROOT, in_name_world

WORLD = ROOT / "tests" / "dns_world.py"


def in_dns_world(tmp_path: Path, mode: list[str], argv: list[str]) -> dict[str, Any]:
    files = {
        # The resolver's longest wait (30 s a try, five tries): longer than the world lets a
        # run last, so a run that waits for it is killed and says so.
        "/etc/resolv.conf": "nameserver 127.0.0.1\noptions timeout:30 attempts:5\n",
        # Names go to /etc/hosts and that server only.
        "/etc/nsswitch.conf": "hosts: files dns\n",
        "/etc/hosts": "127.0.0.1 localhost\n",
    }
    report = in_name_world(tmp_path, WORLD, [*mode, "--", *argv], files)
    if not report["names"]:
        pytest.skip("the resolver here does not ask the server /etc/resolv.conf names")
    return report


def _one_row(tmp_path: Path, mode: list[str], argv: list[str]) -> tuple[int, dict[str, Any]]:
    """The exit code and the one JSON row of `netprobe ARGV --json` in a DNS world."""
    report = in_dns_world(tmp_path, mode, [*argv, "--json"])
    rows = [json.loads(line) for line in report["stdout"].splitlines()]
    assert len(rows) == 1, report
    return report["code"], rows[0]


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
    # (--interval 1s: the pauses between rounds grow to a second, well apart from a round's
    # own burst of queries.)
    argv = ["port-check", *names, "--wait", "--deadline", "20s", "--interval", "1s"]
    report = in_dns_world(tmp_path, ["late", "1", "10"], argv)
    assert report["nxdomains"] >= 10, report
    assert report["most_at_once"] == 10, report
    assert report["code"] == 0, report


@pytest.mark.parametrize(
    ("argv", "signame", "code", "said"),
    [
        (["port-check", "never.np.test:80"], "SIGINT", 130, "before the first check"),
        (["port-check", "never.np.test:80"], "SIGTERM", 143, "before the first check"),
        (["port-check", "never.np.test:80", "x.np.test:80", "127.0.0.1:PORT"], "SIGINT", 130, ""),
        (
            ["port-check", "never.np.test:80", "--wait", "--deadline", "20s"],
            "SIGINT",
            130,
            "nothing checked",
        ),
        (["send", "never.np.test:80", "hello"], "SIGINT", 130, "before the exchange began"),
        (["backlog", "never.np.test:80", "-n", "1", "--allow-remote"], "SIGINT", 130, ""),
        # The servers hold their stop signals from the bind on (until their loop handles
        # them), not during the lookup before it: held there, a Ctrl-C waited for the resolver.
        (["echo", "--host", "never.np.test", "--port", "0"], "SIGINT", 130, ""),
        (["reset", "serve", "--host", "never.np.test", "--port", "0"], "SIGINT", 130, ""),
    ],
    ids=[
        "port-check", "port-check-term", "port-check-many", "wait", "send", "backlog", "echo",
        "reset-serve",
    ],
)  # fmt: skip
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


def test_wait_keeps_to_its_deadline_while_a_lookup_hangs(tmp_path: Path) -> None:
    # The resolver never answers. Before: --deadline 2s waited for the lookup, then for each
    # round's new one (the world kills the run at 30 s).
    argv = ["port-check", "never.np.test:80", "--wait", "--deadline", "2s"]
    code, row = _one_row(tmp_path, ["silent", "none"], argv)
    assert (code, row["state"], row["errno_name"]) == (124, "error", "EAI_AGAIN"), row


@pytest.mark.parametrize(
    ("mode", "deadline"),
    [
        # Answered at its first lookup only: the next round's lookup hangs to the deadline.
        (["once"], "3s"),
        # Answered at once: the pause before the last round ends at the deadline.
        (["answer"], "1s"),
    ],
    ids=["lookup-hangs", "pause-ends-at-deadline"],
)
def test_a_lookup_cut_by_the_deadline_leaves_the_last_verdict_standing(
    tmp_path: Path, mode: list[str], deadline: str
) -> None:
    # once.np.test is 127.0.0.1, where port 1 is closed. Before: a lookup cut short by the
    # deadline (EAI_AGAIN: no answer yet, not "no such name") replaced the last round's real
    # verdict with an error row, address null; a pause ending at the deadline started one
    # more round, whose lookup was cut at once (12 of 12 runs).
    argv = ["port-check", "once.np.test:1", "--wait", "--deadline", deadline]
    code, row = _one_row(tmp_path, mode, argv)
    assert (code, row["address"], row["state"], row["errno_name"]) == (
        124,
        "127.0.0.1",
        "closed",
        "ECONNREFUSED",
    ), row


def test_wait_follows_a_name_to_its_new_address(tmp_path: Path) -> None:
    # mover.np.test names 127.0.0.50 (nobody listens) for its first second, then 127.0.0.7
    # (a service made anew). Before: a name was looked up again only while it did not
    # resolve: the wait probed .50 to the deadline.
    argv = ["port-check", "mover.np.test:PORT", "--wait", "--deadline", "20s"]
    code, row = _one_row(tmp_path, ["answer", "1"], argv)
    assert (code, row["address"], row["state"]) == (0, "127.0.0.7", "open"), row


def test_a_name_with_ipv4_and_ipv6_addresses_is_checked_at_its_ipv4_one(tmp_path: Path) -> None:
    # dual.np.test has 127.0.0.1 and ::1 (as "localhost" has on many hosts); the listener is
    # IPv4 only. getaddrinfo gives ::1 first: checking that alone said "closed" (nmap checks
    # the IPv4 address unless -6).
    code, row = _one_row(tmp_path, ["answer"], ["port-check", "dual.np.test:PORT"])
    assert (code, row["address"], row["state"]) == (0, "127.0.0.1", "open"), row
    code, row = _one_row(tmp_path, ["answer"], ["port-check", "dual.np.test:PORT", "-6"])
    assert (row["address"], row["state"]) == ("::1", "closed"), row


def test_lookup_threads_count_every_job_with_a_small_pipe(monkeypatch: pytest.MonkeyPatch) -> None:
    # The pipe only wakes the caller; the count is kept apart. Before: a worker's byte lost to
    # a full pipe (a user past fs.pipe-user-pages-soft gets 4-8 KiB pipes) was a job never
    # counted, and the caller waited forever. Then every thread is gone (a fork may follow).
    import threading

    from netprobe import sockets

    real_pipe2 = os.pipe2

    def small_pipe2(flags: int) -> tuple[int, int]:
        read_end, write_end = real_pipe2(flags)
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
        return read_end, write_end

    monkeypatch.setattr(os, "pipe2", small_pipe2)
    jobs = [lambda n=n: n for n in range(20000)]
    result: list[object] = []
    runner = threading.Thread(target=lambda: result.extend(sockets._in_lookup_threads(jobs)))
    runner.daemon = True
    runner.start()
    runner.join(60)
    assert not runner.is_alive(), "the lookups never ended"
    assert result == list(range(20000))
    assert not [t for t in threading.enumerate() if t.name == "netprobe-resolve"]


def test_a_name_that_does_not_resolve_given_twice_is_one_row() -> None:
    from netprobe.engines.port_check import Expect, build_hosts, parse_targets
    from netprobe.errors import ResolveError

    def resolver(host: str, family: int) -> list[Any]:
        raise ResolveError("resolve", -2, "EAI_NONAME", "Name or service not known")

    specs = parse_targets(["gone.example:80", "gone.example:80", "gone.example:81"])
    hosts = build_hosts(specs, ports=None, family=0, expect=Expect.OPEN, resolver=resolver)
    assert [(h.name, h.ports, h.error) for h in hosts] == [
        ("gone.example", (80,), "EAI_NONAME"),
        ("gone.example", (81,), "EAI_NONAME"),
    ]


def test_open_only_names_a_name_that_did_not_resolve(tmp_path: Path) -> None:
    # --open-only shows no error row: before, a failed name left only exit 5 behind.
    argv = ["port-check", "never.np.test:80", "127.0.0.1:PORT", "--open-only"]
    report = in_dns_world(tmp_path, ["late", "30", "1"], argv)
    assert report["code"] == 5, report
    assert "port-check: never.np.test: cannot resolve (EAI_NONAME)\n" in report["stderr"], report


def test_the_summary_names_a_slow_lookup(tmp_path: Path) -> None:
    # The server holds the one query until its cap (HOLD_S, 5 s; it waits for two names).
    # The checks' time and rate stay their own; the lookups' time is said apart (before, a
    # slow resolver showed nowhere).
    report = in_dns_world(tmp_path, ["hold", "2"], ["port-check", "slow.np.test:PORT"])
    assert report["code"] == 0, report
    assert re.search(
        r"in \d+\.\d\d s \(\d+ ports/s\), after \d+\.\d\d s of name lookups\n$", report["stderr"]
    ), report


def test_a_wait_that_ran_out_names_its_checks_as_given_and_not_too_many(tmp_path: Path) -> None:
    # mover.np.test stays at 127.0.0.50, where nobody listens, nor on .51-.60. Before: the
    # line named addresses (127.0.0.50:P for the name given), every one of them.
    argv = ["port-check", "mover.np.test:PORT", "127.0.0.50-60:PORT", "--wait", "--deadline", "1s"]
    report = in_dns_world(tmp_path, ["answer"], argv)
    assert report["code"] == 124, report
    [line] = [x for x in report["stderr"].splitlines() if "never held" in x]
    named = re.search(r"never held: (mover\.np\.test:\d+), 127\.0\.0\.51:\d+, .* and 1 more$", line)
    assert named is not None, line
