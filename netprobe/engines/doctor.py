"""doctor: host facts with verdicts, and a loopback self-test of every subcommand.

Does I/O: loopback sockets only, always through the socket core and the real engines (servers
run in threads here and are always stopped), and host facts read through kernel.py. Yields
one CheckResult per check; never prints.

Strategy: every check is a plain function returning (verdict, figure, hint), run in order by
run_doctor. A check that raises becomes a FAIL row naming the errno and the operation, so
one broken engine never hides the others. When 127.0.0.1 fails because the loopback interface
is down, the ipv4-loopback row says so with the remedy, and the checks that need loopback are
skipped with that reason instead of each failing on its own. Each self-test exchanges real
bytes (random payloads, compared by crc32 in both directions) and bounds every wait with a
deadline: the whole run stays under 10 s, `--quick` (host facts plus the fast self-tests)
under 3 s. Nothing needs root: the checks that would show more as root (other users' sockets)
say so instead of failing.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from netprobe.engines.send import SendResult
    from netprobe.kernel import HostLimits
    from netprobe.server import Bound, Server

__all__ = ["CHECK_NAMES", "QUICK_NAMES", "Check", "CheckResult", "Verdict", "run_doctor"]


class Verdict(StrEnum):
    PASS = "pass"  # works as netprobe needs it
    WARN = "warn"  # works, with a limit the user should know about
    FAIL = "fail"  # broken: a command that relies on it will not work
    SKIP = "skip"  # not checked here (not available on this platform), with the reason


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
Outcome = tuple[Verdict, str, str]
CheckFunc = Callable[[], Outcome]


@dataclass(frozen=True, slots=True)
class Check:
    """One entry of the check list: where it belongs, its name, the function, --quick or not."""

    group: str
    name: str
    func: CheckFunc
    quick: bool  # part of --quick
    needs_loopback: bool = False  # exchanges over 127.0.0.1: skipped when loopback is down
    needs_fds: bool = False  # opens sockets: skipped when too few descriptors are left


def run_doctor(
    *, quick: bool = False, checks: Sequence[Check] | None = None
) -> Iterator[CheckResult]:
    """Run every check (only the fast ones with quick=True), yielding results in order.

    Args:
        quick: only the checks marked quick (host facts and the fast self-tests).
        checks: the checks to run instead of the built-in list (tests use it).
    """
    # Once ipv4-loopback failed: (figure, why) for the checks that need 127.0.0.1.
    no_loopback: tuple[str, str] | None = None
    short_of_fds: tuple[str, str] | None = None  # (figure, hint) when the self-tests cannot run
    fds_looked_at = False
    for check in _CHECKS if checks is None else checks:
        if quick and not check.quick:
            continue
        if check.needs_fds:
            if not fds_looked_at:
                short_of_fds, fds_looked_at = _short_of_fds(), True
            if short_of_fds is not None:
                # Each would fail on EMFILE, but where is chance: a reset proxy that could
                # not reach its upstream reads as a bug of its own. One cause, said once.
                figure = short_of_fds[0]
                hint = (
                    f"not run: the self-tests need about {_SELFTEST_FDS} free file "
                    "descriptors (see rlimit-nofile)"
                )
                yield CheckResult(check.group, check.name, Verdict.SKIP, figure, hint, 0.0)
                continue
        if no_loopback is not None and check.needs_loopback:
            # Every exchange would fail the same way (ENETUNREACH, EADDRNOTAVAIL): one cause,
            # said once.
            figure, why = no_loopback
            hint = f"not run: needs 127.0.0.1, {why} (see {_LOOPBACK_CHECK})"
            yield CheckResult(check.group, check.name, Verdict.SKIP, figure, hint, 0.0)
            continue
        start = time.monotonic()
        try:
            verdict, figure, hint = check.func()
        except Exception as exc:  # a check that crashes is a failed check, not a crash
            verdict = Verdict.FAIL
            figure, hint = _describe_failure(exc)
        elapsed_ms = (time.monotonic() - start) * 1000
        yield CheckResult(check.group, check.name, verdict, figure, hint, round(elapsed_ms, 2))
        if check.name == _LOOPBACK_CHECK and verdict is Verdict.FAIL:
            lo_down = _loopback_down()
            no_loopback = (
                (f"{lo_down} down", f"and {lo_down} is down")
                if lo_down is not None
                else ("no 127.0.0.1", "which does not work here")
            )


# The self-tests, one at a time, hold up to 13 descriptors more than doctor at rest (measured:
# reset-proxy, its server, proxy, client and the event loop's own); a margin on top.
_SELFTEST_FDS = 16


def _short_of_fds() -> tuple[str, str] | None:
    """(figure, hint) when too few file descriptors are left for the self-tests, after
    raising the soft limit as far as the hard one allows; None when there are enough (or
    the count is not known here)."""
    from netprobe.sockets import raise_nofile_limit

    limit = raise_nofile_limit(256)
    if limit.soft is None:
        return None
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            in_use = len(os.listdir(folder)) - 1  # less the one listdir used
        except OSError:
            continue
        break
    else:
        return None
    free = limit.soft - in_use
    if free >= _SELFTEST_FDS:
        return None
    return (
        f"{free} fds free",
        f"the self-tests need about {_SELFTEST_FDS} free file descriptors; RLIMIT_NOFILE "
        f"allows {limit.soft} and {in_use} are in use (raise it: ulimit -n 1024)",
    )


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _errno_of(exc: BaseException) -> str | None:
    """The errno name an exception carries, itself or in its cause (sockets.py raises
    NetworkError from the OSError)."""
    from netprobe.sockets import errno_name

    seen: BaseException | None = exc
    for _ in range(8):  # a cause chain is short; the bound rules out a cycle
        if seen is None:
            break
        name = getattr(seen, "errno_name", None)
        if isinstance(name, str) and name:
            return name
        if isinstance(seen, OSError) and seen.errno is not None:
            return errno_name(seen.errno)
        seen = seen.__cause__
    return None


def _describe_failure(exc: Exception) -> tuple[str, str]:
    """(figure, hint) for a check that raised: the errno and the operation that failed, so
    the row tells what broke rather than which exception class carried it."""
    from netprobe.errors import DeadlineExceeded, NetworkError

    message = _one_line(str(exc) or repr(exc))
    errno = _errno_of(exc)
    if isinstance(exc, NetworkError):
        return f"{exc.op}: {errno or 'error'}", message
    if isinstance(exc, DeadlineExceeded):
        return f"{exc.op}: timed out", message
    if isinstance(exc, OSError):
        what = f" on {exc.filename}" if exc.filename is not None else ""
        return errno or "OS error", f"{exc.strerror or message}{what}"
    if errno is not None:
        return errno, message
    # No errno: a bug or a broken invariant. The class goes in the hint, where it helps a
    # report; the figure says what happened to the check.
    return "crashed", f"{type(exc).__name__}: {message}"


# Every blocking step of a self-test is bounded by this (loopback answers in microseconds;
# the margin is for a loaded 2-core CI machine).
_STEP_S = 2.0
# A server thread must be gone this long after stop() (the core promises about 1 s).
_STOP_S = 2.0


# ---------------------------------------------------------------------------------------------
# Host facts
# ---------------------------------------------------------------------------------------------


def _platform() -> Outcome:
    uname = platform.uname()
    figure = f"{uname.system} {uname.release} {uname.machine}, Python {platform.python_version()}"
    if uname.system != "Linux":
        return Verdict.WARN, figure, "kernel queue figures (backlog, listeners) are Linux-only"
    return Verdict.PASS, figure, "Linux: every kernel figure netprobe reports is available"


_LOOPBACK_CHECK = "ipv4-loopback"  # the check whose failure makes run_doctor ask why
_IFF_UP = 0x1  # <linux/if.h>


def _loopback_down() -> str | None:
    """The name of the loopback interface when it is down; None when it is up or unknown.

    psutil asks the kernel (SIOCGIFFLAGS) in this process's network namespace. The sysfs file
    is only the fallback: /sys shows the interfaces of the namespace that mounted it, so in a
    fresh `unshare -n` (lo down) /sys/class/net/lo/flags still reads the host's lo, up.
    """
    try:
        import psutil

        stats = psutil.net_if_stats()
    except (ImportError, OSError):
        stats = None
    if stats is not None:
        for name, stat in stats.items():
            if name in ("lo", "lo0") or "loopback" in stat.flags.split(","):
                return None if stat.isup else name
        return None
    try:
        with open("/sys/class/net/lo/flags", encoding="ascii") as handle:
            flags = int(handle.read(), 16)
    except (OSError, ValueError):
        return None
    return None if flags & _IFF_UP else "lo"


def _lo_remedy(name: str) -> str:
    if name == "lo":
        return f"`ip link set {name} up` (root or CAP_NET_ADMIN in this network namespace)"
    return f"`ifconfig {name} up` (as root)"  # BSD and macOS call it lo0


def _loopback(host: str) -> CheckFunc:
    def check() -> Outcome:
        from netprobe import sockets

        # No ::1 (IPv6 disabled) only costs the -6 options; no 127.0.0.1 breaks everything.
        failed = Verdict.WARN if ":" in host else Verdict.FAIL
        try:
            listener = sockets.open_listener(host, 0, backlog=4)
        except Exception as exc:
            return _loopback_failed(failed, "unusable", f"cannot listen on {host}: {exc}")
        try:
            port = listener.getsockname()[1]
            target = sockets.resolve(host, port)[0]
            outcome = sockets.connect_nonblocking(target, deadline=time.monotonic() + _STEP_S)
        finally:
            listener.close()
        if outcome.state != "open":
            return _loopback_failed(
                failed, str(outcome.state), f"connect to {host} gave {outcome.errno_name}"
            )
        return (
            Verdict.PASS,
            "usable",
            f"{sockets.format_hostport(host, port)} connect in {outcome.elapsed_s * 1000:.2f} ms",
        )

    return check


def _loopback_failed(verdict: Verdict, figure: str, what: str) -> Outcome:
    """A loopback check's failure row, naming the cause when it is a loopback interface that
    is down (a fresh network namespace: ENETUNREACH on 127.0.0.1, no ::1 at all)."""
    name = _loopback_down()
    if name is None:
        return verdict, figure, what
    # The remedy goes on the row that fails the run; the ::1 row points there.
    then = (
        f"see {_LOOPBACK_CHECK}"
        if verdict is Verdict.WARN
        else f"bring it up with {_lo_remedy(name)}"
    )
    return verdict, f"{name} down", f"the loopback interface {name} is down ({what}); {then}"


def _limits() -> HostLimits:
    from netprobe import kernel

    return kernel.host_limits()


def _unreadable(name: str) -> Outcome:
    return Verdict.SKIP, "unknown", f"{name} is not readable here (Linux /proc/sys only)"


def _somaxconn() -> Outcome:
    value = _limits().somaxconn
    if value is None:
        return _unreadable("net.core.somaxconn")
    figure = str(value)
    if value < 1024:
        return (
            Verdict.WARN,
            figure,
            f"every listen() backlog is clamped to {value}: a backlog lab above it queues only "
            f"{value}+1 (modern default 4096)",
        )
    return (
        Verdict.PASS,
        figure,
        f"listen(B) queues min(B, {value})+1 connections before the kernel drops SYNs",
    )


def _syn_backlog() -> Outcome:
    limits = _limits()
    value = limits.tcp_max_syn_backlog
    if value is None:
        return _unreadable("net.ipv4.tcp_max_syn_backlog")
    if limits.tcp_syncookies == 0:
        return (
            Verdict.PASS,
            str(value),
            "syncookies off: SYNs drop once SYN-RECV requests pass the listen backlog, "
            f"or about {value * 3 // 4} (3/4 of it) for unproven peers",
        )
    return (
        Verdict.PASS,
        str(value),
        "matters only with syncookies off; the SYN-queue cap is the listen backlog "
        "(Linux 4.4+); a full accept queue drops SYNs anyway",
    )


def _syncookies() -> Outcome:
    value = _limits().tcp_syncookies
    if value is None:
        return _unreadable("net.ipv4.tcp_syncookies")
    if value == 1:
        return (
            Verdict.PASS,
            "1",
            "cookies only when the SYN queue overflows (default); a full ACCEPT queue still drops",
        )
    if value == 0:
        return (
            Verdict.WARN,
            "0",
            "off: SYNs past the SYN-queue cap drop instead of getting a cookie (backlog "
            "shows timeouts)",
        )
    return (
        Verdict.WARN,
        str(value),
        "always: every handshake uses a cookie, so backlog sees no SYN-RECV sockets",
    )


def _abort_on_overflow() -> Outcome:
    value = _limits().tcp_abort_on_overflow
    if value is None:
        return _unreadable("net.ipv4.tcp_abort_on_overflow")
    if value == 0:
        return (
            Verdict.PASS,
            "0",
            "full accept queue: SYNs drop (client stuck in SYN-SENT, the usual case on "
            "loopback) or the final ACK drops (client says connected, server has no socket)",
        )
    return (
        Verdict.WARN,
        str(value),
        "non-default: RST only when the final ACK finds the accept queue full; SYNs to a "
        "full queue still drop (on loopback, the usual case)",
    )


def _port_range() -> Outcome:
    port_range = _limits().port_range
    if port_range is None:
        return _unreadable("net.ipv4.ip_local_port_range")
    low, high = port_range
    count = high - low + 1
    figure = f"{low}-{high} ({count} ports)"
    hint = (
        f"one source address opens at most {count} connections to one IP:port; "
        "backlog --source 127.0.0.2-20 multiplies it"
    )
    return (Verdict.WARN if count < 10_000 else Verdict.PASS), figure, hint


def _cpus() -> Outcome:
    from netprobe import kernel

    host = os.cpu_count() or 1
    usable = kernel.usable_cpus()
    quota = kernel.cgroup_cpu_limit()
    figure = f"{usable} usable of {host}"
    if quota is not None:
        figure += f" (cgroup quota {quota:g} CPUs)"
    if usable < 2:
        hint = "one CPU: load tests share it with the server under test; scans use one process"
    else:
        hint = "port-check splits large scans over 2 processes when a CPU is idle"
    return Verdict.PASS, figure, hint


def _capable(bit: int) -> bool:
    """Whether this process holds capability number `bit` (effective set; root assumed).

    The set is the one of this process's user namespace: a capability that the kernel checks
    against the initial namespace (CAP_SYS_RESOURCE for rlimits) may show here and still not
    work. Test such things for real instead (see _hard_nofile_raisable).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> bit & 1)
    except (OSError, ValueError, IndexError):
        pass
    return hasattr(os, "geteuid") and os.geteuid() == 0


_CAP_SYS_PTRACE = 19  # read other users' /proc/PID/fd (socket owners)


def _try_raise_hard_nofile() -> bool:
    """Raise the hard RLIMIT_NOFILE by one, then put it back; whether the raise worked."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard + 1))
    except (ValueError, OSError):  # EPERM: "not allowed to raise maximum limit"
        return False
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))  # lowering is always allowed
    return True


def _hard_nofile_raisable() -> bool:
    """Whether this process may raise its hard RLIMIT_NOFILE, found by trying it.

    CapEff cannot tell: setrlimit needs CAP_SYS_RESOURCE in the initial user namespace, so
    root in a container or under `unshare -r` shows the bit and is still refused. The try
    runs in a forked child that exits at once, so nothing changes here; a threaded process
    (fork could deadlock the child) tries in place and restores the limit straight away.
    """
    if hasattr(os, "fork") and threading.active_count() == 1:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - forked child
            code = 1
            try:
                code = 0 if _try_raise_hard_nofile() else 1
            finally:
                os._exit(code)
        _pid, status = os.waitpid(pid, 0)
        return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    return _try_raise_hard_nofile()


def _nr_open() -> int | None:
    """fs.nr_open: the kernel's cap on any hard RLIMIT_NOFILE, privileged or not."""
    try:
        with open("/proc/sys/fs/nr_open", encoding="ascii") as handle:
            return int(handle.read())
    except (OSError, ValueError):
        return None


def _nofile() -> Outcome:
    from netprobe.sockets import nofile_limit

    soft, hard = nofile_limit()
    if soft is None and hard is None:
        return Verdict.SKIP, "unknown", "RLIMIT_NOFILE is not available on this platform"
    figure = f"soft {soft or 'unlimited'}, hard {hard or 'unlimited'}"
    nr_open = _nr_open()
    can_raise_hard = hard is not None and _hard_nofile_raisable()
    if hard is None:
        raise_note = "no hard cap"
    elif can_raise_hard:
        raise_note = "raising the hard limit was tried and works here (CAP_SYS_RESOURCE)"
    elif nr_open is not None and hard >= nr_open:
        raise_note = f"the hard limit is already fs.nr_open ({nr_open}), the kernel's cap"
    else:
        raise_note = (
            "raising the hard limit was tried and refused "
            "(needs CAP_SYS_RESOURCE in the initial user namespace)"
        )
    short = _short_of_fds()
    if short is not None:
        # As a loopback that does not work: the self-tests are skipped for it, the run fails.
        return Verdict.FAIL, f"{figure}; {short[0]}", f"{short[1]}; {raise_note}"
    ceiling = hard if hard is not None else soft
    if ceiling is not None and ceiling < 4096 and not can_raise_hard:
        return (
            Verdict.WARN,
            figure,
            f"at most ~{ceiling} sockets at once (scans, backlog, echo load); {raise_note}",
        )
    if soft != hard:
        return (
            Verdict.PASS,
            figure,
            f"netprobe raises the soft limit up to {hard or 'unlimited'} when a run needs it; "
            f"{raise_note}",
        )
    return Verdict.PASS, figure, f"about {soft} sockets at once; {raise_note}"


def _fds_readable(pid: int) -> bool | None:
    """Whether this process may read the fd links of `pid`, as socket_owners must; None when
    the process is gone.

    Listing /proc/PID/fd is not enough: root's DAC override lists it, but each link needs
    ptrace read access (CAP_SYS_PTRACE over another user's process), which a container's
    root usually lacks.
    """
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return False
    for name in names:
        try:
            os.readlink(f"{fd_dir}/{name}")
        except FileNotFoundError:
            continue  # that fd was closed meanwhile: try the next
        except OSError:
            return False
        return True
    return True


def _user_of(pid: int, username: str | None) -> str:
    """psutil's user name, else the owner of /proc/PID (readable under hidepid=noaccess,
    where psutil is refused the status file it takes the uid from)."""
    if username:
        return username
    try:
        uid = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return "?"
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return str(uid)


def _host_gids() -> set[int]:
    """This process's groups as host ids, the terms /proc's gid= option is shown in."""
    from netprobe import kernel

    local = {os.getegid(), *os.getgroups()}
    id_map = kernel.read_id_map("gid")
    if id_map is None:
        return local
    return {
        out + gid - inside
        for gid in local
        for inside, out, n in id_map
        if inside <= gid < inside + n
    }


def _owners_remedy(uid: int, *, userns: bool, ptrace: bool) -> str:
    """What would show the hidden owners, given what limits this process.

    Reading another user's fd links takes CAP_SYS_PTRACE over that process (the gid= group
    of a hidepid mount only gets the processes listed, not their fds).

    Args:
        uid: this process's uid (0: root, of the initial namespace or of a user namespace).
        userns: in a user namespace, whose capabilities stop at its own processes.
        ptrace: holds CAP_SYS_PTRACE over every process (so only in the initial namespace).
    """
    if userns:
        who = "root" if uid == 0 else f"uid {uid}"
        return (
            f"this is {who} of a user namespace (uid_map is not 0 0 4294967295), whose "
            "capabilities stop at its own processes: run netprobe as root on the host"
        )
    if uid == 0 and not ptrace:
        return (
            "root here lacks CAP_SYS_PTRACE (containers drop it): add it, e.g. "
            "docker run --cap-add SYS_PTRACE"
        )
    if uid == 0:
        return (
            "root with CAP_SYS_PTRACE is still refused there: a security module (SELinux, "
            "AppArmor, Yama) or the process itself (undumpable) forbids reading its fds"
        )
    return "run as root to see them"


def _socket_owners() -> Outcome:
    """Can this user see which process owns another user's socket? (psutil, as listeners does)."""
    try:
        import psutil
    except ImportError:
        return Verdict.SKIP, "no psutil", "install psutil to see socket owners"
    if not os.path.isdir("/proc/self/fd"):
        return Verdict.SKIP, "no /proc", "socket owners are read from /proc/PID/fd (Linux only)"
    from netprobe import kernel

    total = 0
    hidden: dict[str, int] = {}
    for proc in psutil.process_iter(["pid", "username", "status"]):
        info = proc.info
        if info.get("status") == psutil.STATUS_ZOMBIE:
            continue  # no open files left to show, whoever asks
        readable = _fds_readable(info["pid"])
        if readable is None:
            continue  # the process ended meanwhile
        total += 1
        if not readable:
            user = _user_of(info["pid"], info.get("username"))
            hidden[user] = hidden.get(user, 0) + 1
    uid = os.getuid()
    # Root of a user namespace holds its capabilities over that namespace's processes only.
    userns = kernel.in_initial_user_namespace() is False
    ptrace = _capable(_CAP_SYS_PTRACE) and not userns
    # hidepid spares whoever may ptrace a process and, but for "ptraceable", the gid= group
    # (the kernel's has_pid_permissions). Under "invisible" the hidden processes are not
    # even listed, so the scan above cannot count them: the mount option has to say it.
    mount = kernel.proc_mount()
    hidepid = mount.hidepid if mount is not None else "off"
    spared_gid = mount.gid if mount is not None and hidepid != "ptraceable" else None
    veiled = hidepid != "off" and not ptrace and spared_gid not in _host_gids()
    if not hidden and not veiled:
        who = "root" if uid == 0 else "CAP_SYS_PTRACE" if ptrace else "this user"
        return (
            Verdict.PASS,
            f"all {total} processes",
            f"listeners and backlog name the process of every socket ({who})",
        )
    count = sum(hidden.values())
    figure = f"{count} of {total} processes hidden" if hidden else f"{total} visible"
    notes = ["other users' sockets show a user but no pid/process"]
    if hidden:
        ranked = sorted(hidden.items(), key=lambda kv: -kv[1])[:3]
        users = ", ".join(f"{user} ({n})" for user, n in ranked)
        notes = [f"sockets of the hidden processes show a user but no pid/process: {users}"]
    if veiled:
        figure += f", /proc hidepid={hidepid}"
        unseen = "unreadable" if hidepid == "noaccess" else "not even listed"
        notes.append(f"/proc is mounted hidepid={hidepid}: other users' processes are {unseen}")
    notes.append(_owners_remedy(uid, userns=userns, ptrace=ptrace))
    return Verdict.WARN, figure, "; ".join(notes)


def _queue_up(port: int, count: int) -> tuple[list[Any], str | None]:
    """`count` connections to our own 127.0.0.1:PORT listener, left in its accept queue; and
    why not all of them connected (None when they did). A check that compared the queue with
    the connections it got would pass on 0 == 0 when loopback is down."""
    from netprobe import sockets

    target = sockets.resolve("127.0.0.1", port)[0]
    clients: list[Any] = []
    why: str | None = None
    for _ in range(count):
        outcome = sockets.connect_nonblocking(
            target, deadline=time.monotonic() + _STEP_S, keep=True
        )
        if outcome.sock is not None:
            clients.append(outcome.sock)
        else:
            why = f"{outcome.state}" + (f" {outcome.errno_name}" if outcome.errno_name else "")
    if why is not None:
        why = f"only {len(clients)} of {count} connects to our own listener succeeded ({why})"
    return clients, why


def _queue_view() -> Outcome:
    """The kernel's accept-queue view (inet_diag) that backlog and listeners rely on."""
    from netprobe import kernel, sockets

    listener = sockets.open_listener("127.0.0.1", 0, backlog=8)
    clients: list[Any] = []
    try:
        port = int(listener.getsockname()[1])
        clients, why = _queue_up(port, 2)
        row = kernel.find_listener(port, "127.0.0.1")
    finally:
        for client in clients:
            client.close()
        listener.close()
    if why is not None:
        return Verdict.FAIL, f"{len(clients)}/2 connected", why
    if row is None:
        return Verdict.FAIL, "not found", "our own listener is missing from the kernel's view"
    figure = f"queue {row.queue}/{row.limit if row.limit is not None else '?'} via {row.source}"
    if row.queue != len(clients):
        return Verdict.FAIL, figure, f"expected {len(clients)} queued connections"
    if row.source != "inet_diag":
        return (
            Verdict.WARN,
            figure,
            "no inet_diag: queue lengths from /proc, without the limit or per-listener drops",
        )
    return Verdict.PASS, figure, "inet_diag gives queue, limit and drops without root"


# ---------------------------------------------------------------------------------------------
# Self-test plumbing
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _serving(server: Server) -> Iterator[Bound]:
    """Run a server-core server in a thread; always stop it, and fail if it did not stop."""
    bound = server.listen()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            server.run()
        except BaseException as exc:  # reported by the check, not by threading's hook
            errors.append(exc)

    thread = threading.Thread(target=run, name="doctor-server", daemon=True)
    thread.start()
    try:
        yield bound
    finally:
        server.stop()
        thread.join(_STOP_S)
    if errors:
        raise errors[0]
    if thread.is_alive():
        raise RuntimeError(f"the server on {bound} did not stop within {_STOP_S:g} s")


def _server_config(**fields: Any) -> Any:
    from netprobe.server import ServerConfig

    # In a thread signals cannot be installed anyway; saying so keeps the intent visible.
    return ServerConfig(handle_signals=False, close_timeout_s=_STOP_S, **fields)


def _send(
    target: str, payload: bytes, *, udp: bool = False, datagrams: int | None = None
) -> SendResult:
    """One `send` exchange through the real engine, keeping what came back."""
    from netprobe.engines.send import Expectations, InputSource, SendOptions, exchange
    from netprobe.sockets import parse_target

    opts = SendOptions(
        target=parse_target(target),
        source=InputSource(data=payload),
        udp=udp,
        timeout_s=_STEP_S,
        idle_timeout_s=_STEP_S,
        expect=Expectations(expect_datagrams=datagrams),
        collect=True,
    )
    result = exchange(opts, None)
    if result.ended_by == "interrupted":
        raise KeyboardInterrupt  # the engine reports a Ctrl-C as a result: doctor stops
    return result


def _stop_handlers() -> dict[int, Any]:
    import signal

    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}


def _restore_handlers(saved: dict[int, Any]) -> None:
    import signal

    for sig, handler in saved.items():
        if handler is not None:
            signal.signal(sig, handler)


def _crc(data: bytes) -> str:
    return f"{zlib.crc32(data):08x}"


def _compare(sent: bytes, result: SendResult, what: str) -> Outcome:
    got = result.data or b""
    if got != sent:
        figure = f"{len(sent)} B out crc32 {_crc(sent)}, {len(got)} B back crc32 {_crc(got)}"
        return Verdict.FAIL, figure, f"{what}: the bytes back differ (ended by {result.ended_by})"
    figure = f"{len(sent)} B both ways, crc32 {_crc(sent)}, {result.total_ms:.1f} ms"
    return Verdict.PASS, figure, f"{what}: every byte came back intact"


# ---------------------------------------------------------------------------------------------
# Self-tests: echo + send, listen + send
# ---------------------------------------------------------------------------------------------

_STREAM_PAYLOAD = 256 * 1024  # big enough to cross socket buffers both ways, fast on loopback


def _echo_tcp() -> Outcome:
    from netprobe.engines.echo import EchoOptions, make_server

    payload = os.urandom(_STREAM_PAYLOAD)
    server = make_server(_server_config(port=0), EchoOptions())
    with _serving(server) as bound:
        result = _send(f"127.0.0.1:{bound.port}", payload)
    # Which echo answered: the C one is built at install where a compiler is (setup.py).
    path = "raw echo in C" if server.config.native_echo else "raw echo in Python"
    return _compare(payload, result, f"echo + send over TCP ({path})")


def _echo_unix() -> Outcome:
    from netprobe.engines.echo import EchoOptions, make_server

    payload = os.urandom(_STREAM_PAYLOAD)
    folder = tempfile.mkdtemp(prefix="netprobe-doctor-")
    try:
        path = os.path.join(folder, "echo.sock")
        with _serving(make_server(_server_config(path=path), EchoOptions())):
            result = _send(f"unix:{path}", payload)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return _compare(payload, result, "echo + send over a Unix socket")


def _echo_udp() -> Outcome:
    from netprobe.engines.echo import EchoOptions, make_server

    payload = os.urandom(1200)  # one datagram under any loopback MTU
    with _serving(make_server(_server_config(port=0, udp=True), EchoOptions())) as bound:
        # Loopback UDP is lossy only under buffer pressure; a few tries tell loss from a bug.
        for _attempt in range(3):
            result = _send(f"127.0.0.1:{bound.port}", payload, udp=True, datagrams=1)
            if result.data == payload:
                break
    return _compare(payload, result, "echo + send over UDP (one datagram)")


def _listen_send() -> Outcome:
    from netprobe.engines.listen import ListenOptions, listen
    from netprobe.engines.send import InputSource

    request, reply = os.urandom(64 * 1024), os.urandom(48 * 1024)
    heard: list[bytes] = []
    ready = threading.Event()
    port: list[int] = []
    errors: list[BaseException] = []

    def on_event(event: dict[str, Any]) -> None:
        if event.get("event") == "listening":
            port.append(int(event["port"]))
            ready.set()

    def run() -> None:
        try:
            # The idle timeout is listen's own stop hook: it returns when nobody comes.
            opts = ListenOptions(port=0, source=InputSource(data=reply), idle_timeout_s=_STEP_S)
            listen(opts, heard.append, on_event)
        except BaseException as exc:
            errors.append(exc)
        finally:
            ready.set()

    thread = threading.Thread(target=run, name="doctor-listen", daemon=True)
    thread.start()
    try:
        if not ready.wait(_STEP_S) or not port:
            if errors:
                raise errors[0]  # its own failure (a bind's EADDRNOTAVAIL) names the cause
            raise RuntimeError("listen did not announce its port")
        result = _send(f"127.0.0.1:{port[0]}", request)
    finally:
        thread.join(_STEP_S + _STOP_S)
    if errors:
        raise errors[0]
    if thread.is_alive():
        return Verdict.FAIL, "still running", "listen did not end after its peer closed"
    got_in, got_out = b"".join(heard), result.data or b""
    figure = f"{len(got_in)} B in crc32 {_crc(got_in)}, {len(got_out)} B out crc32 {_crc(got_out)}"
    if got_in != request or got_out != reply:
        return Verdict.FAIL, figure, "listen and send disagree on the bytes exchanged"
    return Verdict.PASS, figure, "listen + send: both directions at once, both intact"


# ---------------------------------------------------------------------------------------------
# Self-tests: connects (connector, port-check, backlog, listeners)
# ---------------------------------------------------------------------------------------------

_FILTER_TIMEOUT_S = 0.25  # a dropped SYN is retried after 1 s: anything shorter tells


@contextlib.contextmanager
def _three_ports() -> Iterator[dict[str, int]]:
    """An open port, a closed one and one whose accept queue is full (filtered)."""
    from netprobe import sockets

    open_l = sockets.open_listener("127.0.0.1", 0, backlog=16)
    full_l = sockets.open_listener("127.0.0.1", 0, backlog=0)
    fillers: list[Any] = []
    try:
        fillers = sockets.fill_accept_queue(full_l, deadline=time.monotonic() + _STEP_S)
        # The closed port is a filler's own local port: our connected socket holds that TCP
        # port, so nobody can start listening there while we look (a port picked and
        # released, or a UDP port, could meanwhile get someone's listener), and a SYN to it
        # meets no listener: RST.
        yield {
            "open": int(open_l.getsockname()[1]),
            "closed": int(fillers[0].getsockname()[1]),
            "full": int(full_l.getsockname()[1]),
            "fillers": len(fillers),
        }
    finally:
        for filler in fillers:
            filler.close()
        for sock in (open_l, full_l):
            sock.close()


def _connector_selftest() -> Outcome:
    """connector against an open, a closed and a full-queue loopback listener."""
    from netprobe.connector import ConnectJob, run_connects
    from netprobe.sockets import resolve

    with _three_ports() as ports:
        family = resolve("127.0.0.1", 0)[0].family
        jobs = [
            ConnectJob(name, family, ("127.0.0.1", ports[name]))
            for name in ("open", "closed", "full")
        ]
        seen = {
            r.job.key: r.state.value
            for r in run_connects(jobs, concurrency=3, timeout_s=_FILTER_TIMEOUT_S)
        }
        held = ports["fillers"]
    want = {"open": "open", "closed": "refused", "full": "timeout"}
    figure = ", ".join(f"{k}={seen.get(k)}" for k in want)
    if seen != want:
        return Verdict.FAIL, figure, f"expected {want}"
    return (
        Verdict.PASS,
        figure,
        f"full queue held {held} = listen(0)+1; a further connect timed out",
    )


def _port_check() -> Outcome:
    from netprobe.engines.port_check import CheckConfig, Expect, build_hosts, parse_targets
    from netprobe.engines.port_check import run_checks as run_port_checks

    with _three_ports() as ports:
        names = {ports[name]: name for name in ("open", "closed", "full")}
        spec = f"127.0.0.1:{','.join(str(p) for p in names)}"
        hosts = build_hosts(parse_targets([spec]), ports=None, family=0, expect=Expect.OPEN)
        config = CheckConfig(timeout_s=_FILTER_TIMEOUT_S)
        seen = {names[r.port]: r.state.value for r in run_port_checks(hosts, config) if r.port}
    want = {"open": "open", "closed": "closed", "full": "filtered"}
    figure = ", ".join(f"{k}={seen.get(k)}" for k in want)
    if seen != want:
        return Verdict.FAIL, figure, f"expected {want}"
    return Verdict.PASS, figure, "open, closed and a full accept queue (filtered) told apart"


_LAB_BACKLOG = 4


def _backlog_lab() -> Outcome:
    from netprobe.engines.backlog import BacklogConfig, BacklogSummary, run_backlog

    cfg = BacklogConfig(
        lab=True,
        backlog=_LAB_BACKLOG,
        connections=2 * (_LAB_BACKLOG + 1),
        timeout_s=_FILTER_TIMEOUT_S,
        duration_s=_STEP_S,
        processes_ok=False,
    )
    record: dict[str, Any] = {}
    # The engine turns a Ctrl-C into an "interrupted" report and ignores SIGINT/SIGTERM from
    # then on (what the backlog command wants): here the run must end, and stay stoppable.
    saved = _stop_handlers()
    try:
        for event in run_backlog(cfg):
            if isinstance(event, BacklogSummary):
                record = event.record
    finally:
        _restore_handlers(saved)
    if record.get("interrupted"):
        raise KeyboardInterrupt
    server = record.get("server") or {}
    limit = server.get("backlog_limit")
    want = (limit if limit is not None else _LAB_BACKLOG) + 1  # somaxconn may clamp it
    queued = server.get("accept_queue_max")
    established = record.get("established")
    figure = (
        f"backlog {_LAB_BACKLOG}: {established} established, accept queue peak {queued}, "
        f"{record.get('timed_out')} timed out"
    )
    if queued is None:
        return Verdict.FAIL, figure, "no server view of the lab listener (kernel.find_listener)"
    # B is what the kernel made of listen()'s argument: somaxconn may clamp it (Send-Q says).
    b = (
        f"B = {want - 1}"
        if want - 1 == _LAB_BACKLOG
        else f"B = min({_LAB_BACKLOG}, somaxconn) = {want - 1}"
    )
    if queued != want or established != want:
        return Verdict.FAIL, figure, f"expected B+1 = {want} established and queued ({b})"
    return (
        Verdict.PASS,
        figure,
        f"listen({_LAB_BACKLOG}) queued B+1 = {want} ({b}); the rest dropped",
    )


def _listeners() -> Outcome:
    from netprobe import sockets
    from netprobe.engines.listeners import list_listeners

    listener = sockets.open_listener("127.0.0.1", 0, backlog=8)
    clients: list[Any] = []
    try:
        port = int(listener.getsockname()[1])
        clients, why = _queue_up(port, 3)
        rows = list_listeners(port=port, udp=False, unix=False)
    finally:
        for client in clients:
            client.close()
        listener.close()
    if why is not None:
        return Verdict.FAIL, f"{len(clients)}/3 connected", why
    mine = [r for r in rows if r.address == "127.0.0.1" and r.port == port]
    if not mine:
        return Verdict.FAIL, "not listed", f"our listener 127.0.0.1:{port} is missing"
    row = mine[0]
    figure = f"queue {row.recv_q}/{row.send_q}, pid {row.pid}"
    if row.pid != os.getpid():
        return Verdict.FAIL, figure, f"owner should be this process ({os.getpid()})"
    if row.recv_q != len(clients):
        return Verdict.FAIL, figure, f"expected {len(clients)} queued connections"
    return Verdict.PASS, figure, "listeners found our listener, its queue and its owner"


# ---------------------------------------------------------------------------------------------
# Self-tests: reset serve / proxy / client
# ---------------------------------------------------------------------------------------------

_RESET_AFTER = 4096  # the trigger; the client offers 4x as much


def _reset_options(**fields: Any) -> Any:
    from netprobe.engines.reset import ResetOptions
    from netprobe.engines.reset_faults import Action, FaultSchedule, Trigger, TriggerKind

    return ResetOptions(
        trigger=Trigger(TriggerKind.AFTER_BYTES, _RESET_AFTER),
        schedule=FaultSchedule(action=Action.RST, seed=0),
        **fields,
    )


def _reset_seen(result: SendResult, what: str) -> Outcome:
    figure = (
        f"ended by {result.ended_by} ({result.errno_name}) after {result.bytes_received} B back"
    )
    if result.ended_by != "reset" or result.errno_name != "ECONNRESET":
        return Verdict.FAIL, figure, f"{what}: expected the client to read ECONNRESET"
    if result.bytes_received > _RESET_AFTER:
        return Verdict.FAIL, figure, f"{what}: more than {_RESET_AFTER} B before the reset"
    return Verdict.PASS, figure, f"{what} --after-bytes {_RESET_AFTER}: the client got ECONNRESET"


def _reset_serve() -> Outcome:
    from netprobe.engines.reset import make_serve

    server, _totals, _control = make_serve(_server_config(port=0), _reset_options())
    with _serving(server) as bound:
        result = _send(f"127.0.0.1:{bound.port}", os.urandom(4 * _RESET_AFTER))
    return _reset_seen(result, "reset serve")


def _reset_proxy() -> Outcome:
    from netprobe.engines.echo import EchoOptions, make_server
    from netprobe.engines.reset import make_proxy

    with _serving(make_server(_server_config(port=0), EchoOptions())) as upstream:
        options = _reset_options(upstream=("127.0.0.1", upstream.port))
        proxy, _totals, _control = make_proxy(_server_config(port=0), options)
        with _serving(proxy) as bound:
            result = _send(f"127.0.0.1:{bound.port}", os.urandom(4 * _RESET_AFTER))
    return _reset_seen(result, "reset proxy")


def _reset_client() -> Outcome:
    from netprobe.engines.echo import EchoOptions, make_server
    from netprobe.engines.reset_client import run_reset_client
    from netprobe.engines.reset_faults import Trigger, TriggerKind
    from netprobe.server import ConnEvent
    from netprobe.sockets import resolve

    closes: list[ConnEvent] = []
    closed = threading.Event()

    def on_event(event: ConnEvent) -> None:
        if event.event == "close":
            closes.append(event)
            closed.set()

    server = make_server(_server_config(port=0), EchoOptions(), on_event=on_event)
    with _serving(server) as bound:
        target = resolve("127.0.0.1", bound.port or 0)[0]
        results = list(
            run_reset_client(
                target,
                str(bound),
                trigger=Trigger(TriggerKind.AFTER_BYTES, _RESET_AFTER),
                data=None,
                count=1,
                concurrency=1,
                timeout_s=_STEP_S,
            )
        )
        closed.wait(_STEP_S)  # the server learns of the RST on its next read
    client = results[0] if results else None
    reason = closes[0].reason if closes else None
    ended = client.ended_by if client else "no connection"
    figure = (
        f"client {ended} after {client.bytes_out if client else 0} B, "
        f"server saw {reason or 'no close'}"
    )
    if client is None or client.ended_by != "client-rst" or client.bytes_out != _RESET_AFTER:
        return Verdict.FAIL, figure, f"expected the client to reset after {_RESET_AFTER} B"
    if reason != "reset":
        return Verdict.FAIL, figure, "the server side should have read ECONNRESET"
    return Verdict.PASS, figure, "reset client: the server side read ECONNRESET"


# ---------------------------------------------------------------------------------------------
# Self-test: framing (sans-IO codecs)
# ---------------------------------------------------------------------------------------------


def _framing_selftest() -> Outcome:
    from netprobe.framing import NEED_DATA, parse_framing

    names = ["raw", "line", "crlf", "len8", "len16", "len32", "len64", "netstring"]
    payloads = [b"hello", b"", b"x" * 200, bytes(range(1, 10))]
    for name in names:
        spec = parse_framing(name)
        frames = payloads if name != "raw" else [b"hello"]
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


_CHECKS: list[Check] = [
    Check("host", "platform", _platform, True),
    Check("host", _LOOPBACK_CHECK, _loopback("127.0.0.1"), True),
    Check("host", "ipv6-loopback", _loopback("::1"), True),
    Check("host", "somaxconn", _somaxconn, True),
    Check("host", "tcp-max-syn-backlog", _syn_backlog, True),
    Check("host", "tcp-syncookies", _syncookies, True),
    Check("host", "tcp-abort-on-overflow", _abort_on_overflow, True),
    Check("host", "ip-local-port-range", _port_range, True),
    Check("host", "rlimit-nofile", _nofile, True),
    Check("host", "cpus", _cpus, True),
    Check("host", "socket-owners", _socket_owners, True),
    Check("host", "queue-view", _queue_view, True, needs_loopback=True),
    Check("selftest", "echo-send-tcp", _echo_tcp, True, needs_loopback=True, needs_fds=True),
    Check("selftest", "echo-send-udp", _echo_udp, False, needs_loopback=True, needs_fds=True),
    Check("selftest", "echo-send-unix", _echo_unix, False, needs_fds=True),
    Check("selftest", "listen-send", _listen_send, False, needs_loopback=True, needs_fds=True),
    Check("selftest", "connector", _connector_selftest, True, needs_loopback=True, needs_fds=True),
    Check("selftest", "port-check", _port_check, True, needs_loopback=True, needs_fds=True),
    Check("selftest", "backlog-lab", _backlog_lab, False, needs_loopback=True, needs_fds=True),
    Check("selftest", "listeners", _listeners, False, needs_loopback=True, needs_fds=True),
    Check("selftest", "reset-serve", _reset_serve, False, needs_loopback=True, needs_fds=True),
    Check("selftest", "reset-proxy", _reset_proxy, False, needs_loopback=True, needs_fds=True),
    Check("selftest", "reset-client", _reset_client, False, needs_loopback=True, needs_fds=True),
    Check("selftest", "framing", _framing_selftest, True),
]

CHECK_NAMES: tuple[str, ...] = tuple(c.name for c in _CHECKS)
QUICK_NAMES: tuple[str, ...] = tuple(c.name for c in _CHECKS if c.quick)
