"""Runs that survive faults, end to end (issue 13): a stop signal (one rank and two), NaN, a full
disk, a damaged checkpoint, a used run directory, changed settings on resume.

Every case runs the real command and checks what the user sees (exit status, one line naming the
file / key / step and the fix) and that nothing is lost: ``latest`` on a complete checkpoint that
resumes, no NaN checkpoint, no process left behind (every launched process carries a tag in its
environment, and no process with that tag may remain).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from megafusion.evaluation.curves import read_metrics
from tests.helpers import ROOT, train_command

pytestmark = pytest.mark.torchrun
CONFIG = ROOT / "tests/configs/parity.yaml"
STEPS = 6


def _args(out: Path, *overrides: str) -> list[str]:
    return [
        "--config",
        str(CONFIG),
        f"logging.out_dir={out}",
        "logging.wandb=false",
        f"train.steps={STEPS}",
        "checkpoint.interval=2",
        f"logging.dump_losses={out}.losses.json",
        *overrides,
    ]


def _env(tag: str, **extra: str) -> dict:
    """The test's environment without a caller's fault or debug switches, tagged, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("MEGAFUSION_FAULT", "MEGAFUSION_DEBUG")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MEGAFUSION_TEST_TAG": tag, **extra}


def _run(out: Path, *overrides: str, nproc: int = 1, rc: int = 0, launcher: bool = False, **env: str) -> str:
    """The run's console (stdout, then stderr); ``launcher``: through ``launch/torchrun.sh``."""
    tag = uuid.uuid4().hex
    cmd = train_command(nproc, _args(out, *overrides))
    if launcher:
        cmd = ["bash", str(ROOT / "launch/torchrun.sh"), *_args(out, *overrides)]
        env = {"NPROC": str(nproc), "PYTHON": sys.executable, **env}
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(tag, **env), capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == rc, f"exit {proc.returncode}, expected {rc}:\n{text[-5000:]}"
    _assert_no_process_left(tag)
    return text


def _assert_no_process_left(tag: str) -> None:
    deadline = time.time() + 5
    while True:
        left = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if p.environ().get("MEGAFUSION_TEST_TAG") == tag:
                    left.append((p.pid, " ".join(p.info["cmdline"] or [])[:120]))
            except psutil.Error:
                continue
        if not left or time.time() > deadline:
            break
        time.sleep(0.2)
    assert not left, f"processes outlived the run: {left}"


def _losses(out: Path) -> list[float]:
    return json.loads(Path(f"{out}.losses.json").read_text())["losses"]


def _error_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.startswith("megafusion train: ")]
    assert lines, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    return lines[-1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, uninterrupted: the losses every interrupted run must continue exactly."""
    out = tmp_path_factory.mktemp("faults") / "reference"
    _run(out)
    return _losses(out)


def _close(got: list[float], want: list[float], rel: float) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert abs(a - b) <= rel * abs(b), (got, want)


def test_sigterm_saves_exits_75_and_the_rerun_continues_exactly(reference, tmp_path):
    """A real SIGTERM from outside mid-run: the step finishes, a checkpoint is saved, status 75
    (and the status file), nothing survives; the same command continues to the same losses."""
    out, status = tmp_path / "run", tmp_path / "status"
    tag = uuid.uuid4().hex
    env = _env(tag, MEGAFUSION_EXIT_STATUS_FILE=str(status))
    # a slow step (big eval) is not needed: the signal lands whenever it lands and the checks hold
    proc = subprocess.Popen(
        train_command(1, _args(out, "checkpoint.interval=0")),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count('"loss"') >= 1) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    text = proc.communicate(timeout=120)[0]
    _assert_no_process_left(tag)
    if proc.returncode == 0:  # the run was already past its last step: nothing left to show
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 75, text[-4000:]
    stopped = int(status.read_text().split()[2])
    assert status.read_text().startswith(f"preempted step {stopped} ")
    assert f"stopped at step {stopped} on SIGTERM" in text and "Traceback" not in text
    latest = (out / "checkpoints/latest").read_text().strip()
    assert latest == f"step_{stopped:07d}"
    _run(out)
    _close(_losses(out), reference[stopped:], 1e-6)
    train, _ = read_metrics(metrics, "rerun", AssertionError)  # raises on a repeated step
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))


def test_signal_on_one_of_two_ranks_stops_both_and_the_rerun_continues(reference, tmp_path):
    """SIGTERM delivered to rank 1 only (DP=2), under ``launch/torchrun.sh``: every rank agrees,
    saves step 3 and exits; the launcher ends with one line and status 75 (torchrun alone: 1 and
    a traceback, which the launcher keeps in the log it names); the rerun continues to the
    one-process losses."""
    out, log = tmp_path / "run", tmp_path / "torchrun.log"
    text = _run(out, nproc=2, rc=75, launcher=True, MEGAFUSION_FAULT="sigterm:3:1", TORCHRUN_LOG=str(log))
    assert "rank 1: SIGTERM received" in text, text[-3000:]
    assert text.splitlines()[-1] == (
        f"launch/torchrun.sh: preempted at step 3, saved {out}/checkpoints/step_0000003; run the same command "
        f"again to continue (exit status 75; torchrun's messages: {log})"
    )
    assert "Traceback" not in text and "ChildFailedError" not in text and "exitcode" not in text, text[-3000:]
    kept = log.read_text()
    assert "ChildFailedError" in kept and "exitcode  : 75" in kept and "== outcome: preempted step 3 " in kept
    assert (out / "checkpoints/latest").read_text().strip() == "step_0000003"
    text = _run(out, nproc=2, launcher=True, TORCHRUN_LOG=str(log))
    assert "launch/torchrun.sh:" not in text  # a finished run: no line of the launcher's
    _close(_losses(out), reference[3:], 1e-5)  # DP=2 vs one process: parity tolerance


def test_nan_stops_at_the_step_with_nothing_saved(tmp_path):
    out = tmp_path / "run"
    text = _run(out, "checkpoint.interval=1", rc=2, MEGAFUSION_FAULT="nan:3:1")
    line = _error_line(text)
    assert "step 3: the loss is not finite (modality text)" in line and "microbatch 1 of the step" in line
    assert "train.lr" in line and "train.on_nan=skip" in line
    assert (out / "checkpoints/latest").read_text().strip() == "step_0000002"
    assert not (out / "checkpoints/step_0000003").exists()


def test_nan_skip_drops_the_step_and_logs_it(tmp_path):
    out = tmp_path / "run"
    _run(out, "train.on_nan=skip", MEGAFUSION_FAULT="nan:3:1")
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"event"' in line]
    assert [e["step"] for e in events if e["event"] == "skipped_step"] == [3]
    skipped = next(e["message"] for e in events if e["event"] == "skipped_step")
    assert "(train.on_nan=skip)" in skipped and "resume with train.on_nan=skip" not in skipped, skipped
    assert all(x == x for x in _losses(out)[3:])  # finite after the skipped step
    assert (out / "checkpoints/latest").read_text().strip() == f"step_{STEPS:07d}"


def test_full_disk_during_a_save_loses_nothing(reference, tmp_path):
    """ENOSPC inside megatron-core's writer processes: one line naming the file and the cause,
    the partial checkpoint removed, ``latest`` still on the last good one, which resumes."""
    out = tmp_path / "run"
    line = _error_line(_run(out, rc=2, MEGAFUSION_FAULT="enospc:4"))
    assert "saving checkpoint" in line and "step_0000004" in line and "No space left on device" in line
    assert "latest still names step_0000002" in line
    assert not (out / "checkpoints/step_0000004").exists()
    _run(out)
    _close(_losses(out), reference[2:], 1e-6)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A finished run with checkpoints at steps 2, 4, 6 (keep_last=3)."""
    out = tmp_path_factory.mktemp("faults") / "saved"
    _run(out, "checkpoint.keep_last=3")
    return out


def _damage(step_dir: Path, name: str, how: str) -> None:
    f = step_dir / name
    if how == "flip":
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x01
        f.write_bytes(bytes(data))
    elif how == "truncate":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "empty":
        f.write_bytes(b"")
    else:
        f.unlink()


def test_every_damaged_file_is_named(saved, tmp_path):
    """One flipped byte in each file of a checkpoint (every kind megatron-core writes, and the
    manifest), a truncated, an empty and a missing file: each is caught by name before loading."""
    from megafusion import checkpoint as ck

    original = saved / "checkpoints/step_0000006"
    names = sorted(p.name for p in original.iterdir())
    assert {".metadata", "common.pt", "metadata.json", "megafusion.json"} <= set(names)
    assert any(n.endswith(".distcp") for n in names)
    cases = [(n, "flip") for n in names] + [
        (next(n for n in names if n.endswith(".distcp")), "truncate"),
        ("common.pt", "empty"),
        (".metadata", "missing"),
    ]
    for name, how in cases:
        copy = tmp_path / f"{how}{name}" / "step_0000006"
        shutil.copytree(original, copy)
        _damage(copy, name, how)
        with pytest.raises(ck.CheckpointError) as err:
            ck.verify_checkpoint(copy)
        assert name in str(err.value) and "damaged" in str(err.value), (name, how, str(err.value))
    assert ck.verify_checkpoint(original) == f"{len(names) - 1} files verified"


def test_a_damaged_latest_is_refused_and_load_step_resumes(saved, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(saved, out)
    shutil.copy(f"{saved}.losses.json", f"{out}.losses.json")
    distcp = sorted((out / "checkpoints/step_0000006").glob("*.distcp"))[0]
    _damage(distcp.parent, distcp.name, "flip")
    line = _error_line(_run(out, "train.steps=8", rc=2))
    assert distcp.name in line and "checkpoint.load_step=4" in line
    text = _run(out, "train.steps=8", "checkpoint.load_step=4")
    assert "resumed from" in text and "step_0000004 (" in text and "files verified" in text


def test_a_used_run_directory_is_not_overwritten(saved, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(saved, out)
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    line = _error_line(_run(out, "checkpoint.resume=false", rc=2))
    assert str(out) in line and "--overwrite" in line and "logging.out_dir" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    text = _run(out, "checkpoint.resume=false", "checkpoint.overwrite=true", "train.steps=2")
    assert "deleted the previous run's" in text
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_0000002"]


def test_resume_with_a_longer_schedule_applies_it_and_refuses_a_new_sequence_length(saved, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(saved, out)
    line = _error_line(_run(out, "train.steps=8", "model.seq_length=16", rc=2))
    assert "model.seq_length 32 -> 16" in line and "checkpoint.init_from=" in line
    text = _run(out, "train.steps=12")
    assert "train.steps: 6 -> 12" in text and "cosine decay to 0.0003 at step 12" in text
    records, _ = read_metrics(out / "metrics.jsonl", "rerun", AssertionError)
    lrs = {r["step"]: r["lr"] for r in records}
    assert lrs[7] > 3e-4 * 1.5, "the extended run must leave min_lr (the new schedule applies)"


def test_unwritable_output_paths_are_refused_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for key in ("logging.out_dir", "checkpoint.dir"):
        overrides = [f"{key}={blocker}/sub"]
        line = _error_line(_run(tmp_path / "run", *overrides, rc=2))
        assert key in line and "a_file" in line, line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_stop_signals_second_signal_and_deadline_force_the_exit(tmp_path):
    """Forced exits (status 76), as the first message says: a second signal more than
    DUPLICATE_WINDOW_S after the first; not one within it (a launcher's copy, said once), so there the
    deadline forces it; a forked child dies too."""
    script = """
import multiprocessing as mp, os, signal, sys, time
from megafusion.runtime.children import die_with_parent
from megafusion.training import preemption
die_with_parent()
preemption.DUPLICATE_WINDOW_S = float(sys.argv[2])
child = mp.get_context("fork").Process(target=time.sleep, args=(60,))
with preemption.StopSignals("SIGTERM,SIGUSR1", float(sys.argv[1])) as stop:
    child.start()
    print(child.pid, flush=True)
    os.kill(os.getpid(), signal.SIGUSR1)
    time.sleep(float(sys.argv[3]))
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
"""
    # (train.stop_deadline_s, window, seconds to the second signal, what forces the exit)
    cases = (("60", "0.1", "0.3", "second signal (SIGTERM)"), ("0.8", "5", "0.1", "train.stop_deadline_s=0.8 passed"))
    for deadline, window, gap, why in cases:
        status = tmp_path / f"status_{window}"
        tag = uuid.uuid4().hex
        proc = subprocess.run(
            [sys.executable, "-c", script, deadline, window, gap],
            env=_env(tag, MEGAFUSION_EXIT_STATUS_FILE=str(status)),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 76, proc.stderr
        assert status.read_text() == f"forced {why}\n"
        said = proc.stderr.splitlines()
        assert said[0] == (
            f"[megafusion] rank 0: SIGUSR1 received: finishing this step, then saving a checkpoint and exiting (a "
            f"second signal more than {window} s after this one, or train.stop_deadline_s={deadline} s, forces the "
            f"exit without saving)"
        ), said
        if float(gap) < float(window):  # said once, before the deadline forces the exit
            copy = said.pop(1)
            assert copy.startswith("[megafusion] rank 0: SIGTERM ") and "the first signal: taken as a copy" in copy
        assert not any("taken as a copy" in line for line in said), said
        assert said[1].startswith(f"[megafusion] rank 0: {why}: exiting now without saving"), said
        _assert_no_process_left(tag)
