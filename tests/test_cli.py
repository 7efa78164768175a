"""The CLI skeleton: version, help, python -m, one-line errors, doctor."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest
import typer

from netprobe import __version__
from tests.helpers import (
    LONG,
    ROOT,
    CliResult,
    ServerThread,
    invoke,
    run_netprobe,
    wait_in_syscall,
)

COMMANDS = ["port-check", "echo", "send", "listen", "backlog", "listeners", "reset", "doctor"]


def test_version() -> None:
    result = invoke(["--version"])
    assert result.exit_code == 0
    assert result.text.strip() == f"netprobe {__version__}"


def test_python_dash_m_works_like_netprobe() -> None:
    proc = run_netprobe(["--version"])
    assert proc.returncode == 0
    assert proc.stdout.decode().strip() == f"netprobe {__version__}"


def test_help_lists_every_command() -> None:
    result = invoke(["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.text


def test_unknown_option_is_one_line_usage_error() -> None:
    result = invoke(["doctor", "--no-such-flag"])
    assert result.exit_code == 2
    assert result.stdout == b""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "--no-such-flag" in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("argv", [[], ["reset"]], ids=["bare", "reset"])
def test_no_command_shows_help_on_stderr_and_exits_2(argv: list[str]) -> None:
    # Bad input: nothing on stdout (the help went there, 32 lines a script would take for
    # results; review helper-101).
    result = invoke(argv)
    assert result.exit_code == 2
    assert result.stdout == b""
    assert ("port-check" if not argv else "proxy") in result.stderr


@pytest.mark.parametrize(
    "argv",
    [["--debug"], ["--debug", "--debug"], ["--debug", "reset"], ["--"], ["--debug", "--"]],
    ids=" ".join,
)
def test_debug_without_a_command_is_a_bare_netprobe(argv: list[str]) -> None:
    # `netprobe --debug` printed the traceback of Click's own usage error, then "Missing
    # command.": --debug shows where an error came from, and a missing command is not one.
    bare = invoke(argv[-1:] if argv[-1] == "reset" else [])
    result = invoke(argv)
    assert result.exit_code == bare.exit_code == 2
    assert result.stdout == b""
    assert "Traceback" not in result.stderr
    assert result.stderr == bare.stderr


@pytest.mark.parametrize(
    "argv",
    [["echo", "--unix", ""], ["reset", "serve", "--unix", ""], ["listen", "--unix", ""]],
)
def test_empty_unix_path_is_bad_input(argv: list[str]) -> None:
    result = invoke(argv)
    assert result.exit_code == 2
    assert result.stdout == b""
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert "Unix socket path is empty" in lines[0]


# --- bad input shared by several commands (review fixes) -------------------------------------


def _one_usage_line(result: CliResult) -> str:
    assert result.exit_code == 2, result.stderr
    assert result.stdout == b""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


# --duration bounds each server in case the bad value were accepted (the test then fails on
# the exit code instead of hanging).
SERVERS = [
    ["echo", "--port", "0", "--duration", "0.2"],
    ["listen", "--port", "0", "--idle-timeout", "0.2"],
    ["reset", "serve", "--port", "0", "--duration", "0.2"],
]


@pytest.mark.parametrize("server", SERVERS, ids=lambda argv: " ".join(argv[:2]))
@pytest.mark.parametrize(
    ("host", "needle"),
    [
        ("", "--host ''"),
        ("   ", "--host '   '"),
        ("a b", "'a b'"),
        ("[::1]", "'[::1]'"),
        ("127.0.0.1:80", "'127.0.0.1:80'"),
        ("127.0.0.0/8", "'127.0.0.0/8'"),
        ("unix:/tmp/np.sock", "'unix:/tmp/np.sock'"),
    ],
)
def test_malformed_host_is_a_usage_error_naming_it(
    server: list[str], host: str, needle: str
) -> None:
    # Before: getaddrinfo was asked, and the line said only "resolve: EAI_NONAME" (exit 5).
    line = _one_usage_line(invoke([*server, "--host", host]))
    assert needle in line


@pytest.mark.parametrize(
    "argv",
    [
        ["backlog", "--lab", "-n", "2", "--timeout", "100ms"],
        ["reset", "serve", "--port", "0", "--duration", "0.2"],
        ["reset", "proxy", "--upstream", "127.0.0.1:9", "--duration", "0.2"],
    ],
    ids=lambda argv: " ".join(argv[:2]),
)
@pytest.mark.parametrize("quiet", ["-q", "--quiet"])
def test_json_and_quiet_exclude_each_other(argv: list[str], quiet: str) -> None:
    # As port-check, listeners, doctor and reset client already do (and the README says).
    line = _one_usage_line(invoke([*argv, "--json", quiet]))
    assert "--json and --quiet exclude each other" in line


@pytest.mark.parametrize(
    "argv",
    [
        ["echo", "--port", "0", "--duration", "0.2"],
        ["backlog", "--lab", "-n", "2", "--timeout", "100ms"],
        ["reset", "serve", "--port", "0", "--duration", "0.2"],
        ["reset", "proxy", "--upstream", "127.0.0.1:9", "--duration", "0.2"],
    ],
    ids=lambda argv: " ".join(argv[:2]),
)
def test_backlog_beyond_a_c_int_is_a_usage_error(argv: list[str]) -> None:
    # Before: listen() raised OverflowError, reported as an internal error (exit 70).
    line = _one_usage_line(invoke([*argv, "--backlog", "99999999999"]))
    assert "99999999999" in line
    assert "2147483647" in line


# --- the shared parsers in netprobe.cli._options ----------------------------------------------


@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "-inf", "infinity", "1e400"])
def test_per_second_refuses_non_finite_numbers(text: str) -> None:
    from netprobe.cli._options import per_second

    with pytest.raises(typer.BadParameter, match="not a finite number") as info:
        per_second(text)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize("text", ["0", "-1", "1e-300", "0.0009"])
def test_per_second_refuses_rates_below_the_minimum(text: str) -> None:
    from netprobe.cli._options import per_second

    with pytest.raises(typer.BadParameter) as info:
        per_second(text)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize(("text", "value"), [("0.001", 0.001), ("5", 5.0), ("1e6", 1e6)])
def test_per_second_takes_ordinary_rates(text: str, value: float) -> None:
    from netprobe.cli._options import per_second

    assert per_second(text) == value


@pytest.mark.parametrize(
    ("text", "family", "expected"),
    [
        (None, 0, "127.0.0.1"),
        (None, socket.AF_INET, "127.0.0.1"),
        (None, socket.AF_INET6, "::1"),
        ("::1", socket.AF_INET6, "::1"),
        ("0.0.0.0", socket.AF_INET, "0.0.0.0"),
        ("localhost", socket.AF_INET6, "localhost"),
        (" 127.0.0.2 ", 0, "127.0.0.2"),
        ("fe80::1%lo", 0, "fe80::1%lo"),
    ],
)
def test_bind_host_defaults_and_passes_good_hosts(
    text: str | None, family: int, expected: str
) -> None:
    from netprobe.cli._options import bind_host

    assert bind_host(text, family=family) == expected


@pytest.mark.parametrize(
    ("text", "family", "words"),
    [
        ("::1", socket.AF_INET, "-4 and --host ::1 contradict each other"),
        ("127.0.0.1", socket.AF_INET6, "-6 and --host 127.0.0.1 contradict each other"),
        ("::zz", 0, "'::zz'"),
    ],
)
def test_bind_host_refuses_family_conflicts_and_bad_literals(
    text: str, family: int, words: str
) -> None:
    from netprobe.cli._options import bind_host
    from netprobe.errors import UsageError

    with pytest.raises(UsageError, match=re.escape(words)):
        bind_host(text, family=family)


def test_naming_host_names_the_host_and_keeps_exit_5() -> None:
    from netprobe.cli._options import naming_host
    from netprobe.errors import ResolveError
    from netprobe.exitcodes import ExitStatus, exit_status_for_error
    from netprobe.sockets import resolve

    # A real ResolveError from the socket core, made without any lookup (a literal of the
    # wrong family): the line must name the host the user gave, and still mean exit 5.
    with pytest.raises(ResolveError) as info, naming_host("127.0.0.1"):
        resolve("127.0.0.1", 0, family=socket.AF_INET6)
    assert str(info.value) == (
        "--host '127.0.0.1': cannot resolve: EAI_FAMILY: 127.0.0.1 is not an IPv6 address"
    )
    assert info.value.errno_name == "EAI_FAMILY"
    assert exit_status_for_error(info.value) == ExitStatus.RESOLVE


def test_readme_exit_code_table_lists_every_exit_status() -> None:
    # The table is the suite's public list: a code the program uses must be in it, and a row
    # must name a code the program has (listen's 143 was missing from both).
    import re

    from netprobe.exitcodes import ExitStatus

    text = (ROOT / "README.md").read_text()
    start = text.index("| code | name | meaning |")
    rows = re.findall(r"^\| (\d+) \| ([A-Z_]+) \|", text[start:], flags=re.MULTILINE)
    table = {int(code): name for code, name in rows}
    assert table == {int(status): status.name for status in ExitStatus}


@pytest.mark.parametrize(
    "argv",
    [
        ["port-check", "127.0.0.1", "-p", "1-65535", "--rate", "2000", "--json"],
        ["port-check", "127.0.0.1:1", "-c", "100", "--interval", "10s", "--json"],
        ["backlog", "--lab", "-n", "1000", "--rate", "100", "--json"],
        ["reset", "client", "127.0.0.1:{port}", "--count", "1000", "--json"],
    ],
    ids=["port-check", "port-check-latency", "backlog", "reset-client"],
)
def test_an_interrupted_run_never_waits_on_a_stdout_nobody_reads(
    argv: list[str], server: ServerThread
) -> None:
    # stdout: a pipe already full that nobody reads; the run's first write waits on it, and
    # one Ctrl-C comes. Before: the report of the interrupted run (port-check's latency
    # summaries, backlog's partial tick) or the exit's own flush (port-check) waited on that
    # reader forever, with no signal left to end it (backlog ignores later ones by then).
    # (reset client's handler only sets a flag: its stuck write was retried, 8 of 8 runs.)
    argv = [arg.format(port=server.port) for arg in argv]
    with _small_pipe(room=0) as (_read_end, write_end):
        code = _interrupted(argv, write_end, lambda pid: wait_in_syscall(pid, "write", 1))
    assert code == 130


@contextlib.contextmanager
def _small_pipe(room: int) -> Iterator[tuple[int, int]]:
    """A 4 KiB pipe with `room` bytes free (the rest "#"): its read end and write end."""
    read_end, write_end = os.pipe()
    try:
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
        os.write(write_end, b"#" * (4096 - room))
        yield read_end, write_end
    finally:
        os.close(write_end)
        os.close(read_end)


def _interrupted(
    argv: list[str],
    stdout: int,
    ready: Callable[[int], None],
    then: Callable[[], None] = lambda: None,
) -> int:
    """`netprobe ARGV`'s exit code, stdout to `stdout`, given one SIGINT once ready(pid);
    then() runs right after the signal."""
    with subprocess.Popen(
        [sys.executable, "-m", "netprobe", *argv],
        stdout=stdout,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    ) as proc:
        try:
            ready(proc.pid)
            proc.send_signal(signal.SIGINT)
            then()
            return proc.wait(LONG)
        finally:
            if proc.poll() is None:
                proc.kill()


def test_a_second_signal_while_the_report_waits_on_a_full_stdout_ends_quietly() -> None:
    # The report of an interrupted run waits up to STUCK_STDOUT_GRACE_S for a stdout pipe
    # nobody reads; a second Ctrl-C in that wait means "out now". Before: it escaped the exit
    # path as a traceback (exit 1).
    child = (
        "import os, sys\n"
        "from netprobe.cli._run import spare_a_stuck_stdout\n"
        "spare_a_stuck_stdout()\n"
        "sys.stderr.write('spared, stdout is ' + os.readlink('/proc/self/fd/1') + '\\n')\n"
    )
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    os.write(write_end, b"#" * 4096)  # full
    try:
        with subprocess.Popen(
            [sys.executable, "-c", child], stdout=write_end, stderr=subprocess.PIPE, cwd=ROOT
        ) as proc:
            try:
                wait_in_syscall(proc.pid, "poll")  # the grace: a poll for room on stdout
                proc.send_signal(signal.SIGINT)
                code = proc.wait(LONG)
            finally:
                if proc.poll() is None:
                    proc.kill()
            assert proc.stderr is not None
            err = proc.stderr.read().decode()
    finally:
        os.close(write_end)
        os.close(read_end)
    assert (code, err) == (0, "spared, stdout is /dev/null\n")


def _pipe_holds(read_end: int) -> int:
    from netprobe.render import pipe_queued

    held = pipe_queued(read_end)
    assert held is not None, "FIONREAD on a pipe"
    return held


def _established_by(pid: int) -> int:
    import psutil

    conns = psutil.Process(pid).net_connections("tcp")
    return sum(conn.status == psutil.CONN_ESTABLISHED for conn in conns)


@pytest.mark.parametrize(
    ("argv", "room", "ready"),
    [
        # Three probes' lines (~560 bytes) go out; the three summaries (~1050) do not fit.
        (
            [
                *("port-check", "127.0.0.1:{port}", "127.0.0.2:{port}", "127.0.0.3:{port}"),
                *("-c", "100", "--interval", "30s", "--json"),
            ],
            800,
            "wrote 500",
        ),
        # The preflight line (~250 bytes) goes out; the partial tick and summary (~2.4 KB) not.
        (["backlog", "--lab", "-n", "1000", "--rate", "100", "--json"], 1000, "wrote 200"),
        # Nothing before the signal; then 50 connection records (~15 KB) and the totals.
        (
            [
                *("reset", "client", "127.0.0.1:{port}", "--count", "50", "-c", "50"),
                *("--after-ms", "30000", "--json"),
            ],
            3000,
            "50 connected",
        ),
    ],
    ids=["port-check-latency", "backlog", "reset-client"],
)
def test_an_interrupted_report_that_fills_a_stopped_readers_pipe_does_not_hold_the_exit(
    argv: list[str], room: int, ready: str
) -> None:
    # stdout: a pipe nobody reads with room for what the run writes before the signal, not
    # for its report. Before: the report's write waited on that reader forever once the
    # pipe was full: port-check -c and reset client until a second signal, backlog (which
    # ignores later signals, so that none cuts its report) until SIGKILL.
    from tests.helpers import in_syscall, wait_until

    with socket.socket() as listener, _small_pipe(room) as (read_end, write_end):
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)  # never accepts: the kernel completes up to 128 handshakes
        argv = [arg.format(port=listener.getsockname()[1]) for arg in argv]

        def wrote_its_start(pid: int) -> None:
            if ready.startswith("wrote "):
                least = 4096 - room + int(ready.split()[1])
                wait_until(lambda: _pipe_holds(read_end) >= least, f"pid {pid}: {ready}")
            else:
                wait_until(lambda: _established_by(pid) >= 50, ready)
            wait_until(lambda: not in_syscall(pid, "write", 1), "not writing")

        code = _interrupted(argv, write_end, wrote_its_start)
    assert code == 130


def test_an_interrupted_report_still_reaches_a_slow_reader_whole() -> None:
    # The bound is on a pipe that takes nothing for a second, not on the report's time: a
    # reader that drains it a little at a time gets every line (backlog's summary is last).
    import threading

    from tests.helpers import in_syscall, wait_until

    room = 1000
    got = bytearray()
    gone = threading.Event()
    argv = ["backlog", "--lab", "-n", "1000", "--rate", "100", "--json"]
    with _small_pipe(room) as (read_end, write_end):

        def preflight_written(pid: int) -> None:
            least = 4096 - room + 200
            wait_until(lambda: _pipe_holds(read_end) >= least, "the preflight line")
            wait_until(lambda: not in_syscall(pid, "write", 1), "not writing")

        def drain() -> None:
            import select
            import time

            while True:
                if select.select([read_end], [], [], 0.1)[0]:
                    got.extend(os.read(read_end, 256))
                    time.sleep(0.1)  # 2.5 KB/s: the whole takes ~2 s, a stall 0.1 s
                elif gone.is_set():
                    return

        reader = threading.Thread(target=drain)
        try:
            code = _interrupted(argv, write_end, preflight_written, then=reader.start)
        finally:
            gone.set()
            if reader.is_alive():
                reader.join(LONG)
    assert code == 130
    import json

    lines = bytes(got).lstrip(b"#").decode().splitlines()
    last = json.loads(lines[-1])
    assert (last["kind"], last.get("interrupted")) == ("backlog", True), lines[-1][:300]


def test_a_ctrl_c_while_the_command_line_loads_exits_130_without_a_traceback() -> None:
    # The Ctrl-C lands while Typer is imported (a finder raises it there, as the signal's
    # handler would). Before: the console script imported netprobe.cli, Typer with it, before
    # any code of ours ran, and printed the KeyboardInterrupt's traceback.
    child = (
        "import sys\n"
        "class Interrupt:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'typer':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Interrupt())\n"
        "from netprobe.entry import main\n"
        "sys.exit(main())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", child, "port-check", "127.0.0.1:9"],
        capture_output=True,
        timeout=LONG,
        cwd=ROOT,
        check=False,
    )
    assert (proc.returncode, proc.stderr) == (130, b"\n"), proc.stderr.decode()
    console = (ROOT / "pyproject.toml").read_text()
    assert 'netprobe = "netprobe.entry:main"' in console


def test_the_root_help_lists_every_exit_code() -> None:
    from netprobe.exitcodes import SHORT_MEANING, ExitStatus

    assert set(SHORT_MEANING) == set(ExitStatus)
    text = " ".join(invoke(["--help"]).text.split())
    for code, meaning in SHORT_MEANING.items():
        assert f"{int(code)} {meaning}" in text


@pytest.mark.parametrize(
    "command",
    [
        ["port-check"],
        ["echo"],
        ["send"],
        ["listen"],
        ["backlog"],
        ["listeners"],
        ["doctor"],
        ["reset", "serve"],
        ["reset", "proxy"],
        ["reset", "client"],
    ],
    ids=lambda c: "-".join(c),
)
def test_every_commands_help_names_its_exit_codes(command: list[str]) -> None:
    # Some listed none, others left out bad input, Ctrl-C or SIGTERM (review helper-101).
    text = " ".join(invoke([*command, "--help"]).text.split())
    assert "Exit codes: 0 " in text
    assert "2 bad" in text
