"""The one output module: results as a table (terminal), plain lines (pipe), JSON Lines or CSV.

Writes only to the stream it is given; engines never call it. Records are flat dicts (see
results.to_record); nested values are shown as JSON in table, plain and CSV output.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TextIO

__all__ = [
    "Column",
    "LineSink",
    "OutputFormat",
    "Renderer",
    "ServerOutput",
    "choose_format",
    "dump_json",
    "format_value",
    "log",
]


class OutputFormat(StrEnum):
    TABLE = "table"  # aligned columns, written when the run ends (terminal default)
    PLAIN = "plain"  # one space-separated line per result, streamed (pipe default)
    JSON = "json"  # JSON Lines, one object per result, streamed
    CSV = "csv"  # header row, then one row per result, streamed
    QUIET = "quiet"  # nothing: the exit code tells


def choose_format(*, json_out: bool, csv_out: bool, quiet: bool, out: TextIO) -> OutputFormat:
    """The format the user asked for, else a table on a terminal and plain lines elsewhere.

    Raises:
        UsageError: more than one of --json, --csv and --quiet (each excludes the others).
    """
    asked = [
        flag for flag, on in (("--json", json_out), ("--csv", csv_out), ("--quiet", quiet)) if on
    ]
    if len(asked) > 1:
        from netprobe.errors import UsageError

        raise UsageError(f"{' and '.join(asked)} exclude each other: choose one output")
    if quiet:
        return OutputFormat.QUIET
    if json_out:
        return OutputFormat.JSON
    if csv_out:
        return OutputFormat.CSV
    return OutputFormat.TABLE if _isatty(out) else OutputFormat.PLAIN


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


@dataclass(frozen=True, slots=True)
class Column:
    """One column of table, plain and CSV output: the record key, its header, a formatter."""

    key: str
    header: str
    fmt: Callable[[Any], str] | None = None
    align_right: bool = False


def shown(text: str) -> str:
    """Text as it may be printed: bytes that were not UTF-8 (a path from argv or the kernel,
    kept as surrogate escapes) become `\\xNN`, so output never fails to encode and JSON stays
    valid UTF-8."""
    if text.isascii():
        return text
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def format_value(value: Any) -> str:
    """A record value as text: '-' for None, 3 decimals for floats, JSON for nested values."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, dict | list):
        return json.dumps(_printable(value), separators=(",", ":"))
    return shown(str(value))


def _printable(value: Any) -> Any:
    if isinstance(value, str):
        return shown(value)
    if isinstance(value, dict):
        return {shown(str(k)): _printable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_printable(v) for v in value]
    return value


def dump_json(record: Mapping[str, Any]) -> str:
    """One JSON object on one line (the JSON Lines form every command uses)."""
    text = json.dumps(record, separators=(", ", ": "), default=str)
    if "\\ud" in text:
        # A surrogate: a byte that was not UTF-8 (or a character beyond the BMP, which
        # shown() keeps). Rare, so the common record pays one substring test for it.
        text = json.dumps(_printable(record), separators=(", ", ": "), default=str)
    return text


class Renderer:
    """Streams records in one format; call close() once at the end (the table prints then).

    Args:
        fmt: the output format.
        out: where results go (stdout).
        columns: columns for table, plain and CSV; JSON always carries every key.
        sort_key: table only: order rows by this key before printing.
    """

    def __init__(
        self,
        fmt: OutputFormat,
        out: TextIO,
        columns: Sequence[Column],
        *,
        sort_key: Callable[[Mapping[str, Any]], Any] | None = None,
    ) -> None:
        self.fmt = fmt
        self.out = out
        self.columns = list(columns)
        self.sort_key = sort_key
        self._rows: list[Mapping[str, Any]] = []
        self._csv: Any = None
        self.count = 0

    def emit(self, record: Mapping[str, Any]) -> None:
        self.count += 1
        if self.fmt is OutputFormat.QUIET:
            return
        if self.fmt is OutputFormat.JSON:
            self.out.write(dump_json(record) + "\n")
            self.out.flush()
        elif self.fmt is OutputFormat.CSV:
            if self._csv is None:
                self._csv = csv.writer(self.out, lineterminator="\n")
                self._csv.writerow([c.key for c in self.columns])
            self._csv.writerow([self._cell(c, record, csv_mode=True) for c in self.columns])
            self.out.flush()
        elif self.fmt is OutputFormat.PLAIN:
            self.out.write(" ".join(self._cell(c, record) for c in self.columns) + "\n")
            self.out.flush()
        else:
            self._rows.append(record)

    def emit_all(self, records: Iterable[Mapping[str, Any]]) -> None:
        for record in records:
            self.emit(record)

    def close(self) -> None:
        if self.fmt is OutputFormat.CSV and self._csv is None:
            # No rows: the header still comes, so a CSV reader sees an empty table, not an
            # empty file.
            self._csv = csv.writer(self.out, lineterminator="\n")
            self._csv.writerow([c.key for c in self.columns])
            self.out.flush()
            return
        if self.fmt is not OutputFormat.TABLE or not self._rows:
            return
        rows = sorted(self._rows, key=self.sort_key) if self.sort_key else self._rows
        cells = [[c.header for c in self.columns]]
        cells += [[self._cell(c, r) for c in self.columns] for r in rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(self.columns))]
        for row in cells:
            parts = [
                cell.rjust(w) if col.align_right else cell.ljust(w)
                for cell, w, col in zip(row, widths, self.columns, strict=True)
            ]
            self.out.write("  ".join(parts).rstrip() + "\n")
        self.out.flush()
        self._rows.clear()

    def _cell(self, column: Column, record: Mapping[str, Any], *, csv_mode: bool = False) -> str:
        value = record.get(column.key)
        if csv_mode and value is None:
            return ""
        if column.fmt is not None and value is not None:
            return column.fmt(value)
        return format_value(value)


def log(message: str, *, stream: TextIO | None = None, always: bool = False) -> None:
    """A progress or log line on stderr, shown only on a terminal unless `always`."""
    err = stream if stream is not None else sys.stderr
    if always or _isatty(err):
        err.write(message + "\n")
        err.flush()


class StatusLine:
    """One line of progress on a terminal, rewritten in place (CR, then erase the line), so a
    long wait shows one changing line rather than a screenful; nothing at all elsewhere, nor
    on a terminal that says it cannot erase (TERM=dumb: an editor's shell buffer)."""

    _ERASE = "\r\033[K"

    def __init__(self, stream: TextIO | None = None) -> None:
        self._err = stream if stream is not None else sys.stderr
        self.enabled = _isatty(self._err) and os.environ.get("TERM") != "dumb"
        self._shown = False

    def show(self, message: str) -> None:
        if self.enabled:
            # Cut to the terminal's width: erasing reaches only the last row of a wrapped
            # line, so a longer one would leave a trail of its first rows behind.
            width = self._columns()
            if len(message) >= width:
                message = message[: max(1, width - 4)] + "..."
            self._err.write(self._ERASE + message)
            self._err.flush()
            self._shown = True

    def _columns(self) -> int:
        try:
            columns = os.get_terminal_size(self._err.fileno()).columns
        except (AttributeError, ValueError, OSError):
            return 80
        return columns or 80  # a pty whose size was never set says 0 (as shutil's fallback)

    def clear(self) -> None:
        """Erase the line, so what follows starts at column 0 (call before any other output)."""
        if self._shown:
            self._err.write(self._ERASE)
            self._err.flush()
            self._shown = False


class LineSink:
    """Lines for a server's log or event stream, written without ever blocking the caller.

    A server writes its events from its event loop: a reader that stops reading (a script that
    keeps the pipe but reads only the announce line, a terminal on hold) must not stop the
    echo for every client, nor a SIGTERM. A line goes out at once through a non-blocking
    handle of its own when the stream takes it; otherwise it waits in a queue that a thread
    writes out as the stream drains, up to `limit` bytes. Lines beyond that are dropped and
    counted, and the next line that fits is preceded by `dropped_line(n)` (when given), so the
    stream itself says where lines are missing. Streams that never block (a file, /dev/null,
    an in-memory buffer) are written directly.
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        limit: int = 1 << 20,
        dropped_line: Callable[[int], str] | None = None,
    ) -> None:
        import os
        import weakref

        self._stream = stream
        self._limit = limit
        self._dropped_line = dropped_line
        self._fd = _may_block(stream)
        self._nonblocking: int | None = None
        self._named_fifo = False
        if self._fd is not None:
            # From here on the fd is written directly: the thread must never block while it
            # holds the stream's own lock, which the interpreter takes again at exit.
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
            self._encoding = getattr(stream, "encoding", None) or "utf-8"
            self._named_fifo = _is_named_fifo(self._fd)
            self._nonblocking = _nonblocking_twin(self._fd)
            if self._nonblocking is not None:
                self._release = weakref.finalize(self, os.close, self._nonblocking)
        self._reset()

        # A forked worker must not inherit the lock held, nor a queue its thread left behind.
        # (A weak reference: the hook outlives the sink, and must not keep it alive.)
        ref = weakref.ref(self)

        def reset_in_child() -> None:
            sink = ref()
            if sink is not None:
                sink._reset()

        os.register_at_fork(after_in_child=reset_in_child)

    def _reset(self) -> None:
        import collections
        import threading

        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._queue: collections.deque[bytes] = collections.deque()
        self._queued = 0
        # Queued chunks that carry a "dropped N" note (by id): N, to report again if lost.
        self._reports: dict[int, int] = {}
        self._busy = False  # the thread is writing bytes it took from the queue
        self._thread: Any = None
        self._broken = False
        self._unreported = 0
        self.dropped = 0  # lines dropped because the reader fell behind (or left)
        # A write error that is ours, not the reader's (ENOSPC on a full disk, EIO): the
        # caller raises it at the end (exit 6), as any output error is.
        self.error: OSError | None = None

    def write(self, line: str) -> None:
        with self._lock:
            if self._broken:
                self.dropped += 1
                return
            if self._fd is None:
                self._write_stream(line + "\n")
                return
            data = self._encode(line + "\n")
            idle = not self._queue and not self._busy
            if not idle and self._queued + len(data) > self._limit:
                self.dropped += 1
                self._unreported += 1
                return
            reported = self._unreported
            if reported and self._dropped_line is not None:
                # Where the lines went missing, before the first one that made it again.
                data = self._encode(self._dropped_line(reported) + "\n") + data
            self._unreported = 0
            if idle and self._nonblocking is not None:
                rest = self._write_some(data)
                if rest is None:  # not written: this line (and the note) lost
                    self.dropped += 1
                    self._unreported = reported + 1
                    return
                if not rest:
                    return
                data = rest
                reported = 0  # the note went out
            if reported:
                self._reports[id(data)] = reported
            self._queue.append(data)
            self._queued += len(data)
            if self._thread is None:
                self._thread = _start_quiet_thread(self._drain)
            self._drained.notify_all()

    def settle(self, timeout_s: float) -> int:
        """Wait up to timeout_s for the queue to be written, then drop (and count) what is
        still queued, so that a last line written next goes out first. Returns the count of
        lines dropped so far."""
        self._wait(timeout_s)
        with self._lock:
            if self._queue:
                self.dropped += len(self._queue)
                # Noted in the stream before the next line (the last one: the totals), with
                # the notes the dropped chunks carried.
                self._unreported += len(self._queue) + sum(self._reports.values())
                self._queue.clear()
                self._reports.clear()
                self._queued = 0
            return self.dropped

    @property
    def unreported(self) -> int:
        """Lines dropped that no "dropped N" line in the stream has told of yet."""
        return self._unreported

    def add_unreported(self, count: int) -> None:
        """Lines another writer of this stream lost (a forked worker's): the next "dropped"
        line tells of them too."""
        with self._lock:
            self._unreported += count

    def close(self, timeout_s: float) -> int:
        """Wait up to timeout_s for the queue to be written; returns the lines never written
        (dropped, still queued, or still being written when the wait ended)."""
        self._wait(timeout_s)
        with self._lock:
            if self._nonblocking is not None:
                # Our second handle would keep a pipe open after the stream's own is closed
                # (its reader would never see EOF); later lines go through the thread.
                self._nonblocking = None
                self._release()
            return self.dropped + len(self._queue) + int(self._busy and not self._broken)

    def _wait(self, timeout_s: float) -> None:
        import time

        end = time.monotonic() + timeout_s
        with self._lock:
            while (self._queue or self._busy) and not self._broken:
                left = end - time.monotonic()
                if left <= 0:
                    return
                self._drained.wait(left)

    def _encode(self, text: str) -> bytes:
        try:
            return text.encode(self._encoding)
        except (UnicodeEncodeError, LookupError):
            return text.encode("utf-8", "backslashreplace")

    def _write_stream(self, text: str) -> None:
        try:
            self._stream.write(text)
            self._stream.flush()
        except (BrokenPipeError, ValueError):  # the reader is gone: nothing more is written
            self._broken = True
        except OSError as exc:
            self.error = exc
            self._broken = True

    def _write_some(self, data: bytes) -> bytes | None:
        """Write what the stream takes now, never waiting; returns the rest (None: nothing
        was written and nothing will be: a named FIFO has no reader now, or the stream is
        gone for good, `_broken`)."""
        import os

        assert self._nonblocking is not None
        try:
            written = os.write(self._nonblocking, data)
        except (BlockingIOError, InterruptedError):
            return data
        except BrokenPipeError:
            if self._named_fifo:
                # No reader right now; a FIFO on disk may get a new one: this line is lost,
                # later ones are tried again.
                return None
            self._broken = True
            return None
        except OSError as exc:
            self.error = exc
            self._broken = True
            return None
        return data[written:]

    def _drain(self) -> None:
        import os
        import time

        assert self._fd is not None
        failed = idle = False
        try:
            while True:
                with self._lock:
                    if self._broken:
                        return
                    if not self._queue:
                        # Written out: the thread ends (a process that wants to fork later
                        # must be single-threaded); the next line that has to wait starts one.
                        self._thread = None
                        idle = True
                        return
                    data = self._queue.popleft()
                    self._queued -= len(data)
                    reported = self._reports.pop(id(data), 0)
                    self._busy = True
                view = memoryview(data)
                while view:
                    try:
                        view = view[os.write(self._fd, view) :]  # blocks while the reader is slow
                    except InterruptedError:
                        continue
                    except BlockingIOError:  # someone made the shared fd non-blocking
                        time.sleep(0.01)
                    except BrokenPipeError:
                        if not self._named_fifo:
                            failed = True
                            return
                        with self._lock:  # no reader now: this chunk is lost, not the rest
                            self.dropped += 1
                            self._unreported += 1 + reported  # its note is lost too
                        break
                    except OSError as exc:
                        self.error = exc
                        failed = True
                        return
                with self._lock:
                    self._busy = False
                    self._drained.notify_all()
        finally:
            if not idle:
                with self._lock:
                    self._busy = False
                    if failed or not self._broken:
                        # EPIPE, or this thread ended unexpectedly: nothing more can be written.
                        self._broken = True
                        self._queue.clear()
                        self._reports.clear()
                        self._queued = 0
                    self._drained.notify_all()


# How long the lines still queued at a server's end may wait for a slow reader before its
# final totals go out (stdout; stderr half that), and the totals themselves after that: a
# stuck reader never holds the exit for long (a stop must end within a second).
SETTLE_S = 0.2
FINISH_S = 0.2


class ServerOutput:
    """A server's stdout (results, or JSON events) and stderr (log lines) as LineSinks: events
    never block the server; a reader that falls behind loses lines, counted, and the stream
    says where (`{"event": "dropped", ...}` on stdout, `dropped N event lines: ...` on
    stderr, after `err_prefix`)."""

    def __init__(self, err_prefix: str = "") -> None:
        self.out = LineSink(
            sys.stdout,
            dropped_line=lambda n: dump_json(
                {"event": "dropped", "lines": n, "why": "the reader of stdout fell behind"}
            ),
        )
        self.err = LineSink(
            sys.stderr,
            dropped_line=lambda n: (
                f"{err_prefix}dropped {n} event lines: the reader of stderr fell behind"
            ),
        )

    def write(self, stream: TextIO, line: str) -> None:
        # (Nobody reading any more is no reason to stop serving: the sinks then drop lines.)
        (self.out if stream is sys.stdout else self.err).write(line)

    @property
    def dropped(self) -> int:
        return self.out.dropped + self.err.dropped

    def settle(self, share: float = 1.0) -> int:
        """Let the queued lines go out (bounded; `share` of the usual wait), then drop and
        count the rest, so a last line goes out next. Returns the lines dropped in all."""
        return self.err.settle(SETTLE_S / 2 * share) + self.out.settle(SETTLE_S * share)

    def finish(self) -> OSError | None:
        """Give a slow reader a moment for the last lines; a stuck one never holds the exit.
        Returns a write error of this host's own (ENOSPC), which the caller reports (exit 6)."""
        self.out.close(FINISH_S)
        self.err.close(FINISH_S / 2)
        return self.out.error or self.err.error

    def worker_exit(self) -> dict[str, int]:
        """A forked worker's last lines: the counters it reports to the parent (the lines it
        lost, and those of stdout no "dropped" line told of). Its waits are short: the
        parent's own come after them, and the whole stop must stay within a second."""
        self.settle(share=0.5)
        out_lost = self.out.close(0.02)
        # Beyond what it dropped: a line still being written as the worker ends.
        unmarked = self.out.unreported + (out_lost - self.out.dropped)
        return {"lines_lost": out_lost + self.err.close(0.02), "lines_unmarked": unmarked}


def _start_quiet_thread(target: Callable[[], None]) -> Any:
    """A daemon thread that no signal is ever delivered to. Python runs handlers in the main
    thread only; while the main thread blocks a signal (a server's stop), the kernel would
    hand a process-directed one to this thread instead, where its default action kills the
    process. Started with everything blocked, it inherits that mask."""
    import signal
    import threading

    thread = threading.Thread(target=target, name="netprobe-log", daemon=True)
    if not hasattr(signal, "pthread_sigmask"):
        thread.start()
        return thread
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return thread


def write_within(stream: Any, data: bytes, within_s: float) -> bool:
    """Write `data` to a binary stream, waiting at most `within_s` seconds at a time for a
    pipe to take some of it (through a non-blocking twin); False when a wait ran out or the
    reader left, the rest of `data` dropped. A reader that is only slow gets it all. Anything
    else (a file, a terminal, memory) gets a plain write. For the last output of a run
    already interrupted: a reader that stopped reading must not keep that run alive, and one
    that left must not change its exit code."""
    import time

    try:
        fd = stream.fileno()
    except (OSError, ValueError, AttributeError):
        fd = None
    twin = _nonblocking_twin(fd) if fd is not None else None
    if twin is None:
        stream.write(data)
        stream.flush()
        return True
    deadline = time.monotonic() + within_s
    queued = pipe_queued(twin)
    try:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(twin, view) :]
                deadline = time.monotonic() + within_s
            except BlockingIOError:
                now_queued = pipe_queued(twin)
                if now_queued is not None and queued is not None and now_queued < queued:
                    deadline = time.monotonic() + within_s  # the reader took some: it reads
                queued = now_queued
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.01)  # (the socket core alone polls; a pipe's room can wait this)
        return True
    except OSError:  # the reader left (EPIPE)
        return False
    finally:
        os.close(twin)


def _nonblocking_twin(fd: int) -> int | None:
    """A second, non-blocking open of the pipe fd writes to, so a write from the loop can
    never wait, whatever another process sharing fd does. None for anything else: a
    terminal (a non-blocking write may take part of a line, and the tty's lock keeps a whole
    blocking write in one piece, which the thread's are), a socket, no /proc."""
    import stat

    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return None
    except OSError:
        return None
    try:
        return os.open(
            f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
        )
    except OSError:
        return None


def pipe_queued(fd: int) -> int | None:
    """The bytes a pipe (either end's fd) holds unread: FIONREAD; None where it does not
    tell. A count that goes down means its reader reads, even while a write cannot go in
    yet (Linux reports a pipe writable only once a whole page of it is free)."""
    import fcntl
    import stat
    import struct
    import termios

    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return None  # a socket's FIONREAD counts what comes in, not what waits to go out
        return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0])
    except OSError:
        return None


def _is_named_fifo(fd: int) -> bool:
    """A FIFO with a name on disk (a reader may leave and a new one come), not a pipe."""
    import stat

    try:
        return stat.S_ISFIFO(os.fstat(fd).st_mode) and not os.readlink(
            f"/proc/self/fd/{fd}"
        ).startswith("pipe:")
    except OSError:
        return False


def _may_block(stream: TextIO) -> int | None:
    """The stream's fd when a write to it can block (pipe, socket, terminal), else None."""
    import stat

    try:
        fd = stream.fileno()
        mode = os.fstat(fd).st_mode
    except (OSError, ValueError, AttributeError):
        return None  # an in-memory stream
    if stat.S_ISREG(mode) or (stat.S_ISCHR(mode) and not os.isatty(fd)):
        return None  # a file or /dev/null
    return fd
