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

from megafusion.checkpoint import integrity, mcore_patches
from megafusion.checkpoint.directory import latest_size, step_dir
from megafusion.checkpoint.lineage import LINEAGE
from megafusion.checkpoint.manifest import LATEST, MANIFEST, new_manifest, read_manifest, write_manifest
from megafusion.checkpoint.warm_start import WarmStart
from megafusion.core.errors import CheckpointError
from megafusion.core.io import atomic_write

_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


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


def _complete(root: Path | None, path: Path, manifest: dict, keep_last: int = 0, pinned=()) -> None:
    """Rank 0 completes a checkpoint: manifest last, then (for a run directory) ``latest`` and pruning."""
    write_manifest(path, manifest)
    if root is not None:
        atomic_write(root / LATEST, path.name + "\n")
        _prune(root, keep_last, pinned)


def _prune(root: Path, keep_last: int, pinned=()) -> None:
    """Keep the newest ``keep_last`` complete checkpoints and the ``pinned`` ones; drop older and
    incomplete ones."""
    latest = (root / LATEST).read_text().strip()
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    complete = [p for p in steps if (p / MANIFEST).exists()]
    keep = set(complete[-keep_last:]) | {root / latest} | {Path(p) for p in pinned}
    for p in steps:
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)


def save_weights(path: str | Path, model, cfg, data_meta: dict | None, origin: dict) -> Path:
    """A model-only checkpoint (no optimizer, step 0) that runs start from with ``checkpoint.init_from``."""
    path = Path(path)
    mcore_patches.no_writer_manager()
    if dist.get_rank() == 0:
        if path.exists() and any(path.iterdir()):
            raise CheckpointError(f"{path} exists and is not empty: choose a new output directory")
        path.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(_model_state(model), str(path))
    files = integrity.record_files(path)
    if dist.get_rank() == 0:
        manifest = new_manifest(cfg, data_meta, 0, 0, weights_only=True, origin=origin, **{integrity.FILES_KEY: files})
        _complete(None, path, manifest)
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
    progress: dict | None = None,
    pinned=(),
    lineage: dict | None = None,
) -> Path:
    """Save on every rank; returns the step directory (complete and verified when this returns).

    Any failure (no space, an unwritable directory, a writer error on any rank) raises the same
    ``CheckpointError`` on every rank, naming the path and the cause; the partial directory is
    removed and ``latest`` keeps naming the last complete checkpoint. ``progress``: what the run
    keeps besides the step and the consumed samples (FLOPs so far, recent losses), given back by
    :func:`load_checkpoint`. ``pinned``: step directories pruning must keep (the last one before a
    loss spike). ``lineage``: the seed the run started from (:mod:`megafusion.checkpoint.lineage`),
    recorded in the manifest when given."""
    root = Path(root)
    path = step_dir(root, step)
    mcore_patches.no_writer_manager()
    needed = _expected_bytes(root, model)
    failure = None
    try:
        if dist.get_rank() == 0:
            _check_free_space(root, needed, cfg.checkpoint.space_margin)
            if path.exists():  # a leftover of an interrupted save of the same step
                shutil.rmtree(path)
            path.mkdir(parents=True)
    except (OSError, CheckpointError) as err:
        failure = _describe_failure(err, path, needed)
    failure = _agree(failure)
    files = None
    if failure is None:
        try:
            state = _sharded_state_dict(model, optimizer, is_loading=False)
            state["scheduler"] = scheduler.state_dict()
            state["progress"] = {"step": step, "consumed_samples": consumed_samples, **(progress or {})}
            with _injected_write_error(step, path):
                dist_checkpointing.save(state, str(path))
            _fault_point("after_shards", step)
            files = integrity.record_files(path)
            if dist.get_rank() == 0:
                extra = {integrity.FILES_KEY: files, **({LINEAGE: lineage} if lineage else {})}
                manifest = new_manifest(cfg, data_meta, step, consumed_samples, **extra)
                _complete(root, path, manifest, keep_last, pinned)
        except BaseException as err:  # torch DCP's CheckpointException is a BaseException
            if isinstance(err, (KeyboardInterrupt, SystemExit)):
                raise
            failure = _describe_failure(err, path, needed)
        failure = _agree(failure)
    if failure is not None:
        previous = (root / LATEST).read_text().strip() if (root / LATEST).exists() else None
        if dist.get_rank() == 0 and previous != path.name:  # never the one `latest` already names
            shutil.rmtree(path, ignore_errors=True)
        dist.barrier()
        raise CheckpointError(
            f"saving checkpoint {path} failed: {failure}. Nothing of it was kept; "
            + (f"{root / LATEST} still names {previous}, which resumes" if previous else "no earlier checkpoint exists")
        )
    dist.barrier()
    _fault_point("after_save", step)
    return path


def _agree(failure: str | None) -> str | None:
    """Every rank's failure message gathered: the first one (None when every rank succeeded)."""
    if dist.get_world_size() == 1:
        return failure
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, failure)
    found = [f for f in everyone if f]
    found.sort(key=lambda f: "errno" not in f.lower())  # the rank that saw the OSError says most
    return found[0] if found else None


def _describe_failure(err: BaseException, path: Path, needed: int) -> str:
    """One line: the OSError underneath megatron's wrappers when there is one, and the free space."""
    if isinstance(err, CheckpointError):
        return str(err)
    cause = _os_error(err)
    if cause is not None:
        where = cause.filename or path
        text = f"{where}: {cause.strerror or cause} (errno {cause.errno})"
    else:
        # torch DCP's CheckpointException carries each failed rank's exception (their causes are
        # lost on the way between ranks): its message names the file and the OS error.
        failures = getattr(err, "failures", None) or {}
        inner = [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        first = inner[0] if inner else err
        text = f"{type(first).__name__}: {str(first).splitlines()[0] if str(first) else ''}"
        if inner:
            text += f" (on rank{'s' if len(failures) > 1 else ''} {', '.join(map(str, failures))})"
    free = _free_bytes(path)
    if free is not None and free < needed:
        text += f"; the disk holding {path.parent} has {_gb(free)} free, the checkpoint needs about {_gb(needed)}"
    return text


def _os_error(err: BaseException) -> OSError | None:
    """The first OSError in ``err``'s cause chain or in megatron's per-rank failure table."""
    seen, todo = set(), [err]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError):
            return e
        todo += [e.__cause__, e.__context__]
        for failure in (getattr(e, "failures", None) or {}).values():  # torch DCP's CheckpointException
            todo.append(failure[0] if isinstance(failure, tuple) else failure)
    return None


def _expected_bytes(root: Path, model) -> int:
    """The size of the next checkpoint: the last one's recorded files, else an estimate from the
    parameters (weights + Adam's two fp32 moments, + fp32 master weights for 16-bit parameters)."""
    previous = latest_size(root)
    if previous:
        return previous
    import torch

    local = 0
    for chunk in model:
        for p in chunk.parameters():
            local += p.numel() * p.element_size()
            if p.requires_grad:
                local += p.numel() * (8 + (4 if p.element_size() < 4 else 0))
    total = torch.tensor([float(local)], dtype=torch.float64)
    if dist.get_world_size() > 1:
        from megatron.core import parallel_state as ps

        total = total.to(_collective_device())
        dist.all_reduce(total)
        total = total.cpu() / ps.get_data_parallel_world_size(
            with_context_parallel=True
        )  # every data (x context) replica holds the model
    return int(total.item())


def _collective_device():
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def _check_free_space(root: Path, needed: int, margin: float) -> None:
    """Refuse a save the disk cannot hold: it needs ``needed`` bytes x (1 + ``margin``) free."""
    root.mkdir(parents=True, exist_ok=True)
    free = _free_bytes(root)
    wanted = int(needed * (1 + margin))
    if free is not None and free < wanted:
        raise CheckpointError(
            f"not enough free space in {root}: the checkpoint needs about {_gb(needed)} and checkpoint.space_margin="
            f"{margin:g} asks for {_gb(wanted)} free, {_gb(free)} are; free space there (e.g. lower "
            f"checkpoint.keep_last), point checkpoint.dir at a larger disk, or lower checkpoint.space_margin"
        )


def _injected_write_error(step: int, path: Path):
    """Test hook: ``MEGAFUSION_FAULT=enospc:<step>`` makes this save's shard files fail to open
    with ENOSPC, inside megatron-core's own writer processes, as on a full disk."""
    import contextlib

    if os.environ.get("MEGAFUSION_FAULT", "") != f"enospc:{step}":
        return contextlib.nullcontext()
    import errno
    import sys

    target = str(path)

    def hook(event, args):
        if event == "open" and str(args[0]).startswith(target) and str(args[0]).endswith(".distcp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[0]))

    sys.addaudithook(hook)  # audit hooks cannot be removed: the faulted process is expected to stop
    return contextlib.nullcontext()


def verify_checkpoint(path: Path, verify: bool = True) -> str:
    """Check the manifest's seal and every file's checksum (all ranks); returns what was checked."""
    manifest = read_manifest(path)
    if not verify:
        return "files not verified (checkpoint.verify=false)"
    if integrity.verify_files(Path(path), manifest, integrity.fallback(path)):
        return f"{len(manifest[integrity.FILES_KEY])} files verified"
    return "no checksums recorded (saved by an older megafusion): files not verified"


def load_weights(path: Path, model, warm: WarmStart | None = None, verify: bool = True) -> str:
    """Load only the model tensors of checkpoint ``path`` (saved in any layout) into ``model``,
    bridging what ``warm`` (from ``check_compatible``) allows; returns what was verified."""
    checked = verify_checkpoint(path, verify)
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
    return checked


def load_checkpoint(path: Path, model, optimizer, scheduler, verify: bool = True) -> dict:
    """Load a checkpoint saved in any layout into this one; returns its ``progress`` dict, with
    ``verified`` saying what was checked."""
    checked = verify_checkpoint(path, verify)
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
    return {**loaded["progress"], "verified": checked}


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
