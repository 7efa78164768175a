"""Issue 9, hostile input: a table of bad command lines for every subcommand; servers fed
garbage, truncated frames, oversized frames and a 1 GB length prefix; and `send` given the
same by a hostile server.

Safety: the only non-loopback literals are TEST-NET-1 (192.0.2.0/24), and only for commands
that refuse non-loopback targets while parsing, so nothing is ever sent to them.
"""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

import pytest

from netprobe.framing import parse_framing
from tests.helpers import LONG, ServerThread, invoke
from tests.reliability.harness import ServerProc

T = "127.0.0.1:9"  # a well-formed target for cases whose bad value is elsewhere
LONG_UNIX = "/tmp/" + "x" * 120 + ".sock"  # over the 107-byte sun_path limit

# (argv, text the error line must contain: the bad value or the offending flag)
BAD_INPUTS: list[tuple[list[str], str]] = [
    # port-check: ports, ranges, CIDRs, durations, numbers, hex, choices, files, conflicts
    (["port-check", "127.0.0.1:70000"], "70000"),
    (["port-check", "127.0.0.1:0"], "0"),
    (["port-check", "127.0.0.1:--5"], "-5"),
    (["port-check", "127.0.0.1", "--ports", "80-20"], "80-20"),
    (["port-check", "127.0.0.1", "--ports", "http"], "http"),
    (["port-check", "127.0.0.1", "--ports", "1,,2"], "1,,2"),
    (["port-check", "127.0.0.1", "--ports", "1-99999"], "99999"),
    (["port-check", "127.0.0.1", "--ports", "all,80"], "all"),
    (["port-check", "127.0.0.1:80,81-x"], "80,81-x"),
    (["port-check", "127.0.0.0/33", "--ports", "80"], "127.0.0.0/33"),
    (["port-check", "127.0.0.1/8x", "--ports", "80"], "127.0.0.1/8x"),
    (["port-check", "127.0.0.0/8", "--ports", "80"], "127.0.0.0/8"),
    (["port-check", "[::1:80"], "[::1:80"),
    (["port-check", "127.0.0.1:80", "--timeout", "soon"], "soon"),
    (["port-check", "127.0.0.1:80", "--timeout", "-1s"], "-1s"),
    (["port-check", "127.0.0.1:80", "--interval", "-1"], "-1"),
    (["port-check", "127.0.0.1:80", "--concurrency", "0"], "'0'"),
    (["port-check", "127.0.0.1:80", "--retries", "-1"], "'-1'"),
    (["port-check", "127.0.0.1:80", "--count", "0"], "'0'"),
    (["port-check", "127.0.0.1:80", "--rate", "fast"], "fast"),
    (["port-check", "127.0.0.1:80", "--udp", "--payload-hex", "zz"], "zz"),
    (["port-check", "127.0.0.1:80", "--payload", "x", "--payload-hex", "41"], "--payload-hex"),
    (["port-check", "127.0.0.1:80", "--require", "most"], "most"),
    (["port-check", "127.0.0.1:80", "--expect", "maybe"], "maybe"),
    (["port-check", "127.0.0.1:80=ajar"], "ajar"),
    (["port-check", "127.0.0.1:80", "-4", "-6"], "-6"),
    (["port-check", "--targets-file", "/nonexistent/np-targets"], "/nonexistent/np-targets"),
    (["port-check", "--targets-file", "/"], "'/'"),
    # echo
    (["echo", "--port", "65536"], "65536"),
    (["echo", "--port", "-1"], "-1"),
    (["echo", "--framing", "len7"], "len7"),
    (["echo", "--mode", "mirror"], "mirror"),
    (["echo", "--max-frame", "12XB"], "12XB"),
    (["echo", "--max-frame", "0"], "0"),
    (["echo", "--idle-timeout", "1parsec"], "1parsec"),
    (["echo", "--idle-timeout", "0s"], "0s"),
    (["echo", "--delay", "-1s"], "-1s"),
    (["echo", "--count", "0"], "0"),
    (["echo", "--max-conns", "0"], "0"),
    (["echo", "--accept-rate", "0"], "0"),
    (["echo", "--allow", "10.0.0.0/40"], "10.0.0.0/40"),
    (["echo", "--udp", "--unix", "/tmp/np-rel.sock"], "--unix"),
    (["echo", "--udp", "--max-conns", "3"], "--max-conns"),
    (["echo", "--once", "--count", "3"], "--count 3"),
    (["echo", "--ready-file", "/nonexistent-dir/ready.json"], "/nonexistent-dir/ready.json"),
    (["echo", "--unix", LONG_UNIX], LONG_UNIX),
    # send
    (["send", "127.0.0.1:99999", "x"], "99999"),
    (["send", "127.0.0.1", "x"], "127.0.0.1"),
    (["send", "unix:", "x"], "unix:"),
    (["send", T, "--hex", "4G"], "4G"),
    (["send", T, "--hex", "414"], "414"),
    (["send", T, "--file", "/nonexistent/np-payload"], "/nonexistent/np-payload"),
    (["send", T, "x", "--transcript", "/nonexistent-dir/t.jsonl"], "/nonexistent-dir/t.jsonl"),
    (["send", T, "x", "--framing", "len3"], "len3"),
    (["send", T, "x", "--until-regex", "(unclosed"], "(unclosed"),
    (["send", T, "x", "--timeout", "never"], "never"),
    (["send", T, "x", "--idle-timeout", "-3"], "-3"),
    (["send", T, "x", "--max-frame", "-1"], "-1"),
    (["send", T, "x", "--repeat", "0"], "'0'"),
    (["send", T, "x", "--expect-frames", "2"], "--expect-frames"),
    # listen
    (["listen", "--port", "70000"], "70000"),
    (["listen", "--idle-timeout", "abc"], "abc"),
    (["listen", "--max-bytes", "-1"], "-1"),
    (["listen", "--udp", "--unix", "/tmp/np-rel-l.sock"], "--unix"),
    (["listen", "--unix", LONG_UNIX], LONG_UNIX),
    # backlog (refuses non-loopback targets before any connect)
    (["backlog", "192.0.2.1:80"], "192.0.2.1"),
    (["backlog", "192.0.2.7:80", "--connections", "10"], "192.0.2.7"),
    (["backlog", "127.0.0.1:80", "--lab"], "--lab"),
    (["backlog", "--lab", "--backlog", "-2"], "-2"),
    (["backlog", "--lab", "--connections", "0"], "0"),
    (["backlog", "--lab", "--concurrency", "0"], "0"),
    (["backlog", "--lab", "--rate", "-3"], "-3"),
    (["backlog", "--lab", "--duration", "forever"], "forever"),
    (["backlog", "--lab", "--source", "127.0.0.300"], "127.0.0.300"),
    (["backlog", "--lab", "--ramp", "100,x"], "'x'"),
    (["backlog", "--lab", "--fail-if", "p99>>2"], "p99>>2"),
    # listeners, doctor
    (["listeners", "--port", "0"], "'0'"),
    (["listeners", "--port", "http"], "http"),
    (["doctor", "--bogus"], "--bogus"),
    # reset serve / proxy / client
    (["reset", "serve", "--action", "explode"], "explode"),
    (["reset", "serve", "--after-bytes", "10QB"], "10QB"),
    (["reset", "serve", "--after-bytes", "-1"], "-1"),
    (["reset", "serve", "--after-frames", "3"], "--framing"),
    (["reset", "serve", "--probability", "1.5"], "1.5"),
    (["reset", "serve", "--seed", "abc"], "abc"),
    (["reset", "serve", "--plan", "rst,boom"], "boom"),
    (["reset", "serve", "--on-accept", "--after-ms", "5"], "--after-ms"),
    (["reset", "serve", "--bandwidth", "fast", "--action", "slow"], "fast"),
    (["reset", "serve", "--unix", LONG_UNIX], LONG_UNIX),
    (["reset", "proxy", "--upstream", "192.0.2.1:80"], "192.0.2.1"),
    (["reset", "proxy", "--upstream", "notaport"], "notaport"),
    (["reset", "proxy", "--upstream", "127.0.0.1:0"], "127.0.0.1:0"),
    (["reset", "proxy", "--upstream", T, "--listen", "127.0.0.1:77777"], "77777"),
    (["reset", "proxy", "--upstream", T, "--direction", "sideways"], "sideways"),
    (["reset", "proxy", "--upstream", T, "--latency", "-5ms"], "-5ms"),
    (["reset", "proxy", "--upstream", T, "--slice", "0"], "0"),
    (["reset", "proxy", "--upstream", T, "--limit-bytes", "1ZB"], "1ZB"),
    (["reset", "client", "127.0.0.1:65536"], "65536"),
    (["reset", "client", T, "--after-ms", "soon"], "soon"),
    (["reset", "client", T, "--count", "0"], "'0'"),
]

SUBCOMMANDS = {
    "port-check",
    "echo",
    "send",
    "listen",
    "backlog",
    "listeners",
    "doctor",
    "reset serve",
    "reset proxy",
    "reset client",
}


def _command(argv: list[str]) -> str:
    return " ".join(argv[:2]) if argv[0] == "reset" else argv[0]


def test_the_table_covers_every_subcommand() -> None:
    print(f"\nbad inputs tried: {len(BAD_INPUTS)}")
    assert len(BAD_INPUTS) >= 40
    assert {_command(argv) for argv, _ in BAD_INPUTS} == SUBCOMMANDS
    for argv, _ in BAD_INPUTS:
        for word in argv:
            # Only TEST-NET-1 literals outside loopback, and only where they are refused.
            if word.startswith("192.0.2."):
                assert _command(argv) in {"backlog", "reset proxy"}, argv


@pytest.mark.parametrize(
    ("argv", "names"), BAD_INPUTS, ids=[" ".join(a)[:60] for a, _ in BAD_INPUTS]
)
def test_bad_input_exits_2_with_one_line_naming_it(argv: list[str], names: str) -> None:
    result = invoke(argv)
    assert result.exit_code == 2, result.stderr
    assert result.stdout == b""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("netprobe:"), lines[0]
    assert names in lines[0], lines[0]
    assert "Traceback" not in result.stderr


# -- servers fed hostile bytes -----------------------------------------------------------------

MAX_FRAME = 1024


def _exchange(port: int, payload: bytes, *, eof: bool = False) -> tuple[int, str]:
    """Send payload (then FIN if asked); read until the server ends the connection.

    Returns (the client's port, "fin" or "rst"). Fails if the server keeps it open.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=LONG) as sock:
        local = sock.getsockname()[1]
        sock.sendall(payload)
        if eof:
            sock.shutdown(socket.SHUT_WR)
        try:
            while sock.recv(65536):
                pass
        except ConnectionResetError:
            return local, "rst"
        except TimeoutError:
            pytest.fail(f"server kept the connection open after {payload[:16]!r}")
    return local, "fin"


def _round_trip(port: int, wire: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=LONG) as sock:
        sock.sendall(wire)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _logged_reason(srv: ServerProc, event: str, local_port: int) -> str | None:
    peer = f"127.0.0.1:{local_port}"
    deadline = time.monotonic() + LONG
    while time.monotonic() < deadline:
        for record in srv.events(event):
            if record.get("peer") == peer:
                return str(record.get("reason"))
        time.sleep(0.02)
    return None


GARBAGE = bytes(range(255, -1, -1)) * 16  # as len32 its first length is 0xFFFEFDFC
ECHO_CASES = [
    # (framing, hostile bytes, send FIN after, reason the server must log)
    ("len32", struct.pack("!I", 1 << 30), False, "frame-too-large"),  # 1 GB length prefix
    ("len32", struct.pack("!I", MAX_FRAME + 1) + b"x" * (MAX_FRAME + 1), False, "frame-too-large"),
    ("len32", struct.pack("!I", 100) + b"y" * 50, True, "incomplete-frame"),
    ("len32", GARBAGE, False, "frame-too-large"),
    ("line", b"z" * (MAX_FRAME + 1) + b"\n", False, "frame-too-large"),
    ("line", b"no newline", True, "incomplete-frame"),
    ("netstring", b"12x:abc,", False, "malformed-frame"),
    ("netstring", b"5:abc", True, "incomplete-frame"),
    ("netstring", b"1073741824:", False, "frame-too-large"),
]


@pytest.mark.slow
def test_echo_closes_hostile_framed_connections_and_goes_on_serving() -> None:
    by_framing: dict[str, list[tuple[bytes, bool, str]]] = {}
    for framing, payload, eof, reason in ECHO_CASES:
        by_framing.setdefault(framing, []).append((payload, eof, reason))
    for framing, cases in by_framing.items():
        argv = ["echo", "--port", "0", "--json", "--framing", framing]
        with ServerProc([*argv, "--max-frame", str(MAX_FRAME)]) as srv:
            spec = parse_framing(framing)
            for payload, eof, reason in cases:
                local, _ = _exchange(srv.port, payload, eof=eof)
                assert _logged_reason(srv, "close", local) == reason, (framing, payload[:16])
                # ... and a well-behaved client is served right after.
                frames = [b"ok", b"x" * MAX_FRAME]
                wire = b"".join(spec.encode(f) for f in frames)
                assert _round_trip(srv.port, wire) == wire
            srv.stop()
            totals = srv.totals()
            assert totals["connections"] >= 2 * len(cases)  # (+ any stranger's port scan)
            assert "Traceback" not in srv.stderr_text()


RESET_CASES = [
    (struct.pack("!I", 1 << 30), "frame-too-large"),  # 1 GB length prefix (cap 16 MiB)
    (b"\xff\xff\xff\xff" + b"junk" * 64, "frame-too-large"),
]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["serve", "proxy"])
def test_reset_frame_trigger_closes_hostile_streams_with_a_reason(command: str) -> None:
    trigger = ["--after-frames", "3", "--framing", "len32", "--json"]
    with ServerProc(["echo", "--port", "0", "--json"]) as upstream:
        if command == "serve":
            argv = ["reset", "serve", "--port", "0", *trigger]
        else:
            argv = ["reset", "proxy", "--upstream", f"127.0.0.1:{upstream.port}", *trigger]
        with ServerProc(argv) as srv:
            for payload, reason in RESET_CASES:
                local, _ = _exchange(srv.port, payload)
                assert _logged_reason(srv, "connection", local) == reason
                wire = struct.pack("!I", 2) + b"ok"
                assert _round_trip(srv.port, wire) == wire
            srv.stop()
            assert "Traceback" not in srv.stderr_text()


def test_hostile_unix_path_is_refused_before_binding(tmp_path: Path) -> None:
    result = invoke(["echo", "--unix", str(tmp_path / ("y" * 200))])
    assert result.exit_code == 2
    assert not any(tmp_path.iterdir())


HOSTILE_REPLIES = [
    (struct.pack("!I", 1 << 30), "len32"),  # 1 GB length prefix
    (b"\xff" * 64, "len32"),  # garbage: a 4 GB length
    (struct.pack("!I", 10) + b"abc", "len32"),  # partial frame, then EOF
    (b"12x:abc,", "netstring"),  # malformed length
]


@pytest.mark.parametrize(("reply", "framing"), HOSTILE_REPLIES)
def test_send_reports_a_hostile_framed_reply_in_one_line(reply: bytes, framing: str) -> None:
    def hostile(conn: socket.socket) -> None:
        conn.recv(100)
        conn.sendall(reply)

    srv = ServerThread(handler=hostile)
    try:
        result = invoke(["send", f"127.0.0.1:{srv.port}", "x", "--framing", framing, "-t", "5s"])
    finally:
        srv.stop()
    assert result.exit_code not in (0, 70), result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert f"127.0.0.1:{srv.port}" in lines[0]
    assert "Traceback" not in result.stderr
