"""A run's directories, in-process and without torch: the run lock (held, stale on this host, stale
on another host, a requeued SLURM job, two take-overs at once), a lost ``latest`` rebuilt from the
newest complete verified step, ``--overwrite`` over a checkpoint (and a requeued job that must not
delete what it saved), the directory a refusal names, a changed ``train.seed`` refused before any
data is built, and the free-space rule. End to end (two real runs on one directory, a killed run's
lock taken over): tests/training/test_run_directory_e2e.py."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest

from megafusion.checkpoint import directory, integrity
from megafusion.checkpoint.manifest import LATEST, new_manifest, write_manifest
from megafusion.config import load_config
from megafusion.core.errors import CheckpointError, ConfigError
from megafusion.core.io import file_digest
from megafusion.training import run_dir, run_lock
from tests.helpers import ROOT

CONFIG = str(ROOT / "tests/configs/parity.yaml")


@pytest.fixture(autouse=True)
def _fresh_process_state(monkeypatch):
    """Each test as a new process would see it: no lock held, nothing prepared, not in a SLURM job."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setattr(run_dir, "_prepared", {})
    yield
    run_dir.release()


def _cfg(out: Path, *overrides: str):
    return load_config(CONFIG, [f"logging.out_dir={out}", "logging.wandb=false", *overrides])


def _fake_step(root: Path, step: int, cfg) -> Path:
    """A complete step directory as a save leaves it: files, then the sealed manifest with their checksums."""
    path = directory.step_dir(root, step)
    path.mkdir(parents=True)
    (path / "__0_0.distcp").write_bytes(os.urandom(64))
    (path / "common.pt").write_bytes(b"common")
    files = {p.name: [p.stat().st_size, file_digest(p)] for p in sorted(path.iterdir())}
    write_manifest(path, new_manifest(cfg, None, step, step * 4, **{integrity.FILES_KEY: files}))
    (root / LATEST).write_text(path.name + "\n")
    return path


def _lines():
    said = []
    return said, said.append


# --- the lock ------------------------------------------------------------------------------------


def _write_lock(directory_: Path, **holder) -> Path:
    directory_.mkdir(parents=True, exist_ok=True)
    path = directory_ / run_lock.LOCK_NAME
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": "theirs", **holder}))
    return path


def test_a_live_holder_refuses_the_second_run_naming_it(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import psutil

        started = psutil.Process(sleeper.pid).create_time()
        lock = _write_lock(tmp_path / "out", pid=sleeper.pid, started=started, job="77")
        said, say = _lines()
        with pytest.raises(ConfigError) as err:
            run_lock.hold({"checkpoint.dir": tmp_path / "out"}, say)
        line = str(err.value)
        assert "\n" not in line and f"pid {sleeper.pid}" in line and socket.gethostname() in line
        assert "SLURM job 77" in line and str(lock) in line and "checkpoint.dir" in line
        assert json.loads(lock.read_text())["token"] == "theirs" and not said  # untouched
    finally:
        sleeper.kill()
        sleeper.wait()
    # Now its process is gone: the lock is stale, taken over with one line, and released at the end.
    said, say = _lines()
    run_lock.hold({"checkpoint.dir": tmp_path / "out"}, say)
    assert len(said) == 1 and "took over" in said[0] and "no longer running" in said[0]
    mine = json.loads(lock.read_text())
    assert mine["pid"] == os.getpid() and mine["host"] == socket.gethostname() and mine["started"]
    run_lock.release_all()
    assert not lock.exists()


def test_a_reused_pid_is_not_the_holder(tmp_path):
    _write_lock(tmp_path, pid=os.getpid(), started=1.0)  # this pid, but a process started in 1970
    said, say = _lines()
    run_lock.hold({"logging.out_dir": tmp_path}, say)
    assert "another process" in said[0]


def test_another_hosts_lock_is_stale_only_after_its_heartbeat_stops(tmp_path, monkeypatch):
    lock = _write_lock(tmp_path, host="node-elsewhere", pid=1)
    with pytest.raises(ConfigError, match="node-elsewhere.*last heartbeat 0 s ago"):
        run_lock.hold({"logging.out_dir": tmp_path}, print)
    old = time.time() - run_lock.STALE_AFTER_S - 5
    os.utime(lock, (old, old))
    said, say = _lines()
    run_lock.hold({"logging.out_dir": tmp_path}, say)
    assert "heartbeat is 30" in said[0] and "node-elsewhere" in said[0]


def test_the_holder_keeps_its_heartbeat(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    run_lock.hold({"logging.out_dir": tmp_path}, print)
    lock = tmp_path / run_lock.LOCK_NAME
    os.utime(lock, (1.0, 1.0))
    time.sleep(0.5)
    assert time.time() - lock.stat().st_mtime < 5


def test_a_requeued_slurm_job_takes_its_own_lock_on_any_node(tmp_path, monkeypatch):
    _write_lock(tmp_path, host="node-elsewhere", pid=1, job="4242")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    said, say = _lines()
    run_lock.hold({"logging.out_dir": tmp_path}, say)
    assert "earlier incarnation of this SLURM job (4242)" in said[0]


def test_of_two_runs_taking_over_one_stale_lock_one_wins(tmp_path):
    """Both see the stale lock; the second one's rename finds it gone and meets the winner's lock."""
    _write_lock(tmp_path, pid=2**22 + 7)  # no such process
    first = run_lock.RunLock(tmp_path, "logging.out_dir")
    second = run_lock.RunLock(tmp_path, "logging.out_dir")
    holder, age = second._read()
    assert second.stale_reason(holder, age)  # both would take it over...
    first.acquire(print)
    with pytest.raises(ConfigError, match="in use by another run"):
        second.acquire(print)  # ...but the winner is alive
    first.release()


def test_the_command_refuses_a_held_directory_and_missing_inputs_before_importing_torch(tmp_path):
    _write_lock(tmp_path / "out", host="node-elsewhere", pid=1)
    cases = [
        [f"logging.out_dir={tmp_path / 'out'}"],
        [f"logging.out_dir={tmp_path / 'new'}", f"checkpoint.init_from={tmp_path / 'no_such_ckpt'}"],
        [f"logging.out_dir={tmp_path / 'new'}", f"data.tokenizer={tmp_path / 'no_such.model'}"],
    ]
    code = (
        "import sys; from megafusion.commands.train import main\n"
        f"statuses = [main(['--config', {CONFIG!r}, *case]) for case in {cases!r}]\n"
        "print(statuses, 'torch imported:', 'torch' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "SLURM_JOB_ID")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert "[2, 2, 2] torch imported: False" in proc.stdout, proc.stdout + proc.stderr
    held, init_from, tokenizer = proc.stderr.splitlines()
    assert "in use by another run (host node-elsewhere" in held
    assert f"checkpoint.init_from {tmp_path / 'no_such_ckpt'}: no such file or directory" in init_from
    assert f"data.tokenizer {tmp_path / 'no_such.model'}: no such file or directory" in tokenizer
    assert not (tmp_path / "new").exists()


# --- a lost `latest` -------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["missing", "empty", "incomplete"])
def test_a_lost_latest_is_rebuilt_from_the_newest_complete_verified_step(tmp_path, how):
    cfg = _cfg(tmp_path, "train.steps=8")
    root = tmp_path / "checkpoints"
    _fake_step(root, 2, cfg)
    _fake_step(root, 4, cfg)
    damaged = _fake_step(root, 6, cfg)
    (damaged / "__0_0.distcp").write_bytes(os.urandom(64))  # same size, other bytes
    (root / "step_0000008").mkdir()  # a save that died before its manifest
    if how == "missing":
        (root / LATEST).unlink()
    elif how == "empty":
        (root / LATEST).write_text("")
    else:
        (root / LATEST).write_text("step_0000008\n")
    said, say = _lines()
    assert run_dir.prepare(cfg, say) == directory.step_dir(root, 4)
    assert (root / LATEST).read_text().strip() == "step_0000004"
    line = next(s for s in said if "rebuilt" in s)
    assert {"missing": "was missing", "empty": "was empty", "incomplete": "named step_0000008"}[how] in line
    assert "step_0000006 (__0_0.distcp does not match its checksum" in line
    assert sorted(p.name for p in root.iterdir()) == [LATEST, "run.lock", *(f"step_000000{i}" for i in (2, 4, 6, 8))]


def test_a_latest_with_nothing_complete_beside_it_names_the_way_out(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step_0000002").mkdir(parents=True)
    (root / LATEST).write_text("step_0000002\n")
    with pytest.raises(CheckpointError, match="no complete checkpoint is beside it: pass --overwrite"):
        run_dir.prepare(_cfg(tmp_path), print)


# --- starting over another run ------------------------------------------------------------------


def test_overwrite_starts_afresh_over_a_checkpoint_and_a_requeued_job_continues(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    root = tmp_path / "checkpoints"
    _fake_step(root, 2, cfg)
    (tmp_path / run_dir.METRICS).write_text("{}\n")
    assert run_dir.prepare(cfg, print) == directory.step_dir(root, 2)  # without --overwrite: resumes
    run_lock.release_all()
    monkeypatch.setattr(run_dir, "_prepared", {})
    monkeypatch.setenv("SLURM_JOB_ID", "99")
    said, say = _lines()
    assert run_dir.prepare(_cfg(tmp_path, "checkpoint.overwrite=true"), say) is None  # --overwrite: afresh
    assert "deleted the previous run's" in said[0] and "step_0000002" in said[0] and not list(root.glob("step_*"))
    assert not (root / LATEST).exists() and json.loads((tmp_path / run_dir.RUN_RECORD).read_text())["job"] == "99"
    run_lock.release_all()
    # The job saved, was preempted and requeued with the same command: it continues, deleting nothing.
    _fake_step(root, 4, cfg)
    monkeypatch.setattr(run_dir, "_prepared", {})
    said, say = _lines()
    assert run_dir.prepare(_cfg(tmp_path, "checkpoint.overwrite=true"), say) == directory.step_dir(root, 4)
    assert "requeued" in said[0] and (root / "step_0000004").is_dir()


def test_the_refusal_names_the_directory_that_holds_the_run(tmp_path):
    shared = tmp_path / "shared_checkpoints"
    shared.mkdir()
    (shared / "step_0000002").mkdir()  # the other run's first save, still being written
    with pytest.raises(ConfigError) as err:
        run_dir.prepare(_cfg(tmp_path / "b", f"checkpoint.dir={shared}"), print)
    assert str(err.value).startswith(f"{shared} holds a run (step_0000002)")


def test_a_run_restarting_before_its_first_save_may_change_train_recompute(tmp_path, monkeypatch):
    """Recomputation changes what is kept for the backward pass, not what the run computes: the same
    run may restart in its directory with another ``train.recompute``; another ``train.lr`` is another run."""
    (tmp_path / run_dir.RUN_RECORD).write_text(json.dumps({"config": _cfg(tmp_path).to_dict()}))
    (tmp_path / run_dir.METRICS).write_text("")  # it logged, then crashed before any checkpoint
    run_dir.prepare(_cfg(tmp_path, "train.recompute=full"), print)
    assert json.loads((tmp_path / run_dir.RUN_RECORD).read_text())["config"]["train"]["recompute"] == "full"
    monkeypatch.setattr(run_dir, "_prepared", {})
    with pytest.raises(ConfigError, match="holds a run"):
        run_dir.prepare(_cfg(tmp_path, "train.lr=1e-4"), print)


def test_a_changed_seed_on_resume_is_refused_by_name_before_any_data_is_built(tmp_path):
    _fake_step(tmp_path / "checkpoints", 2, _cfg(tmp_path, "data.source=builtin"))
    cache = tmp_path / "cache"
    cfg = _cfg(tmp_path, "data.source=builtin", "train.seed=5", f"data.cache_dir={cache}")
    with pytest.raises(CheckpointError, match=r"train\.seed 7 -> 5"):
        run_dir.prepare(cfg, print)
    assert not cache.exists() or not any(cache.iterdir())  # no tokenizer trained for the new seed


# --- disk space --------------------------------------------------------------------------------

Usage = namedtuple("Usage", "total used free")


def test_the_free_space_rule_is_the_size_times_the_stated_margin(tmp_path, monkeypatch):
    from megafusion.checkpoint import io

    mib = 2**20
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(100 * mib, 84 * mib, 16 * mib))
    io._check_free_space(tmp_path, needed=int(10.1 * mib), margin=0.1)  # 11.1 MiB of 16 free: saves
    with pytest.raises(CheckpointError) as err:
        io._check_free_space(tmp_path, needed=int(10.1 * mib), margin=0.6)
    line = str(err.value)
    assert "10.1 MiB" in line and "checkpoint.space_margin=0.6 asks for 16.2 MiB" in line and "16.0 MiB are" in line


def test_a_warm_start_of_another_shape_says_what_to_set_not_how_to_resume(tmp_path):
    from megafusion.checkpoint.manifest import check_compatible

    saved = _cfg(tmp_path, "model.hidden_size=64")
    manifest = new_manifest(saved, None, 0, 0, weights_only=True)
    with pytest.raises(CheckpointError) as err:
        check_compatible(tmp_path / "init", manifest, _cfg(tmp_path), None, weights_only=True)
    text = str(err.value)
    assert "model.hidden_size: checkpoint 64, this run 32" in text and "checkpoint.init_from a checkpoint" in text
    assert "checkpoint.resume" not in text
