"""The boundary where exceptions become one stderr line and an exit code. No network I/O."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import sys
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn, TextIO, cast

from netprobe.errors import (
    LOCAL_IO_ERRNOS,
    OUT_OF_FDS_ERRNOS,
    NetprobeError,
    from_an_interrupt,
)
from netprobe.exitcodes import ExitStatus, exit_status_for_error

__all__ = [
    "BoundedStdout",
    "bounded_stdout",
    "error_line",
    "main",
    "spare_a_stuck_stdout",
    "stdout_takes_some",
]


# Bytes of argv that are not UTF-8 reach Python as surrogate escapes (0xff is U+DCFF), which
# a message's !r writes as `\udcff`. repr doubles a backslash the user typed, so `\udc..`
# is an escaped byte only after an even run of backslashes (or none); `\\udcff` is text.
_REPR_ESCAPED_BYTE_RE = re.compile(r"(?<!\\)((?:\\\\)*)\\udc([89a-f][0-9a-f])")
_ESCAPED_BYTE_RE = re.compile("[\udc80-\udcff]")


def _bytes_as_xnn(line: str) -> str:
    # The README promises \xNN for such bytes, as render.shown() writes them in results.
    if line.isascii() and "\\udc" not in line:
        return line
    line = _REPR_ESCAPED_BYTE_RE.sub(r"\1\\x\2", line)
    return _ESCAPED_BYTE_RE.sub(lambda m: f"\\x{ord(m[0]) - 0xDC00:02x}", line)


class SigtermState:
    """Whether SIGTERM arrived inside sigterm_as_interrupt (it then exits 143, not 130)."""

    terminated = False


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[SigtermState]:
    """Within the block, SIGTERM raises KeyboardInterrupt where Ctrl-C would: a command then
    reports how its run ended, as for Ctrl-C, before it exits (143, as if killed: check
    `state.terminated`). Outside the main thread (an embedding program) nothing changes."""
    state = SigtermState()

    def handler(_signum: int, _frame: object) -> None:
        state.terminated = True
        raise KeyboardInterrupt

    try:
        previous: Any = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: its signals, its rules
        previous = None
    try:
        yield state
    finally:
        # Put back unless the run has since chosen to ignore it (sockets.ignore_stop_signals:
        # its report under way): a second SIGTERM (timeout(1) sends two) would kill the exit.
        if previous is not None and signal.getsignal(signal.SIGTERM) is handler:
            signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def sigterm_exits_143() -> Iterator[SigtermState]:
    """sigterm_as_interrupt, and a KeyboardInterrupt that leaves the block after SIGTERM
    exits 143 (after Ctrl-C it goes on up: 130). For commands whose report of an interrupted
    run is made inside the block."""
    import typer

    with sigterm_as_interrupt() as state:
        try:
            yield state
        except KeyboardInterrupt:
            if state.terminated:
                raise typer.Exit(ExitStatus.TERMINATED) from None
            raise


def error_line(command: str | None, message: str) -> None:
    """The one line a failed run prints on stderr: `netprobe: CMD: message`, with bytes that
    were not UTF-8 shown as `\\xNN`."""
    if sys.stderr is None:  # started with stderr closed: the exit code is all there is
        return
    where = f"netprobe: {command}: " if command else "netprobe: "
    sys.stderr.write(_bytes_as_xnn(where + " ".join(message.split("\n"))) + "\n")
    sys.stderr.flush()


def exit_local_io_error(command: str, exc: OSError, log: Any) -> NoReturn:
    """A server's output failed for a reason of this host's own (ENOSPC): the usual line, but
    written through the server's non-blocking stderr `log` (a LineSink: a stderr nobody
    reads must not hold the exit), then exit 6."""
    import typer

    silence_stdout()
    name = errno.errorcode.get(exc.errno or 0, "EIO")
    log.write(f"netprobe: {command}: local I/O error: {name}: {exc.strerror}")
    log.close(0.1)
    raise typer.Exit(int(ExitStatus.LOCAL))


# The argv of the run in progress. Click drops the `--` separator, and a command that takes
# `-- COMMAND ARGS...` (port-check --wait) needs to know where it stood.
current_argv: list[str] = []


def _debug_requested(args: Sequence[str]) -> bool:
    # A global option: it counts only before the command word. After it, `--debug` is the
    # command's bad option, or the value of one (`send ... --until --debug`).
    for arg in args:
        if arg == "--debug":
            return True
        if not arg.startswith("-"):
            return False
    return False


def _traceback() -> None:
    import traceback

    traceback.print_exc(file=sys.stderr)


def _command_name(args: Sequence[str]) -> str | None:
    words = [a for a in args if not a.startswith("-")]
    if not words:
        return None
    if words[0] == "reset" and len(words) > 1:
        return f"reset {words[1]}"
    return words[0]


_RANGE_RE = re.compile(r"^(Invalid value for [^:]+: )(\S+)( is not in the range .*)$", re.DOTALL)


def _click_message(exc: Any) -> str:
    # Click quotes the rejected value in every message but the range check's
    # ("0 is not in the range x>=1"); quote it there too, so every bad-input line names the
    # value the same way.
    message = str(exc.format_message())
    match = _RANGE_RE.match(message)
    if match is not None:
        head, value, tail = match.groups()
        return f"{head}{value!r}{tail}"
    return message


def silence_stdout() -> None:
    """After stdout was closed by its reader: what is still buffered for it, and anything
    written later, goes to /dev/null, so the exit does not fail on it again.

    Nothing happens when sys.stdout is not a file (a caller capturing the output in memory,
    as the tests do): fd 1 is then someone else's."""
    if sys.stdout is not None:
        try:
            sys.stdout.fileno()
        except (AttributeError, ValueError, OSError):
            return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.__stdout__.fileno() if sys.__stdout__ is not None else 1)
    finally:
        os.close(devnull)


# How long an interrupted run's report waits for a full stdout to take something.
STUCK_STDOUT_GRACE_S = 1.0


def spare_a_stuck_stdout() -> None:
    """For a run already interrupted, before it writes its report: when stdout takes nothing
    within STUCK_STDOUT_GRACE_S (a pipe whose reader stopped reading), that output and the
    rest go to /dev/null. The signal was the run's end, and waiting on that reader had no
    signal left to end it; a reader that is only slow still gets the report. A second
    signal during the wait ends it: stdout is kept if it can take something at once (the
    second of timeout(1)'s two signals, ms apart, must not cost the report), else the report
    goes unshown."""
    try:
        takes = stdout_takes_some(STUCK_STDOUT_GRACE_S)
    except KeyboardInterrupt:  # raised here, it would escape the exit path as a traceback
        try:
            takes = stdout_takes_some(0.0)
        except KeyboardInterrupt:  # a third, at once: out now
            takes = False
    if not takes:
        silence_stdout()


class BoundedStdout:
    """The text stream an interrupted run writes its report to, in place of sys.stdout: each
    write waits at most STUCK_STDOUT_GRACE_S at a time for a pipe to take some of it; a pipe
    that takes nothing for that long gets nothing more (stdout goes to /dev/null).

    spare_a_stuck_stdout covers a pipe already full when the signal came; this one covers a
    report that fills the pipe while it is written (the signal having found room). Without
    it, `backlog` (which ignores later signals, so that none cuts its report) waited for
    SIGKILL."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._gone = False

    def write(self, text: str) -> int:
        from netprobe.render import write_within

        if not self._gone:
            encoding = getattr(self._stream, "encoding", None) or "utf-8"
            data = text.encode(encoding, errors="backslashreplace")
            binary = getattr(self._stream, "buffer", None)
            if binary is None:  # not a file: memory never waits
                self._stream.write(text)
            elif not write_within(binary, data, STUCK_STDOUT_GRACE_S):
                self._gone = True
                silence_stdout()
        return len(text)

    def flush(self) -> None:
        pass  # every write went out whole, or nowhere

    def isatty(self) -> bool:
        return bool(self._stream.isatty())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def bounded_stdout(stream: Any) -> Any:
    """A BoundedStdout over `stream` (sys.stdout), once what `stream` still buffers went out
    (or, for a pipe that takes nothing within the grace, to /dev/null)."""
    if isinstance(stream, BoundedStdout):
        return stream
    spare_a_stuck_stdout()
    try:
        stream.flush()
    except (OSError, ValueError):
        silence_stdout()
    return BoundedStdout(stream)


def stdout_takes_some(within_s: float = 0.0) -> bool:
    """Whether stdout can take some output within `within_s` seconds (a pipe with a free
    page, a file, a terminal, memory), or its reader takes something meanwhile (a slow
    reader frees a page slowly): False for a pipe whose reader stopped reading."""
    import select
    import time

    from netprobe.render import pipe_queued

    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):
        return True  # not a file (a caller capturing output in memory): it never waits
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    deadline = time.monotonic() + within_s
    queued = pipe_queued(fd)
    while True:
        left = deadline - time.monotonic()
        if poller.poll(max(0, min(int(left * 1000), 50))):
            return True
        now_queued = pipe_queued(fd)
        if queued is not None and now_queued is not None and now_queued < queued:
            return True  # the reader took some: slow, not stopped
        if left <= 0:
            return False


class _StderrGuard:
    """sys.stderr for a run: once its reader is gone (EPIPE), log lines are dropped and fd 2
    goes to /dev/null. A closed stderr must not change what a run does or how it exits: a
    log reader that died would otherwise turn a failed check into exit 0, skip a wait's
    COMMAND, or stop a listener before its first client."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> Any:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._reader_gone()
            return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._reader_gone()

    def _reader_gone(self) -> None:
        with contextlib.suppress(AttributeError, ValueError, OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, self._stream.fileno())
            finally:
                os.close(devnull)
        # What the stream still buffers now goes to /dev/null with the next flush.
        with contextlib.suppress(OSError, ValueError):
            self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _output_closed() -> int:
    # stdout was closed early (`netprobe send ... | head`): results were cut, not a failure.
    # (port-check, whose exit code is a verdict, decides for itself: see its _checks.)
    silence_stdout()
    return ExitStatus.OK


_CLOSED_STDOUT = "stdout is closed: results are discarded"
_closed_stdout_note: list[bool] = []  # [True]: said after the command's announcement


def note_closed_stdout() -> None:
    """Say that stdout was closed, once, if main() left that to the command (listen, after the
    announcement that must be its first stderr line)."""
    if _closed_stdout_note:
        _closed_stdout_note.clear()
        error_line(None, _CLOSED_STDOUT)


def main(argv: Sequence[str] | None = None) -> int:
    """Run netprobe with argv (default sys.argv[1:]) and return the exit status.

    Click's usage errors and netprobe's own errors become one line on stderr; any other
    exception is a bug (exit 70). `--debug` prints the traceback first; the exit status is
    the same with or without it (scripts keep their meaning).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    current_argv[:] = args
    if sys.stderr is None:  # started with stderr closed (`2>&-`): logs and events go nowhere
        sys.stderr = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 (lives for the run)
    if sys.stdout is None:  # started with stdout closed (`>&-`): as if sent to /dev/null
        sys.stdout = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 (lives for the run)
        if _command_name(args) == "listen":
            # Its first stderr line is the address announcement, which scripts read: the
            # note comes right after it (note_closed_stdout).
            _closed_stdout_note[:] = [True]
        else:
            error_line(None, _CLOSED_STDOUT)
    for stream in (sys.stdout, sys.stderr):
        # A path that is not UTF-8 must never make output fail: render.shown() writes such
        # bytes as \xNN, and anything it misses comes out escaped rather than as exit 70.
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
    real_stderr = sys.stderr
    sys.stderr = cast(TextIO, _StderrGuard(real_stderr))
    try:
        return _run(args)
    finally:
        note_closed_stdout()  # a listen that ended before its announcement still says it
        if isinstance(sys.stderr, _StderrGuard):
            sys.stderr = real_stderr


def _run(args: list[str]) -> int:
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
    from typer.exceptions import Abort

    from netprobe.cli import build_app

    debug = _debug_requested(args)
    command = _command_name(args)
    # No command (`netprobe`, `netprobe reset`) is bad input, exit 2: the help it shows goes
    # to stderr with the error, so stdout stays for results only.
    positional = [a for a in args if not a.startswith("-")]
    asked = any(a in ("-h", "--help", "--version") for a in args)
    no_command = not asked and positional in ([], ["reset"])
    # `netprobe --debug` (or `--`) alone is a bare `netprobe` too: Click saw an argument, not
    # "no arguments", and said "Missing command." under the traceback of its usage error.
    given = [] if positional == [] and all(a in ("--debug", "--") for a in args) else args
    try:
        app = build_app(next(iter(positional), None))
        with contextlib.redirect_stdout(sys.stderr) if no_command else contextlib.nullcontext():
            result: Any = app(args=given, prog_name="netprobe", standalone_mode=False)
    except NoArgsIsHelpError as exc:  # Typer has already printed the help
        message = exc.format_message().strip()
        if message:
            sys.stderr.write(message + "\n")
        return ExitStatus.USAGE
    except ClickException as exc:  # usage errors, bad option values, unreadable files
        if debug:
            _traceback()
        error_line(command, _click_message(exc))
        return ExitStatus.USAGE
    except (Abort, KeyboardInterrupt):
        sys.stderr.write("\n")
        spare_a_stuck_stdout()
        return ExitStatus.INTERRUPTED
    except NetprobeError as exc:
        if debug:
            _traceback()
        error_line(command, str(exc))
        return exit_status_for_error(exc)
    except BrokenPipeError:
        return _output_closed()
    except OSError as exc:
        if exc.errno in OUT_OF_FDS_ERRNOS:
            # Out of descriptors where a command had no reply of its own for it (listeners
            # reading the kernel's tables): this host's limit, exit 6, not a bug.
            if debug:
                _traceback()
            name = errno.errorcode[exc.errno]
            error_line(command, f"local error: {name}: {exc.strerror} (see ulimit -n)")
            return ExitStatus.LOCAL
        if exc.errno not in LOCAL_IO_ERRNOS:
            if debug:
                _traceback()
            error_line(
                command,
                f"internal error: {type(exc).__name__}: {exc} (--debug shows the traceback)",
            )
            return ExitStatus.INTERNAL
        # A full disk (or quota) behind stdout (`> /dev/full`), a failing device, a hung-up
        # terminal: this host's failure, as a --transcript that cannot be written is, not a
        # bug. Where it came from is not known here (stdout, stdin, a --file), so the line
        # names the error only. What is still buffered for stdout goes to /dev/null, so the
        # exit does not fail on it again.
        if debug:
            _traceback()
        silence_stdout()
        name = errno.errorcode.get(exc.errno or 0, "EIO")
        error_line(command, f"local I/O error: {name}: {exc.strerror}")
        return ExitStatus.LOCAL
    except SystemExit as exc:
        # Typer turns an EPIPE that escapes a command into sys.exit(1), after wrapping the
        # standard streams in click's PacifyFlushWrapper: that pair is a closed stdout.
        if exc.code == 1 and type(sys.stdout).__name__ == "PacifyFlushWrapper":
            return _output_closed()
        raise
    except Exception as exc:
        if debug:
            _traceback()
        if from_an_interrupt(exc):  # a Ctrl-C that Python's own locking turned into this
            sys.stderr.write("\n")
            spare_a_stuck_stdout()
            return ExitStatus.INTERRUPTED
        error_line(
            command, f"internal error: {type(exc).__name__}: {exc} (--debug shows the traceback)"
        )
        return ExitStatus.INTERNAL
    code = int(result) if isinstance(result, int) else ExitStatus.OK
    if code in (ExitStatus.INTERRUPTED, ExitStatus.TERMINATED):
        spare_a_stuck_stdout()  # else the exit's own flush of stdout could wait forever
    return code
