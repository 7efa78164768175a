"""`netprobe doctor` (stub until its issue lands). No I/O here."""

from __future__ import annotations

import typer

from netprobe.cli._options import not_built

__all__ = ["doctor"]


def doctor(ctx: typer.Context) -> None:
    """Not built yet."""
    not_built("doctor")
