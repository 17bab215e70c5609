"""Runs never overwrite each other: a run directory records the run it holds (``run.json``).

Before anything is built, :func:`claim` decides from the files alone (every rank reads the same
ones and reaches the same answer; rank 0 writes):

- a run that resumes (``checkpoint.resume=true`` and a checkpoint to resume) continues: whether
  its config fits is the resume check's business (``training.resume_changes``);
- otherwise, if ``logging.out_dir`` or ``checkpoint.dir`` holds another run (a ``run.json``,
  checkpoints or ``metrics.jsonl``), the run is refused, naming what is there, unless
  ``checkpoint.overwrite=true`` (``megafusion train --overwrite``), which deletes that run's
  checkpoints, metrics and record first. The one exception: the same config restarting in its
  own directory before it saved anything (a crash before the first checkpoint).

Every output path is also checked writable here, before any work.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch.distributed as dist

from megafusion.core.errors import ConfigError
from megafusion.core.io import atomic_write, ensure_writable_dir

RUN_RECORD = "run.json"
METRICS = "metrics.jsonl"
# Keys that may change between restarts of one run without making it another run: sections, and
# keys of the sections compared otherwise (train.recompute changes what is kept for the backward
# pass, not what the run computes).
_RESTART_KEYS = ("logging", "checkpoint", "eval", "parallel", "ops")
_RESTART_SECTION_KEYS = {"train": ("recompute",)}


def check_output_paths(cfg, checkpoint_root: Path) -> None:
    """Every directory the run will write, checked writable now (not at the first save)."""
    ensure_writable_dir(cfg.logging.out_dir, "logging.out_dir")
    if cfg.checkpoint.save:
        ensure_writable_dir(checkpoint_root, "checkpoint.dir" if cfg.checkpoint.dir else "logging.out_dir/checkpoints")
    if cfg.data.source != "synthetic":
        ensure_writable_dir(cfg.data.cache_dir, "data.cache_dir")
    for key in ("dump_losses", "dump_grads"):
        target = getattr(cfg.logging, key)
        if target:
            ensure_writable_dir(os.path.dirname(os.path.abspath(target)), f"logging.{key}")


def _identity(config: dict) -> dict:
    kept = {k: v for k, v in config.items() if k not in _RESTART_KEYS}
    for section, keys in _RESTART_SECTION_KEYS.items():
        if isinstance(kept.get(section), dict):
            kept[section] = {k: v for k, v in kept[section].items() if k not in keys}
    return kept


def _holdings(out_dir: Path, root: Path) -> list[Path]:
    found = [out_dir / RUN_RECORD, out_dir / METRICS, root / "latest"]
    found += sorted(root.glob("step_*")) if root.is_dir() else []
    return [p for p in found if p.exists()]


def claim(cfg, root: Path, resuming: bool, say) -> None:
    """Refuse to start over another run (see the module docstring); record this one in ``run.json``."""
    out_dir = Path(cfg.logging.out_dir)
    record_path = out_dir / RUN_RECORD
    ours = cfg.to_dict()
    if not resuming:
        held = _holdings(out_dir, root)
        restart = False
        if held and record_path.exists():
            try:
                theirs = json.loads(record_path.read_text()).get("config", {})
            except (OSError, json.JSONDecodeError):
                theirs = None
            saved_nothing = not any(p.name == "latest" or p.name.startswith("step_") for p in held)
            same = theirs is not None and _identity(theirs) == _identity(ours)
            restart = saved_nothing and cfg.checkpoint.resume and same
        if held and not restart:
            if not cfg.checkpoint.overwrite:
                why = (
                    "checkpoint.resume=false would start a new run over it"
                    if not cfg.checkpoint.resume
                    else "it holds another run (other settings) that saved no checkpoint to resume"
                )
                raise ConfigError(
                    f"{out_dir} holds a run ({', '.join(str(p) for p in held[:3])}"
                    f"{', ...' if len(held) > 3 else ''}) and {why}: choose a new logging.out_dir "
                    f"(and checkpoint.dir), or pass --overwrite (checkpoint.overwrite=true) to delete that run's "
                    f"checkpoints and metrics first"
                )
    else:
        held, restart = [], True
    # Every rank has decided from the files as they were: only now may rank 0 change them.
    dist.barrier()
    if held and not restart:
        if dist.get_rank() == 0:
            for p in held:
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        say(f"[megafusion] --overwrite: deleted the previous run's {', '.join(p.name for p in held)}")
    if dist.get_rank() == 0:
        previous = {}
        if resuming and record_path.exists():
            try:
                previous = json.loads(record_path.read_text())
            except (OSError, json.JSONDecodeError):
                previous = {}
        record = {
            "started": previous.get("started", time.strftime("%Y-%m-%dT%H:%M:%S%z")),
            "checkpoint_dir": str(root),
            "config": ours,
            "restarts": previous.get("restarts", -1) + 1,
        }
        atomic_write(record_path, json.dumps(record, indent=1))
    dist.barrier()
