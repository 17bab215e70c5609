"""Shared test helpers: running megafusion as a real command (alone or under torchrun)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def run_module(module: str, *args: str, timeout: int = 120, one_thread: bool = False) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` in the repository root, as a user runs an experiment; output captured.
    ``one_thread``: torch on one thread (runs that launch several processes share 2 cores)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if one_thread else None
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )


def train_command(nproc: int, args: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "megafusion.train", *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "megafusion.train",
        *args,
    ]


def run_train(
    tmp_path: Path,
    nproc: int,
    config: str,
    overrides: list[str],
    tag: str,
    timeout: int = 300,
    env: dict | None = None,
    expect_rc: int = 0,
):
    """Train with ``nproc`` processes; return (per-step losses, first-step full gradients, stdout).

    Output goes under ``tmp_path/tag`` with W&B and checkpoints off unless ``overrides`` say
    otherwise (later overrides win).
    """
    losses, grads = tmp_path / f"{tag}_losses.json", tmp_path / f"{tag}_grads.pt"
    args = [
        "--config",
        str(ROOT / config),
        f"logging.out_dir={tmp_path / tag}",
        "logging.wandb=false",
        "checkpoint.save=false",
        *overrides,
        f"logging.dump_losses={losses}",
        f"logging.dump_grads={grads}",
    ]
    cmd = train_command(nproc, args)
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == expect_rc, (
        f"{' '.join(cmd)} exited {proc.returncode}, expected {expect_rc}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    if expect_rc != 0:
        return None, None, proc.stdout + proc.stderr
    dumped = json.loads(losses.read_text())
    return dumped["losses"], (torch.load(grads) if grads.exists() else None), proc.stdout


def assert_same_training(reference, run, layout: str, rel_tol: float) -> None:
    """``run`` = (losses, first-step full gradients) equals ``reference`` step by step, gradient by gradient."""
    (ref_losses, ref_grads), (losses, grads) = reference, run
    assert len(losses) == len(ref_losses) > 0
    for step, (got, want) in enumerate(zip(losses, ref_losses), start=1):
        assert abs(got - want) <= rel_tol * abs(want), f"{layout} step {step}: loss {got!r} vs {want!r}"

    assert sorted(grads) == sorted(ref_grads), "the layout holds different parameters than one process"
    for name, want in ref_grads.items():
        got = grads[name]
        assert got.shape == want.shape, f"{name}: gathered shape {tuple(got.shape)} vs {tuple(want.shape)}"
        assert want.norm() > 0, f"{name}: zero reference gradient makes the comparison vacuous"
        rel = ((got - want).norm() / want.norm()).item()
        assert rel <= rel_tol, f"{layout}: gradient of {name} differs by {rel:.2e} (relative)"


def recompute_of(overrides: list[str]) -> str:
    """The ``train.recompute`` an override list sets (none if it sets none)."""
    modes = [o.split("=", 1)[1] for o in overrides if o.startswith("train.recompute=")]
    return modes[-1] if modes else "none"


def assert_recompute_ran(out: str, overrides: list[str]) -> None:
    """The run's banner names the recomputation its overrides asked for (and none without)."""
    mode = recompute_of(overrides)
    assert ("| recompute " in out) == (mode != "none") and (mode == "none" or f"| recompute {mode}" in out), mode


def save_tiny_vae(path: Path):
    """A tiny random diffusers ``AutoencoderKL`` (16x16 images -> 4x4x4 latents), saved at ``path``."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=0.5,
    )
    vae.save_pretrained(path)
    return vae


def token_image_checkpoint(tmp_path: Path) -> Path:
    """A tiny LM checkpoint with discrete image tokens (the built-in shapes as 36 pixel-patch codes),
    trained for two steps with caption dropout: what the generation and evaluation tests load."""
    ckpt = tmp_path / "ckpt"
    overrides = ["train.steps=2", "objective.caption_dropout=0.5", "checkpoint.save=true", f"checkpoint.dir={ckpt}"]
    run_train(tmp_path, 1, "tests/configs/mixed_small.yaml", [*overrides, "logging.dump_grads=null"], "train")
    return ckpt
