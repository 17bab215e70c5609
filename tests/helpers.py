"""Shared test helpers: running megafusion as a real command (alone or under torchrun)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def run_train(tmp_path: Path, nproc: int, config: str, overrides: list[str], tag: str, timeout: int = 600):
    """Train with ``nproc`` processes; return (per-step losses, first-step full gradients)."""
    losses, grads = tmp_path / f"{tag}_losses.json", tmp_path / f"{tag}_grads.pt"
    args = ["--config", str(ROOT / config), *overrides, f"logging.dump_losses={losses}", f"logging.dump_grads={grads}"]
    if nproc == 1:
        cmd = [sys.executable, "-m", "megafusion.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "megafusion.train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(losses.read_text())["losses"], torch.load(grads), proc.stdout
