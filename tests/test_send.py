"""`netprobe send` against real loopback servers (threads in this process), run in-process."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from netprobe.framing import parse_framing
from tests.conftest import HAS_IPV6
from tests.helpers import (
    LONG,
    CliResult,
    ServerThread,
    in_syscall,
    invoke,
    udp_echo_thread,
    udp_server_thread,
    wait_connecting,
    wait_in_syscall,
)

Handler = Callable[[socket.socket], None]


def echo_handler(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


@pytest.fixture
def start() -> Iterator[Callable[..., ServerThread]]:
    """Start ServerThreads with a handler; every one is stopped at teardown."""
    servers: list[ServerThread] = []

    def make(
        handler: Handler, family: int = socket.AF_INET, host: str = "127.0.0.1"
    ) -> ServerThread:
        srv = ServerThread(family=family, host=host, handler=handler)
        servers.append(srv)
        return srv

    try:
        yield make
    finally:
        for srv in servers:
            srv.stop()


def addr(srv: ServerThread) -> str:
    return f"[{srv.host}]:{srv.port}" if ":" in srv.host else f"{srv.host}:{srv.port}"


def as_json(out: bytes) -> dict[str, object]:
    record = json.loads(out.decode())
    assert isinstance(record, dict)
    return record


def _send_process(*argv: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "netprobe", "send", *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


# --- what is sent ---------------------------------------------------------------------------


def test_text_data_round_trip(start: Callable[..., ServerThread]) -> None:
    srv = start(echo_handler)
    res = invoke(["send", addr(srv), "hello, wörld"])
    assert res.exit_code == 0, res.stderr
    assert res.stdout == "hello, wörld".encode()
    assert res.stderr == ""


def test_json_object_fields(start: Callable[..., ServerThread]) -> None:
    srv = start(echo_handler)
    res = invoke(["send", addr(srv), "ping", "--json"])
    assert res.exit_code == 0, res.stderr
    rec = as_json(res.stdout)
    assert rec["target"] == addr(srv)
    assert rec["address"] == addr(srv)
    assert rec["proto"] == "tcp"
    assert rec["bytes_sent"] == 4
    assert rec["bytes_received"] == 4
    assert rec["ended_by"] == "eof"
    assert rec["data"] == "ping"
    for key in ("connect_ms", "first_byte_ms", "total_ms"):
        value = rec[key]
        assert isinstance(value, float)
        assert 0 <= value < LONG * 1000
    assert rec["connect_ms"] <= rec["first_byte_ms"] <= rec["total_ms"]  # type: ignore[operator]


def test_hex_data_is_binary_safe(start: Callable[..., ServerThread]) -> None:
    srv = start(echo_handler)
    res = invoke(["send", addr(srv), "--hex", "00 ff:0a 0d80"])
    assert res.exit_code == 0, res.stderr
    assert res.stdout == b"\x00\xff\x0a\x0d\x80"
    res = invoke(["send", addr(srv), "00ff80", "--hex", "--json"])
    assert as_json(res.stdout)["data_b64"] == base64.b64encode(b"\x00\xff\x80").decode()


def test_file_and_stdin(start: Callable[..., ServerThread], tmp_path: Path) -> None:
    srv = start(echo_handler)
    payload = bytes(range(256)) * 1000
    path = tmp_path / "payload.bin"
    path.write_bytes(payload)
    res = invoke(["send", addr(srv), "--file", str(path)])
    assert res.exit_code == 0, res.stderr
    assert res.stdout == payload
    res = invoke(["send", addr(srv)], stdin=payload)
    assert res.exit_code == 0, res.stderr
    assert res.stdout == payload


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs Linux /proc")
def test_a_file_sendfile_cannot_send_is_read_instead(
    start: Callable[..., ServerThread], tmp_path: Path
) -> None:
    # Most /proc files are regular files that sendfile(2) refuses (EINVAL): send exited 6
    # having sent nothing, where nc sends them (`--file /proc/net/tcp`, `< /proc/self/status`).
    srv = start(echo_handler)
    expected = Path("/proc/self/cmdline").read_bytes()  # this process's, as invoke runs here
    assert expected
    res = invoke(["send", addr(srv), "--file", "/proc/self/cmdline"])
    assert res.exit_code == 0, res.stderr
    assert res.stdout == expected
    with open("/proc/self/cmdline", "rb") as stdin:  # opened here: this process's, too
        proc = subprocess.run(
            [sys.executable, "-m", "netprobe", "send", addr(srv)],
            stdin=stdin,
            capture_output=True,
            timeout=LONG,
            check=False,
        )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected


def test_crlf_converts_bare_lf_only(start: Callable[..., ServerThread]) -> None:
    srv = start(echo_handler)
    res = invoke(["send", addr(srv), "--crlf"], stdin=b"a\nb\r\nc\n\nd")
    assert res.exit_code == 0, res.stderr
    assert res.stdout == b"a\r\nb\r\nc\r\n\r\nd"


def test_no_data_on_stdin_still_reads_the_greeting(start: Callable[..., ServerThread]) -> None:
    srv = start(lambda conn: conn.sendall(b"220 ready\r\n"))
    res = invoke(["send", addr(srv)])
    assert res.exit_code == 0, res.stderr
    assert res.stdout == b"220 ready\r\n"


# --- where reading ends ---------------------------------------------------------------------


def _chatty(conn: socket.socket) -> None:
    """Sends a banner in pieces, then keeps the connection open without closing."""
    for piece in (b"220 hel", b"lo\r\n250 ", b"more\r\n", b"tail"):
        conn.sendall(piece)
        time.sleep(0.01)
    conn.recv(1)  # wait for the client to go away


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--until", "\r\n"], b"220 hello\r\n"),
        (["--until", "250"], b"220 hello\r\n250"),
        (["--until-regex", r"2\d0 m"], b"220 hello\r\n250 m"),
        (["--expect-bytes", "5"], b"220 h"),
        (["--expect-bytes", "12"], b"220 hello\r\n2"),
    ],
)
def test_expectations_cut_and_end_early(
    start: Callable[..., ServerThread], args: list[str], expected: bytes
) -> None:
    srv = start(_chatty)
    began = time.monotonic()
    res = invoke(["send", addr(srv), "--no-shutdown", "--idle-timeout", "5s", *args])
    assert res.exit_code == 0, res.stderr
    assert res.stdout == expected
    assert time.monotonic() - began < 3  # ended by the expectation, not the idle timeout
    res = invoke(["send", addr(srv), "--no-shutdown", "--idle-timeout", "5s", "--json", *args])
    rec = as_json(res.stdout)
    assert rec["ended_by"] == "expect"
    assert rec["expect_met"] is True
    assert rec["data"] == expected.decode()


def test_expectation_not_met_at_eof_exits_1(start: Callable[..., ServerThread]) -> None:
    srv = start(lambda conn: conn.sendall(b"no delimiter here"))
    res = invoke(["send", addr(srv), "--until", "END"])
    assert res.exit_code == 1
    assert res.stdout == b"no delimiter here"
    assert "expectation not met" in res.stderr


def _banner_then_silence(conn: socket.socket) -> None:
    conn.sendall(b"220 hello\r\n250 more\r\ntail")
    conn.recv(1)  # hold the connection open until the client goes away


def test_idle_timeout_after_data_is_a_normal_end(start: Callable[..., ServerThread]) -> None:
    srv = start(_banner_then_silence)
    res = invoke(["send", addr(srv), "--no-shutdown", "--idle-timeout", "200ms", "--json"])
    assert res.exit_code == 0, res.stderr
    rec = as_json(res.stdout)
    assert rec["ended_by"] == "idle-timeout"
    assert rec["data"] == "220 hello\r\n250 more\r\ntail"


def _answer_after_eof(conn: socket.socket) -> None:
    while conn.recv(65536):
        pass
    time.sleep(0.1)
    conn.sendall(b"got it\n")


def test_peer_answering_after_our_fin_gets_the_idle_time_from_it(
    start: Callable[..., ServerThread],
) -> None:
    # Before: stdin paused longer than --idle-timeout before it ended, so the idle limit had
    # already passed when the FIN went out: exit 3 "no answer" while the answer was on its way.
    srv = start(_answer_after_eof)
    with _send_process(addr(srv), "--idle-timeout", "300ms") as proc:
        assert proc.stdin is not None
        assert proc.stdout is not None
        assert proc.stderr is not None
        proc.stdin.write(b"req")
        proc.stdin.flush()
        time.sleep(0.8)  # the pause: longer than the idle timeout
        proc.stdin.close()
        assert proc.wait(LONG) == 0, proc.stderr.read()
        out = proc.stdout.read()
    assert out == b"got it\n"


def _wait_for(check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + LONG
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_run_still_says_how_it_ended(
    start: Callable[..., ServerThread], signum: int, code: int
) -> None:
    # Before: exit 130 (or death by SIGTERM) with nothing on stdout or stderr.
    got = threading.Event()

    def echo_and_note(conn: socket.socket) -> None:
        while data := conn.recv(65536):
            conn.sendall(data)
            got.set()

    srv = start(echo_and_note)
    with _send_process(addr(srv), "--json") as proc:
        assert proc.stdin is not None
        assert proc.stdout is not None
        proc.stdin.write(b"x")
        proc.stdin.flush()  # stdin stays open: only the signal ends the run
        assert got.wait(LONG)  # the server has the byte: the kernel took it from the client
        proc.send_signal(signum)
        try:
            assert proc.wait(LONG) == code
        finally:
            proc.stdin.close()
        rec = as_json(proc.stdout.read())
    assert rec["ended_by"] == "interrupted"
    # The server has the byte, so the kernel took it: it is counted, wherever the signal
    # landed (before the count, CountingGate holds it). The echo may not be back yet, or be
    # counted and not yet handed over (a signal while on_received writes acts at once). The
    # text-mode test below signals only once the echo is out, and checks the exact counts.
    sent, received, data = rec["bytes_sent"], rec["bytes_received"], rec["data"]
    assert isinstance(received, int)
    assert isinstance(data, str)
    assert sent == 1
    assert len(data) <= received <= 1


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_run_in_text_mode_says_so_on_stderr(
    start: Callable[..., ServerThread], signum: int, code: int
) -> None:
    srv = start(echo_handler)
    with _send_process(addr(srv)) as proc:
        assert proc.stdin is not None
        assert proc.stdout is not None
        assert proc.stderr is not None
        proc.stdin.write(b"x")
        proc.stdin.flush()  # stdin stays open: only the signal ends the run
        assert os.read(proc.stdout.fileno(), 1) == b"x"  # the echo is back: received 1 B
        proc.send_signal(signum)
        try:
            assert proc.wait(LONG) == code
        finally:
            proc.stdin.close()
        err = proc.stderr.read().decode()
    assert err.endswith("interrupted after sending 1 B and receiving 1 B\n"), err


def test_interrupted_while_connecting_still_prints_its_json_object(full_queue_port: int) -> None:
    # Before: nothing on stdout (the README: a run that never connects still prints its object).
    argv = [f"127.0.0.1:{full_queue_port}", "hi", "--timeout", "20s", "--json"]
    with _send_process(*argv) as proc:
        assert proc.stdin is not None
        assert proc.stdout is not None
        assert proc.stderr is not None
        proc.stdin.close()
        wait_connecting(proc.pid)  # the SYN waits for a queue that never has room
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(LONG) == 143
        rec = as_json(proc.stdout.read())
        err = proc.stderr.read().decode()
    assert (rec["ended_by"], rec["address"], rec["bytes_sent"]) == ("interrupted", None, 0)
    assert "interrupted before the exchange began" in err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_with_stdout_stuck_exits_at_once_and_quietly(
    start: Callable[..., ServerThread], signum: int
) -> None:
    # Before (stdout buffered, the default): after its report the process waited for the
    # reader to take what the buffer held, then failed on it at exit ("Exception ignored ...
    # BrokenPipeError", exit 120) once the reader had left. nc exits at once.
    def trickle(conn: socket.socket) -> None:
        # Small pieces: each one lands in stdout's buffer, which then holds bytes at exit.
        with contextlib.suppress(OSError):
            for _ in range(3000):
                conn.sendall(b"z" * 1000)
                time.sleep(0.001)

    srv = start(trickle)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    with subprocess.Popen(
        [sys.executable, "-m", "netprobe", "send", addr(srv), ""],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    ) as proc:
        assert proc.stdout is not None
        assert proc.stderr is not None
        wait_in_syscall(proc.pid, "write", 1)  # the 64 KiB pipe is full: it waits on stdout
        proc.send_signal(signum)
        code = proc.wait(LONG)  # nobody reads stdout, yet it exits
        err = proc.stderr.read().decode()
    assert code == (130 if signum == signal.SIGINT else 143), err
    assert "interrupted after sending" in err
    assert "Exception ignored" not in err


def test_repeat_interrupted_while_connecting_reports_that_run(full_queue_port: int) -> None:
    # Before: the run cut short while connecting had no object (a single run has one).
    argv = [f"127.0.0.1:{full_queue_port}", "hi", "--repeat", "3", "--timeout", "20s", "--json"]
    with _send_process(*argv) as proc:
        assert proc.stdin is not None
        assert proc.stdout is not None
        proc.stdin.close()
        wait_connecting(proc.pid)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(LONG) == 130
        records = [json.loads(line) for line in proc.stdout.read().splitlines()]
    assert [r["kind"] for r in records] == ["send", "send-stats"]
    assert (records[0]["ended_by"], records[1]["runs"]) == ("interrupted", 1)


def test_repeat_interrupted_while_checking_the_input_prints_empty_statistics(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before: Ctrl-C while the input was checked (a large file) escaped with no statistics.
    from netprobe.engines import send as engine

    def interrupted(_opts: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "_check_input", interrupted)
    res = invoke(["send", "127.0.0.1:9", "x", "--repeat", "2", "--json"])
    assert res.exit_code == 130
    assert as_json(res.stdout)["runs"] == 0
    assert "interrupted after 0 of 2 runs" in res.stderr


def test_interrupted_while_stdout_blocks_is_not_called_connecting(
    start: Callable[..., ServerThread], tmp_path: Path
) -> None:
    # The hexdump of the reply fills the stdout pipe nobody reads to within 45 bytes of its
    # 64 KiB: 829 full rows of 79 bytes go out during the exchange, and the last, partial row
    # waits at the end (receiver.finish). Before: the signal there said "while connecting".
    srv = start(echo_handler)
    path = tmp_path / "in.bin"
    path.write_bytes(os.urandom(829 * 16 + 15))
    with _send_process(addr(srv), "--file", str(path), "--hexdump") as proc:
        assert proc.stdin is not None
        assert proc.stdout is not None
        assert proc.stderr is not None
        proc.stdin.close()
        _wait_for(lambda: srv.accepted >= 1)
        wait_in_syscall(proc.pid, "write", 1)  # the exchange is over: it waits on its last row
        proc.send_signal(signal.SIGTERM)
        proc.stdout.read()  # let it write what it still has, then exit
        assert proc.wait(LONG) == 143
        err = proc.stderr.read().decode()
    assert "interrupted after sending" in err, err


def test_an_interrupted_repeat_prints_the_statistics_so_far(
    start: Callable[..., ServerThread],
) -> None:
    srv = start(echo_handler)
    with _send_process(addr(srv), "ping", "--repeat", "5", "--interval", "30s") as proc:
        assert proc.stdin is not None
        assert proc.stdout is not None
        assert proc.stderr is not None
        proc.stdin.close()
        _wait_for(lambda: srv.accepted >= 1)
        wait_in_syscall(proc.pid, "poll")  # in the first run's exchange, or the interval after
        proc.send_signal(signal.SIGINT)
        assert proc.wait(LONG) == 130
        out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
    # The first run is over by then (or, on a slow machine, cut short): one run either way.
    assert out.startswith("runs 1  completed ")
    assert err.endswith("netprobe: send: interrupted after 1 of 5 runs\n")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_run_never_waits_on_a_full_stdout_for_its_last_output(
    start: Callable[..., ServerThread], signum: int
) -> None:
    # The signal lands while send polls; the hexdump's last row is still to be written, to a
    # pipe already full that nobody reads. Before: that write waited forever (exit only by
    # SIGKILL); CI's helper saw it in 9 of 29 runs of a test under load. Now it is dropped.
    banner = _Banner()
    srv = start(banner)
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    os.write(write_end, b"#" * 4096)  # full
    try:
        with subprocess.Popen(
            [sys.executable, "-m", "netprobe", "send", addr(srv), "--hexdump"],
            stdin=subprocess.PIPE,  # open: only the signal ends the run
            stdout=write_end,
            stderr=subprocess.PIPE,
        ) as proc:
            os.close(write_end)
            write_end = -1
            _wait_for(lambda: banner.read_by(proc.pid))
            proc.send_signal(signum)
            try:
                code = proc.wait(LONG)
            finally:
                if proc.poll() is None:
                    proc.kill()
                assert proc.stdin is not None
                proc.stdin.close()
            assert proc.stderr is not None
            err = proc.stderr.read().decode()
    finally:
        if write_end >= 0:
            os.close(write_end)
        os.close(read_end)
    assert code == (130 if signum == signal.SIGINT else 143), err
    assert err.endswith("interrupted after sending 0 B and receiving 7 B\n"), err


def test_hexdump_format(start: Callable[..., ServerThread]) -> None:
    srv = start(echo_handler)
    res = invoke(["send", addr(srv), "--hexdump", "--hex", "48656c6c6f2c20776f726c64210a00ff7f41"])
    assert res.exit_code == 0, res.stderr
    assert res.stdout.decode() == (
        "00000000  48 65 6c 6c 6f 2c 20 77  6f 72 6c 64 21 0a 00 ff  |Hello, world!...|\n"
        "00000010  7f 41                                             |.A|\n"
        "00000012\n"
    )


# --- framing --------------------------------------------------------------------------------


def _framed_upper(spec_name: str) -> Handler:
    """Decode frames; answer each with its upper-case copy, written one byte at a time."""
    spec = parse_framing(spec_name)

    def handler(conn: socket.socket) -> None:
        decoder = spec.decoder()
        while True:
            data = conn.recv(65536)
            decoder.feed(data)
            for frame in decoder.frames():
                for byte in spec.encode(frame.upper()):
                    conn.sendall(bytes([byte]))
            if not data:
                return

    return handler


@pytest.mark.parametrize("spec", ["line", "crlf", "len16", "len32", "netstring"])
def test_framing_round_trip_with_one_byte_writes(
    start: Callable[..., ServerThread], spec: str
) -> None:
    srv = start(_framed_upper(spec))
    lines = b"alpha\nbeta gamma\n\ndelta"
    res = invoke(["send", addr(srv), "--framing", spec], stdin=lines)
    assert res.exit_code == 0, res.stderr
    assert res.stdout == b"ALPHA\nBETA GAMMA\n\nDELTA\n"
    res = invoke(["send", addr(srv), "--framing", spec, "--json"], stdin=lines)
    assert as_json(res.stdout)["frames"] == ["ALPHA", "BETA GAMMA", "", "DELTA"]


@pytest.mark.parametrize("udp", [False, True], ids=["tcp", "udp"])
def test_crlf_framing_of_crlf_input_adds_no_second_cr(
    start: Callable[..., ServerThread], udp: bool
) -> None:
    # `printf 'a\r\nb\n' | send --framing crlf` put "a\r\r\nb\r\n" on the wire.
    stdin = b"a\r\nb\n"
    if udp:
        with udp_echo_thread() as port:
            argv = ["send", f"127.0.0.1:{port}", "--udp", "--framing", "crlf", "--json"]
            res = invoke(argv, stdin=stdin)
    else:
        got: list[bytes] = []

        def record(conn: socket.socket) -> None:
            data = b""
            while chunk := conn.recv(4096):
                data += chunk
            got.append(data)
            conn.sendall(data)

        res = invoke(["send", addr(start(record)), "--framing", "crlf", "--json"], stdin=stdin)
        assert got == [b"a\r\nb\r\n"]
    assert res.exit_code == 0, res.stderr
    assert as_json(res.stdout)["frames"] == ["a", "b"]


def test_raw_framing_sends_input_unchanged(start: Callable[..., ServerThread]) -> None:
    srv = start(echo_handler)
    res = invoke(["send", addr(srv), "--framing", "raw", "--json"], stdin=b"a\nb\n")
    assert res.exit_code == 0, res.stderr
    assert "".join(as_json(res.stdout)["frames"]) == "a\nb\n"  # type: ignore[arg-type]


def test_repeat_replays_a_file(start: Callable[..., ServerThread], tmp_path: Path) -> None:
    srv = start(echo_handler)
    path = tmp_path / "req.txt"
    path.write_bytes(b"GET\n")
    res = invoke(["send", addr(srv), "--file", str(path), "--repeat", "3", "--json"])
    assert res.exit_code == 0, res.stderr
    lines = [json.loads(line) for line in res.stdout.decode().splitlines()]
    assert [line.get("data") for line in lines[:3]] == ["GET\n"] * 3


def test_framing_data_is_one_frame_and_expect_frames(start: Callable[..., ServerThread]) -> None:
    def two_replies(conn: socket.socket) -> None:
        conn.recv(65536)
        conn.sendall(struct.pack("!H", 3) + b"one" + struct.pack("!H", 3) + b"two")
        conn.recv(1)

    srv = start(two_replies)
    res = invoke(["send", addr(srv), "hi there", "--framing", "len16", "--expect-frames", "1"])
    assert res.exit_code == 0, res.stderr
    assert res.stdout == b"one\n"


def test_truncated_frame_at_eof_exits_1(start: Callable[..., ServerThread]) -> None:
    def truncated(conn: socket.socket) -> None:
        while conn.recv(65536):  # read everything first: unread data would make close() an RST
            pass
        conn.sendall(struct.pack("!I", 10) + b"abc")

    srv = start(truncated)
    res = invoke(["send", addr(srv), "x", "--framing", "len32", "--json"])
    assert res.exit_code == 1
    assert "framing_error" in as_json(res.stdout)


def test_malformed_frame_stops_reading(start: Callable[..., ServerThread]) -> None:
    def bad_netstring(conn: socket.socket) -> None:
        while conn.recv(65536):
            pass
        conn.sendall(b"3:abc,x:zz,")
        conn.recv(1)

    srv = start(bad_netstring)
    res = invoke(
        ["send", addr(srv), "q", "--framing", "netstring", "--json", "--idle-timeout", "5s"]
    )
    assert res.exit_code == 1
    rec = as_json(res.stdout)
    assert rec["frames"] == ["abc"]
    assert rec["ended_by"] == "error"
    assert rec["framing_error"]


# --- other transports -----------------------------------------------------------------------


@pytest.mark.ipv6
@pytest.mark.skipif(not HAS_IPV6, reason="no ::1 on this host")
def test_ipv6_loopback(start: Callable[..., ServerThread]) -> None:
    srv = start(echo_handler, family=socket.AF_INET6, host="::1")
    res = invoke(["send", f"[::1]:{srv.port}", "six", "--json"])
    assert res.exit_code == 0, res.stderr
    rec = as_json(res.stdout)
    assert rec["data"] == "six"
    assert rec["address"] == f"[::1]:{srv.port}"


def _send_to_a_unix_echo(address: str, argv: list[str]) -> CliResult:
    """`netprobe send ARGV` while a one-client Unix echo listens at `address` (a path, or
    NUL + name for an abstract socket); the listener is always closed, its thread joined."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(1)
    listener.settimeout(LONG)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(LONG)
            echo_handler(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        return invoke(argv)
    finally:
        if thread.is_alive():  # send never got through: nobody will connect
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as unblock:
                unblock.connect(address)
        thread.join(LONG)
        listener.close()
        assert not thread.is_alive()


@pytest.mark.unix
def test_unix_socket_exchange(tmp_path: Path) -> None:
    path = str(tmp_path / "echo.sock")
    res = _send_to_a_unix_echo(path, ["send", f"unix:{path}", "over unix", "--json"])
    assert res.exit_code == 0, res.stderr
    rec = as_json(res.stdout)
    assert (rec["proto"], rec["data"], rec["address"]) == ("unix", "over unix", f"unix:{path}")


@pytest.fixture
def udp_echo() -> Iterator[int]:
    """A UDP echo on 127.0.0.1 (replies are prefixed re:)."""
    with udp_echo_thread(prefix=b"re:") as port:
        yield port


def test_udp_raw_framing_keeps_every_byte(udp_echo: int, tmp_path: Path) -> None:
    # Before: raw input was still cut into lines, so every 0x0a byte was dropped.
    payload = bytes(range(256))
    path = tmp_path / "all.bin"
    path.write_bytes(payload)
    target = f"127.0.0.1:{udp_echo}"
    argv = ["send", target, "--udp", "--framing", "raw", "--file", str(path), "--json"]
    res = invoke([*argv, "--expect-datagrams", "1"])
    assert res.exit_code == 0, res.stderr
    rec = as_json(res.stdout)
    assert (rec["bytes_sent"], rec["datagrams_sent"]) == (256, 1)
    assert (rec["bytes_received"], rec["datagrams_received"]) == (259, 1)


@pytest.mark.parametrize(
    ("args", "stdin", "sent"),
    [
        # Before: each line went out ending in a bare CR, and DATA was not converted at all.
        (["--expect-datagrams", "2"], b"a\nb\n", "re:a\r\nre:b\r\n"),
        (["a\nb", "--expect-datagrams", "1"], b"", "re:a\r\nb"),
        # An existing CRLF stays as it is (it became CR CR LF), as over TCP.
        (["a\r\nb\nc", "--expect-datagrams", "1"], b"", "re:a\r\nb\r\nc"),
        (["--expect-datagrams", "2"], b"l1\r\nl2\n", "re:l1\r\nre:l2\r\n"),
    ],
)
def test_udp_crlf_ends_lines_with_crlf(
    udp_echo: int, args: list[str], stdin: bytes, sent: str
) -> None:
    res = invoke(["send", f"127.0.0.1:{udp_echo}", "--udp", "--crlf", *args, "--json"], stdin=stdin)
    assert res.exit_code == 0, res.stderr
    assert as_json(res.stdout)["data"] == sent


def test_udp_replies_are_taken_while_the_input_pauses() -> None:
    # Before: replies were read only between input lines, so with stdin open and quiet the
    # reply sat in the socket: --expect-datagrams (and --timeout) waited for the next line.
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.settimeout(LONG)

    def answer_late() -> None:
        with contextlib.suppress(OSError):
            data, peer = server.recvfrom(65536)
            time.sleep(0.2)  # after the client looked for an answer and went back to its input
            server.sendto(b"re:" + data, peer)

    thread = threading.Thread(target=answer_late, daemon=True)
    thread.start()
    port = server.getsockname()[1]
    argv = [f"127.0.0.1:{port}", "--udp", "--expect-datagrams", "1", "--json"]
    with _send_process(*argv) as proc:
        assert proc.stdin is not None
        assert proc.stdout is not None
        assert proc.stderr is not None
        proc.stdin.write(b"a\n")
        proc.stdin.flush()
        try:
            code = proc.wait(LONG)  # stdin stays open: only the reply can end the run
        finally:
            proc.stdin.close()
        assert code == 0, proc.stderr.read()
        rec = as_json(proc.stdout.read())
    thread.join(LONG)
    server.close()
    assert (rec["ended_by"], rec["data"], rec["datagrams_sent"]) == ("expect", "re:a", 1)


def test_udp_each_line_is_a_datagram(udp_echo: int) -> None:
    target = f"127.0.0.1:{udp_echo}"
    res = invoke(
        ["send", target, "--udp", "--expect-datagrams", "3", "--json"], stdin=b"a\nbb\nccc\n"
    )
    assert res.exit_code == 0, res.stderr
    rec = as_json(res.stdout)
    assert rec["proto"] == "udp"
    assert rec["datagrams_sent"] == rec["datagrams_received"] == 3
    assert rec["data"] == "re:are:bbre:ccc"
    assert rec["ended_by"] == "expect"
    res = invoke(
        ["send", target, "--udp", "ping", "--expect-datagrams", "1", "--idle-timeout", "5s"]
    )
    assert (res.exit_code, res.stdout) == (0, b"re:ping")


@pytest.mark.parametrize("framing", [[], ["--framing", "raw"]], ids=["lines", "raw"])
def test_udp_refused_after_the_last_datagram_keeps_input_complete(
    tmp_path: Path, framing: list[str]
) -> None:
    # Before: raw input learnt its end only on the empty read after the last datagram, so an
    # ICMP refusal to that datagram reported input_complete false (lines: when they end in \n).
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
    path = tmp_path / "in.txt"
    path.write_bytes(b"abc\n")
    argv = ["send", f"127.0.0.1:{port}", "--udp", "--file", str(path), *framing, "--json"]
    res = invoke([*argv, "--idle-timeout", "1s"])
    assert res.exit_code == 1, res.stderr
    rec = as_json(res.stdout)
    assert (rec["errno_name"], rec["datagrams_sent"], rec["input_complete"]) == (
        "ECONNREFUSED",
        1,
        True,
    )


def test_udp_long_line_late_in_a_file_is_refused_before_sending(tmp_path: Path) -> None:
    # Before: UDP line mode skipped the check of a file that can be read twice, so every
    # earlier line went out before the long one was refused.
    path = tmp_path / "in.txt"
    path.write_bytes(b"ok\n" * 100_000 + b"x" * 300 + b"\n")  # the long line in a later read
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("127.0.0.1", 0))
        port = receiver.getsockname()[1]
        argv = ["send", f"127.0.0.1:{port}", "--udp", "--max-frame", "100", "--file", str(path)]
        res = invoke([*argv, "--idle-timeout", "0.2"])
        receiver.setblocking(False)
        with pytest.raises(BlockingIOError):
            receiver.recv(100)  # nothing was sent
    assert res.exit_code == 2
    assert "longer than 100 bytes" in res.stderr


def test_udp_refused_exits_1(closed_port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
    res = invoke(["send", f"127.0.0.1:{port}", "--udp", "x", "--idle-timeout", "1s"])
    assert res.exit_code == 1
    assert "ECONNREFUSED" in res.stderr


# --- outcomes and exit codes ----------------------------------------------------------------


def test_refused_exits_1(closed_port: int) -> None:
    res = invoke(["send", f"127.0.0.1:{closed_port}", "x"])
    assert res.exit_code == 1
    assert res.stdout == b""
    assert "ECONNREFUSED" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_server_that_never_answers_times_out(start: Callable[..., ServerThread]) -> None:
    srv = start(lambda conn: conn.recv(1) and conn.recv(1))  # holds the connection open
    began = time.monotonic()
    res = invoke(["send", addr(srv), "x", "--no-shutdown", "--timeout", "300ms", "--json"])
    assert time.monotonic() - began >= 0.3
    assert res.exit_code == 3
    assert as_json(res.stdout)["ended_by"] == "timeout"
    res = invoke(["send", addr(srv), "x", "--no-shutdown", "--idle-timeout", "200ms"])
    assert res.exit_code == 3
    assert "no answer" in res.stderr


def test_connect_timeout_exits_3(full_queue_port: int) -> None:
    res = invoke(["send", f"127.0.0.1:{full_queue_port}", "x", "--timeout", "200ms"])
    assert res.exit_code == 3
    assert "timed out" in res.stderr


def _resetter(conn: socket.socket) -> None:
    conn.recv(65536)
    conn.sendall(b"partial")
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def test_reset_exits_4(start: Callable[..., ServerThread]) -> None:
    srv = start(_resetter)
    res = invoke(["send", addr(srv), "hello", "--no-shutdown", "--json"])
    assert res.exit_code == 4
    rec = as_json(res.stdout)
    assert rec["ended_by"] == "reset"
    assert rec["errno_name"] in {"ECONNRESET", "EPIPE"}


def test_clean_close_exits_0(start: Callable[..., ServerThread]) -> None:
    srv = start(lambda conn: conn.sendall(b"bye"))
    res = invoke(["send", addr(srv), "--json"])
    assert res.exit_code == 0
    assert as_json(res.stdout)["ended_by"] == "eof"


def test_resolution_failure_exits_5() -> None:
    res = invoke(["send", "no-such-host.invalid:80", "x"])
    assert res.exit_code == 5
    assert res.stdout == b""


# --- repeat, transcript ---------------------------------------------------------------------


def test_repeat_statistics(start: Callable[..., ServerThread]) -> None:
    srv = start(echo_handler)
    res = invoke(["send", addr(srv), "ping", "--repeat", "5", "--interval", "10ms", "--json"])
    assert res.exit_code == 0, res.stderr
    lines = [json.loads(line) for line in res.stdout.decode().splitlines()]
    assert len(lines) == 6
    assert all(line["data"] == "ping" for line in lines[:5])
    stats = lines[5]
    assert stats["kind"] == "send-stats"
    assert (stats["runs"], stats["completed"], stats["failed"]) == (5, 5, 0)
    for metric in ("connect_ms", "first_byte_ms", "total_ms"):
        row = stats[metric]
        assert row["count"] == 5
        assert row["min"] <= row["p50"] <= row["p90"] <= row["p99"] <= row["max"]
        assert row["min"] <= row["avg"] <= row["max"]
    assert srv.accepted == 5
    text = invoke(["send", addr(srv), "ping", "--repeat", "3"])
    assert text.exit_code == 0
    assert b"runs 3  completed 3  failed 0" in text.stdout
    assert b"first byte" in text.stdout


def test_repeat_counts_failures(closed_port: int) -> None:
    res = invoke(["send", f"127.0.0.1:{closed_port}", "x", "--repeat", "3"])
    assert res.exit_code == 1
    assert b"failed 3" in res.stdout


def test_transcript(start: Callable[..., ServerThread], tmp_path: Path) -> None:
    srv = start(echo_handler)
    path = tmp_path / "t.jsonl"
    res = invoke(["send", addr(srv), "abc", "--transcript", str(path)])
    assert res.exit_code == 0, res.stderr
    records = [json.loads(line) for line in path.read_text().splitlines()]
    sent = b"".join(base64.b64decode(r["data_b64"]) for r in records if r["direction"] == "send")
    got = b"".join(base64.b64decode(r["data_b64"]) for r in records if r["direction"] == "recv")
    assert (sent, got) == (b"abc", b"abc")
    assert all(r["size"] == len(base64.b64decode(r["data_b64"])) for r in records)
    stamps = [r["monotonic"] for r in records]
    assert stamps == sorted(stamps)


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["127.0.0.1:9", "zz", "--hex"], "not a hex string"),
        (["127.0.0.1:9", "--file", "/nonexistent/file"], "cannot read"),
        (["127.0.0.1:9", "x", "--until", "a", "--until-regex", "b"], "exclude each other"),
        (["127.0.0.1:9", "x", "--until-regex", "("], "not a valid regex"),
        # re raises OverflowError / RecursionError for these (exit 70, internal error, before).
        (["127.0.0.1:9", "x", "--until-regex", "x{4294967296}"], "not a valid regex"),
        (["127.0.0.1:9", "x", "--until-regex", "(" * 5000 + "a" + ")" * 5000], "nested too deeply"),
        (["127.0.0.1:9", "x", "--framing", "len7"], "len7"),
        (["127.0.0.1:9", "x", "--expect-frames", "2"], "needs --framing"),
        (["127.0.0.1:9", "x", "--expect-datagrams", "2"], "needs --udp"),
        # Before: the read ended inside a frame, the frames with it were dropped, exit 0.
        (["127.0.0.1:9", "x", "--framing", "len32", "--expect-bytes", "6"], "--expect-frames N"),
        (["127.0.0.1:9", "x", "--framing", "line", "--until", "l"], "--until ends the read"),
        (["127.0.0.1:9", "x", "--framing", "netstring", "--until-regex", "l"], "--until-regex"),
        (["127.0.0.1:9", "--udp", "x", "--framing", "len8", "--until", "b"], "--framing len8"),
        (["127.0.0.1", "x"], "one port"),
        (["127.0.0.1:9", "x", "--idle-timeout", "soon"], "not a duration"),
        (["127.0.0.1:9", "x", "--file", "/etc/hostname"], "not both"),
        (["127.0.0.1:9", "--hex"], "--hex needs DATA"),
        (["127.0.0.1:9", "x", "--crlf", "--framing", "line"], "--crlf"),
        (["127.0.0.1:9", "x", "--max-frame", "0"], "--max-frame 0"),
        (["127.0.0.1:9", "x", "--interval", "1s"], "--interval paces --repeat runs"),
        (["127.0.0.1:9", "x", "--expect-bytes", "0"], "--expect-bytes 0"),
        (["127.0.0.1:9", "x", "--until", ""], "--until"),
        # Before: accepted, and matched before the first byte (the read ended at once).
        (["127.0.0.1:9", "x", "--until-regex", ""], "matches an empty reply"),
        (["127.0.0.1:9", "x", "--until-regex", "a*"], "matches an empty reply"),
        (["127.0.0.1:9", "x", "--hexdump", "--json"], "--hexdump"),
        (["127.0.0.1:9", "x", "--repeat", "0"], "--repeat"),
        (["unix:/tmp/x.sock", "x", "--udp"], "--udp"),
        # Before: ignored (the connect to a missing file then exited 1).
        (["unix:/tmp/np-none.sock", "x", "-6"], "-6 has no effect with 'unix:/tmp/np-none.sock'"),
        (["unix:/tmp/np-none.sock", "x", "-4"], "-4 has no effect"),
    ],
)
def test_bad_input_exits_2_with_one_line(args: list[str], needle: str) -> None:
    res = invoke(["send", *args])
    assert res.exit_code == 2
    assert res.stdout == b""
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert needle in res.stderr


def test_json_says_how_a_run_without_a_connection_ended(
    closed_port: int, full_queue_port: int
) -> None:
    refused = invoke(["send", f"127.0.0.1:{closed_port}", "x", "--json"])
    assert refused.exit_code == 1
    record = json.loads(refused.stdout)
    assert (record["ended_by"], record["errno_name"], record["address"]) == (
        "error",
        "ECONNREFUSED",
        None,
    )
    hung = invoke(["send", f"127.0.0.1:{full_queue_port}", "x", "--json", "--timeout", "300ms"])
    assert hung.exit_code == 3
    assert json.loads(hung.stdout)["ended_by"] == "timeout"


def test_unix_path_too_long_for_a_socket_is_bad_input() -> None:
    result = invoke(["send", "unix:/tmp/" + "z" * 120, "hi"])
    assert result.exit_code == 2
    assert "a Unix socket path may have 107" in result.stderr


def test_udp_framing_enforces_max_frame_on_replies() -> None:
    # The reply announces a 10-byte frame; --max-frame 4 refuses it, as over TCP.
    with udp_echo_thread(prefix=b"\x00\x0a0123456789") as port:
        res = invoke(
            ["send", f"127.0.0.1:{port}", "--udp", "--framing", "len16", "--max-frame", "4",
             "--expect-datagrams", "1", "--json", "ab"]
        )  # fmt: skip
    assert res.exit_code == 1, res.stdout
    rec = as_json(res.stdout)
    assert "max_frame is 4" in str(rec["framing_error"])
    assert "frames" not in rec or rec["frames"] == []


# --- review fixes: --repeat with --transcript/--hexdump, stalled uploads, partial frames, ----
# --- an unwritable transcript ----------------------------------------------------------------


def holding(reply: bytes, release: threading.Event) -> Handler:
    """Send `reply` at once, then keep the connection open, never reading, until `release`."""

    def handler(conn: socket.socket) -> None:
        conn.sendall(reply)
        release.wait(LONG)

    return handler


def test_repeat_transcript_records_every_run(
    start: Callable[..., ServerThread], tmp_path: Path
) -> None:
    # It used to create the file and write nothing: the runs never got the transcript.
    srv = start(echo_handler)
    path = tmp_path / "t.jsonl"
    res = invoke(["send", addr(srv), "abc", "--repeat", "3", "--transcript", str(path)])
    assert res.exit_code == 0, res.stderr
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted({r["run"] for r in records}) == [1, 2, 3]
    for run in (1, 2, 3):
        mine = [r for r in records if r["run"] == run]
        sent = b"".join(base64.b64decode(r["data_b64"]) for r in mine if r["direction"] == "send")
        got = b"".join(base64.b64decode(r["data_b64"]) for r in mine if r["direction"] == "recv")
        assert (sent, got) == (b"abc", b"abc")
    assert [r["run"] for r in records] == sorted(r["run"] for r in records)
    # A single run keeps its documented fields: no `run`.
    single = tmp_path / "one.jsonl"
    assert invoke(["send", addr(srv), "abc", "--transcript", str(single)]).exit_code == 0
    assert all("run" not in json.loads(line) for line in single.read_text().splitlines())


def test_repeat_with_hexdump_is_bad_input(server: ServerThread) -> None:
    # --repeat discards the replies, so --hexdump used to be silently ignored.
    res = invoke(["send", f"127.0.0.1:{server.port}", "x", "--repeat", "2", "--hexdump"])
    assert (res.exit_code, res.stdout) == (2, b"")
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert "--hexdump" in lines[0]
    assert "--repeat" in lines[0]
    assert server.accepted == 0


def _stall_size() -> int:
    """An upload the loopback buffers cannot swallow: well over the largest send buffer."""
    try:
        wmem_max = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, ValueError, IndexError):
        wmem_max = 4 * 1024 * 1024
    return max(8_000_000, 2 * wmem_max + 4 * 1024 * 1024)


def test_upload_stalled_by_a_peer_that_stopped_reading_exits_3(
    start: Callable[..., ServerThread], tmp_path: Path
) -> None:
    # The peer greets, then never reads: the upload stalls, the idle timeout ends the run.
    # That used to exit 0 with nothing on stderr, since a reply (the banner) had come.
    banner = b"220 hello\r\n"
    payload = tmp_path / "upload.bin"
    size = _stall_size()
    payload.write_bytes(b"A" * size)
    release = threading.Event()
    try:
        servers = [start(holding(banner, release)) for _ in range(2)]
        for srv in servers:  # a fixed receive buffer: the kernel cannot take it all for it
            srv.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        args = ["--file", str(payload), "--idle-timeout", "500ms"]
        as_json_run = invoke(["send", addr(servers[0]), *args, "--json"])
        text_run = invoke(["send", addr(servers[1]), *args])
    finally:
        release.set()
    assert as_json_run.exit_code == 3, as_json_run.stdout
    rec = as_json(as_json_run.stdout)
    assert rec["data"] == banner.decode()
    assert rec["ended_by"] == "idle-timeout"
    assert rec["input_complete"] is False
    assert 0 < int(str(rec["bytes_sent"])) < size
    assert text_run.exit_code == 3
    assert text_run.stdout == banner
    (line,) = text_run.stderr.splitlines()
    assert "input not fully sent" in line
    assert f"of {size} bytes went out before the idle timeout" in line


def test_complete_upload_says_input_complete(start: Callable[..., ServerThread]) -> None:
    srv = start(echo_handler)
    res = invoke(["send", addr(srv), "ping", "--json"])
    assert res.exit_code == 0, res.stderr
    assert as_json(res.stdout)["input_complete"] is True


def test_a_reader_pausing_past_the_idle_timeout_loses_nothing(
    start: Callable[..., ServerThread],
) -> None:
    # Before: the time send sat blocked on a full stdout counted as the peer being idle, so a
    # reader that paused longer than --idle-timeout (`send ... | (sleep 3; cat)`) got a cut
    # reply and exit 0 (nc delivers it all).
    payload = os.urandom(2 * 1024 * 1024)

    def serve(conn: socket.socket) -> None:
        conn.recv(16)
        conn.sendall(payload)

    srv = start(serve)
    with _send_process(addr(srv), "GET", "--idle-timeout", "150ms") as proc:
        assert proc.stdout is not None
        time.sleep(0.6)  # the reader pauses, four idle timeouts long
        out, err = proc.communicate(timeout=LONG)
    assert out == payload
    assert proc.returncode == 0, err


def test_partial_frame_at_the_idle_timeout_is_a_framing_error(
    start: Callable[..., ServerThread],
) -> None:
    # A len32 header announcing 5 bytes, 3 of them sent; the peer stays open. The partial
    # frame used to be dropped silently, exit 0; after an EOF the same bytes are exit 1.
    partial = b"\x00\x00\x00\x05abc"
    release = threading.Event()
    try:
        servers = [start(holding(partial, release)) for _ in range(3)]
        base = ["x", "--framing", "len32"]
        idle_json = invoke(["send", addr(servers[0]), *base, "--idle-timeout", "500ms", "--json"])
        idle_text = invoke(["send", addr(servers[1]), *base, "--idle-timeout", "500ms"])
        overall = invoke(
            ["send", addr(servers[2]), *base, "--idle-timeout", "0", "--timeout", "700ms",
             "--json"]
        )  # fmt: skip
    finally:
        release.set()
    assert idle_json.exit_code == 1, idle_json.stdout
    rec = as_json(idle_json.stdout)
    assert rec["ended_by"] == "idle-timeout"
    assert rec["framing_error"] == "incomplete frame at idle timeout: 7 bytes of a frame"
    assert rec["frames"] == []
    assert idle_text.exit_code == 1
    assert idle_text.stdout == b""
    (line,) = idle_text.stderr.splitlines()
    assert line.endswith("incomplete frame at idle timeout: 7 bytes of a frame")
    # --timeout stays exit 3 (timed out), and now says what was cut off.
    assert overall.exit_code == 3, overall.stdout
    rec = as_json(overall.stdout)
    assert rec["ended_by"] == "timeout"
    assert rec["framing_error"] == "incomplete frame at timeout: 7 bytes of a frame"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("extra", [[], ["--repeat", "2"]])
def test_transcript_write_failure_exits_6_with_one_line(
    start: Callable[..., ServerThread], extra: list[str]
) -> None:
    # Every write to /dev/full fails with ENOSPC: that used to be "internal error", exit 70.
    srv = start(echo_handler)
    res = invoke(["send", addr(srv), "hello", "--transcript", "/dev/full", *extra])
    assert res.exit_code == 6, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert "/dev/full" in lines[0]
    assert "ENOSPC" in lines[0]
    assert "internal error" not in res.stderr


def test_transcript_open_failure_of_the_host_exits_6(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: ServerThread
) -> None:
    # A path that cannot be used is bad input (exit 2); a host that cannot give us the file
    # (no space for it, no free descriptor) is a local failure (exit 6), named with its errno.
    import errno

    target = tmp_path / "t.jsonl"
    real_open = Path.open

    def failing_open(self: Path, *args: object, **kwargs: object) -> object:
        if self == target:
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_open(self, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(Path, "open", failing_open)
    res = invoke(["send", f"127.0.0.1:{server.port}", "x", "--transcript", str(target)])
    assert res.exit_code == 6, res.stderr
    (line,) = res.stderr.splitlines()
    assert str(target) in line
    assert "ENOSPC" in line
    assert server.accepted == 0


def test_a_terminal_stdin_sends_nothing_and_says_so(start: Callable[..., ServerThread]) -> None:
    # An nc user types into `netprobe send HOST:PORT`: nothing was sent, silently.
    import pty

    srv = start(echo_handler)
    main, tty = pty.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "netprobe", "send", addr(srv)],
            stdin=tty, stderr=tty, stdout=subprocess.PIPE, timeout=LONG * 2, check=False,
        )  # fmt: skip
        said = b""
        while select.select([main], [], [], 0.2)[0]:
            said += os.read(main, 4096)
    finally:
        os.close(main)
        os.close(tty)
    assert proc.returncode in (0, 3)  # nothing sent: an idle timeout with no answer is 3
    assert b"stdin is a terminal: sending nothing" in said


def _udp_replier(replies: int, gap_s: float) -> Any:
    """A UDP server answering each datagram with `replies` lines `gap_s` apart."""
    return udp_server_thread(lambda _data: [b"line%d\n" % i for i in range(replies)], gap_s)


def test_udp_replies_that_keep_coming_are_read_past_one_idle_timeout() -> None:
    # The idle limit was fixed before the replies came: --idle-timeout acted as an overall
    # timeout (20 of 60 lines in 2 s, exit 0). socat -T2 gets them all.
    with _udp_replier(8, 0.1) as (port, _got):
        res = invoke(["send", "--udp", f"127.0.0.1:{port}", "hi", "--idle-timeout", "300ms",
                      "--json"])  # fmt: skip
    rec = as_json(res.stdout)
    assert (rec["datagrams_received"], rec["ended_by"]) == (8, "idle-timeout"), rec
    assert res.exit_code == 0, res.stderr


def test_a_terminal_stdin_sends_no_udp_datagram_either() -> None:
    # An empty DATA stood for "no input": over UDP one empty datagram went out, a real probe.
    import pty

    main, tty = pty.openpty()
    try:
        with _udp_replier(0, 0.0) as (port, got):
            proc = subprocess.run(
                [sys.executable, "-m", "netprobe", "send", "--udp", f"127.0.0.1:{port}",
                 "--idle-timeout", "200ms", "--json"],
                stdin=tty, capture_output=True, timeout=LONG * 2,
                check=False,
            )  # fmt: skip
            time.sleep(0.1)  # a datagram on its way would be in by now
    finally:
        os.close(main)
        os.close(tty)
    assert got == []
    assert as_json(proc.stdout)["datagrams_sent"] == 0


def test_a_signal_with_stdout_stuck_ends_a_hexdump_too(start: Callable[..., ServerThread]) -> None:
    # After the interrupt, the hexdump's last line was written behind the stuck write, with
    # no signal left to end it: only SIGKILL did.
    def flood(conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            conn.sendall(b"\0" * 5_000_000)

    srv = start(flood)
    with _send_process(addr(srv), "hi", "--hexdump") as proc:  # stdout: a pipe nobody reads
        wait_in_syscall(proc.pid, "write", 1)  # the pipe fills, then the write blocks
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(LONG) == 143
        finally:
            if proc.poll() is None:
                proc.kill()


class _Banner:
    """A server handler that sends a banner and then only reads; `read_by(pid)` says when
    the client has read it all (its socket's rx_queue is 0) and waits in poll(2)."""

    def __init__(self) -> None:
        self.ends: list[tuple[str, str]] = []  # the client's (local, remote) in /proc/net/tcp

    def __call__(self, conn: socket.socket) -> None:
        conn.sendall(b"OK v1\r\n")
        ours, theirs = conn.getsockname()[1], conn.getpeername()[1]
        self.ends.append((f":{theirs:04X}", f":{ours:04X}"))
        with contextlib.suppress(OSError):
            while conn.recv(16):  # until send is gone (stdin stays open: no FIN before)
                pass

    def read_by(self, pid: int) -> bool:
        if not self.ends:
            return False
        with open("/proc/net/tcp") as table:
            rows = [line.split() for line in table.readlines()[1:]]
        local, remote = self.ends[0]
        # (Both ends: a TIME_WAIT socket of an earlier test may hold the same local port.)
        unread = [
            int(row[4].split(":")[1], 16)
            for row in rows
            if row[1].endswith(local) and row[2].endswith(remote)
        ]
        return unread == [0] and in_syscall(pid, "poll")


def test_an_interrupted_hexdump_still_prints_what_came(start: Callable[..., ServerThread]) -> None:
    # Only a write the signal cut stops the output: a first fix dropped the last dump line
    # of every interrupted run, stdout fine or not (7 bytes received, 0 printed).
    banner = _Banner()
    srv = start(banner)
    with _send_process(addr(srv), "--hexdump", "--idle-timeout", "10s") as proc:
        _wait_for(lambda: banner.read_by(proc.pid))
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=LONG)
    assert proc.returncode == 130, err
    assert out.decode().splitlines() == [
        "00000000  4f 4b 20 76 31 0d 0a                              |OK v1..|",
        "00000007",
    ]


@pytest.mark.unix
def test_an_abstract_unix_target() -> None:
    # Before: `unix:@name` was taken for a file named `@name`: ECONNREFUSED/ENOENT, exit 1.
    name = f"@netprobe-send-{os.getpid()}-{time.monotonic_ns()}"
    argv = ["send", f"unix:{name}", "over abstract", "--json"]
    res = _send_to_a_unix_echo("\0" + name[1:], argv)
    assert res.exit_code == 0, res.stderr
    rec = as_json(res.stdout)
    assert (rec["data"], rec["address"]) == ("over abstract", f"unix:{name}")


def test_an_abstract_name_may_have_108_bytes_with_its_leading_nul() -> None:
    # Linux keeps no closing NUL after an abstract name: the `@` (the leading NUL) and 107.
    result = invoke(["send", "unix:@" + "z" * 108, "hi"])
    assert result.exit_code == 2
    assert "it may have 108" in result.stderr
    nobody = invoke(["send", "unix:@" + "z" * 107, "hi", "--json"])
    assert as_json(nobody.stdout)["errno_name"] == "ECONNREFUSED", nobody.stderr
