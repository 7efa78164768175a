"""doctor: host facts with verdicts, and a loopback self-test of every subcommand.

Does I/O (loopback sockets only, through the socket core and the engines) and reads host facts
through kernel.py. Yields one CheckResult per check; never prints.
"""

from __future__ import annotations

import platform
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum

__all__ = ["CheckResult", "Verdict", "run_doctor"]


class Verdict(StrEnum):
    PASS = "pass"  # works as netprobe needs it
    WARN = "warn"  # works, with a limit the user should know about
    FAIL = "fail"  # broken: a command that relies on it will not work
    SKIP = "skip"  # not checked here (needs root, or not available on this platform)


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One row of the doctor report.

    Attributes:
        group: "host" (a fact about this machine) or "selftest" (a real loopback exchange).
        check: short name of the check.
        verdict: pass, warn, fail or skip.
        figure: the measured value, as text.
        hint: one line saying what the figure means or what to do.
        elapsed_ms: how long the check took.
    """

    group: str
    check: str
    verdict: Verdict
    figure: str
    hint: str
    elapsed_ms: float
    kind: str = "doctor"


# A check returns (verdict, figure, hint); raising is a FAIL with the exception's text.
CheckFunc = Callable[[], tuple[Verdict, str, str]]


@dataclass(frozen=True, slots=True)
class _Check:
    group: str
    name: str
    func: CheckFunc
    quick: bool  # part of --quick


def run_doctor(*, quick: bool = False) -> Iterator[CheckResult]:
    """Run every check (only the fast ones with quick=True), yielding results in order."""
    for check in _CHECKS:
        if quick and not check.quick:
            continue
        start = time.monotonic()
        try:
            verdict, figure, hint = check.func()
        except Exception as exc:  # a check that crashes is a failed check, not a crash
            verdict, figure, hint = Verdict.FAIL, type(exc).__name__, str(exc) or repr(exc)
        elapsed_ms = (time.monotonic() - start) * 1000
        yield CheckResult(check.group, check.name, verdict, figure, hint, round(elapsed_ms, 2))


# ---------------------------------------------------------------------------------------------
# Host facts
# ---------------------------------------------------------------------------------------------


def _platform() -> tuple[Verdict, str, str]:
    uname = platform.uname()
    figure = f"{uname.system} {uname.release} {uname.machine}, Python {platform.python_version()}"
    if uname.system != "Linux":
        return Verdict.WARN, figure, "kernel queue figures (backlog, listeners) are Linux-only"
    return Verdict.PASS, figure, "Linux: every kernel figure netprobe reports is available"


def _loopback(host: str) -> Callable[[], tuple[Verdict, str, str]]:
    def check() -> tuple[Verdict, str, str]:
        from netprobe import sockets

        try:
            listener = sockets.open_listener(host, 0, backlog=4)
        except Exception as exc:
            verdict = Verdict.WARN if ":" in host else Verdict.FAIL
            return verdict, "unusable", f"cannot listen on {host}: {exc}"
        try:
            port = listener.getsockname()[1]
            target = sockets.resolve(host, port)[0]
            outcome = sockets.connect_nonblocking(target, deadline=time.monotonic() + 2)
        finally:
            listener.close()
        if outcome.state != "open":
            return Verdict.FAIL, str(outcome.state), f"connect to {host} gave {outcome.errno_name}"
        return (
            Verdict.PASS,
            "usable",
            f"{sockets.format_hostport(host, port)} connect in {outcome.elapsed_s * 1000:.2f} ms",
        )

    return check


def _nofile() -> tuple[Verdict, str, str]:
    from netprobe.sockets import nofile_limit

    soft, hard = nofile_limit()
    if soft is None and hard is None:
        return Verdict.SKIP, "unknown", "RLIMIT_NOFILE is not available on this platform"
    figure = f"soft {soft or 'unlimited'}, hard {hard or 'unlimited'}"
    ceiling = hard if hard is not None else soft
    if ceiling is not None and ceiling < 4096:
        return (
            Verdict.WARN,
            figure,
            f"at most ~{ceiling} sockets at once (scans, backlog and echo load)",
        )
    if soft != hard:
        return Verdict.PASS, figure, "netprobe raises the soft limit to the hard one when needed"
    return Verdict.PASS, figure, f"about {soft} sockets at once; only root can raise the hard limit"


# ---------------------------------------------------------------------------------------------
# Self-tests
# ---------------------------------------------------------------------------------------------


def _connector_selftest() -> tuple[Verdict, str, str]:
    """connector against an open, a closed and a full-queue loopback listener."""
    from netprobe import sockets
    from netprobe.connector import ConnectJob, run_connects

    open_l = sockets.open_listener("127.0.0.1", 0, backlog=16)
    full_l = sockets.open_listener("127.0.0.1", 0, backlog=0)
    closed = sockets.open_udp("127.0.0.1", 0)  # holds a port number nobody listens on with TCP
    fillers = []
    try:
        fillers = sockets.fill_accept_queue(full_l, deadline=time.monotonic() + 3)
        ports = {
            "open": open_l.getsockname()[1],
            "closed": closed.getsockname()[1],
            "full": full_l.getsockname()[1],
        }
        jobs = [ConnectJob(name, full_l.family, ("127.0.0.1", p)) for name, p in ports.items()]
        seen = {r.job.key: r.state.value for r in run_connects(jobs, concurrency=3, timeout_s=0.3)}
    finally:
        for f in fillers:
            f.close()
        for s in (open_l, full_l, closed):
            s.close()
    want = {"open": "open", "closed": "refused", "full": "timeout"}
    figure = ", ".join(f"{k}={seen.get(k)}" for k in want)
    if seen != want:
        return Verdict.FAIL, figure, f"expected {want}"
    return (
        Verdict.PASS,
        figure,
        f"full queue held {len(fillers)} = listen(0)+1; a further connect timed out (filtered)",
    )


def _framing_selftest() -> tuple[Verdict, str, str]:
    from netprobe.framing import NEED_DATA, parse_framing

    names = ["raw", "line", "crlf", "len8", "len16", "len32", "len64", "netstring"]
    payloads = [b"hello", b"", b"x" * 200, bytes(range(1, 10))]
    for name in names:
        spec = parse_framing(name)
        frames = payloads if name != "raw" else [b"hello"]
        if name == "len8" or name in {"line", "crlf"}:
            frames = [p for p in frames if len(p) < 256]
        stream = b"".join(spec.encode(p) for p in frames)
        decoder = spec.decoder()
        got: list[bytes] = []
        for i in range(len(stream)):  # one byte at a time: the hardest chunking
            decoder.feed(stream[i : i + 1])
            while (frame := decoder.next_frame()) is not NEED_DATA:
                assert isinstance(frame, bytes)
                got.append(frame)
        if name == "raw":
            got = [b"".join(got)]
        if got != frames:
            return Verdict.FAIL, name, f"{name}: decoded {got!r}, expected {frames!r}"
    crc = zlib.crc32(b"".join(payloads))
    return Verdict.PASS, f"{len(names)} codecs", f"byte-at-a-time round trip, crc32 {crc:08x}"


_CHECKS: list[_Check] = [
    _Check("host", "platform", _platform, True),
    _Check("host", "ipv4-loopback", _loopback("127.0.0.1"), True),
    _Check("host", "ipv6-loopback", _loopback("::1"), True),
    _Check("host", "rlimit-nofile", _nofile, True),
    _Check("selftest", "connector", _connector_selftest, True),
    _Check("selftest", "framing", _framing_selftest, True),
]
