"""`netprobe reset serve|proxy|client` (stubs until its issue lands). No I/O here."""

from __future__ import annotations

import typer

from netprobe.cli._options import not_built

__all__ = ["app"]

app = typer.Typer(
    help="Provoke connection resets: a misbehaving server, a fault proxy, an aborting client.",
    no_args_is_help=True,
)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(ctx: typer.Context) -> None:
    """Not built yet."""
    not_built("reset serve")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def proxy(ctx: typer.Context) -> None:
    """Not built yet."""
    not_built("reset proxy")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def client(ctx: typer.Context) -> None:
    """Not built yet."""
    not_built("reset client")
