"""`netprobe doctor`: every self-test passes on this machine, host facts, failure handling."""

from __future__ import annotations

import builtins
import contextlib
import errno
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from netprobe import errors
from netprobe.engines import doctor
from netprobe.engines.doctor import CHECK_NAMES, QUICK_NAMES, Check, Verdict, run_doctor
from netprobe.errors import ConnectError, DeadlineExceeded, LocalError, NetworkError
from netprobe.kernel import HostLimits
from tests.helpers import REAL_ROOT, ROOT, invoke, run_netprobe

HOST_FACTS = {
    "platform",
    "ipv4-loopback",
    "ipv6-loopback",
    "somaxconn",
    "tcp-max-syn-backlog",
    "tcp-syncookies",
    "tcp-abort-on-overflow",
    "ip-local-port-range",
    "rlimit-nofile",
    "cpus",
    "socket-owners",
    "queue-view",
}
SELF_TESTS = {
    "echo-send-tcp",
    "echo-send-udp",
    "echo-send-unix",
    "listen-send",
    "connector",
    "port-check",
    "backlog-lab",
    "listeners",
    "reset-serve",
    "reset-proxy",
    "reset-client",
    "framing",
}
ROW_KEYS = {"kind", "group", "check", "verdict", "figure", "hint", "elapsed_ms"}


def _rows(stdout: bytes) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    lines = [json.loads(line) for line in stdout.decode().splitlines()]
    assert lines, "no output"
    assert lines[-1]["kind"] == "doctor-summary"
    return lines[:-1], lines[-1]


def _doctor_threads() -> list[str]:
    names = ("doctor-", "backlog-", "reset-relay")
    return [t.name for t in threading.enumerate() if t.name.startswith(names)]


@pytest.mark.slow
def test_doctor_json_every_self_test_passes_and_every_host_fact_is_there() -> None:
    # In-process: a leaked socket is a ResourceWarning (an error here), a live thread shows.
    result = invoke(["doctor", "--json"])
    rows, summary = _rows(result.stdout)
    assert {r["kind"] for r in rows} == {"doctor"}
    for row in rows:
        assert set(row) == ROW_KEYS, row
        assert row["figure"], row
        assert row["hint"], row
        assert "\n" not in row["hint"]
    names = [r["check"] for r in rows]
    assert names == list(CHECK_NAMES)
    assert set(names) == HOST_FACTS | SELF_TESTS
    by_group = {g: {r["check"] for r in rows if r["group"] == g} for g in ("host", "selftest")}
    assert by_group == {"host": HOST_FACTS, "selftest": SELF_TESTS}
    not_passed = [r for r in rows if r["group"] == "selftest" and r["verdict"] != "pass"]
    assert not_passed == []
    # B is the kernel's (somaxconn may clamp listen()'s argument): the hint says which it was.
    (lab,) = [r for r in rows if r["check"] == "backlog-lab"]
    assert "queued B+1 = " in lab["hint"], lab
    assert "(B = " in lab["hint"], lab
    # A host fact may warn (e.g. not root: other users' sockets are hidden), never fail here.
    assert [r for r in rows if r["verdict"] == "fail"] == []
    assert summary["ok"] is True
    assert summary["quick"] is False
    assert summary["checks"] == len(rows)
    assert sum(summary[v.value] for v in Verdict) == len(rows)
    assert summary["elapsed_s"] < 10  # the bound; a run takes ~1.5 s here
    assert result.exit_code == 0
    assert _doctor_threads() == []


@pytest.mark.slow
def test_doctor_quick_json_runs_the_quick_subset() -> None:
    # A real process: the README's first command, start-up and exit code included.
    proc = run_netprobe(["doctor", "--quick", "--json"], timeout=30)
    rows, summary = _rows(proc.stdout)
    names = [r["check"] for r in rows]
    assert names == list(QUICK_NAMES)
    assert set(names) < set(CHECK_NAMES)
    assert set(names) >= HOST_FACTS
    assert {"echo-send-tcp", "port-check", "connector", "framing"} <= set(names)
    assert [r for r in rows if r["verdict"] == "fail"] == []
    assert summary["ok"] is True
    assert summary["quick"] is True
    assert summary["elapsed_s"] < 3  # the bound; ~1 s here
    assert proc.returncode == 0


def _ok() -> tuple[Verdict, str, str]:
    return Verdict.PASS, "1", "fine"


def _warn() -> tuple[Verdict, str, str]:
    return Verdict.WARN, "2", "a limit"


def _boom() -> tuple[Verdict, str, str]:
    raise RuntimeError("engine broke\nin two lines")


def test_a_check_that_raises_is_a_fail_row_and_later_checks_still_run() -> None:
    checks = [
        Check("selftest", "boom", _boom, True),
        Check("host", "fine", _ok, False),
    ]
    rows = list(run_doctor(checks=checks))
    assert [(r.check, r.verdict) for r in rows] == [("boom", Verdict.FAIL), ("fine", Verdict.PASS)]
    # No errno: a bug. The class name goes to the hint; the figure says what became of the check.
    assert rows[0].figure == "crashed"
    assert rows[0].hint == "RuntimeError: engine broke in two lines"
    assert [r.check for r in run_doctor(quick=True, checks=checks)] == ["boom"]


def test_cli_exits_1_when_a_check_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    checks = [Check("host", "fine", _ok, True), Check("selftest", "boom", _boom, True)]
    monkeypatch.setattr(doctor, "_CHECKS", checks)
    result = invoke(["doctor", "--json"])
    rows, summary = _rows(result.stdout)
    assert [r["verdict"] for r in rows] == ["pass", "fail"]
    assert summary["ok"] is False
    assert (summary["pass"], summary["fail"]) == (1, 1)
    assert result.exit_code == 1


def test_cli_warnings_do_not_fail_and_plain_output_summarises_on_stderr(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(doctor, "_CHECKS", [Check("host", "limit", _warn, True)])
    result = invoke(["doctor"])
    assert result.exit_code == 0
    assert "limit" in result.text
    assert "warn" in result.text
    assert "doctor: OK: 1 warn" in result.stderr
    quiet = invoke(["doctor", "--quiet"])
    assert (quiet.exit_code, quiet.stdout, quiet.stderr) == (0, b"", "")


# Host-fact verdicts for limits other hosts have (the values are injected; nothing is sent).


def _limits(**changes: Any) -> HostLimits:
    base: dict[str, Any] = {
        "somaxconn": 4096,
        "tcp_max_syn_backlog": 2048,
        "tcp_syncookies": 1,
        "tcp_abort_on_overflow": 0,
        "port_range": (32768, 60999),
        "nofile_soft": 1024,
        "nofile_hard": 4096,
    }
    return HostLimits(**{**base, **changes})


@pytest.mark.parametrize(
    ("check", "changes", "verdict", "in_text"),
    [
        ("somaxconn", {}, Verdict.PASS, "min(B, 4096)+1"),
        ("somaxconn", {"somaxconn": 128}, Verdict.WARN, "clamped to 128"),
        ("somaxconn", {"somaxconn": None}, Verdict.SKIP, "not readable"),
        # SOCKETS.md 1.2/1.3: the SYN-queue cap is the listen backlog (Linux 4.4+); the sysctl
        # only matters with syncookies off (3/4 of it); a full accept queue drops SYNs anyway.
        ("tcp-max-syn-backlog", {}, Verdict.PASS, "cap is the listen backlog"),
        ("tcp-max-syn-backlog", {}, Verdict.PASS, "full accept queue drops SYNs"),
        ("tcp-max-syn-backlog", {"tcp_syncookies": 0}, Verdict.PASS, "about 1536 (3/4 of it)"),
        ("tcp-max-syn-backlog", {"tcp_syncookies": 0}, Verdict.PASS, "pass the listen backlog"),
        ("tcp-syncookies", {}, Verdict.PASS, "overflows"),
        ("tcp-syncookies", {"tcp_syncookies": 0}, Verdict.WARN, "off"),
        ("tcp-syncookies", {"tcp_syncookies": 2}, Verdict.WARN, "always"),
        ("tcp-abort-on-overflow", {}, Verdict.PASS, "SYNs drop (client stuck in SYN-SENT"),
        ("tcp-abort-on-overflow", {}, Verdict.PASS, "final ACK drops"),
        ("tcp-abort-on-overflow", {"tcp_abort_on_overflow": 1}, Verdict.WARN, "RST only when"),
        ("tcp-abort-on-overflow", {"tcp_abort_on_overflow": 1}, Verdict.WARN, "still drop"),
        ("ip-local-port-range", {}, Verdict.PASS, "28232"),
        ("ip-local-port-range", {"port_range": (60000, 61000)}, Verdict.WARN, "1001"),
        ("ip-local-port-range", {"port_range": None}, Verdict.SKIP, "not readable"),
    ],
)
def test_sysctl_verdicts(
    monkeypatch: pytest.MonkeyPatch,
    check: str,
    changes: dict[str, Any],
    verdict: Verdict,
    in_text: str,
) -> None:
    monkeypatch.setattr(doctor, "_limits", lambda: _limits(**changes))
    func = {c.name: c.func for c in doctor._CHECKS}[check]
    got, figure, hint = func()
    assert got is verdict
    assert in_text in figure + " " + hint


def test_nofile_verdict_names_the_limits_and_who_can_raise_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import netprobe.sockets

    monkeypatch.setattr(netprobe.sockets, "nofile_limit", lambda: (1024, 2048))
    monkeypatch.setattr(doctor, "_hard_nofile_raisable", lambda: False)
    monkeypatch.setattr(doctor, "_nr_open", lambda: 1048576)
    verdict, figure, hint = doctor._nofile()
    assert (verdict, figure) == (Verdict.WARN, "soft 1024, hard 2048")
    assert "CAP_SYS_RESOURCE" in hint
    monkeypatch.setattr(netprobe.sockets, "nofile_limit", lambda: (1024, 65536))
    verdict, _figure, hint = doctor._nofile()
    assert verdict is Verdict.PASS
    assert "raises the soft limit up to 65536" in hint
    monkeypatch.setattr(netprobe.sockets, "nofile_limit", lambda: (1048576, 1048576))
    verdict, _figure, hint = doctor._nofile()
    assert verdict is Verdict.PASS
    assert "already fs.nr_open (1048576)" in hint


# Lower the fd limits to 1024:1024 (lowering needs no privilege), then print what doctor's
# rlimit-nofile row says and the limits before and after it ran.
_NOFILE_ROW = """
import json, resource
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
low = 1024 if hard == resource.RLIM_INFINITY else min(hard, 1024)
resource.setrlimit(resource.RLIMIT_NOFILE, (low, low))
before = resource.getrlimit(resource.RLIMIT_NOFILE)
from netprobe.engines import doctor
verdict, figure, hint = doctor._nofile()
after = resource.getrlimit(resource.RLIMIT_NOFILE)
print(json.dumps([str(verdict), hint, before, after]))
"""
# The same limits, then the real question: may this process raise its hard limit?
_NOFILE_TRUTH = """
import resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
low = 1024 if hard == resource.RLIM_INFINITY else min(hard, 1024)
resource.setrlimit(resource.RLIMIT_NOFILE, (low, low))
try:
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, low + 1))
except ValueError:
    sys.exit(1)
"""

# This process's limits as they are: may it raise the hard one?
_NOFILE_TRUTH_AS_IS = """
import resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
try:
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard + 1))
except ValueError:
    sys.exit(1)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX rlimits")
@pytest.mark.parametrize("userns", [False, True], ids=["here", "unshare-r"])
def test_nofile_row_says_what_raising_the_hard_limit_really_does(userns: bool) -> None:
    # Root of a user namespace (a container, `unshare -r`) shows CAP_SYS_RESOURCE in CapEff,
    # but setrlimit checks it in the initial namespace: doctor said "may also raise the hard
    # limit" (pass at hard 1024) and setrlimit then failed.
    prefix: list[str] = []
    if userns:
        unshare = shutil.which("unshare")
        probe = [unshare or "unshare", "-r", "true"]
        if unshare is None or subprocess.run(probe, capture_output=True, check=False).returncode:
            pytest.skip("no unprivileged user namespaces here")
        prefix = [unshare, "-r"]

    def run(code: str) -> subprocess.CompletedProcess[str]:
        argv = [*prefix, sys.executable, "-c", code]
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=20, cwd=ROOT, check=False
        )

    truth = run(_NOFILE_TRUTH)
    assert truth.returncode in (0, 1), truth.stderr
    row = run(_NOFILE_ROW)
    assert row.returncode == 0, row.stderr
    verdict, hint, before, after = json.loads(row.stdout)
    assert after == before  # the try left nothing behind
    if truth.returncode == 0:
        assert verdict == "pass", hint
        assert "tried and works" in hint
    else:
        assert verdict == "warn", hint
        assert "tried and refused" in hint
        assert "may also raise" not in hint


def test_nofile_probe_in_a_threaded_process_restores_the_limits() -> None:
    import resource

    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] == resource.RLIM_INFINITY:
        pytest.skip("no hard limit to raise")
    # A second thread rules out fork(): the probe tries in place and must put the limit back.
    stop = threading.Event()
    helper = threading.Thread(target=stop.wait, name="nofile-helper")
    helper.start()
    try:
        before = resource.getrlimit(resource.RLIMIT_NOFILE)
        got = doctor._hard_nofile_raisable()
        after = resource.getrlimit(resource.RLIMIT_NOFILE)
    finally:
        stop.set()
        helper.join()
    assert after == before
    truth = subprocess.run(
        [sys.executable, "-c", _NOFILE_TRUTH_AS_IS], capture_output=True, timeout=20, check=False
    )
    assert truth.returncode in (0, 1), truth.stderr
    assert got is (truth.returncode == 0)


# socket-owners: what really limits the owners listeners can show. The row is computed in a
# child process placed where the limit holds: a private mount namespace whose /proc has
# hidepid, a user namespace (`unshare -r`), or root without CAP_SYS_PTRACE.
_OWNERS_ROW = """
import encodings.ascii, encodings.utf_8, json, os, pwd, sys
import psutil
from netprobe import kernel
from netprobe.engines import doctor
if sys.argv[1:] == ["nobody"]:  # after the imports: the interpreter may live under /root
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
print(json.dumps([str(v) for v in doctor._socket_owners()]))
"""
_NOBODY = 65534


def _owners_row(prefix: list[str], *args: str) -> tuple[str, str, str]:
    argv = [*prefix, sys.executable, "-c", _OWNERS_ROW, *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr
    verdict, figure, hint = json.loads(proc.stdout)
    return verdict, figure, hint


def _runs(argv: list[str]) -> bool:
    try:
        return subprocess.run(argv, capture_output=True, timeout=20, check=False).returncode == 0
    except OSError:
        return False


@contextlib.contextmanager
def _nobody_process() -> Iterator[None]:
    """A process of another user (nobody) for the duration (needs root to start it)."""
    helper = subprocess.Popen(["sleep", "60"], user=_NOBODY, group=_NOBODY, extra_groups=[])
    try:
        yield
    finally:
        helper.kill()
        helper.wait(timeout=10)


_ROOT = REAL_ROOT


@pytest.mark.skipif(not _ROOT, reason="mounting a /proc with hidepid needs root")
@pytest.mark.parametrize(
    ("hidepid", "name", "unseen"), [("1", "noaccess", "unreadable"), ("2", "invisible", "listed")]
)
def test_socket_owners_warns_when_proc_hides_other_users(
    hidepid: str, name: str, unseen: str
) -> None:
    # hidepid=2 used to pass ("all 1 processes"): the processes it hides are not listed, so
    # none of them failed the fd probe. Root's processes (pytest's) are the other user's.
    mount = f"mount -t proc -o hidepid={hidepid} proc /proc"
    prefix = ["unshare", "-m", "--propagation", "private", "sh", "-c", f'{mount} && exec "$@"', "-"]
    if not _runs([*prefix, "true"]):
        pytest.skip("cannot mount a private /proc here")
    verdict, figure, hint = _owners_row(prefix, "nobody")
    assert verdict == "warn", (figure, hint)
    assert f"hidepid={name}" in figure
    assert unseen in hint
    assert "run as root to see them" in hint
    if name == "noaccess":  # listed but unreadable: counted, and named by /proc/PID's owner
        assert "root (" in hint


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux user namespaces")
def test_socket_owners_in_a_user_namespace_says_so_not_run_as_root() -> None:
    # uid 0 of `unshare -r` is refused other users' fds like anyone: "run as root" was wrong.
    if not _runs(["unshare", "-r", "true"]):
        pytest.skip("no unprivileged user namespaces here")
    import psutil

    with _nobody_process() if _ROOT else contextlib.nullcontext():
        if not any(p.uids().real != os.getuid() for p in psutil.process_iter()):
            pytest.skip("no process of another user to hide")
        verdict, figure, hint = _owners_row(["unshare", "-r"])
    assert verdict == "warn", (figure, hint)
    assert "root of a user namespace" in hint
    assert "run as root to see them" not in hint


@pytest.mark.skipif(not _ROOT or shutil.which("setpriv") is None, reason="needs root, setpriv")
def test_socket_owners_root_without_cap_sys_ptrace_warns() -> None:
    # A container's root: its DAC override lists /proc/PID/fd, but reading the links takes
    # CAP_SYS_PTRACE. Listing alone made the row pass while listeners showed no owners.
    drop = ["setpriv", "--inh-caps=-sys_ptrace", "--bounding-set=-sys_ptrace"]
    with _nobody_process():
        verdict, figure, hint = _owners_row(drop)
    assert verdict == "warn", (figure, hint)
    assert "nobody (1)" in hint
    assert "lacks CAP_SYS_PTRACE" in hint


@pytest.mark.parametrize(
    ("uid", "userns", "ptrace", "says"),
    [
        (0, True, False, "root of a user namespace"),
        (1000, True, False, "uid 1000 of a user namespace"),
        (0, False, False, "lacks CAP_SYS_PTRACE"),
        (0, False, True, "still refused"),
        (1000, False, False, "run as root to see them"),
    ],
)
def test_owners_remedy_names_the_limit(uid: int, userns: bool, ptrace: bool, says: str) -> None:
    assert says in doctor._owners_remedy(uid, userns=userns, ptrace=ptrace)


_QUEUE_CHECKS_OFFLINE = """
from netprobe.engines.doctor import _listeners, _queue_view
for verdict, figure, hint in (_queue_view(), _listeners()):
    print(verdict.value, "|", figure, "|", hint)
"""


def test_queue_checks_fail_when_no_connect_reaches_our_own_listener() -> None:
    # In a network namespace of the test's own with loopback down, every connect fails
    # (ENETUNREACH). Before, queue-view and listeners compared the queue with the connects
    # that succeeded, 0 == 0, and passed without testing anything.
    unshare = shutil.which("unshare")
    probe = [unshare or "unshare", "-rn", "true"]
    if unshare is None or subprocess.run(probe, capture_output=True, check=False).returncode:
        pytest.skip("no unprivileged network namespaces here")
    result = subprocess.run(
        [unshare, "-rn", sys.executable, "-c", _QUEUE_CHECKS_OFFLINE],
        capture_output=True, text=True, timeout=20, cwd=ROOT, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [line.split(" | ") for line in result.stdout.splitlines()]
    assert [(verdict, figure) for verdict, figure, _hint in rows] == [
        ("fail", "0/2 connected"),
        ("fail", "0/3 connected"),
    ]
    assert all("only 0 of" in hint and "ENETUNREACH" in hint for _v, _f, hint in rows)


def _raises(exc: Exception) -> Check:
    def check() -> tuple[Verdict, str, str]:
        raise exc

    return Check("selftest", "raises", check, True)


@pytest.mark.parametrize(
    ("exc", "figure", "in_hint"),
    [
        # What loopback being down used to show: "ConnectError" / "NetworkError" as the figure.
        (ConnectError("connect", errno.ENETUNREACH, "ENETUNREACH", "127.0.0.1:9"),
         "connect: ENETUNREACH", "127.0.0.1:9"),
        (NetworkError("fill accept queue", None, "ENETUNREACH"),
         "fill accept queue: ENETUNREACH", "fill accept queue"),
        (DeadlineExceeded("recv"), "recv: timed out", "recv"),
        (LocalError("cannot bind 127.0.0.1:80: permission denied", "EACCES"),
         "EACCES", "cannot bind 127.0.0.1:80"),
        (OSError(errno.ENOSPC, "No space left on device", "/tmp/x"),
         "ENOSPC", "No space left on device on /tmp/x"),
    ],
)  # fmt: skip
def test_a_check_that_raises_shows_the_errno_and_the_operation_not_the_class(
    exc: Exception, figure: str, in_hint: str
) -> None:
    (row,) = run_doctor(checks=[_raises(exc)])
    assert row.verdict is Verdict.FAIL
    assert row.figure == figure, row
    assert in_hint in row.hint, row
    assert type(exc).__name__ not in row.figure


def test_an_errno_in_the_cause_is_named_too() -> None:
    # Only sockets.py catches OSError; anything else wrapping one keeps it in __cause__.
    try:
        try:
            raise OSError(errno.EMFILE, "Too many open files")
        except OSError as inner:
            raise RuntimeError("could not open the echo listener") from inner
    except RuntimeError as outer:
        exc = outer
    (row,) = run_doctor(checks=[_raises(exc)])
    assert (row.verdict, row.figure) == (Verdict.FAIL, "EMFILE")
    assert row.hint == "could not open the echo listener"


# Every check that exchanges bytes over 127.0.0.1 (echo-send-unix and framing do not).
NEEDS_LOOPBACK = (SELF_TESTS - {"echo-send-unix", "framing"}) | {"queue-view"}
# Figures that would only name the exception that carried a failure.
EXCEPTION_NAMES = {
    name
    for name, obj in vars(builtins).items()
    if isinstance(obj, type) and issubclass(obj, BaseException)
} | set(errors.__all__)


def _doctor_with_loopback_down(
    argv: list[str], setup: str = ""
) -> subprocess.CompletedProcess[bytes]:
    """`python -m netprobe ARGV` in a fresh network namespace, whose loopback is down (as a
    new namespace's always is) unless the `setup` shell commands change it. Skips where no
    namespace can be made."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare")
    if setup and shutil.which("ip") is None:
        pytest.skip("no ip command")
    # -r where unprivileged user namespaces exist; plain -n for root, or inside a namespace
    # whose capabilities allow it (the suite's workers may already run in `unshare -n`).
    for flags in ("-rn", "-n"):
        if _runs([unshare, flags, "true"]):
            run = shlex.join([sys.executable, "-m", "netprobe", *argv])
            cmd = [unshare, flags, "sh", "-c", f"{setup or ':'} && exec {run}"]
            return subprocess.run(cmd, capture_output=True, timeout=60, cwd=ROOT, check=False)
    pytest.skip("no network namespace can be made here (no unshare -n or -rn)")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux network namespaces")
def test_doctor_without_127_0_0_1_skips_what_needs_it() -> None:
    # lo up, 127.0.0.1 gone: listen-send was "crashed" (a RuntimeError around the bind's
    # EADDRNOTAVAIL) and ten more checks failed one by one on the same cause.
    setup = "ip link set lo up && ip addr del 127.0.0.1/8 dev lo"
    proc = _doctor_with_loopback_down(["doctor", "--json"], setup)
    rows, summary = _rows(proc.stdout)
    by_name = {r["check"]: r for r in rows}
    assert by_name["ipv4-loopback"]["verdict"] == "fail", by_name["ipv4-loopback"]
    assert "EADDRNOTAVAIL" in by_name["ipv4-loopback"]["hint"]
    skipped = {r["check"] for r in rows if r["verdict"] == "skip"}
    assert skipped == NEEDS_LOOPBACK
    for name in skipped:
        assert by_name[name]["hint"] == (
            "not run: needs 127.0.0.1, which does not work here (see ipv4-loopback)"
        )
    assert [r["check"] for r in rows if r["verdict"] == "fail"] == ["ipv4-loopback"]
    assert (summary["fail"], proc.returncode) == (1, 1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux network namespaces")
@pytest.mark.parametrize("quick", [False, True], ids=["full", "quick"])
def test_doctor_with_loopback_down_names_the_cause_once_and_skips_what_needs_it(
    quick: bool,
) -> None:
    # It printed "ipv4-loopback fail unreachable ... ENETUNREACH" and then 11 more failures,
    # several with "ConnectError" or "NetworkError" as the figure, and nowhere the cause.
    proc = _doctor_with_loopback_down(["doctor", "--json", *(["--quick"] if quick else [])])
    rows, summary = _rows(proc.stdout)
    by_name = {r["check"]: r for r in rows}
    v4 = by_name["ipv4-loopback"]
    assert v4["verdict"] == "fail"
    assert "loopback interface lo is down" in v4["hint"], v4
    assert "ip link set lo up" in v4["hint"], v4
    assert "ENETUNREACH" in v4["hint"], v4  # what was seen stays next to the cause
    assert list(by_name) == list(QUICK_NAMES if quick else CHECK_NAMES)
    for row in rows:
        assert set(row) == ROW_KEYS, row
        assert row["figure"] not in EXCEPTION_NAMES, row
        assert "\n" not in row["hint"]
    v6 = by_name["ipv6-loopback"]
    assert v6["verdict"] == "warn"
    assert "lo is down" in v6["hint"], v6
    # The remedy is said once; every check that needs 127.0.0.1 is skipped, pointing there.
    assert [r["check"] for r in rows if "ip link set" in r["hint"]] == ["ipv4-loopback"]
    skipped = {r["check"] for r in rows if r["verdict"] == "skip"}
    assert skipped == NEEDS_LOOPBACK & set(by_name)
    for name in skipped:
        assert "lo is down (see ipv4-loopback)" in by_name[name]["hint"], by_name[name]
    # What needs no loopback still runs and passes.
    assert by_name["framing"]["verdict"] == "pass"
    if not quick:
        assert by_name["echo-send-unix"]["verdict"] == "pass"
    assert [r["check"] for r in rows if r["verdict"] == "fail"] == ["ipv4-loopback"]
    assert (summary["ok"], summary["fail"]) == (False, 1)
    assert proc.returncode == 1  # exit codes unchanged: a failed check is 1


def test_a_ctrl_c_during_the_backlog_lab_stops_doctor_with_signals_still_working() -> None:
    # Before: the backlog engine turned the Ctrl-C into an "interrupted" report, which the
    # check took as a pass, and left SIGINT and SIGTERM ignored: doctor ran every later
    # check and exited 0 (10 of 16 runs with the signal aimed there), deaf to both signals.
    import signal

    import psutil

    stop_signals = (signal.SIGINT, signal.SIGTERM)
    before = {sig: signal.getsignal(sig) for sig in stop_signals}
    main = threading.get_ident()

    def press_once_the_flood_runs() -> None:
        # Only while the flood runs: a signal after the check would hit a later test.
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            if any(c.status == psutil.CONN_SYN_SENT for c in psutil.Process().net_connections()):
                signal.pthread_kill(main, signal.SIGINT)
                return
            time.sleep(0.001)

    press = threading.Thread(target=press_once_the_flood_runs)
    press.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            doctor._backlog_lab()
    finally:
        press.join(5.0)
    assert {sig: signal.getsignal(sig) for sig in stop_signals} == before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts /proc/self/fd")
def test_too_few_fds_fail_rlimit_nofile_once_and_skip_the_self_tests() -> None:
    # At `ulimit -n 20` reset-proxy failed as "ended by eof (None) ... expected ECONNRESET",
    # at 12 nine self-tests failed (listeners: "our listener is missing"), and asyncio's
    # half-made event loops printed tracebacks: every one of them was EMFILE.
    import resource

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (14, 14))

    proc = subprocess.run(
        [sys.executable, "-m", "netprobe", "doctor", "--json"],
        capture_output=True,
        timeout=60,
        check=False,
        preexec_fn=low_limit,
    )
    rows, summary = _rows(proc.stdout)
    by_name = {r["check"]: r for r in rows}
    nofile = by_name["rlimit-nofile"]
    assert nofile["verdict"] == "fail", nofile
    assert "the self-tests need about" in nofile["hint"], nofile
    skipped = {r["check"] for r in rows if r["verdict"] == "skip"}
    assert skipped == SELF_TESTS - {"framing"}, rows
    for name in skipped:
        assert "(see rlimit-nofile)" in by_name[name]["hint"], by_name[name]
    assert [r["check"] for r in rows if r["verdict"] == "fail"] == ["rlimit-nofile"]
    assert (summary["fail"], proc.returncode) == (1, 1)
    assert b"Traceback" not in proc.stderr, proc.stderr
    assert b"Exception" not in proc.stderr, proc.stderr
