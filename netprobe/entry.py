"""The `netprobe` command's entry point (and `python -m netprobe`'s): it imports nothing heavy
before a Ctrl-C is handled. The command line itself (Typer and every command) loads in
main(); a Ctrl-C during those imports (about 0.2 s, more on a loaded host) printed a Python
traceback."""

from __future__ import annotations

import sys


def main() -> int:
    """Run netprobe with sys.argv; its exit status."""
    try:
        from netprobe.cli import main as run

        return run()
    except KeyboardInterrupt:  # before the command line handles it itself: exit as it would
        sys.stderr.write("\n")
        return 130
