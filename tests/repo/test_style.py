"""The tree keeps one style: ``ruff check`` (lint + import order) and ``ruff format --check`` pass
with the repository's ``ruff.toml`` (line length 120)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import ROOT

PATHS = ["megafusion", "tests", "bench", "examples", "launch"]


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]])
def test_ruff(command):
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", *command, *PATHS], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, (
        f"ruff {' '.join(command)} (fix: ruff check --fix . && ruff format .):\n"
        f"{proc.stdout[-4000:]}{proc.stderr[-2000:]}"
    )
