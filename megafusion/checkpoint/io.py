"""Saving and loading checkpoints with megatron-core ``dist_checkpointing``, ``latest`` and pruning.

A save is complete only when every rank has written its shards (barrier), then rank 0 writes
``megafusion.json`` and atomically replaces ``latest``. A crash anywhere before that leaves
``latest`` naming the previous complete checkpoint, and the half-written directory is ignored
and removed by the next successful save.

Tensors are saved under their global names (megatron-core's sharded state dicts, readable keys
such as ``decoder.layers.3.mlp.linear_fc1.weight``), with the distributed optimizer's state in
the ``fully_reshardable`` format (one canonical tensor per parameter, like the plain
optimizer's), so a run can resume into another TP / PP / VPP / DP layout (with the same
optimizer kind). What is saved: model chunks, optimizer state, LR scheduler, the step and the
number of consumed samples (the data loader's whole state: samples are a pure function of their
index), and the config; no RNG state is needed (nothing in a training step draws random numbers
from a global generator on this path).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch.distributed as dist
from megatron.core import dist_checkpointing

from megafusion.checkpoint import mcore_patches
from megafusion.checkpoint.manifest import LATEST, MANIFEST, new_manifest, write_manifest
from megafusion.checkpoint.warm_start import WarmStart
from megafusion.core.errors import CheckpointError
from megafusion.core.io import atomic_write

_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:07d}"


def resolve_dir(cfg) -> Path:
    return Path(cfg.checkpoint.dir or os.path.join(cfg.logging.out_dir, "checkpoints"))


def _model_state(model) -> dict:
    # The unwrapped module: keys read "decoder.layers.3.mlp.linear_fc1.weight", not "module.…".
    chunks = [getattr(chunk, "module", chunk) for chunk in model]
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def _sharded_state_dict(model, optimizer, is_loading: bool) -> dict:
    state = _model_state(model)
    # The nested {"model0": ..., "model1": ...} as megatron-LM passes it: merging the chunks into one
    # dict would collide on their chunk-local keys ("decoder.layers.0...") under virtual pipelining.
    state["optimizer"] = optimizer.sharded_state_dict(dict(state), is_loading=is_loading, metadata=_OPTIM_METADATA)
    return state


def _complete(root: Path | None, path: Path, manifest: dict, keep_last: int = 0) -> None:
    """Rank 0 completes a checkpoint: manifest last, then (for a run directory) ``latest`` and pruning."""
    write_manifest(path, manifest)
    if root is not None:
        atomic_write(root / LATEST, path.name + "\n")
        _prune(root, keep_last)


def _prune(root: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` complete checkpoints; drop older and incomplete ones."""
    latest = (root / LATEST).read_text().strip()
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    complete = [p for p in steps if (p / MANIFEST).exists()]
    keep = set(complete[-keep_last:]) | {root / latest}
    for p in steps:
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)


def save_weights(path: str | Path, model, cfg, data_meta: dict | None, origin: dict) -> Path:
    """A model-only checkpoint (no optimizer, step 0) that runs start from with ``checkpoint.init_from``."""
    path = Path(path)
    if dist.get_rank() == 0:
        if path.exists() and any(path.iterdir()):
            raise CheckpointError(f"{path} exists and is not empty: choose a new output directory")
        path.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(_model_state(model), str(path))
    dist.barrier()
    if dist.get_rank() == 0:
        _complete(None, path, new_manifest(cfg, data_meta, 0, 0, weights_only=True, origin=origin))
    dist.barrier()
    return path


def save_checkpoint(
    root: str | Path,
    step: int,
    model,
    optimizer,
    scheduler,
    consumed_samples: int,
    cfg,
    data_meta: dict | None,
    keep_last: int,
    flops_total: float = 0.0,
) -> Path:
    """Save on every rank; returns the step directory (complete when this returns)."""
    path = step_dir(root, step)
    if dist.get_rank() == 0:
        if path.exists():  # a leftover of an interrupted save of the same step
            shutil.rmtree(path)
        path.mkdir(parents=True)
    dist.barrier()
    state = _sharded_state_dict(model, optimizer, is_loading=False)
    state["scheduler"] = scheduler.state_dict()
    state["progress"] = {"step": step, "consumed_samples": consumed_samples, "flops_total": flops_total}
    dist_checkpointing.save(state, str(path))
    _fault_point("after_shards", step)
    dist.barrier()  # every rank's shards are on disk
    if dist.get_rank() == 0:
        _complete(Path(root), path, new_manifest(cfg, data_meta, step, consumed_samples), keep_last)
    dist.barrier()
    _fault_point("after_save", step)
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory, or a run's checkpoint directory (then the step ``latest`` names)."""
    path = Path(path)
    if (path / MANIFEST).exists():
        return path
    found = latest_checkpoint(path) if (path / LATEST).exists() else None
    if found is None:
        raise CheckpointError(
            f"{path} is neither a megafusion checkpoint (no {MANIFEST}) nor a checkpoint "
            f"directory with a '{LATEST}' file: give a step directory or a run's checkpoint.dir"
        )
    return found


def latest_checkpoint(root: str | Path) -> Path | None:
    """The directory ``latest`` names, or None when there is no complete checkpoint."""
    pointer = Path(root) / LATEST
    if not pointer.exists():
        return None
    path = Path(root) / pointer.read_text().strip()
    if not (path / MANIFEST).exists():
        raise CheckpointError(
            f"{pointer} names {path}, which is not a complete megafusion checkpoint (no {MANIFEST}): "
            f"point {pointer} at a complete step directory, or delete it to start from scratch"
        )
    return path


def load_weights(path: Path, model, warm: WarmStart | None = None) -> None:
    """Load only the model tensors of checkpoint ``path`` (saved in any layout) into ``model``,
    bridging what ``warm`` (from ``check_compatible``) allows."""
    warm = warm or WarmStart()
    state = _model_state(model)
    skipped = {key: set() for key in state}  # per chunk: local keys the checkpoint does not hold
    for key, sharded in state.items():
        for local in list(sharded):
            saved = getattr(sharded[local], "key", local)  # non-tensor entries keep theirs
            source = warm.checkpoint_key(local, saved)
            if source is None:
                del sharded[local]
                skipped[key].add(local)
            elif source != saved:
                sharded[local].key = source
    try:
        loaded = dist_checkpointing.load(state, str(path))
    except Exception as err:  # megatron raises assorted types for missing/corrupt shards
        raise CheckpointError(f"cannot load the model weights of {path}: {type(err).__name__}: {err}") from err
    for key, chunk in zip(state, model):
        module = getattr(chunk, "module", chunk)
        missing, unexpected = module.load_state_dict(loaded[key], strict=False)
        unfilled = set(missing) - skipped[key]
        if unfilled or unexpected:
            raise CheckpointError(
                f"{path}: the model's tensors do not match the checkpoint's: missing "
                f"{sorted(unfilled)}, unexpected {sorted(unexpected)}"
            )
        if warm.rule and warm.rule.fill:
            warm.rule.fill(module)


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Load a checkpoint saved in any layout into this one; returns its ``progress`` dict."""
    mcore_patches.check_version()
    mcore_patches.keep_step_on_fully_reshardable_load()
    state = mcore_patches.loading_state_dict(lambda: _sharded_state_dict(model, optimizer, is_loading=True), optimizer)
    state["scheduler"] = None
    state["progress"] = None
    try:
        loaded = dist_checkpointing.load(state, str(path))
    except Exception as err:  # megatron raises assorted types for missing/corrupt shards
        raise CheckpointError(f"cannot load checkpoint {path}: {type(err).__name__}: {err}") from err
    for i, chunk in enumerate(model):
        chunk.module.load_state_dict(loaded[f"model{i}" if len(model) > 1 else "model"], strict=True)
    optimizer.load_state_dict(loaded["optimizer"])
    mcore_patches.unshare_adam_steps(optimizer)
    scheduler.load_state_dict(loaded["scheduler"])
    return loaded["progress"]


def _fault_point(where: str, step: int) -> None:
    """Test hook: ``MEGAFUSION_FAULT=<where>:<step>`` kills the process here (crash tests)."""
    fault = os.environ.get("MEGAFUSION_FAULT", "")
    if fault == f"{where}:{step}":
        import psutil

        print(f"[megafusion] MEGAFUSION_FAULT: dying at {where} of step {step}", flush=True)
        # Like a node failure, take the helpers (dist_checkpointing's writer processes) along.
        for child in psutil.Process().children(recursive=True):
            child.kill()
        os._exit(17)
