"""`netprobe send`: a netcat for pipelines (binary-safe, framing-aware, with timings). No I/O
here beyond opening the files the user names; the exchange is netprobe.engines.send.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import stat
import sys
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, Any, cast

import typer

from netprobe.cli._options import (
    IPv4Opt,
    IPv6Opt,
    check_literal_family,
    duration,
    family_of,
    size,
)
from netprobe.cli._run import sigterm_as_interrupt, silence_stdout
from netprobe.errors import DeadlineExceeded, LocalError, NetworkError, UsageError
from netprobe.exitcodes import ExitStatus

if TYPE_CHECKING:
    from collections.abc import Callable

    from netprobe.engines.send import InputSource, SendResult

# Opening --transcript FILE fails with these when the path itself is wrong: bad input (exit 2).
# Any other failure (a full disk, no free descriptor) is this host's refusal (exit 6).
_BAD_PATH_ERRNOS = frozenset(
    (errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EROFS, errno.ENAMETOOLONG,
     errno.ELOOP)
)  # fmt: skip

__all__ = ["send"]


def _input(data: str | None, hex_data: bool, file: str | None) -> tuple[InputSource, Any]:
    """Choose what to send: DATA, --file, or stdin when it is not a terminal."""
    from netprobe.engines.send import InputSource

    if data is not None and file is not None:
        raise UsageError("give DATA or --file, not both")
    if hex_data and data is None:
        raise UsageError("--hex needs DATA (a hex string such as 48656c6c6f0a)")
    if data is not None:
        if not hex_data:
            return InputSource(data=data.encode("utf-8", "surrogateescape")), None
        text = data.replace(" ", "").replace(":", "")
        try:
            return InputSource(data=bytes.fromhex(text)), None
        except ValueError as exc:
            raise UsageError(f"--hex {data!r} is not a hex string: {exc}") from None
    if file is not None:
        if not file:  # Path("") is ".", and the line would name that instead
            raise UsageError("--file '': the path is empty (give a file to send)")
        try:
            handle = Path(file).open("rb")  # noqa: SIM115 (send() closes it after the run)
        except OSError as exc:
            raise UsageError(f"--file {file!r}: cannot read it: {exc.strerror}") from None
        return InputSource.from_stream(handle), handle
    stdin = sys.stdin
    # No input at all is an empty stream, not an empty DATA: over UDP that sent one empty
    # datagram (a real probe to many services); `send --udp HOST:PORT ''` still sends it.
    nothing = InputSource.from_stream(io.BytesIO())
    if stdin is None:
        return nothing, None
    if stdin.isatty():
        # nc would read what is typed; send is for scripts (its input must end), so it sends
        # nothing. Said once (a log line: on a terminal), so that a session that seems to
        # work does not send nothing silently.
        if sys.stderr is not None and sys.stderr.isatty():
            sys.stderr.write(
                "netprobe: send: stdin is a terminal: sending nothing (give DATA or --file, or "
                "pipe the input; `netprobe listen` is the interactive end)\n"
            )
        return nothing, None
    return InputSource.from_stream(cast("IO[bytes]", getattr(stdin, "buffer", stdin))), None


class _TranscriptFile:
    """--transcript FILE: opened before the run, so a path that cannot be written is refused
    before anything is sent, but emptied only once the run uses it.

    The engine refuses some input only as the exchange begins (a payload the framing cannot
    carry, a Unix target with --udp): that bad input must leave an old FILE as it was, and
    must not leave a new, empty one behind.
    """

    def __init__(self, text: str) -> None:
        self.name = text
        path = Path(text)
        try:
            self.file = path.open("x", encoding="utf-8")
            self.created = True
        except FileExistsError:
            # Append mode does not truncate (yet); the writes still start at 0 once emptied.
            self.file = path.open("a", encoding="utf-8")
            self.created = False
        self.emptied = self.created
        self.used = False

    def write(self, text: str) -> int:
        self.used = True
        self._empty()
        return self.file.write(text)

    def flush(self) -> None:
        self.file.flush()

    def _empty(self) -> None:
        if self.emptied:
            return
        self.emptied = True
        fd = self.file.fileno()
        # "w" never truncated /dev/null or a FIFO either, and ftruncate() refuses them (EINVAL).
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.ftruncate(fd, 0)

    def close(self, *, refused: bool) -> None:
        """Close; `refused`: the run ended as bad input (the file is left as it was found)."""
        try:
            if not refused:
                self._empty()  # a run that recorded nothing still replaces the old record
        finally:
            self.file.close()
            if refused and self.created and not self.used:
                Path(self.name).unlink(missing_ok=True)


def _open_transcript(text: str) -> _TranscriptFile:
    if not text:  # Path("") is ".", and the line would name that instead
        raise UsageError("--transcript '': the path is empty (give a file to write)")
    try:
        return _TranscriptFile(text)
    except OSError as exc:
        if exc.errno in _BAD_PATH_ERRNOS:
            raise UsageError(f"--transcript {text!r}: cannot write it: {exc.strerror}") from None
        from netprobe.sockets import errno_name

        name = errno_name(exc.errno)
        raise LocalError(
            f"--transcript {text!r}: cannot open it: {name or 'error'}: {exc.strerror or exc}",
            name,
        ) from None


def _input_size(source: InputSource, converted: bool) -> int | None:
    """The bytes the input puts on the wire, when known before sending (DATA, a regular
    file sent as it is); None for a pipe or converted input (--crlf, --framing)."""
    if converted:
        return None
    if source.data is not None:
        return len(source.data)
    start = source.offset()
    if start is None or source.fd is None:
        return None
    try:
        return max(os.fstat(source.fd).st_size - start, 0)
    except OSError:
        return None


def _failure_line(result: SendResult, input_size: int | None) -> str:
    """Why a single run did not complete, for the one stderr line."""
    if result.error is not None:  # e.g. UDP: "recv: ECONNREFUSED: nothing listens on ..."
        return result.error
    if result.ended_by == "interrupted":
        return (
            f"{result.address}: interrupted after sending {result.bytes_sent} B and receiving "
            f"{result.bytes_received} B"
        )
    answered = result.first_byte_ms is not None or result.bytes_received > 0
    unsent = not result.input_complete and result.ended_by in ("idle-timeout", "timeout")
    if result.framing_error is not None:
        why = result.framing_error
    elif result.expect_met is False:
        why = f"expectation not met (ended by {result.ended_by})"
    elif result.ended_by == "idle-timeout" and not answered:
        why = "no answer before the idle timeout"
    elif unsent:
        why = ""  # the note below says it all
    else:
        why = result.ended_by
        if result.errno_name is not None:
            why = f"{why} ({result.errno_name})"
    if unsent:
        total = f" of {input_size}" if input_size is not None else ""
        when = "the idle timeout" if result.ended_by == "idle-timeout" else "the timeout"
        note = f"input not fully sent: {result.bytes_sent}{total} bytes went out before {when}"
        why = f"{why}; {note}" if why else note
    return f"{result.address}: {why}"


def _stats_text(stats: dict[str, Any]) -> str:
    ended = ", ".join(f"{k} {v}" for k, v in sorted(stats["ended_by"].items()))
    errnos = ", ".join(f"{k} {v}" for k, v in sorted(stats["errno_name"].items()))
    lines = [f"runs {stats['runs']}  completed {stats['completed']}  failed {stats['failed']}"]
    causes = "; ".join(part for part in (ended, errnos) if part)
    lines[0] += f"  ({causes})" if causes else ""
    lines.append(
        f"{'ms':<14}" + "".join(f"{h:>10}" for h in ("min", "avg", "p50", "p90", "p99", "max"))
    )
    for metric in ("connect_ms", "first_byte_ms", "total_ms"):
        row = stats[metric]
        name = metric.removesuffix("_ms").replace("_", " ")
        if not row["count"]:
            lines.append(f"{name:<14}" + f"{'-':>10}" * 6)
        else:
            cells = (row[k] for k in ("min", "avg", "p50", "p90", "p99", "max"))
            lines.append(f"{name:<14}" + "".join(f"{c:>10.3f}" for c in cells))
    return "\n".join(lines) + "\n"


def send(
    target: Annotated[str, typer.Argument(help="HOST:PORT, [V6]:PORT or unix:/path.")],
    data: Annotated[
        str | None, typer.Argument(help="Text to send (default: --file, or stdin if piped).")
    ] = None,
    hex_data: Annotated[
        bool, typer.Option("--hex", help="DATA is a hex string (spaces and ':' allowed).")
    ] = False,
    file: Annotated[
        str | None, typer.Option("--file", "-f", metavar="FILE", help="Send this file (streamed).")
    ] = None,
    crlf: Annotated[bool, typer.Option("--crlf", help="Send line endings as CRLF.")] = False,
    no_shutdown: Annotated[
        bool,
        typer.Option("--no-shutdown", help="Do not half-close (SHUT_WR) after the input ends."),
    ] = False,
    hexdump: Annotated[
        bool, typer.Option("--hexdump", help="Show replies as offset/hex/ASCII lines.")
    ] = False,
    idle_timeout: Annotated[
        float,
        typer.Option(
            "--idle-timeout",
            show_default="2s",
            parser=duration,
            metavar="DURATION",
            help="Stop reading after this long without data; 0 disables it.",
        ),
    ] = 2.0,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout",
            "-t",
            parser=duration,
            metavar="DURATION",
            help="Overall limit (connect + read).",
        ),
    ] = None,
    expect_bytes: Annotated[
        int | None,
        typer.Option(
            "--expect-bytes", parser=size, metavar="SIZE", help="Stop after this many reply bytes."
        ),
    ] = None,
    until: Annotated[
        str | None,
        typer.Option("--until", metavar="STR", help="Stop once this string has arrived."),
    ] = None,
    until_regex: Annotated[
        str | None,
        typer.Option("--until-regex", metavar="RE", help="Stop once the reply matches this regex."),
    ] = None,
    framing_spec: Annotated[
        str | None,
        typer.Option(
            "--framing",
            metavar="SPEC",
            help="raw|line|crlf|len8|len16|len32|len64|netstring: one frame per input line "
            "(or DATA); replies decoded, one per line.",
        ),
    ] = None,
    expect_frames: Annotated[
        int | None,
        typer.Option(
            "--expect-frames", min=1, metavar="N", help="Stop after N reply frames (--framing)."
        ),
    ] = None,
    max_frame: Annotated[
        int,
        typer.Option(
            "--max-frame",
            parser=size,
            metavar="SIZE",
            show_default="16MiB",
            help="Largest frame accepted.",
        ),
    ] = 16 * 1024 * 1024,
    udp: Annotated[
        bool, typer.Option("--udp", help="UDP: each DATA / line / frame is one datagram.")
    ] = False,
    expect_datagrams: Annotated[
        int | None,
        typer.Option(
            "--expect-datagrams", min=1, metavar="N", help="Stop after N reply datagrams (--udp)."
        ),
    ] = None,
    repeat: Annotated[
        int,
        typer.Option(
            "--repeat", min=1, metavar="N", help="Run the exchange N times; print latency stats."
        ),
    ] = 1,
    interval_opt: Annotated[
        float | None,
        typer.Option(
            "--interval",
            show_default="0",
            parser=duration,
            metavar="DURATION",
            help="Pause between --repeat runs.",
        ),
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="One JSON object instead of the reply bytes.")
    ] = False,
    transcript_file: Annotated[
        str | None,
        typer.Option(
            "--transcript",
            metavar="FILE",
            help="Write every chunk (both directions) as JSON lines.",
        ),
    ] = None,
    ipv4: IPv4Opt = False,
    ipv6: IPv6Opt = False,
) -> None:
    """Connect, send DATA / --file / stdin, print what comes back; say how it ended.

    Exit codes: 0 completed, 1 refused (or expectation not met at EOF, or a framing error),
    2 bad input, 3 timed out, no answer, or input left unsent; 4 reset by peer, 5 name not
    resolved, 6 local failure (the transcript cannot be written); 130 Ctrl-C, 143 SIGTERM.
    """
    import re

    from netprobe.engines.send import (
        Expectations,
        SendOptions,
        Transcript,
        exchange,
        exit_status_for,
        failed_result,
        latency_stats,
        repeat_exchange,
    )
    from netprobe.render import dump_json
    from netprobe.sockets import parse_target

    if until is not None and until_regex is not None:
        raise UsageError("--until and --until-regex exclude each other")
    if expect_frames is not None and framing_spec is None:
        raise UsageError("--expect-frames needs --framing")
    if expect_datagrams is not None and not udp:
        raise UsageError("--expect-datagrams needs --udp")
    if crlf and framing_spec is not None:
        raise UsageError("--crlf converts raw input; with framing use --framing crlf")
    if hexdump and (json_out or framing_spec is not None):
        raise UsageError("--hexdump shows raw replies; it excludes --json and --framing")
    if interval_opt is not None and repeat <= 1:
        raise UsageError("--interval paces --repeat runs: add --repeat N (N of 2 or more)")
    interval = interval_opt or 0.0
    if hexdump and repeat > 1:
        raise UsageError(
            "--hexdump shows the replies, which --repeat discards: use one or the other"
        )
    pattern = None
    if until_regex is not None:
        try:
            pattern = re.compile(until_regex.encode("utf-8", "surrogateescape"))
        except re.error as exc:
            raise UsageError(f"--until-regex {until_regex!r} is not a valid regex: {exc}") from None
        except (OverflowError, RecursionError) as exc:
            # re raises these, not re.error, for a repeat count past 2**32-1 ("x{4294967296}")
            # and for parentheses nested too deep for its parser.
            why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            raise UsageError(f"--until-regex {until_regex!r} is not a valid regex: {why}") from None
        if pattern.search(b"") is not None:
            # As --until '': it would match before the first byte and end the read at once.
            raise UsageError(
                f"--until-regex {until_regex!r} matches an empty reply, so it would stop "
                "before any byte: give a pattern that needs at least one"
            )
    if max_frame < 1:
        raise UsageError(f"--max-frame {max_frame}: must be at least 1 byte")
    if expect_bytes is not None and expect_bytes < 1:
        raise UsageError(f"--expect-bytes {expect_bytes}: must be at least 1")
    if until == "":
        raise UsageError("--until needs a non-empty string")
    framing = None
    if framing_spec is not None:
        from netprobe.framing import parse_framing

        framing = parse_framing(framing_spec)
        byte_ends = [
            flag
            for flag, given in (
                ("--expect-bytes", expect_bytes is not None),
                ("--until", until is not None),
                ("--until-regex", until_regex is not None),
            )
            if given
        ]
        if byte_ends and framing.name != "raw":
            # A byte count or a delimiter over the raw stream would end the read inside a
            # frame: the frames before it were dropped with it, and the run still said met.
            raise UsageError(
                f"{byte_ends[0]} ends the read on raw bytes, which --framing {framing_spec} decodes "
                "into frames: end it with --expect-frames N instead"
            )
    if timeout is not None and timeout <= 0:
        raise UsageError(f"--timeout {timeout:g}: the overall limit must be above 0")
    parsed = parse_target(target)
    family = family_of(ipv4, ipv6)
    if parsed.host is not None:
        check_literal_family(parsed.host, family, repr(target))
    elif parsed.path is not None and family:
        flag = "-4" if ipv4 else "-6"
        raise UsageError(f"{flag} has no effect with {target!r}: a Unix socket has no IP family")
    source, handle = _input(data, hex_data, file)
    if repeat > 1 and not source.rewind():
        if handle is not None:
            handle.close()
        raise UsageError("--repeat needs DATA, --file or a regular-file stdin to replay")
    opts = SendOptions(
        target=parsed,
        source=source,
        family=family,
        udp=udp,
        crlf=crlf,
        framing=framing,
        max_frame=max_frame,
        shutdown=not no_shutdown,
        timeout_s=timeout,
        idle_timeout_s=idle_timeout if idle_timeout > 0 else None,
        expect=Expectations(
            expect_bytes=expect_bytes,
            until=until.encode("utf-8", "surrogateescape") if until is not None else None,
            until_regex=pattern,
            expect_frames=expect_frames,
            expect_datagrams=expect_datagrams,
        ),
        collect=json_out,
        hexdump=hexdump,
    )
    out = cast("IO[bytes]", getattr(sys.stdout, "buffer", sys.stdout))

    def emit(chunk: bytes) -> None:
        out.write(chunk)
        out.flush()

    stuck = [False]

    def emit_bounded(chunk: bytes) -> None:
        # After the signal: as every interrupted report, at most a second's wait on stdout.
        from netprobe.cli._run import STUCK_STDOUT_GRACE_S
        from netprobe.render import write_within

        if not stuck[0] and not write_within(out, chunk, STUCK_STDOUT_GRACE_S):
            stuck[0] = True

    transcript_out: _TranscriptFile | None = None
    refused = False
    input_size = _input_size(source, crlf or framing is not None)
    # SIGTERM as Ctrl-C from here on: the run is reported, then exits 143. (A stack rather
    # than a with-block: it is left in the finally below.)
    sigterm = contextlib.ExitStack()
    term = sigterm.enter_context(sigterm_as_interrupt())
    try:
        if transcript_file is not None:
            transcript_out = _open_transcript(transcript_file)
        transcript = (
            Transcript(cast("IO[str]", transcript_out), transcript_file)
            if transcript_out is not None
            else None
        )
        if repeat > 1:

            def show(result: Any) -> None:
                if json_out:  # a run that never connected too: the same fields as one run
                    emit((dump_json(result.record()) + "\n").encode())

            results, status = repeat_exchange(
                opts, repeat, interval, on_result=show, transcript=transcript
            )
            stats = latency_stats(results)
            emit((dump_json(stats) + "\n" if json_out else _stats_text(stats)).encode())
            if status is ExitStatus.INTERRUPTED:
                sys.stderr.write(
                    f"netprobe: send: interrupted after {len(results)} of {repeat} runs\n"
                )
            raise typer.Exit(_final_code(status, term.terminated))
        try:
            result = exchange(opts, None if json_out else emit, transcript, emit_bounded)
        except (NetworkError, DeadlineExceeded) as exc:
            if json_out:  # every run says how it ended, a failed connect too
                emit((dump_json(failed_result(opts, exc).record()) + "\n").encode())
            raise  # the one stderr line and the exit code come from cli/_run
        except KeyboardInterrupt as exc:
            # Before the exchange began (the engine reports one it cut short): the input
            # check or the connect.
            if json_out:
                emit((dump_json(failed_result(opts, exc).record()) + "\n").encode())
            sys.stderr.write(
                f"netprobe: send: {target}: interrupted before the exchange began "
                "(checking the input or connecting)\n"
            )
            raise typer.Exit(_final_code(ExitStatus.INTERRUPTED, term.terminated)) from None
        # Still under the SIGTERM handler: a signal while stdout blocks on the report is
        # Ctrl-C's, its exit code 143.
        if json_out:
            _emit_report(emit, result)
        status = exit_status_for(result)
        if status and not json_out:
            sys.stderr.write(f"netprobe: send: {_failure_line(result, input_size)}\n")
    except UsageError:
        refused = True
        raise
    except KeyboardInterrupt:
        # Anywhere else (writing a --repeat summary to a stdout that blocks, ...).
        sys.stderr.write("netprobe: send: interrupted\n")
        raise typer.Exit(_final_code(ExitStatus.INTERRUPTED, term.terminated)) from None
    finally:
        sigterm.close()
        if handle is not None:
            handle.close()
        if transcript_out is not None:
            # Every line was flushed as written, so close() can only fail again on the line
            # whose write already raised LocalError: that one message is enough.
            with contextlib.suppress(OSError):
                transcript_out.close(refused=refused)
    raise typer.Exit(_final_code(status, term.terminated))


def _emit_report(emit: Callable[[bytes], None], result: Any) -> None:
    """Write the finished exchange's JSON object. Building it takes a while for a big reply
    (0.5 s for 20 MB): a signal then used to discard the whole report of an exchange already
    over. It waits until the object is written (a signal during the write acts at once)."""
    from netprobe.render import dump_json
    from netprobe.sockets import CountingGate

    gate = CountingGate()
    with gate.watching(), gate:
        text = (dump_json(result.record()) + "\n").encode()
        with gate.unheld(held_first=False):
            emit(text)


def _final_code(status: ExitStatus, terminated: bool) -> int:
    """The exit code: a run ended by SIGTERM exits 143, as if killed (after its report), not
    Ctrl-C's 130. An interrupted run drops what a blocked stdout still holds, as nc does: the
    exit must not wait on a reader that stopped reading, nor fail on one that left later
    (Python's own flush at exit: "Exception ignored ... BrokenPipeError", exit 120)."""
    if status is not ExitStatus.INTERRUPTED:
        return int(status)
    silence_stdout()
    return int(ExitStatus.TERMINATED if terminated else ExitStatus.INTERRUPTED)
