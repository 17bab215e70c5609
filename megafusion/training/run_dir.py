"""Runs never overwrite each other: a run holds its directories and records the run it is.

:func:`prepare` runs once per run on rank 0 (the only process that writes here), before any
process group exists and, from ``megafusion train``, before torch is imported, so every refusal
below takes well under a second. In order:

1. every output path is checked writable (:func:`check_output_paths`, on every rank too), and the
   inputs a run names by path (``checkpoint.init_from``, ``data.tokenizer``) exist;
2. the run takes ``run.lock`` in ``logging.out_dir`` and in its checkpoint directory
   (:mod:`megafusion.training.run_lock`): a second run on either is refused, naming the holder;
3. what the run continues: ``checkpoint.load_step``'s checkpoint, else the one ``latest`` names;
   a lost ``latest`` is rebuilt from the newest complete, verified step
   (:func:`megafusion.checkpoint.directory.recover_latest`). ``checkpoint.overwrite=true``
   (``--overwrite``) continues nothing: it starts afresh, except in a requeued SLURM job that
   already overwrote the directory (the same ``SLURM_JOB_ID`` in ``run.json``), which continues
   what it saved itself;
4. a run that continues nothing, in a directory that holds another run (``run.json``, checkpoints
   or ``metrics.jsonl``), is refused, naming the directory and what is there, unless
   ``checkpoint.overwrite=true``, which deletes that run's checkpoints, metrics and record first.
   The one exception: the same config restarting in its own directory before it saved a complete
   checkpoint (a crash before the first save);
5. a run that continues a checkpoint with a setting that changes its data stream (``train.seed``,
   ``model.seq_length``, ...) is refused now (:func:`megafusion.training.resume_changes.review`),
   before any tokenizer is trained or data read for the new setting;
6. ``run.json`` records the run (config, start time, restarts, SLURM job).

The other ranks wait for rank 0 at the process group's rendezvous and then read the same files:
they continue ``latest`` (or ``checkpoint.load_step``) when ``checkpoint.resume`` is set.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from megafusion.checkpoint import directory
from megafusion.checkpoint.manifest import LATEST, read_manifest
from megafusion.core.errors import CheckpointError, ConfigError
from megafusion.core.io import atomic_write, ensure_exists, ensure_writable_dir
from megafusion.training import resume_changes, run_lock

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


def check_inputs(cfg) -> None:
    """The inputs a run names by path exist (what they hold is checked where they are read)."""
    if cfg.checkpoint.init_from:
        ensure_exists(
            cfg.checkpoint.init_from,
            "checkpoint.init_from",
            "a checkpoint: a step directory, a run's checkpoint.dir, or what `megafusion convert` wrote",
            error=CheckpointError,
        )
    if cfg.data.tokenizer:
        ensure_exists(
            cfg.data.tokenizer,
            "data.tokenizer",
            "a SentencePiece .model, a Hugging Face tokenizer.json or the directory holding one",
            error=ConfigError,
        )


def _identity(config: dict) -> dict:
    kept = {k: v for k, v in config.items() if k not in _RESTART_KEYS}
    for section, keys in _RESTART_SECTION_KEYS.items():
        if isinstance(kept.get(section), dict):
            kept[section] = {k: v for k, v in kept[section].items() if k not in keys}
    return kept


def _holdings(out_dir: Path, root: Path) -> list[Path]:
    found = [out_dir / RUN_RECORD, out_dir / METRICS, root / LATEST]
    found += sorted(root.glob("step_*")) if root.is_dir() else []
    return [p for p in found if p.exists()]


def _record(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / RUN_RECORD).read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}


def _lock_targets(cfg, root: Path) -> dict[str, Path]:
    targets = {"logging.out_dir": Path(cfg.logging.out_dir)}
    if cfg.checkpoint.save:
        targets["checkpoint.dir" if cfg.checkpoint.dir else "logging.out_dir/checkpoints"] = root
    return targets


def _continues(cfg, root: Path, say) -> Path | None:
    """The checkpoint this run continues (None: a new run); see the module docstring, step 3."""
    c = cfg.checkpoint
    if not c.resume:
        return None
    if c.overwrite:
        if c.load_step is not None:
            raise ConfigError(
                f"checkpoint.load_step={c.load_step} with --overwrite (checkpoint.overwrite=true): overwriting "
                f"deletes the checkpoints the step would resume from; drop one of the two"
            )
        job = os.environ.get("SLURM_JOB_ID")
        record = _record(Path(cfg.logging.out_dir)) or {}
        if not (job and record.get("job") == job and (root / LATEST).exists()):
            return None
        say(
            f"[megafusion] SLURM job {job} was requeued: continuing the run it started with --overwrite "
            f"instead of deleting it again"
        )
    if c.load_step is None:
        directory.recover_latest(root, c.verify, say)
    return directory.checkpoint_to_resume(root, c.load_step)


def _restarting(record: dict | None, held: list[Path], root: Path, cfg) -> bool:
    """The same config restarting before its first complete save (a crash before it)."""
    if record is None or "config" not in record or directory.complete_steps(root) or (root / LATEST) in held:
        return False
    return cfg.checkpoint.resume and _identity(record["config"]) == _identity(cfg.to_dict())


def _claim(cfg, root: Path, resuming: bool, say) -> None:
    """Refuse or overwrite another run's directory (step 4), then record this run (step 6)."""
    out_dir = Path(cfg.logging.out_dir)
    record = _record(out_dir)
    held = [] if resuming else _holdings(out_dir, root)
    if held and not _restarting(record, held, root, cfg):
        if not cfg.checkpoint.overwrite:
            why = (
                "checkpoint.resume=false would start a new run over it"
                if not cfg.checkpoint.resume
                else "it holds another run (other settings) that saved no checkpoint to resume"
            )
            where = " and ".join(dict.fromkeys(str(p.parent) for p in held))
            raise ConfigError(
                f"{where} hold{'s' if ' and ' not in where else ''} a run ({', '.join(p.name for p in held[:4])}"
                f"{', ...' if len(held) > 4 else ''}) and {why}: choose a new logging.out_dir (and checkpoint.dir), "
                f"or pass --overwrite (checkpoint.overwrite=true) to delete that run's checkpoints and metrics first"
            )
        for p in held:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
        say(f"[megafusion] --overwrite: deleted the previous run's {', '.join(p.name for p in held)}")
        record = None
    previous = (record or {}) if resuming else {}
    atomic_write(
        out_dir / RUN_RECORD,
        json.dumps(
            {
                "started": previous.get("started", time.strftime("%Y-%m-%dT%H:%M:%S%z")),
                "checkpoint_dir": str(root),
                "job": os.environ.get("SLURM_JOB_ID"),
                "config": cfg.to_dict(),
                "restarts": previous.get("restarts", -1) + 1,
            },
            indent=1,
        ),
    )


_prepared: dict[str, Path | None] = {}  # the config (as JSON) -> what prepare() decided, while it holds


def prepare(cfg, say=print) -> Path | None:
    """Rank 0's checks and claims before a run (the module docstring, steps 1-6); returns the
    checkpoint the run continues, or None. Runs once per config and process (the command calls it
    before importing torch, the trainer again)."""
    key = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
    if key in _prepared:
        return _prepared[key]
    root = directory.resolve_dir(cfg)
    check_output_paths(cfg, root)
    check_inputs(cfg)
    run_lock.hold(_lock_targets(cfg, root), say)
    resume_from = _continues(cfg, root, say)
    _claim(cfg, root, resume_from is not None, say)
    if resume_from is not None:
        resume_changes.review(resume_from, read_manifest(resume_from).get("config", {}), cfg)
    _prepared[key] = resume_from
    return resume_from


def release() -> None:
    """The run is over (however it ended): its locks released, and a run started next in this process
    (in-process callers) is prepared afresh."""
    _prepared.clear()
    run_lock.release_all()
