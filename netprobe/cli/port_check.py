"""`netprobe port-check` (stub until its issue lands). No I/O here."""

from __future__ import annotations

import typer

from netprobe.cli._options import not_built

__all__ = ["port_check"]


def port_check(ctx: typer.Context) -> None:
    """Not built yet."""
    not_built("port-check")
