"""`netprobe send`: every run's JSON has one schema and one `ended_by` vocabulary (a failed
`--repeat` run, a UDP refusal), the `send-stats` rows keep their documented shape, and a
payload the framing cannot carry is refused before anything is sent. Real loopback sockets."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netprobe.engines.send import SendResult, exit_status_for
from netprobe.exitcodes import ExitStatus
from tests.helpers import (
    LONG,
    ROOT,
    ServerThread,
    invoke,
    netprobe_process,
    run_in_own_netns,
    run_netprobe,
    udp_echo_thread,
)


@pytest.mark.parametrize("proto", [[], ["--udp"]], ids=["tcp", "udp"])
def test_a_connect_this_host_refuses_is_exit_6_with_its_object(proto: list[str]) -> None:
    # IPv6 off on loopback: connect() to ::1 fails EADDRNOTAVAIL, this host's refusal (exit 6,
    # as port-check and reset client say). Before: TCP exit 1; UDP exit 6 with no --json
    # object, and a line blaming ip_local_port_range.
    setup = "echo 1 > /proc/sys/net/ipv6/conf/lo/disable_ipv6 || exit 99"
    result = run_in_own_netns(setup, ["send", *proto, "[::1]:7", "hi", "--json"])
    rows = json_lines(result.stdout)
    assert [(r["ended_by"], r["errno_name"], r["address"]) for r in rows] == [
        ("error", "EADDRNOTAVAIL", None)
    ], result.stderr
    assert result.returncode == 6, result.stderr
    assert "ip_local_port_range" not in result.stderr.decode()


def test_a_refusal_by_the_target_outranks_this_hosts_refusal_of_another_address() -> None:
    # `send localhost:9` where IPv6 is off: 127.0.0.1 refuses (the C library sorts it first
    # then), ::1 cannot be reached from here at all. The run said EADDRNOTAVAIL, exit 6: the
    # last address's error, not what the target said.
    code = (
        "import socket, sys\n"
        "from netprobe.engines.send import _connect\n"
        "from netprobe.errors import LocalError\n"
        "from netprobe.sockets import Resolved\n"
        "addrs = [Resolved(socket.AF_INET, ('127.0.0.1', 9)),\n"
        "         Resolved(socket.AF_INET6, ('::1', 9, 0, 0))]\n"
        "try:\n"
        "    _connect(addrs, deadline=float('inf'))\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, isinstance(exc, LocalError), exc.errno_name)\n"
    )
    setup = "echo 1 > /proc/sys/net/ipv6/conf/lo/disable_ipv6 || exit 99"
    result = run_in_own_netns(setup, ["-c", code], module=None)
    assert result.stdout.decode().split() == ["ConnectError", "False", "ECONNREFUSED"], (
        result.stdout + result.stderr
    )


# issue #5's list, plus README's `error` (another socket error, or a malformed reply frame)
ENDED_BY = {"eof", "reset", "idle-timeout", "timeout", "expect", "error"}
STAT_ROW = ["min", "avg", "p50", "p90", "p99", "max", "count"]
EMPTY_ROW = {**dict.fromkeys(STAT_ROW[:-1]), "count": 0}


def json_lines(out: bytes) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in out.decode().splitlines()]
    assert all(isinstance(r, dict) for r in records)
    return records


@pytest.fixture
def reading_server() -> Iterator[ServerThread]:
    """Reads each request to its end, then closes without a reply."""

    def handler(conn: socket.socket) -> None:
        while conn.recv(65536):  # unread data would make close() an RST
            pass

    srv = ServerThread(handler=handler)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def resetting_server() -> Iterator[ServerThread]:
    """Reads the request, then closes with SO_LINGER 0: the client sees an RST."""

    def handler(conn: socket.socket) -> None:
        conn.recv(65536)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    srv = ServerThread(handler=handler)
    try:
        yield srv
    finally:
        srv.stop()


@contextlib.contextmanager
def _loopback_socket(kind: int, backlog: int | None = None) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, kind)
    try:
        sock.bind(("127.0.0.1", 0))
        if backlog is not None:
            sock.listen(backlog)
        sock.settimeout(LONG)
        yield sock
    finally:
        sock.close()


@pytest.fixture
def idle_listener() -> Iterator[socket.socket]:
    """A TCP listener that never accepts: a connect made to it waits in its accept queue."""
    with _loopback_socket(socket.SOCK_STREAM, backlog=8) as listener:
        yield listener


@pytest.fixture
def udp_receiver() -> Iterator[socket.socket]:
    """A bound UDP socket that only collects datagrams."""
    with _loopback_socket(socket.SOCK_DGRAM) as sock:
        yield sock


def first_connection_is_the_sentinel(listener: socket.socket) -> bool:
    """Connect once more and accept: True when nothing had connected before (FIFO queue)."""
    with socket.create_connection(listener.getsockname(), timeout=LONG) as sentinel:
        conn, peer = listener.accept()
        conn.close()
        return bool(peer == sentinel.getsockname())


def first_datagram_is_the_sentinel(receiver: socket.socket) -> bool:
    """Send one datagram more and read: True when nothing had arrived before it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sentinel:
        sentinel.sendto(b"sentinel", receiver.getsockname())
        data, _peer = receiver.recvfrom(65536)
    return data == b"sentinel"


def free_udp_port() -> int:
    """A UDP port nothing listens on: bound, then released (a send there gets ICMP back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", 0))
        port: int = holder.getsockname()[1]
    return port


# --- bug 1: a failed --repeat run prints the object a single failed run prints --------------


def test_failed_repeat_run_is_the_single_run_object(closed_port: int) -> None:
    target = f"127.0.0.1:{closed_port}"
    single = invoke(["send", target, "hello", "--json"])
    assert single.exit_code == 1
    (one,) = json_lines(single.stdout)
    repeated = invoke(["send", target, "hello", "--repeat", "2", "--json"])
    assert repeated.exit_code == 1
    *runs, stats = json_lines(repeated.stdout)
    assert runs == [one, one]
    assert one["ended_by"] in ENDED_BY
    assert (one["address"], one["proto"], one["errno_name"]) == (None, "tcp", "ECONNREFUSED")
    assert (one["bytes_sent"], one["bytes_received"], one["total_ms"]) == (0, 0, None)
    assert stats["kind"] == "send-stats"
    assert (stats["runs"], stats["completed"], stats["failed"]) == (2, 0, 2)
    assert stats["ended_by"] == {"error": 2}
    assert stats["errno_name"] == {"ECONNREFUSED": 2}


def test_repeat_connect_timeout_uses_the_same_vocabulary(full_queue_port: int) -> None:
    target = f"127.0.0.1:{full_queue_port}"
    args = ["send", target, "x", "--json", "--timeout", "200ms"]
    single = invoke(args)
    assert single.exit_code == 3
    (one,) = json_lines(single.stdout)
    repeated = invoke([*args, "--repeat", "2"])
    assert repeated.exit_code == 3
    *runs, stats = json_lines(repeated.stdout)
    assert runs == [one, one]
    assert (one["ended_by"], one["address"], "errno_name" in one) == ("timeout", None, False)
    assert stats["ended_by"] == {"timeout": 2}
    assert stats["errno_name"] == {}


def test_stats_rows_keep_their_shape_when_nothing_connected(closed_port: int) -> None:
    res = invoke(["send", f"127.0.0.1:{closed_port}", "x", "--repeat", "2", "--json"])
    stats = json_lines(res.stdout)[-1]
    for metric in ("connect_ms", "first_byte_ms", "total_ms"):
        assert stats[metric] == EMPTY_ROW, metric
    text = invoke(["send", f"127.0.0.1:{closed_port}", "x", "--repeat", "2"])
    assert text.exit_code == 1
    lines = text.stdout.decode().splitlines()
    assert lines[0] == "runs 2  completed 0  failed 2  (error 2; ECONNREFUSED 2)"
    assert lines[2].split() == ["connect", "-", "-", "-", "-", "-", "-"]


def test_stats_first_byte_row_counts_only_runs_with_a_reply(reading_server: ServerThread) -> None:
    res = invoke(["send", f"127.0.0.1:{reading_server.port}", "x", "--repeat", "3", "--json"])
    assert res.exit_code == 0, res.stderr
    *runs, stats = json_lines(res.stdout)
    assert [r["bytes_received"] for r in runs] == [0, 0, 0]
    assert stats["first_byte_ms"] == EMPTY_ROW
    assert list(stats["connect_ms"]) == STAT_ROW
    assert stats["connect_ms"]["count"] == stats["total_ms"]["count"] == 3


def test_stats_runs_are_completed_plus_failed(resetting_server: ServerThread) -> None:
    target = f"127.0.0.1:{resetting_server.port}"
    res = invoke(["send", target, "hi", "--no-shutdown", "--repeat", "2", "--json"])
    assert res.exit_code == 4
    *runs, stats = json_lines(res.stdout)
    assert [r["ended_by"] for r in runs] == ["reset", "reset"]
    assert (stats["runs"], stats["completed"], stats["failed"]) == (2, 0, 2)
    assert stats["ended_by"] == {"reset": 2}
    assert stats["connect_ms"]["count"] == 2


# --- bug 2: a UDP refusal counts what was sent ----------------------------------------------


def test_udp_refusal_reports_what_was_sent() -> None:
    port = free_udp_port()
    res = invoke(["send", f"127.0.0.1:{port}", "hi", "--udp", "--json", "--idle-timeout", "5s"])
    assert res.exit_code == 1
    (rec,) = json_lines(res.stdout)
    assert rec["address"] == f"127.0.0.1:{port}"
    assert rec["proto"] == "udp"
    assert (rec["bytes_sent"], rec["datagrams_sent"]) == (2, 1)
    assert (rec["bytes_received"], rec["datagrams_received"]) == (0, 0)
    assert (rec["ended_by"], rec["errno_name"]) == ("error", "ECONNREFUSED")
    assert rec["input_complete"] is True  # before: false, though DATA's one datagram went out
    assert "ICMP port unreachable" in rec["error"]
    assert isinstance(rec["total_ms"], float)
    text = invoke(["send", f"127.0.0.1:{port}", "hi", "--udp", "--idle-timeout", "5s"])
    assert text.exit_code == 1
    assert text.stderr.count("\n") == 1
    assert "ECONNREFUSED" in text.stderr


def test_a_datagram_too_large_for_udp_is_this_hosts_refusal_exit_6(tmp_path: Path) -> None:
    # Before: exit 1 ("refused / unreachable"), as if the peer had said no. The kernel refused
    # the send (EMSGSIZE) before anything left: a local error, as port-check's exit 6 is.
    big = tmp_path / "big"
    big.write_bytes(b"x" * 70_000)
    with udp_echo_thread() as port:
        res = invoke(["send", "--udp", f"127.0.0.1:{port}", "--file", str(big), "--json"])
    assert res.exit_code == 6, res.stderr
    (rec,) = json_lines(res.stdout)
    assert (rec["ended_by"], rec["errno_name"], rec["datagrams_sent"]) == ("error", "EMSGSIZE", 0)


def test_udp_refusal_in_a_repeat_is_a_counted_run() -> None:
    port = free_udp_port()
    target = f"127.0.0.1:{port}"
    res = invoke(["send", target, "hi", "--udp", "--repeat", "2", "--json", "--idle-timeout", "5s"])
    assert res.exit_code == 1
    *runs, stats = json_lines(res.stdout)
    assert [(r["address"], r["datagrams_sent"], r["ended_by"]) for r in runs] == [
        (target, 1, "error")
    ] * 2
    assert (stats["runs"], stats["failed"], stats["errno_name"]) == (2, 2, {"ECONNREFUSED": 2})


# --- bug 3: an unframeable payload is refused before anything is sent ------------------------


@pytest.mark.parametrize(
    ("spec", "payload"),
    [("len8", "x" * 256), ("line", "a\nb"), ("crlf", "a\r\nb")],
)
def test_unframeable_data_is_refused_before_connecting(
    idle_listener: socket.socket, closed_port: int, spec: str, payload: str
) -> None:
    # A closed port answers a connect with ECONNREFUSED (exit 1): exit 2 shows none was made.
    res = invoke(["send", f"127.0.0.1:{closed_port}", payload, "--framing", spec])
    assert (res.exit_code, res.stdout) == (2, b"")
    assert f"as a {spec} frame" in res.stderr
    port = idle_listener.getsockname()[1]
    for extra in ([], ["--repeat", "3"], ["--json"]):
        res = invoke(["send", f"127.0.0.1:{port}", payload, "--framing", spec, *extra])
        assert (res.exit_code, res.stdout) == (2, b""), extra
    assert first_connection_is_the_sentinel(idle_listener)


def test_unframeable_hex_data_is_refused_before_connecting(idle_listener: socket.socket) -> None:
    port = idle_listener.getsockname()[1]
    res = invoke(["send", f"127.0.0.1:{port}", "ab" * 256, "--hex", "--framing", "len8"])
    assert res.exit_code == 2
    assert "256-byte payload" in res.stderr
    assert first_connection_is_the_sentinel(idle_listener)


@pytest.mark.parametrize("via", ["file", "stdin"])
def test_unframeable_line_in_a_file_is_refused_before_connecting(
    idle_listener: socket.socket, tmp_path: Path, via: str
) -> None:
    # The bad line comes after a good one and after more than one read chunk (256 KiB).
    body = b"ok\n" + b"y" * 300_000 + b"\n" + b"z" * 300 + b"\n"
    path = tmp_path / "frames.txt"
    path.write_bytes(body)
    target = f"127.0.0.1:{idle_listener.getsockname()[1]}"
    if via == "file":
        res = invoke(["send", target, "--file", str(path), "--framing", "len8"])
    else:
        res = invoke(["send", target, "--framing", "len8"], stdin=body)
    assert res.exit_code == 2
    assert "len8 frame" in res.stderr
    assert first_connection_is_the_sentinel(idle_listener)


def test_unframeable_udp_line_is_refused_before_the_first_datagram(
    udp_receiver: socket.socket, tmp_path: Path
) -> None:
    path = tmp_path / "datagrams.txt"
    path.write_bytes(b"first\n" + b"w" * 300 + b"\n")
    target = f"127.0.0.1:{udp_receiver.getsockname()[1]}"
    res = invoke(["send", target, "--udp", "--file", str(path), "--framing", "len8", "--json"])
    assert (res.exit_code, res.stdout) == (2, b"")
    assert first_datagram_is_the_sentinel(udp_receiver)


def test_checked_file_is_still_sent_whole(tmp_path: Path) -> None:
    """The check reads the input once; the exchange must still send all of it."""
    received: list[bytes] = []

    def collect(conn: socket.socket) -> None:
        while data := conn.recv(65536):
            received.append(data)

    path = tmp_path / "lines.txt"
    path.write_bytes(b"alpha\n" + b"b" * 300_000 + b"\ngamma")
    srv = ServerThread(handler=collect)
    try:
        res = invoke(["send", f"127.0.0.1:{srv.port}", "--file", str(path), "--framing", "len32"])
        stdin_res = invoke(
            ["send", f"127.0.0.1:{srv.port}", "--framing", "len32"], stdin=path.read_bytes()
        )
    finally:
        srv.stop()
    assert res.exit_code == 0, res.stderr
    assert stdin_res.exit_code == 0, stdin_res.stderr
    one = b"".join(struct.pack("!I", len(p)) + p for p in path.read_bytes().split(b"\n"))
    assert b"".join(received) == one + one


@pytest.mark.parametrize("spec", ["line", "len16", "netstring"])
def test_frame_over_max_frame_is_refused_before_connecting(
    idle_listener: socket.socket, tmp_path: Path, spec: str
) -> None:
    # --max-frame caps what we send as well as what we accept: DATA as one frame, and a long
    # line that arrives inside one read chunk (not only one that spans chunks).
    target = f"127.0.0.1:{idle_listener.getsockname()[1]}"
    res = invoke(["send", target, "x" * 50, "--framing", spec, "--max-frame", "10"])
    assert (res.exit_code, res.stdout) == (2, b"")
    assert "--max-frame 10" in res.stderr
    path = tmp_path / "lines.txt"
    path.write_bytes(b"short\n" + b"y" * 50 + b"\nend\n")
    res = invoke(["send", target, "--file", str(path), "--framing", spec, "--max-frame", "10"])
    assert (res.exit_code, res.stdout) == (2, b"")
    assert "longer than 10 bytes" in res.stderr
    assert first_connection_is_the_sentinel(idle_listener)


def test_piped_input_goes_out_whole_after_the_peer_half_closes() -> None:
    # listen half-closes when its own stdin ends, then keeps reading: a send whose input is a
    # pipe must still deliver all of it (it used to stop at the peer's FIN and exit 0).
    received: list[int] = []

    def half_closing(conn: socket.socket) -> None:
        conn.sendall(b"hello from the peer\n")
        conn.shutdown(socket.SHUT_WR)
        total = 0
        while data := conn.recv(65536):
            total += len(data)
        received.append(total)

    srv = ServerThread(handler=half_closing)
    try:
        payload = bytes(range(256)) * 12_000  # 3 MB through a pipe, many chunks
        proc = run_netprobe(["send", f"127.0.0.1:{srv.port}", "--json"], stdin=payload)
    finally:
        srv.stop()
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["bytes_sent"] == len(payload)
    assert record["data"] == "hello from the peer\n"
    assert received == [len(payload)]


def test_an_empty_udp_reply_is_an_answer() -> None:
    # The exchange sends an empty datagram and gets one back: 0 bytes, yet a reply (exit 0,
    # not 3 "no answer").
    with udp_echo_thread() as port:
        res = invoke(
            ["send", f"127.0.0.1:{port}", "", "--udp", "--idle-timeout", "300ms", "--json"]
        )
    record = json_lines(res.stdout)[0]
    assert (record["datagrams_received"], record["bytes_received"]) == (1, 0)
    assert res.exit_code == 0, res.stderr


# --- sweep fixes: empty paths, and a transcript touched before the input was refused --------


@pytest.mark.parametrize(("option", "data"), [("--transcript", ["x"]), ("--file", [])])
def test_empty_path_is_named_as_given(closed_port: int, option: str, data: list[str]) -> None:
    # Before: the line named '.' (the empty path read as the current directory).
    res = invoke(["send", f"127.0.0.1:{closed_port}", *data, option, ""])
    assert (res.exit_code, res.stdout) == (2, b""), res.stderr
    (line,) = res.stderr.splitlines()
    assert f"{option} ''" in line
    assert "'.'" not in line


OLD_TRANSCRIPT = '{"direction": "recv", "size": 0, "data_b64": ""}\n'


@pytest.mark.parametrize(
    "argv",
    [
        ["--repeat", "2"],  # stdin is a pipe here: nothing to replay
        ["x" * 256, "--framing", "len8"],
        ["a\nb", "--framing", "line", "--repeat", "2"],
        ["x", "--udp", "--target-as-unix"],
    ],
    ids=["repeat-pipe", "unframeable", "unframeable-repeat", "udp-unix"],
)
def test_bad_input_leaves_the_transcript_file_alone(
    tmp_path: Path, closed_port: int, argv: list[str]
) -> None:
    # Before: FILE was opened ("w": truncated, or created) first, and the input refused after.
    target = f"127.0.0.1:{closed_port}"
    if "--target-as-unix" in argv:
        argv = [a for a in argv if a != "--target-as-unix"]
        target = f"unix:{tmp_path / 'nobody.sock'}"
    kept = tmp_path / "keep.jsonl"
    kept.write_text(OLD_TRANSCRIPT)
    # A real process: its stdin is a pipe (invoke's in-memory stdin could be replayed).
    res = run_netprobe(["send", target, *argv, "--transcript", str(kept)])
    assert (res.returncode, res.stdout) == (2, b""), res.stderr
    assert len(res.stderr.splitlines()) == 1
    assert kept.read_text() == OLD_TRANSCRIPT
    fresh = tmp_path / "new.jsonl"
    res = run_netprobe(["send", target, *argv, "--transcript", str(fresh)])
    assert res.returncode == 2, res.stderr
    assert not fresh.exists()


def test_a_run_that_fails_still_replaces_the_old_transcript(
    tmp_path: Path, closed_port: int
) -> None:
    # The transcript is this run's record, an empty one too: a refused connect is no bad input.
    kept = tmp_path / "keep.jsonl"
    kept.write_text(OLD_TRANSCRIPT)
    res = invoke(["send", f"127.0.0.1:{closed_port}", "x", "--transcript", str(kept)])
    assert res.exit_code == 1, res.stderr
    assert kept.read_text() == ""


def test_a_reset_right_after_the_accept_is_a_reset_run_not_a_failed_connect() -> None:
    # A server that accepts and aborts at once: when its RST came before connect() looked at
    # SO_ERROR (a race, about one run in six), the run was reported as never connected
    # (address and connect_ms null, ended_by "error"). The handshake had completed.
    argv = ["reset", "serve", "--on-accept", "--port", "0", "--json"]
    with netprobe_process(argv) as server:
        assert server.stdout is not None
        port = json.loads(server.stdout.readline())["port"]
        records = []
        for _ in range(40):
            result = invoke(["send", f"127.0.0.1:{port}", "x", "--json"])
            assert result.exit_code == 4, result.stderr
            records.append(json.loads(result.stdout))
    assert {r["ended_by"] for r in records} == {"reset"}, records
    assert all(r["address"] == f"127.0.0.1:{port}" for r in records)
    assert all(r["connect_ms"] is not None for r in records)


_ACCEPT_AND_CLOSE = """
import socket, sys
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
while True:
    listener.accept()[0].close()
"""


def test_a_peer_that_accepts_and_closes_at_once_is_eof_or_reset_never_a_local_error() -> None:
    # Its FIN and the RST our one write provokes often come in one wake-up: the run ended
    # "error" EPIPE, exit 6 ("this host refused"), in about half the runs.
    import subprocess
    import sys

    server = subprocess.Popen([sys.executable, "-c", _ACCEPT_AND_CLOSE], stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        outcomes = set()
        for _ in range(100):  # a race: about one run in ten or twenty hit it
            result = invoke(["send", f"127.0.0.1:{port}", "x", "--json"])
            record = json.loads(result.stdout)
            outcomes.add((record["ended_by"], result.exit_code))
    finally:
        server.kill()
        server.wait(LONG)
        assert server.stdout is not None
        server.stdout.close()
    # eof: our byte went out before the peer's close (its RST answers it); reset: it arrived
    # unread before the close, which then sends RST instead of FIN.
    assert outcomes <= {("eof", 0), ("reset", 4)}, outcomes


# --- a Unix socket file whose permissions refuse us: this host's refusal, exit 6 -------------

_SETPRIV = shutil.which("setpriv")
# Root (also in a user namespace) passes permission checks: the child drops the capabilities
# that let it, as tests/test_echo.py does (it runs as the same uid, with no new privileges).
_DROP_DAC = (
    [str(_SETPRIV), "--bounding-set=-dac_override,-dac_read_search,-fowner", "--inh-caps=-all"]
    if os.geteuid() == 0 and _SETPRIV is not None
    else []
)


@pytest.mark.unix
@pytest.mark.skipif(
    os.geteuid() == 0 and _SETPRIV is None, reason="root ignores file permissions (no setpriv)"
)
def test_a_unix_socket_whose_permissions_refuse_us_exits_6_as_port_check_does(
    tmp_path: Path,
) -> None:
    # Before: exit 1 ("refused / unreachable", as if the listener had said no) while
    # port-check gave the same EACCES exit 6. A live listener is there; the file's mode bars us.
    path = tmp_path / "l.sock"

    def run(*argv: str) -> subprocess.CompletedProcess[bytes]:
        result = subprocess.run(
            [*_DROP_DAC, sys.executable, "-m", "netprobe", *argv],
            capture_output=True,
            timeout=30,
            cwd=ROOT,
            check=False,
        )
        if result.stderr.startswith(b"setpriv:"):
            pytest.skip(f"cannot drop capabilities here: {result.stderr.decode().strip()}")
        return result

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(path))
        live.listen(1)
        path.chmod(0)
        checked = run("port-check", f"unix:{path}", "--json")
        text = run("send", f"unix:{path}", "hi")
        as_json = run("send", f"unix:{path}", "hi", "--json")
    (row,) = json_lines(checked.stdout)
    assert (row["state"], row["errno_name"], checked.returncode) == ("error", "EACCES", 6)
    assert text.returncode == 6, text.stderr
    assert text.stderr.decode().splitlines() == [f"netprobe: send: connect: EACCES: unix:{path}"]
    assert as_json.returncode == 6, as_json.stderr
    (rec,) = json_lines(as_json.stdout)
    assert (rec["address"], rec["proto"], rec["ended_by"], rec["errno_name"]) == (
        None,
        "unix",
        "error",
        "EACCES",
    )


@pytest.mark.parametrize(
    ("proto", "errno_name", "code"),
    [
        ("unix", "EACCES", ExitStatus.LOCAL),  # the socket file's permissions
        ("unix", "EPERM", ExitStatus.LOCAL),
        ("unix", "ECONNREFUSED", ExitStatus.NOT_OPEN),  # a stale file: nobody listens
        ("tcp", "EACCES", ExitStatus.NOT_OPEN),  # an admin-prohibited route: unreachable
        ("tcp", "EPERM", ExitStatus.NOT_OPEN),
        ("tcp", "EINVAL", ExitStatus.NOT_OPEN),  # a blackhole route
        ("udp", "EINVAL", ExitStatus.NOT_OPEN),
    ],
)
def test_a_failed_connects_record_exits_as_the_run_did(
    proto: str, errno_name: str, code: ExitStatus
) -> None:
    # The record of a run that never connected (a --repeat run's) maps to the same code as the
    # run itself: a permission error on a Unix path is this host's (6), the same errno from a
    # TCP connect stays README's "unreachable" (1).
    result = SendResult("t", None, proto, total_ms=None, ended_by="error", errno_name=errno_name)
    assert exit_status_for(result) is code


def test_an_einval_after_the_connect_is_this_hosts_error() -> None:
    # EINVAL is "no route" only from connect(); a sendfile or send that fails with it once
    # connected is this host's own error (exit 6), not the peer's "no" (1).
    result = SendResult(
        "t", "127.0.0.1:1", "tcp", total_ms=1.0, ended_by="error", errno_name="EINVAL"
    )
    assert exit_status_for(result) is ExitStatus.LOCAL
