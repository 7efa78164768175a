"""The one output module: results as a table (terminal), plain lines (pipe), JSON Lines or CSV.

Writes only to the stream it is given; engines never call it. Records are flat dicts (see
results.to_record); nested values are shown as JSON in table, plain and CSV output.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TextIO

__all__ = [
    "Column",
    "OutputFormat",
    "Renderer",
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
