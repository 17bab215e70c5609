"""Checkpoints through megatron-core ``dist_checkpointing``: save, resume, reshard, prune.

Layout of ``checkpoint.dir``::

    step_0000100/      one dist_checkpointing directory per saved step
      ...              (sharded tensors + common.pt written by megatron-core)
      megafusion.json  written last by rank 0: step, config, data description
    latest             text file naming the newest *complete* step directory

A save is complete only when every rank has written its shards (barrier), then rank 0
writes ``megafusion.json`` and atomically replaces ``latest`` (write + ``os.replace``). A
crash anywhere before that leaves ``latest`` naming the previous complete checkpoint, and
the half-written directory is ignored and removed by the next successful save.

Tensors are saved under their global names (megatron-core's sharded state dicts), with
the distributed optimizer's state in the ``fully_reshardable`` format (one canonical tensor
per parameter, like the plain optimizer's), so a run can
resume into another TP / PP / VPP / DP layout (with the same optimizer kind). What is saved: model chunks, optimizer
state, LR scheduler, the step and the number of consumed samples (the data loader's whole
state: samples are a pure function of their index), and the config; the CPU RNG state is
not needed (nothing in a training step draws random numbers on this path).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

LATEST = "latest"
MANIFEST = "megafusion.json"
FORMAT_VERSION = 1
# Model keys whose change makes a checkpoint's tensors meaningless for the new model.
SHAPE_KEYS = ("arch", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
              "ffn_hidden_size", "vocab_size", "qk_norm")
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


from megafusion.core.errors import CheckpointError  # noqa: E402,F401


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:07d}"


def _sharded_state_dict(model, optimizer, is_loading: bool) -> dict:
    state = _model_state(model)
    # The nested {"model0": ..., "model1": ...} as megatron-LM passes it: merging the chunks into one
    # dict would collide on their chunk-local keys ("decoder.layers.0...") under virtual pipelining.
    state["optimizer"] = optimizer.sharded_state_dict(dict(state), is_loading=is_loading, metadata=_OPTIM_METADATA)
    return state


def _model_keys(cfg) -> dict:
    m = cfg.model
    values = {k: getattr(m, k) for k in SHAPE_KEYS}
    values["num_query_groups"] = m.effective_num_query_groups()
    values["ffn_hidden_size"] = m.effective_ffn_hidden_size()
    if m.arch == "mot":  # which parts hold one tensor per modality
        values["untie"] = ",".join(m.untied_parts())
    if m.norm_placement != "pre":  # other norm keys (absent from older manifests: pre)
        values["norm_placement"] = m.norm_placement
    if m.tie_embeddings:  # no output_layer.weight (absent from older manifests: untied)
        values["tie_embeddings"] = True
    o = cfg.objective
    if o.name != "lm":  # image patch modules of their own shapes (absent from older manifests: lm)
        values["objective"] = f"{o.name}:{o.patchify}:{o.latent_codec}:patch{o.latent_patch_size}"
    if m.freeze_text:  # LMFusion: the new-row deltas (absent from older manifests: off)
        values["freeze_text"] = True
        values["frozen_vocab_rows"] = m.frozen_vocab_rows
    return values


def _model_state(model) -> dict:
    # The unwrapped module: keys read "decoder.layers.3.mlp.linear_fc1.weight", not "module.…".
    chunks = [getattr(chunk, "module", chunk) for chunk in model]
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def _write_manifest(root: Path | None, path: Path, manifest: dict, keep_last: int = 0) -> None:
    """Rank 0 completes a checkpoint: manifest last, then (for a run directory) ``latest`` and pruning."""
    _atomic_write(path / MANIFEST, json.dumps(manifest, indent=1))
    if root is not None:
        _atomic_write(root / LATEST, path.name + "\n")
        _prune(root, keep_last)


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
        _write_manifest(None, path, {"format_version": FORMAT_VERSION, "step": 0, "consumed_samples": 0,
                                     "weights_only": True, "origin": origin, "model": _model_keys(cfg),
                                     "data": data_meta, "config": cfg.to_dict()})
    dist.barrier()
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory, or a run's checkpoint directory (then the step ``latest`` names)."""
    path = Path(path)
    if (path / MANIFEST).exists():
        return path
    found = latest_checkpoint(path) if (path / LATEST).exists() else None
    if found is None:
        raise CheckpointError(f"{path} is neither a megafusion checkpoint (no {MANIFEST}) nor a checkpoint "
                              f"directory with a '{LATEST}' file: give a step directory or a run's checkpoint.dir")
    return found


def load_weights(path: Path, model, warm: WarmStart | None = None) -> None:
    """Load only the model tensors of checkpoint ``path`` (saved in any layout) into ``model``,
    bridging what ``warm`` (from :func:`check_compatible`) allows."""
    from megafusion.models.init import tied_name

    warm = warm or WarmStart()
    state = _model_state(model)
    skipped = {key: set() for key in state}  # per chunk: local keys the checkpoint does not hold
    for key, sharded in state.items():
        for local in list(sharded):
            parts = local.split(".")
            if parts[0] in warm.new_modules or (warm.from_dense and "image" in parts):
                del sharded[local]
                skipped[key].add(local)
            elif warm.from_dense and "text" in parts:  # read the dense tensor under its dense key
                sharded[local].key = tied_name(sharded[local].key)
    try:
        loaded = dist_checkpointing.load(state, str(path))
    except Exception as err:  # megatron raises assorted types for missing/corrupt shards
        raise CheckpointError(f"cannot load the model weights of {path}: {type(err).__name__}: {err}") from err
    for key, chunk in zip(state, model):
        module = getattr(chunk, "module", chunk)
        missing, unexpected = module.load_state_dict(loaded[key], strict=False)
        if set(missing) - skipped[key] or unexpected:
            raise CheckpointError(f"{path}: the model's tensors do not match the checkpoint's: missing "
                                  f"{sorted(set(missing) - skipped[key])}, unexpected {sorted(unexpected)}")
        if warm.from_dense:
            _copy_text_into_image(module)


@torch.no_grad()
def _copy_text_into_image(module) -> None:
    """MoT warm start: every image copy becomes its (just loaded) text copy: same shapes, same shards."""
    params = dict(module.named_parameters())
    for name, param in params.items():
        parts = name.split(".")
        if "image" in parts:
            param.copy_(params[".".join("text" if p == "image" else p for p in parts)])


def save_checkpoint(root: str | Path, step: int, model, optimizer, scheduler, consumed_samples: int,
                    cfg, data_meta: dict | None, keep_last: int, flops_total: float = 0.0) -> Path:
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
        manifest = {"format_version": FORMAT_VERSION, "step": step, "consumed_samples": consumed_samples,
                    "model": _model_keys(cfg), "data": data_meta, "config": cfg.to_dict()}
        _write_manifest(Path(root), path, manifest, keep_last)
    dist.barrier()
    _fault_point("after_save", step)
    return path


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _prune(root: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` complete checkpoints; drop older and incomplete ones."""
    latest = (root / LATEST).read_text().strip()
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    complete = [p for p in steps if (p / MANIFEST).exists()]
    keep = set(complete[-keep_last:]) | {root / latest}
    for p in steps:
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)


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


def read_manifest(path: Path) -> dict:
    try:
        return json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path / MANIFEST} is unreadable ({err}): the checkpoint is damaged") from err


def run_config(path: Path, manifest: dict | None = None):
    """The config checkpoint ``path`` was trained with, minus its layout: ``parallel`` is one
    process's (dist_checkpointing reshards any saved layout into whatever the caller then sets).
    What the tools that run a checkpoint (eval, generate, logits, convert) start from."""
    from megafusion.config.loader import config_from_dict
    from megafusion.config.schema import ParallelConfig

    manifest = read_manifest(path) if manifest is None else manifest
    cfg = config_from_dict(manifest["config"], source=str(path / MANIFEST))
    cfg.parallel = ParallelConfig()
    return cfg


@dataclass
class WarmStart:
    """How ``checkpoint.init_from`` fills a model that differs from the checkpoint's in the ways a
    warm start allows (``check_compatible`` decides; ``load_weights`` does it)."""

    from_dense: bool = False  # a dense checkpoint into model.arch=mot: every modality copy = the dense module
    vocab: tuple[int, int] | None = None  # (checkpoint rows, run rows): a grown vocabulary, new rows zero
    new_modules: tuple[str, ...] = ()  # module names the checkpoint lacks: they keep their initialisation

    def describe(self) -> str:
        parts = []
        if self.from_dense:
            parts.append("dense -> MoT: each modality copy starts as the dense module")
        if self.vocab:
            parts.append(f"vocabulary grown from {self.vocab[0]} to {self.vocab[1]} rows (new rows start at zero)")
        if self.new_modules:
            parts.append(f"new (initialised, not loaded): {', '.join(self.new_modules)}")
        return "; ".join(parts)


def _warm_start(ours: dict, theirs: dict, diffs: dict[str, tuple]) -> WarmStart:
    """Take the differences a warm start can bridge out of ``diffs`` (key -> (checkpoint, run))."""
    from megafusion.models.lmfusion import INPUT_ROWS, OUTPUT_ROWS
    from megafusion.accounting.flops import IMAGE_MODULES

    warm, new = WarmStart(), []
    if diffs.get("arch") == ("dense", "mot"):
        warm.from_dense = True
        del diffs["arch"]
        diffs.pop("untie", None)  # the dense checkpoint has no untied parts: every part is copied
    vocab = diffs.get("vocab_size")
    if vocab and isinstance(vocab[0], int) and vocab[0] < vocab[1]:
        warm.vocab = vocab
        del diffs["vocab_size"]
    if "objective" in diffs and "objective" not in theirs and ours.get("objective", "").startswith("transfusion"):
        new += IMAGE_MODULES  # a language model into Transfusion: the image modules are new
        del diffs["objective"]
    if "freeze_text" in diffs and "freeze_text" not in theirs:
        new += (INPUT_ROWS, OUTPUT_ROWS)  # into LMFusion: the new-row deltas start at zero
        del diffs["freeze_text"]
        diffs.pop("frozen_vocab_rows", None)
    warm.new_modules = tuple(new)
    return warm


def check_compatible(path: Path, manifest: dict, cfg, data_meta: dict | None,
                     weights_only: bool = False) -> WarmStart:
    """Refuse a checkpoint whose model (or tokenizer) differs from the run's, naming each key.

    ``weights_only``: only the model tensors will be loaded (``checkpoint.init_from``), so the
    optimizer kind does not matter, and a warm start may also grow the vocabulary, go from a
    dense model to MoT, from a language model to Transfusion and into LMFusion (the returned
    :class:`WarmStart` says how); otherwise (a resume) a model-only checkpoint is refused.
    """
    if manifest.get("weights_only") and not weights_only:
        raise CheckpointError(f"{path} holds model weights only (no optimizer or progress), so a run cannot "
                              f"resume from it: start a new run from it with checkpoint.init_from={path} "
                              f"and a checkpoint.dir of its own")
    ours = _model_keys(cfg)
    theirs = manifest.get("model", {})
    # Both ways: the optional keys are written only when not at their default, so a key only
    # the checkpoint has (e.g. tie_embeddings) is a difference too.
    model_diffs = {k: (theirs.get(k), ours.get(k)) for k in (*ours, *(k for k in theirs if k not in ours))
                   if theirs.get(k) != ours.get(k)}
    warm = _warm_start(ours, theirs, model_diffs) if weights_only else WarmStart()
    diffs = [f"model.{k}: checkpoint {a!r}, this run {b!r}" for k, (a, b) in model_diffs.items()]
    saved_data, now = manifest.get("data"), data_meta or {}
    # A checkpoint that records no data (imported from Hugging Face) has no tokenizer to compare. A
    # warm start needs only the text ids to agree: image ids and codes may be new.
    keys = ("tokenizer", "codec") if not weights_only else ("text tokenizer",)
    for key in keys if saved_data is not None else ():
        a, b = (_text_identity(saved_data), _text_identity(now)) if key == "text tokenizer" else \
            (saved_data.get(key), now.get(key))
        if a != b:
            diffs.append(f"data {key}: checkpoint {a!r}, this run {b!r}")
    saved_distopt = manifest.get("config", {}).get("parallel", {}).get("distributed_optimizer")
    if not weights_only and saved_distopt is not None and saved_distopt != cfg.parallel.distributed_optimizer:
        # The two optimizers store their state in different formats (megatron-core 0.16).
        diffs.append(f"parallel.distributed_optimizer: checkpoint {saved_distopt}, this run "
                     f"{cfg.parallel.distributed_optimizer} (the optimizer kind cannot change on resume)")
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} does not fit this run:\n  - " + "\n  - ".join(diffs)
            + "\nuse the checkpoint's settings, or start fresh with checkpoint.resume=false or another checkpoint.dir"
        )
    return warm


def _text_identity(data_meta: dict) -> dict | None:
    """The part of a data description that fixes what the text ids mean."""
    tokenizer = data_meta.get("tokenizer")
    if tokenizer is None:
        return None
    return {k: v for k, v in tokenizer.items() if k not in ("vocab_size", "codec")}


def _loading_state_dict(model, optimizer) -> dict:
    """The sharded state dict to load into, working around a megatron-core 0.16.1 assertion.

    Without Apex / Transformer Engine (torch's Adam, e.g. on CPU) the DistributedOptimizer's
    ``state_dict()`` asserts that all parameter states share one ``step``, and a fresh
    optimizer has none. Give them a temporary ``step`` while the state dict is built, then
    remove it: ``load_state_dict`` restores the checkpoint's step and refuses extra keys.
    """
    primed = []
    for torch_opt in _torch_adams(optimizer):
        for group in torch_opt.param_groups:
            for p in group["params"]:
                state = torch_opt.state[p]
                if "step" not in state:
                    # The moments as megatron's init_state_fn makes them (it skips non-empty states).
                    state.setdefault("exp_avg", torch.zeros_like(p.data))
                    state.setdefault("exp_avg_sq", torch.zeros_like(p.data))
                    state["step"] = torch.tensor(0.0)
                    primed.append(state)
    state = _sharded_state_dict(model, optimizer, is_loading=True)
    for param_state in primed:
        del param_state["step"]
    return state


def _keep_step_on_fully_reshardable_load() -> None:
    """Patch a megatron-core 0.16.1 bug in loading ``fully_reshardable`` optimizer state.

    With torch's Adam (no Apex / Transformer Engine) every parameter's optimizer state holds a
    ``step``, which the checkpoint stores once, not per tensor; ``load_state_dict`` restores it
    first and then ``_set_main_param_and_optimizer_states`` looks for it among each
    parameter's tensors (KeyError). Keep the restored value instead. With Apex / TE the
    state has no ``step`` and this changes nothing.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states
    if getattr(original, "_megafusion_patched", False):
        return

    def set_states(self, model_param, tensors):
        if "step" not in tensors:
            group_index, group_order = self.model_param_group_index_map[model_param]
            state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
            if "step" in state:
                tensors = {**tensors, "step": state["step"]}
        return original(self, model_param, tensors)

    set_states._megafusion_patched = True
    DistributedOptimizer._set_main_param_and_optimizer_states = set_states


def _torch_adams(optimizer):
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_opt = getattr(inner, "optimizer", None)
        if type(inner).__name__ == "DistributedOptimizer" and isinstance(torch_opt, torch.optim.Adam):
            yield torch_opt


def _unshare_adam_steps(optimizer) -> None:
    """Give every parameter its own ``step`` tensor after a distributed-optimizer load.

    megatron-core 0.16.1 restores torch Adam's ``step`` as *one* tensor shared by all
    parameter states; Adam increments it in place once per parameter, so the bias
    correction after a resume was wrong (found by the resume-parity test).
    """
    for torch_opt in _torch_adams(optimizer):
        for state in torch_opt.state.values():
            if "step" in state:
                state["step"] = state["step"].clone()


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Load a checkpoint saved in any layout into this one; returns its ``progress`` dict."""
    _keep_step_on_fully_reshardable_load()
    state = _loading_state_dict(model, optimizer)
    state["scheduler"] = None
    state["progress"] = None
    try:
        loaded = dist_checkpointing.load(state, str(path))
    except Exception as err:  # megatron raises assorted types for missing/corrupt shards
        raise CheckpointError(f"cannot load checkpoint {path}: {type(err).__name__}: {err}") from err
    for i, chunk in enumerate(model):
        chunk.module.load_state_dict(loaded[f"model{i}" if len(model) > 1 else "model"], strict=True)
    optimizer.load_state_dict(loaded["optimizer"])
    _unshare_adam_steps(optimizer)
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


def resolve_dir(cfg) -> Path:
    return Path(cfg.checkpoint.dir or os.path.join(cfg.logging.out_dir, "checkpoints"))

