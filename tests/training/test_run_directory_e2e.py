"""Two runs, one checkpoint directory, end to end, as the user met it (issue 26): run A trains; run B,
started after A's first save with the same ``checkpoint.dir`` (another ``logging.out_dir`` and
``train.lr``), used to resume A's checkpoint and write into A's directory. Now B is refused at
start in one line naming A's host and pid, before torch is imported. A is then killed outright
(SIGKILL: no handler runs) and ``latest`` deleted: the rerun takes over A's stale lock and rebuilds
``latest`` (one line each) and continues. A resume with a much larger ``train.lr`` is caught as a
loss spike at its second step: the checkpoint carries the recent losses.

The in-process cases (another host, a requeued job, two take-overs at once, every kind of lost
``latest``, --overwrite): tests/training/test_run_directory.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, train_command

pytestmark = pytest.mark.torchrun


def _command(out: Path, ckpt: Path, *overrides: str) -> list[str]:
    return train_command(
        1,
        [
            "--config",
            str(ROOT / "tests/configs/parity.yaml"),
            f"logging.out_dir={out}",
            f"checkpoint.dir={ckpt}",
            "logging.wandb=false",
            "checkpoint.interval=2",
            "eval.interval=0",
            *overrides,
        ],
    )


def _env() -> dict:
    drop = ("MEGAFUSION_FAULT", "MEGAFUSION_DEBUG", "SLURM_JOB_ID", "RANK")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _tail(proc: subprocess.Popen) -> str:
    return proc.stdout.read()[-3000:] if proc.poll() is not None else "still running"


def _run(cmd: list[str], rc: int = 0) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == rc, f"exit {proc.returncode}, expected {rc}:\n{text[-4000:]}"
    return text


def test_a_second_run_is_refused_and_a_killed_runs_lock_is_taken_over(tmp_path):
    ckpt = tmp_path / "shared_checkpoints"
    a = subprocess.Popen(
        _command(tmp_path / "a", ckpt, "train.steps=400"),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 240
        # Until A has saved 6 steps: the recent losses in its checkpoint fill the spike watch's window.
        while not (ckpt / "latest").exists() or (ckpt / "latest").read_text().strip() < "step_0000006":
            assert a.poll() is None and time.time() < deadline, _tail(a)
            time.sleep(0.2)
        began = time.perf_counter()
        refused = _run(_command(tmp_path / "b", ckpt, "train.steps=3", "train.lr=1e-2"), rc=2)
        refused_in = time.perf_counter() - began
        assert a.poll() is None, "run A must still be running"
    finally:
        os.killpg(a.pid, signal.SIGKILL)  # like a node failure: no handler, no cleanup
        a.wait()
    lines = [line for line in refused.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in refused, refused
    assert lines[0].startswith(f"megafusion train: checkpoint.dir {ckpt} is in use by another run (host ")
    assert f"pid {a.pid}," in lines[0] and str(ckpt / "run.lock") in lines[0]
    assert refused_in < 20, f"the refusal took {refused_in:.1f} s: it must come before torch is imported"
    assert not (tmp_path / "b" / "metrics.jsonl").exists()
    assert json.loads((ckpt / "run.lock").read_text())["pid"] == a.pid  # A's lock outlived A

    # A's `latest` is lost too. The rerun (a constant learning rate 300x higher) takes over the stale lock,
    # rebuilds `latest` and resumes; its first step updates with that rate, its second shows the spike:
    # the running mean needs 5 losses, which come from the checkpoint (without them the first 5 steps of
    # a resume went unwatched). The checkpoint before the spike survives checkpoint.keep_last=1.
    (ckpt / "latest").unlink()
    last = sorted(p for p in ckpt.glob("step_*") if (p / "megafusion.json").exists())[-1]
    at = int(last.name.split("_")[1])
    rerun = ["train.lr=1", "train.min_lr=1", "train.warmup_steps=0", "checkpoint.keep_last=1", f"train.steps={at + 4}"]
    text = _run(_command(tmp_path / "a", ckpt, *rerun))
    assert f"took over {ckpt / 'run.lock'}: its process is no longer running (host " in text, text[-3000:]
    assert f"{ckpt / 'latest'} was missing: rebuilt it to name {last.name}" in text
    assert f"resumed from {last}" in text
    metrics = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    spikes = [json.loads(line) for line in metrics if "loss_spike" in line]
    assert spikes and spikes[0]["step"] == at + 2, spikes
    assert f"{last}, saved before it, is kept (checkpoint.keep_last will not prune it)" in text
    assert last.is_dir() and (ckpt / "latest").read_text().strip() == f"step_{at + 4:07d}"
    assert not (ckpt / "run.lock").exists() and not (tmp_path / "a" / "run.lock").exists()  # released at the end
    # Resumed once more (one step, keep_last=1): the pin travels in the checkpoint, so the pre-spike
    # checkpoint survives the resumed run's pruning too.
    _run(_command(tmp_path / "a", ckpt, *rerun[:-1], f"train.steps={at + 5}"))
    assert sorted(p.name for p in ckpt.glob("step_*")) == [last.name, f"step_{at + 5:07d}"]
