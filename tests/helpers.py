"""Shared test helpers: running megafusion as a real command (alone or under torchrun)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def train_command(nproc: int, args: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "megafusion.train", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "megafusion.train", *args]


def run_train(tmp_path: Path, nproc: int, config: str, overrides: list[str], tag: str, timeout: int = 300,
              env: dict | None = None, expect_rc: int = 0):
    """Train with ``nproc`` processes; return (per-step losses, first-step full gradients, stdout).

    Output goes under ``tmp_path/tag`` with W&B and checkpoints off unless ``overrides`` say
    otherwise (later overrides win).
    """
    losses, grads = tmp_path / f"{tag}_losses.json", tmp_path / f"{tag}_grads.pt"
    args = ["--config", str(ROOT / config), f"logging.out_dir={tmp_path / tag}", "logging.wandb=false",
            "checkpoint.save=false", *overrides, f"logging.dump_losses={losses}", f"logging.dump_grads={grads}"]
    cmd = train_command(nproc, args)
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == expect_rc, (
        f"{' '.join(cmd)} exited {proc.returncode}, expected {expect_rc}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    if expect_rc != 0:
        return None, None, proc.stdout + proc.stderr
    dumped = json.loads(losses.read_text())
    return dumped["losses"], (torch.load(grads) if grads.exists() else None), proc.stdout
