"""Bad input and odd environments end in one stderr line and a documented exit code, never an
internal error: --debug, out-of-range numbers, unreadable target files, closed stdio."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from netprobe.errors import UsageError
from netprobe.sockets import POLL_MAX_S, parse_duration, parse_size, poll_ms, wait_readable
from tests.helpers import LONG, ROOT, ServerThread, bad_input_line, invoke, run_netprobe


def _closed_port() -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound, never listening: refused
    return sock, sock.getsockname()[1]


def test_debug_shows_the_traceback_and_keeps_the_exit_code() -> None:
    plain = run_netprobe(["port-check", "127.0.0.1:99999"])
    debug = run_netprobe(["--debug", "port-check", "127.0.0.1:99999"])
    assert plain.returncode == debug.returncode == 2
    assert b"Traceback" not in plain.stderr
    assert b"Traceback" in debug.stderr
    assert debug.stderr.rstrip().endswith(plain.stderr.rstrip())  # the same line, last


def test_debug_after_the_command_is_that_command_s_bad_option() -> None:
    proc = run_netprobe(["port-check", "127.0.0.1:1", "--debug"])
    assert proc.returncode == 2
    assert b"Traceback" not in proc.stderr
    assert proc.stderr.decode().count("\n") == 1
    assert "--debug" in proc.stderr.decode()


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["port-check", "127.0.0.1:\u00b2"], "'\u00b2' is not a port number"),
        (["port-check", "127.0.0.1:1", "--require", "\u00b2"], "--require"),
        (["port-check", "127.0.0.1:1", "--timeout", "99999999999999h"], "too long"),
        (["port-check", "127.0.0.1:1", "--timeout", "0"], "--timeout 0"),
        (["send", "127.0.0.1:1", "hi", "--timeout", "0"], "--timeout 0"),
        (["reset", "client", "127.0.0.1:1", "--timeout", "0"], "--timeout 0"),
        (["port-check", "127.0.0.1:1", "--until", "closed"], "--until is for wait mode"),
        (["port-check", "127.0.0.1:1", "--deadline", "5s"], "--deadline is for wait mode"),
        (["send", "[::1]:1", "hi", "-4"], "-4 and '[::1]:1' contradict each other"),
        (["send", "127.0.0.1:1", "hi", "-6"], "-6 and '127.0.0.1:1' contradict each other"),
        # The kernel refuses these at bind (EINVAL, exit 6 with a bare strerror before).
        (["echo", "--host", "::ffff:127.0.0.1"], "IPv4-mapped IPv6 address: bind 127.0.0.1"),
        (["listen", "--host", "::ffff:127.0.0.1"], "IPv4-mapped IPv6 address: bind 127.0.0.1"),
        (["reset", "serve", "--host", "::ffff:7f00:1"], "IPv4-mapped IPv6 address: bind 127.0.0.1"),
        (["echo", "--delay", "50ms", "--mode", "discard"], "--mode discard sends none"),
        (
            ["reset", "proxy", "--listen", "[::ffff:127.0.0.1]:0", "--upstream", "127.0.0.1:9"],
            "IPv4-mapped IPv6 address: bind 127.0.0.1",
        ),
        (["echo", "--host", "[::ffff:127.0.0.1]"], "without brackets (e.g. --host 127.0.0.1)"),
    ],
)
def test_out_of_range_values_are_usage_errors(argv: list[str], needle: str) -> None:
    result = invoke(argv)
    assert result.exit_code == 2
    assert needle in result.stderr
    assert result.stderr.count("\n") == 1
    assert "internal error" not in result.stderr


def test_duration_and_size_limits() -> None:
    assert parse_duration("1000000000") == 1e9
    for text in ("1000000001", "9" * 400, "99999999999999h"):
        with pytest.raises(UsageError, match="too long"):
            parse_duration(text)
    assert parse_size("1T") == 1024**4
    for text in ("9" * 400, "99999999999T"):
        with pytest.raises(UsageError, match="too large"):
            parse_size(text)


def test_targets_file_that_is_not_utf8(tmp_path: os.PathLike[str]) -> None:
    bad = os.path.join(tmp_path, "targets.txt")
    with open(bad, "wb") as handle:
        handle.write(b"127.0.0.1:1\n\xff\xfe\n")
    result = invoke(["port-check", "--targets-file", bad])
    assert result.exit_code == 2
    assert "not UTF-8" in result.stderr
    assert "0xff" in result.stderr


def _run_with_fd_closed(fd: int, argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "netprobe", *argv],
        stdin=subprocess.DEVNULL,  # listen reads it (fd 0 closed: closed after this)
        capture_output=True,
        timeout=30,
        cwd=ROOT,
        check=False,
        preexec_fn=lambda: os.close(fd),
    )


def test_targets_from_a_closed_stdin() -> None:
    proc = _run_with_fd_closed(0, ["port-check", "--targets-file", "-"])
    assert proc.returncode == 2
    assert b"stdin is closed" in proc.stderr
    assert b"Traceback" not in proc.stderr


def test_closed_stdout_runs_as_if_sent_to_dev_null() -> None:
    sock, port = _closed_port()
    try:
        proc = _run_with_fd_closed(1, ["port-check", f"127.0.0.1:{port}"])
    finally:
        sock.close()
    assert proc.returncode == 1  # the check's own outcome (closed), not an internal error
    assert b"stdout is closed" in proc.stderr
    assert b"internal error" not in proc.stderr


def test_listen_with_stdout_closed_still_announces_on_the_first_stderr_line() -> None:
    # Scripts read the port from listen's first stderr line; the closed-stdout note took it.
    proc = _run_with_fd_closed(1, ["listen", "-p", "0", "--idle-timeout", "0.2"])
    lines = proc.stderr.decode().splitlines()
    assert lines[0].startswith("listening on 127.0.0.1:"), lines
    assert lines[1] == "netprobe: stdout is closed: results are discarded", lines


def test_listen_with_stdout_closed_that_cannot_bind_still_says_stdout_is_closed() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        proc = _run_with_fd_closed(1, ["listen", "-p", str(busy.getsockname()[1])])
    assert proc.returncode == 6, proc.stderr
    lines = proc.stderr.decode().splitlines()
    assert "EADDRINUSE" in lines[0], lines
    assert lines[1:] == ["netprobe: stdout is closed: results are discarded"], lines


def _run_with_stderr_reader_gone(argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    """`netprobe ARGV` whose stderr is a pipe nobody reads any more: its writes fail (EPIPE)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, "-m", "netprobe", *argv],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=write_end,
            timeout=LONG * 2, cwd=ROOT, check=False,
        )  # fmt: skip
    finally:
        os.close(write_end)


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["port-check", "127.0.0.1:{closed}"], 1),
        (["port-check", "127.0.0.1:{closed}", "--wait", "--deadline", "300ms"], 124),
        (["port-check", "127.0.0.1:99999"], 2),
        (["listen", "--port", "0", "--idle-timeout", "300ms"], 3),
        (["reset", "client", "127.0.0.1:{closed}"], 1),
        (["echo", "--port", "99999"], 2),
    ],
)
def test_a_stderr_nobody_reads_changes_no_exit_code(
    closed_port: int, argv: list[str], code: int
) -> None:
    # Before, the first log or error line raised EPIPE, taken for a closed stdout: exit 0 for
    # a closed port, a timed-out wait and an idle listen; bad input died with exit 1.
    argv = [arg.format(closed=closed_port) for arg in argv]
    assert _run_with_stderr_reader_gone(argv).returncode == code


def test_a_stderr_nobody_reads_still_runs_the_wait_command(server: ServerThread) -> None:
    target = f"127.0.0.1:{server.port}"
    argv = [
        "port-check",
        "--wait",
        "--deadline",
        "5s",
        target,
        "--",
        "sh",
        "-c",
        "echo RAN; exit 7",
    ]
    proc = _run_with_stderr_reader_gone(argv)
    assert (proc.returncode, proc.stdout) == (7, b"RAN\n")


def test_poll_timeouts_stay_inside_poll_s_int() -> None:
    assert poll_ms(0.0001) == 1
    assert poll_ms(1.5) == 1500
    assert poll_ms(1e9) == 2**31 - 1 == int(POLL_MAX_S * 1000)


def test_wait_readable_with_a_deadline_decades_away() -> None:
    left, right = socket.socketpair()
    try:
        right.send(b"x")
        ready = wait_readable([left], time.monotonic() + 1e9)  # poll() would overflow at 1e12 ms
        assert ready == [left.fileno()]
    finally:
        left.close()
        right.close()


def _start(argv: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen(  # type: ignore[call-overload,no-any-return]
        [sys.executable, "-m", "netprobe", *argv], cwd=ROOT, **kwargs
    )


def _finish(proc: subprocess.Popen[bytes]) -> int:
    try:
        return proc.wait(timeout=LONG)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(LONG)


def test_echo_with_stderr_closed_still_serves() -> None:
    # Its accept/close lines go to stderr: with stderr closed they go nowhere, the echo goes on.
    proc = _start(
        ["echo", "--port", "0", "--once"],
        stdout=subprocess.PIPE,
        preexec_fn=lambda: os.close(2),
    )
    try:
        assert proc.stdout is not None
        announce = proc.stdout.readline().decode()  # listening on 127.0.0.1:PORT/tcp
        port = int(announce.rsplit(":", 1)[1].split("/")[0])
        with socket.create_connection(("127.0.0.1", port), timeout=LONG) as client:
            client.sendall(b"hi")
            assert client.recv(2) == b"hi"
    finally:
        code = _finish(proc)
        if proc.stdout is not None:
            proc.stdout.close()
    assert code == 0


def test_listen_with_stderr_closed_still_runs() -> None:
    with socket.socket() as probe:  # a free port: listen's announce line is on the closed stderr
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = _start(
        ["listen", "--port", str(port)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        preexec_fn=lambda: os.close(2),
    )
    try:
        deadline = time.monotonic() + LONG
        while True:
            try:
                client = socket.create_connection(("127.0.0.1", port), timeout=LONG)
                break
            except ConnectionRefusedError:
                assert proc.poll() is None, "listen exited"
                assert time.monotonic() < deadline, "listen never bound"
                time.sleep(0.02)
        with client:
            client.sendall(b"to stdout")
            client.shutdown(socket.SHUT_WR)
            assert client.recv(10) == b""  # stdin is empty: listen sends its FIN
        assert proc.stdout is not None
        assert proc.stdout.read() == b"to stdout"
    finally:
        code = _finish(proc)
        if proc.stdout is not None:
            proc.stdout.close()
    assert code == 0


def _streaming_server(conn: socket.socket) -> None:
    chunk = b"x" * 65536
    for _ in range(64):  # 4 MiB, far more than a pipe holds
        conn.sendall(chunk)


def test_send_whose_stdout_closes_early_exits_0() -> None:
    server = ServerThread(handler=_streaming_server)
    try:
        proc = _start(
            ["send", f"127.0.0.1:{server.port}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None
        assert proc.stderr is not None
        assert proc.stdout.read(1) == b"x"
        proc.stdout.close()  # `| head -c1`
        code = _finish(proc)
        err = proc.stderr.read().decode()
        proc.stderr.close()
    finally:
        server.stop()
    assert code == 0, err
    assert "internal error" not in err


def test_listen_whose_stdout_closes_still_reports_the_peer() -> None:
    proc = _start(
        ["listen", "--port", "0", "--json"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        assert proc.stderr is not None
        announce = json.loads(proc.stderr.readline())
        proc.stdout.close()  # nobody reads the peer's bytes
        with (
            socket.create_connection(("127.0.0.1", announce["port"]), timeout=LONG) as client,
            contextlib.suppress(OSError),  # listen may be gone before the last bytes
        ):
            for _ in range(64):
                client.sendall(b"y" * 65536)
        code = _finish(proc)
        events = [json.loads(line) for line in proc.stderr.read().splitlines()]
        proc.stderr.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(LONG)
    assert code == 0
    assert [e["event"] for e in events] == ["accept", "close"]
    assert events[-1]["ended_by"] == "output-closed"


def test_allow_large_still_refuses_a_block_it_could_never_expand() -> None:
    # An IPv6 /64 used to expand for ever (memory growing, nothing sent) under --allow-large.
    proc = run_netprobe(["port-check", "--allow-large", "::/64", "-p", "22", "-q"])
    assert proc.returncode == 2
    assert proc.stderr.count(b"\n") == 1
    assert b"even with --allow-large" in proc.stderr


# Longer than the 4300 digits int() converts: each of these was `internal error: ValueError`.
_HUGE = "9" * 5000


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["port-check", f"127.0.0.1:{_HUGE}"], "is out of range 1-65535"),
        (["port-check", "127.0.0.1", "-p", _HUGE], "is out of range 1-65535"),
        (["port-check", "127.0.0.1", "-p", f"1-{_HUGE}"], "is out of range 1-65535"),
        (["port-check", "127.0.0.1:1", "--require", _HUGE], "--require"),
        (["send", f"127.0.0.1:{_HUGE}", "hi"], "is out of range 1-65535"),
        (["reset", "client", f"127.0.0.1:{_HUGE}"], "is out of range 1-65535"),
        (["backlog", f"127.0.0.1:{_HUGE}"], "is out of range 1-65535"),
        (
            ["reset", "proxy", "--listen", f"127.0.0.1:{_HUGE}", "--upstream", "127.0.0.1:1"],
            "is out of range 0-65535",
        ),
        (
            ["reset", "proxy", "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{_HUGE}"],
            "is out of range 1-65535",
        ),
    ],
)
def test_a_number_of_any_length_is_bad_input(argv: list[str], needle: str) -> None:
    result = invoke(argv)
    assert result.exit_code == 2, result.stderr
    assert needle in result.stderr
    assert result.stderr.count("\n") == 1
    assert "internal error" not in result.stderr


@pytest.mark.parametrize(
    ("argv", "value"),
    [
        (["listeners", "-p", "\u0661\u0665"], "\u0661\u0665"),  # Arabic-Indic 15
        (["backlog", "--lab", "-n", "\u0661"], "\u0661"),
        (["backlog", "--lab", "-n", "2", "-c", "\u0661"], "\u0661"),
        (["echo", "--port", "\uff17", "--duration", "1s"], "\uff17"),  # fullwidth 7
        (["send", "127.0.0.1:1", "x", "--repeat", "\u00b2"], "\u00b2"),  # superscript 2
        (["port-check", "127.0.0.1:1", "-c", "5_0"], "5_0"),
        (["listeners", "-p", " 22"], " 22"),
    ],
)
def test_whole_numbers_take_ascii_digits_only(argv: list[str], value: str) -> None:
    # int() takes any script's digits, underscores and spaces, and every whole-number option
    # converted with it: `backlog --lab -n \u0661` ran one connect.
    line = bad_input_line(argv)
    assert repr(value) in line, line
    assert "is not a valid int" in line, line


def test_whole_numbers_keep_their_sign_for_the_range_check() -> None:
    assert "must be at least 1" in bad_input_line(["backlog", "--lab", "-n", "-5"])


def test_targets_file_line_over_the_limit(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "targets.txt")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(f"# ok\n127.0.0.1:1\n127.0.0.1:{_HUGE}\n")
    result = invoke(["port-check", "--targets-file", path])
    assert result.exit_code == 2, result.stderr
    assert result.stderr == (
        f"netprobe: port-check: --targets-file {path!r}: line 3 is longer than 4096 characters "
        "(one target per line)\n"
    )


def test_a_targets_file_line_without_a_port_is_named(tmp_path: os.PathLike[str]) -> None:
    # Before: "'localhost' has no port", with no word of the file or its line 51.
    path = os.path.join(tmp_path, "targets.txt")
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(f"127.0.0.{i}:80\n" for i in range(1, 51))
        handle.write("localhost\n")  # /etc/hosts: no lookup leaves the machine
    result = invoke(["port-check", "--targets-file", path])
    assert result.exit_code == 2, result.stderr
    assert result.stderr == (
        f"netprobe: port-check: --targets-file {path!r} line 51: 'localhost' has no port: "
        "give HOST:PORT or -p PORTS\n"
    )
    with_ports = invoke(["port-check", "--targets-file", path, "-p", "1", "-t", "1ms", "-q"])
    assert with_ports.exit_code != 2, with_ports.stderr  # -p gives it one


def test_a_bare_number_target_is_refused_not_probed_as_an_address() -> None:
    # `port-check 127.0.0.1 8080 -p 8080` (as `nc -z HOST PORT`) probed 0.0.31.144:8080.
    result = invoke(["port-check", "127.0.0.1", "8080", "-p", "8080"])
    assert result.exit_code == 2, result.stderr
    assert result.stdout == b""
    assert result.stderr == (
        "netprobe: port-check: '8080': 8080 is a bare number, not a host (as an address it "
        "reads 0.0.31.144): give HOST:PORT, or the ports with -p\n"
    )
    for given in ("2130706433:9", "017700000001:9"):  # as inet_aton reads it: octal too
        with_port = invoke(["port-check", given])
        assert with_port.exit_code == 2
        assert with_port.stderr.endswith("write the address itself (127.0.0.1)\n")


def _capped_memory() -> None:
    import resource

    cap = 1 << 30  # far more than a run needs; a read that never ends meets it in seconds
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_targets_file_without_newlines_is_refused_without_reading_it_all() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "netprobe", "port-check", "--targets-file", "/dev/zero"],
        capture_output=True,
        timeout=30,
        cwd=ROOT,
        check=False,
        preexec_fn=_capped_memory,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (
        b"netprobe: port-check: --targets-file '/dev/zero': line 1 is longer than 4096 "
        b"characters (one target per line)\n"
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["backlog", "127.0.0.0/8:80"],
        ["backlog", "127.0.0.1/32:80"],
        ["reset", "proxy", "--listen", "127.0.0.0/8:0", "--upstream", "127.0.0.1:1"],
        ["reset", "proxy", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.0/8:80"],
    ],
)
def test_a_block_where_one_address_is_needed(argv: list[str]) -> None:
    result = invoke(argv)
    assert result.exit_code == 2, result.stderr
    assert "is a block where one address is needed" in result.stderr
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["port-check", "[::1%]:80"],
        ["port-check", "::1%", "-p", "80"],
        ["send", "[::1%]:80", "hi"],
        ["echo", "--host", "::1%"],
        ["backlog", "[::1%]:80"],
        ["reset", "proxy", "--listen", "[::1%]:0", "--upstream", "127.0.0.1:1"],
        ["reset", "client", "[::1%]:80"],
    ],
)
def test_an_empty_ipv6_zone_is_bad_input(argv: list[str]) -> None:
    result = invoke(argv)
    assert result.exit_code == 2, result.stderr
    assert "has an empty zone after %" in result.stderr
    assert result.stderr.count("\n") == 1


def test_a_fraction_of_a_byte_is_bad_input() -> None:
    sock, port = _closed_port()
    try:
        argvs = [
            ["send", f"127.0.0.1:{port}", "hi", "--expect-bytes", "1.5"],
            ["reset", "serve", "--port", "0", "--mode", "send 1.5", "--duration", "100ms"],
            ["reset", "serve", "--port", "0", "--after-bytes", "0.5", "--duration", "100ms"],
        ]
        results = [invoke(argv) for argv in argvs]
    finally:
        sock.close()
    for result in results:
        assert result.exit_code == 2, result.stderr
        assert result.stderr.count("\n") == 1
    assert "'1.5' is not a whole number of bytes" in results[0].stderr
    assert "'1.5' is not a whole number of bytes" in results[1].stderr
    assert "--after-bytes: '0.5' is not a whole number of bytes" in results[2].stderr


def test_unicode_digits_are_not_numbers() -> None:
    sock, port = _closed_port()
    try:
        argvs = [
            ["port-check", f"127.0.0.1:{port}", "-t", "\uff15s"],
            ["port-check", f"127.0.0.1:{port}", "-t", "\u0663s"],
            ["send", f"127.0.0.1:{port}", "hi", "--expect-bytes", "\uff11K"],
        ]
        results = [invoke(argv) for argv in argvs]
    finally:
        sock.close()
    for result, shown in zip(results, ["'\uff15s'", "'\u0663s'", "'\uff11K'"], strict=True):
        assert result.exit_code == 2, result.stderr
        assert shown in result.stderr
        assert result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (
            [b"echo", b"--host", b"\xff"],
            b"netprobe: echo: --host '\\xff': '\\xff' is not a host name or address\n",
        ),
        (
            [b"port-check", b"127.0.0.1:\xfe"],
            b"netprobe: port-check: '127.0.0.1:\\xfe': '\\xfe' is not a port number (in '\\xfe')\n",
        ),
        (
            [b"port-check", b"127.0.0.1:1", b"--require", b"\xff2"],
            b"netprobe: port-check: --require '\\xff2': use all, any or a count of at least 1\n",
        ),
    ],
)
def test_bytes_that_are_not_utf8_are_shown_as_xnn(argv: list[bytes], line: bytes) -> None:
    proc = subprocess.run(
        [os.fsencode(sys.executable), b"-m", b"netprobe", *argv],
        capture_output=True,
        timeout=30,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr == line


def test_error_line_shows_escaped_bytes_as_xnn(monkeypatch: pytest.MonkeyPatch) -> None:
    from netprobe.cli._run import error_line

    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    error_line("send", repr("a\udcffb") + " and a\udcfeb")
    # A backslash the user typed stays (repr doubles it): what follows it is no escaped byte.
    error_line("send", " ".join(repr(text) for text in ("\\udcff", "\\\\udcff", "\\\udcff")))
    error_line("send", "caf\u00e9 " + repr("\ud800"))  # valid text and other surrogates kept
    assert err.getvalue().splitlines() == [
        r"netprobe: send: 'a\xffb' and a\xfeb",
        r"netprobe: send: '\\udcff' '\\\\udcff' '\\\xff'",
        "netprobe: send: caf\u00e9 '\\ud800'",
    ]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("fmt", [[], ["--json"]])
def test_a_full_disk_behind_stdout_is_a_local_error(closed_port: int, fmt: list[str]) -> None:
    # Before: exit 70, "internal error: OSError: [Errno 28] No space left on device".
    with open("/dev/full", "wb") as full:
        proc = subprocess.run(
            [sys.executable, "-m", "netprobe", "port-check", f"127.0.0.1:{closed_port}", *fmt],
            stdout=full, stderr=subprocess.PIPE, timeout=LONG * 2, cwd=ROOT, check=False,
        )  # fmt: skip
    assert proc.returncode == 6, proc.stderr
    assert proc.stderr == (
        b"netprobe: port-check: local I/O error: ENOSPC: No space left on device\n"
    )


@pytest.mark.parametrize("text", ["\u0661", "1_000", "\u0660.5"])
@pytest.mark.parametrize(
    "argv",
    [
        ["port-check", "127.0.0.1:9", "--rate"],
        ["echo", "--port", "0", "--duration", "0.2", "--accept-rate"],
        ["backlog", "--lab", "-n", "3", "--rate"],
        ["backlog", "--lab", "-n", "3", "--ramp"],
        ["reset", "serve", "--port", "0", "--duration", "0.2", "--after-ms"],
        ["reset", "serve", "--port", "0", "--duration", "0.2", "--on-accept", "--probability"],
    ],
    ids=["port-check-rate", "echo-accept-rate", "backlog-rate", "ramp", "after-ms", "probability"],
)
def test_numbers_take_ascii_digits_only(argv: list[str], text: str) -> None:
    # float() reads Arabic-Indic digits and underscores: these ran with "\u0661" read as 1.
    line = bad_input_line([*argv, text])
    assert repr(text) in line or text in line


@pytest.mark.parametrize(
    ("host", "words"),
    [
        ("0", "0.0.0.0 (every interface)"),
        ("0x0", "0.0.0.0 (every interface)"),
        ("0.0", "0.0.0.0 (every interface)"),
        ("127.1", "127.0.0.1: write it out"),
        ("4294967296", "a bare number"),
    ],
)
@pytest.mark.parametrize(
    "argv",
    [
        ["echo", "--port", "0", "--duration", "0.2", "--host", "{}"],
        ["reset", "serve", "--port", "0", "--duration", "0.2", "--host", "{}"],
        ["reset", "proxy", "--listen", "{}:0", "--upstream", "127.0.0.1:9", "--duration", "0.2"],
    ],
    ids=["echo", "reset-serve", "reset-proxy"],
)
def test_a_server_binds_no_address_shorthand(argv: list[str], host: str, words: str) -> None:
    # `--host 0` (a slip for `--port 0`) bound 0.0.0.0, every interface, where the safe
    # default promises loopback unless 0.0.0.0 is written out.
    line = bad_input_line([arg.format(host) for arg in argv])
    assert repr(host) in line or repr(f"{host}:0") in line
    assert words in line


def test_listen_binds_no_address_shorthand() -> None:
    # A process with a timeout: listen has no --duration, and the old code would wait there.
    from tests.helpers import run_netprobe

    result = run_netprobe(["listen", "--port", "0", "--host", "0"], timeout=10)
    assert result.returncode == 2
    assert result.stdout == b""
    assert result.stderr.decode() == (
        "netprobe: listen: --host '0' reads as the address 0.0.0.0 (every interface): "
        "write it out\n"
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["echo", "--port", "0", "--host", "a b"],
        ["reset", "serve", "--probability", "1.5"],
        ["reset", "proxy", "--listen", "x", "--upstream", "127.0.0.1:9"],
        ["reset", "serve", "--json", "-q"],
        ["listeners", "--json", "--csv"],
    ],
    ids=["echo", "reset-serve", "reset-proxy", "reset-serve-json-q", "listeners"],
)
def test_bad_input_exits_before_the_heavy_imports(argv: list[str]) -> None:
    # These loaded the engine (asyncio, the server core) or psutil before they checked the
    # options: 150-250 ms more for a line of bad input (review helper-101).
    script = (
        "import sys\n"
        "from netprobe.cli import main\n"
        f"code = main({argv!r})\n"
        "heavy = sorted(m for m in ('asyncio', 'psutil', 'netprobe.server') if m in sys.modules)\n"
        "print(code, heavy)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, timeout=60, check=False
    )
    assert done.stdout.decode() == "2 []\n", done.stderr.decode()


# Every duration option, as the command line gives it (with the arguments its command needs).
_DURATION_OPTIONS = [
    ["port-check", "127.0.0.1:1", "--timeout"],
    ["port-check", "127.0.0.1:1", "--wait", "--interval"],
    ["port-check", "127.0.0.1:1", "--wait", "--deadline"],
    ["send", "127.0.0.1:1", "hi", "--timeout"],
    ["send", "127.0.0.1:1", "hi", "--idle-timeout"],
    ["echo", "--idle-timeout"],
    ["echo", "--delay"],
    ["echo", "--duration"],
    ["listen", "--idle-timeout"],
    ["backlog", "127.0.0.1:1", "--duration"],
    ["backlog", "127.0.0.1:1", "--timeout"],
    ["reset", "serve", "--on-idle"],
    ["reset", "serve", "--after-ms"],
    ["reset", "serve", "--duration"],
    ["reset", "client", "127.0.0.1:1", "--after-ms"],
    ["reset", "client", "127.0.0.1:1", "--timeout"],
    ["reset", "proxy", "--upstream", "127.0.0.1:1", "--latency"],
    ["reset", "proxy", "--upstream", "127.0.0.1:1", "--jitter"],
    ["reset", "proxy", "--upstream", "127.0.0.1:1", "--slice", "1", "--slice-delay"],
    ["reset", "proxy", "--upstream", "127.0.0.1:1", "--timeout"],
]


@pytest.mark.parametrize("argv", _DURATION_OPTIONS, ids=" ".join)
@pytest.mark.parametrize("value", ["1e30", "1e400", "2e9s", "1e9h"])
def test_a_duration_too_large_is_too_long_everywhere(argv: list[str], value: str) -> None:
    # --on-idle 1e30 was "not a duration" while --after-ms 1e30 was "too long": one parser
    # now reads them all (exponents included), and a number too large is a time too long.
    line = bad_input_line([*argv, value])
    assert f"{value!r} is too long; a duration must be at most 1e+09 s" in line, line
    assert argv[-1] in line


@pytest.mark.parametrize(
    "argv",
    [
        ["reset", "serve", "--on-idle"],
        ["reset", "proxy", "--upstream", "127.0.0.1:1", "--timeout"],
        ["reset", "client", "127.0.0.1:1", "--timeout"],
        ["port-check", "127.0.0.1:1", "--timeout"],
        ["send", "127.0.0.1:1", "hi", "--timeout"],
        ["echo", "--idle-timeout"],
        ["backlog", "127.0.0.1:1", "--duration"],
    ],
    ids=" ".join,
)
def test_minus_zero_is_zero_for_every_duration_option(argv: list[str]) -> None:
    # --after-ms -0 was 0 while --on-idle -0 was "negative": -0 equals 0, and is 0 everywhere.
    # These options refuse 0, so -0 gets 0's own line; a real negative stays refused.
    assert bad_input_line([*argv, "-0"]) == bad_input_line([*argv, "0"])
    assert "'-1' is negative" in bad_input_line([*argv, "-1"])


def test_minus_zero_durations_and_sizes_parse_as_zero() -> None:
    import math

    for text in ("-0", "-0.0", " -0ms", "-0e5", "-.0s"):
        value = parse_duration(text)
        assert value == 0.0, text
        assert math.copysign(1.0, value) == 1.0, text
    assert parse_duration("-0", bare=1e-3) == 0.0
    assert parse_size("-0") == parse_size("-0K") == 0
    for text in ("-1", "-0.5ms", "-1e-9"):
        with pytest.raises(UsageError, match="is negative"):
            parse_duration(text)
    with pytest.raises(UsageError, match="is negative"):
        parse_size("-1K")


def test_durations_take_an_exponent() -> None:
    assert parse_duration("1e3") == 1000.0
    assert parse_duration("2.5E-1s") == 0.25
    assert parse_duration("5e2ms") == 0.5
    assert parse_duration("250", bare=1e-3) == 0.25  # reset --after-ms: a bare number is ms
    assert parse_duration("1e12", bare=1e-3) == 1e9
    for text in ("1e30", "1e400", "1.1e12ms", "9" * 400 + "e9"):
        with pytest.raises(UsageError, match="too long"):
            parse_duration(text)
    for text in ("e3", "1e", "1e3.5", "nan", "inf", "0x10"):
        with pytest.raises(UsageError, match="is not a duration"):
            parse_duration(text)


def test_a_duration_that_rounds_to_0_is_too_short_and_plus_is_positive() -> None:
    # `1e-400` became 0: refused as 0 by `echo --idle-timeout` ("0s must be more than 0")
    # and taken as "no limit" by `send --idle-timeout`. And `--after-ms +5` was 5 ms before
    # one parser read every duration.
    for text in ("1e-400", "0.1e-330s", "5e-324us"):
        with pytest.raises(UsageError, match="too short: it rounds to 0"):
            parse_duration(text)
    assert parse_duration("0e-400") == parse_duration("+0") == 0.0
    assert parse_duration("+5", bare=1e-3) == 0.005
    assert parse_duration("+1.5s") == 1.5
    line = bad_input_line(["send", "127.0.0.1:1", "hi", "--idle-timeout", "1e-400"])
    assert "--idle-timeout" in line, line
    assert "too short" in line, line
