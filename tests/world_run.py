"""What the name worlds (tests/hosts_world.py, tests/dns_world.py) share: the start and the
end of the netprobe run they host. They run as `python -m tests.NAME` (tests.helpers.in_name_world)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def start(argv: list[str]) -> subprocess.Popen[bytes]:
    """`python -m netprobe ARGV`, stdin empty, stdout and stderr piped."""
    return subprocess.Popen(
        [sys.executable, "-m", "netprobe", *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        # Whoever started us may ignore SIGINT (a shell's background job): netprobe must not.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def finish(proc: subprocess.Popen[bytes], timeout_s: float) -> dict[str, Any]:
    """Wait for netprobe to end (killed past timeout_s) and return the report's first fields:
    its exit code ("killed" if it had to be), stdout and stderr."""
    try:
        out, err = proc.communicate(timeout=timeout_s)
        code: int | str = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        code = "killed"
    return {
        "code": code,
        "stdout": out.decode(errors="replace"),
        "stderr": err.decode(errors="replace"),
    }
