"""The commands a user types: the README's main job, the 4-process layout, and bad input."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.helpers import ROOT

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
STEP = re.compile(r"^step\s+(\d+)/(\d+) \| loss ([0-9.]+)", re.M)


def run(cmd, timeout=600):
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def losses_of(stdout: str) -> list[float]:
    return [float(m.group(3)) for m in STEP.finditer(stdout)]


@pytest.mark.torchrun
def test_torchrun_tp2_pp2_runs_to_completion_and_learns(tmp_path):
    """The core issue's acceptance command (output redirected to a fresh directory)."""
    torchrun = shutil.which("torchrun") or str(ROOT / ".venv/bin/torchrun")
    proc = run(
        [
            torchrun,
            "--nproc-per-node",
            "4",
            "-m",
            "megafusion.train",
            "--config",
            "examples/configs/tiny_dense.yaml",
            "parallel.tp=2",
            "parallel.pp=2",
            f"logging.out_dir={tmp_path}",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "tp 2 x pp 2 x dp 1" in proc.stdout
    losses = losses_of(proc.stdout)
    assert len(losses) == 20, proc.stdout
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, f"loss did not fall: {losses}"


def test_console_command_equals_module_entry_point(tmp_path):
    args = ["--config", "examples/configs/tiny_dense.yaml", "train.steps=3", "logging.wandb=false"]
    console = shutil.which("megafusion")
    first = [*args, f"logging.out_dir={tmp_path / 'console'}"]
    via_console = (
        run([console, "train", *first]) if console else run([sys.executable, "-m", "megafusion", "train", *first])
    )
    via_module = run([sys.executable, "-m", "megafusion.train", *args, f"logging.out_dir={tmp_path / 'module'}"])
    assert via_console.returncode == via_module.returncode == 0, via_console.stderr[-3000:]
    assert losses_of(via_console.stdout) == losses_of(via_module.stdout)
    assert len(losses_of(via_module.stdout)) == 3


def test_invalid_layout_fails_before_training_with_actionable_message():
    proc = run(
        [
            sys.executable,
            "-m",
            "megafusion.train",
            "--config",
            "examples/configs/tiny_dense.yaml",
            "parallel.tp=3",
            "parallel.sp=true",
        ]
    )
    assert proc.returncode == 2
    assert "model.num_attention_heads=4 is not divisible by parallel.tp=3" in proc.stderr
    assert "world size 1" in proc.stderr and "step" not in proc.stdout


def test_flex_attention_training_off_cuda_is_refused_with_the_fix(tmp_path):
    # No GPU visible (also on a GPU machine): the run is on CPU, where FlexAttention cannot train.
    # Its own out_dir: a run the user left in runs/tiny_dense must not decide what this test sees.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "megafusion.train",
            "--config",
            "examples/configs/tiny_dense.yaml",
            "model.attention_backend=flex",
            "logging.wandb=false",
            f"logging.out_dir={tmp_path / 'run'}",
            "checkpoint.save=false",
        ],
        cwd=ROOT,
        env={**ENV, "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "model.attention_backend=flex trains on CUDA only" in proc.stderr
    assert "model.attention_backend=sdpa" in proc.stderr and "step" not in proc.stdout


def test_unknown_key_and_missing_file_are_named():
    proc = run(
        [sys.executable, "-m", "megafusion.train", "--config", "examples/configs/tiny_dense.yaml", "parallel.tpp=2"]
    )
    assert proc.returncode == 2 and "parallel.tpp" in proc.stderr and "parallel.tp" in proc.stderr
    proc = run([sys.executable, "-m", "megafusion.train", "--config", "no/such/file.yaml"])
    assert proc.returncode == 2 and "no/such/file.yaml" in proc.stderr


def test_unknown_cli_command():
    proc = run([sys.executable, "-m", "megafusion", "trian"])
    assert proc.returncode == 2 and "unknown command 'trian'" in proc.stderr


def test_train_dry_run_prints_layout_and_trains_nothing(tmp_path):
    proc = run(
        [
            sys.executable,
            "-m",
            "megafusion.train",
            "--dry-run",
            "--config",
            "examples/configs/tiny_dense.yaml",
            "parallel.tp=2",
            "parallel.pp=2",
            "--world-size",
            "8",
            "--nproc-per-node",
            "4",
            f"logging.out_dir={tmp_path}",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "world 8 = tp 2 x pp 2 x dp 2" in proc.stdout
    rows = [line.split() for line in proc.stdout.splitlines() if re.match(r"^\s+\d+\s+\d\s+\d\s", line)]
    assert len(rows) == 8 and rows[4][:6] == ["4", "1", "0", "0", "1", "0"]  # rank 4: node 1, tp 0, pp 1, dp 0
    assert "loss" not in proc.stdout and not any(tmp_path.iterdir())
