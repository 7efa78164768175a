"""CI's brief run of scripts/fuzz_framing.py (the full 100,000-example run is in the notes)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

SCRIPT = ROOT / "scripts" / "fuzz_framing.py"


def _run(args: list[str], cwd: Path) -> str:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=cwd,  # atheris writes crash-* files into the working directory
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_fuzz_smoke_hypothesis(tmp_path: Path) -> None:
    out = _run(["--smoke", "--engine", "hypothesis"], tmp_path)
    assert "engine=hypothesis examples=600 " in out


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris not installed")
def test_fuzz_smoke_atheris(tmp_path: Path) -> None:
    out = _run(["--examples", "3000", "--engine", "atheris"], tmp_path)
    assert "engine=atheris examples=3000 " in out
    assert list(tmp_path.glob("crash-*")) == []
