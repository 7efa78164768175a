#!/usr/bin/env python3
"""Run the reliability scenarios of issue 9 (the same code as tests/reliability/) and print
their figures: connections held, bytes verified, resets survived, bad inputs tried, RSS and
fd counts before/peak/after. Loopback only; every scenario is bounded in count and time.

    .venv/bin/python scripts/reliability_report.py            # everything (about 45 s)
    .venv/bin/python scripts/reliability_report.py --quick    # 200 conns, 5 s load (~15 s)
    .venv/bin/python scripts/reliability_report.py --only load,resets

Fuzz figures come from scripts/fuzz_framing.py (the framing owner's script): run it with
`--examples 100000` for the full count. Exit status 0 when every scenario printed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.reliability import scenarios
from tests.reliability.test_hostile import BAD_INPUTS

NAMES = ("load", "resets", "slowloris", "nonreader", "emfile", "sigterm", "stuck", "badinput")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts, shorter load")
    parser.add_argument("--only", default=",".join(NAMES), help="comma-separated scenarios")
    args = parser.parse_args()
    chosen = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(chosen) - set(NAMES))
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)} (choose from {', '.join(NAMES)})")
    quick = args.quick
    started = time.monotonic()
    for name in chosen:
        began = time.monotonic()
        lines = _run(name, quick)
        print(f"== {name} ({time.monotonic() - began:.1f}s)")
        for line in lines:
            print("  " + line)
        sys.stdout.flush()
    print(f"== total {time.monotonic() - started:.1f}s")
    return 0


def _run(name: str, quick: bool) -> list[str]:
    if name == "load":
        conns, duration = (200, 5.0) if quick else (1000, 20.0)
        udp = 20_000 if quick else 100_000
        return scenarios.run_load(conns, duration, udp, udp / duration).lines()
    if name == "resets":
        return scenarios.run_resets(200 if quick else 1000).lines()
    if name == "slowloris":
        return scenarios.run_slowloris(100 if quick else 500).lines()
    if name == "nonreader":
        return scenarios.run_nonreader((20 if quick else 100) * 1024 * 1024).lines()
    if name == "emfile":
        return _emfile()
    if name == "sigterm":
        with tempfile.TemporaryDirectory(prefix="np-rel-") as tmp:
            unix = scenarios.run_sigterm(str(Path(tmp) / "echo.sock")).lines()
        return unix + scenarios.run_sigterm_proxy().lines()
    if name == "stuck":
        return scenarios.run_stuck_stop(3 if quick else 5).lines()
    commands = sorted({" ".join(a[:2]) if a[0] == "reset" else a[0] for a, _ in BAD_INPUTS})
    return [
        f"bad inputs tried: {len(BAD_INPUTS)} across {len(commands)} subcommands "
        f"({', '.join(commands)}); run `pytest tests/reliability/test_hostile.py` to check them"
    ]


def _emfile() -> list[str]:
    import socket

    socks: list[socket.socket] = []
    try:
        for i in range(1000):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind(("127.0.0.1", 0))
            if i % 20 == 0:
                sock.listen(64)
        ports = ",".join(str(s.getsockname()[1]) for s in socks)
        scan = scenarios.run_emfile(["port-check", "127.0.0.1", "--ports", ports, "--json"])
    finally:
        for sock in socks:
            sock.close()
    flood = scenarios.run_emfile(
        [
            "backlog",
            "--lab",
            "--connections",
            "1000",
            "--accept-rate",
            "100000",
            "--hold",
            "1s",
            "--timeout",
            "1s",
            "--json",
        ]
    )
    return [scan.line(), flood.line(), scenarios.run_echo_emfile().line()]


if __name__ == "__main__":
    sys.exit(main())
