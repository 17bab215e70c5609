"""``megafusion.json``: what a checkpoint records beside its tensors, and what a run compares.

Written last by rank 0 (its presence marks a complete checkpoint): ``format_version``, ``step``,
``consumed_samples``, ``model`` (the keys below), ``data`` (tokenizer and codec description),
``config`` (the whole run config), for weights-only checkpoints ``weights_only`` and
``origin``, and for a run started with ``checkpoint.init_from`` its ``lineage`` (the seed's
identity: :mod:`megafusion.checkpoint.lineage`).

``model_keys(cfg)``: the shapes every family shares, plus what the model family
(``ModelFamily.manifest_keys``, e.g. MoT's untied parts) and the objective
(``Objective.manifest_key``) add, plus LMFusion's frozen rows. Keys that only differ from their
default are written (``norm_placement``, ``tie_embeddings``, ``objective``, ``freeze_text``), so
manifests made before a key existed read as its default. ``check_compatible`` compares them both
ways and lists every difference with the fix.
"""

from __future__ import annotations

import json
from pathlib import Path

from megafusion.checkpoint import integrity
from megafusion.core.errors import CheckpointError
from megafusion.core.io import atomic_write
from megafusion.models.registry import manifest_keys as family_manifest_keys
from megafusion.objectives.registry import get_objective

LATEST = "latest"
MANIFEST = "megafusion.json"
FORMAT_VERSION = 1
# Model keys whose change makes a checkpoint's tensors meaningless for the new model.
SHAPE_KEYS = (
    "arch",
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "ffn_hidden_size",
    "vocab_size",
    "qk_norm",
)


def model_keys(cfg) -> dict:
    m = cfg.model
    values = {k: getattr(m, k) for k in SHAPE_KEYS}
    values["num_query_groups"] = m.effective_num_query_groups()
    values["ffn_hidden_size"] = m.effective_ffn_hidden_size()
    values.update(family_manifest_keys(cfg))
    if m.norm_placement != "pre":  # other norm keys
        values["norm_placement"] = m.norm_placement
    if m.tie_embeddings:  # no output_layer.weight
        values["tie_embeddings"] = True
    objective = get_objective(cfg.objective.name).manifest_key(cfg)
    if objective is not None:  # modules of their own shapes (e.g. Transfusion's image patch modules)
        values["objective"] = objective
    if m.freeze_text:  # LMFusion: the new-row deltas
        values["freeze_text"] = True
        values["frozen_vocab_rows"] = m.frozen_vocab_rows
    return values


def new_manifest(cfg, data_meta: dict | None, step: int, consumed_samples: int, **extra) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "step": step,
        "consumed_samples": consumed_samples,
        **extra,
        "model": model_keys(cfg),
        "data": data_meta,
        "config": cfg.to_dict(),
    }


def write_manifest(path: Path, manifest: dict) -> None:
    atomic_write(path / MANIFEST, json.dumps(integrity.seal(manifest), indent=1))


def read_manifest(path: Path) -> dict:
    """The manifest of checkpoint ``path``, its own digest checked (any changed byte is caught)."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"{Path(path) / MANIFEST} is unreadable ({err}): the checkpoint is damaged. {integrity.fallback(path)}"
        ) from err
    integrity.check_seal(path, manifest, integrity.fallback(path))
    return manifest


def run_config(path: Path, manifest: dict | None = None):
    """The config checkpoint ``path`` was trained with, minus its layout: ``parallel`` is one
    process's (dist_checkpointing reshards any saved layout into whatever the caller then sets).
    What the tools that run a checkpoint (eval, generate, logits, convert) start from."""
    from megafusion.config.loader import config_from_dict
    from megafusion.config.schema import ParallelConfig

    manifest = read_manifest(path) if manifest is None else manifest
    cfg = config_from_dict(manifest["config"], source=str(Path(path) / MANIFEST))
    cfg.parallel = ParallelConfig()
    return cfg


def check_compatible(path: Path, manifest: dict, cfg, data_meta: dict | None, weights_only: bool = False):
    """Refuse a checkpoint whose model (or tokenizer) differs from the run's, naming each key.

    ``weights_only``: only the model tensors will be loaded (``checkpoint.init_from``), so the
    optimizer kind does not matter, and a warm start may bridge what the run's model family and
    objective allow (:mod:`megafusion.checkpoint.warm_start`; the returned ``WarmStart``
    says how); otherwise (a resume) a model-only checkpoint is refused.
    """
    from megafusion.checkpoint.warm_start import WarmStart, plan_warm_start

    if manifest.get("weights_only") and not weights_only:
        raise CheckpointError(
            f"{path} holds model weights only (no optimizer or progress), so a run cannot "
            f"resume from it: start a new run from it with checkpoint.init_from={path} "
            f"and a checkpoint.dir of its own"
        )
    ours = model_keys(cfg)
    theirs = manifest.get("model", {})
    # Both ways: the optional keys are written only when not at their default, so a key only
    # the checkpoint has (e.g. tie_embeddings) is a difference too.
    model_diffs = {
        k: (theirs.get(k), ours.get(k))
        for k in (*ours, *(k for k in theirs if k not in ours))
        if theirs.get(k) != ours.get(k)
    }
    warm = plan_warm_start(cfg, ours, theirs, model_diffs) if weights_only else WarmStart()
    diffs = [f"model.{k}: checkpoint {a!r}, this run {b!r}" for k, (a, b) in model_diffs.items()]
    saved_data, now = manifest.get("data"), data_meta or {}
    # A checkpoint that records no data (imported from Hugging Face) has no tokenizer to compare. A
    # warm start needs only the text ids to agree: image ids and codes may be new.
    keys = ("tokenizer", "codec") if not weights_only else ("text tokenizer",)
    for key in keys if saved_data is not None else ():
        a, b = (
            (_text_identity(saved_data), _text_identity(now))
            if key == "text tokenizer"
            else (saved_data.get(key), now.get(key))
        )
        if a != b:
            diffs.append(f"data {key}: checkpoint {a!r}, this run {b!r}")
    saved_distopt = manifest.get("config", {}).get("parallel", {}).get("distributed_optimizer")
    if not weights_only and saved_distopt is not None and saved_distopt != cfg.parallel.distributed_optimizer:
        # The two optimizers store their state in different formats (megatron-core 0.16).
        diffs.append(
            f"parallel.distributed_optimizer: checkpoint {saved_distopt}, this run "
            f"{cfg.parallel.distributed_optimizer} (the optimizer kind cannot change on resume)"
        )
    if diffs:
        convert = _conversion(ours.get("arch"), theirs.get("arch"))
        upcycle = (
            f"\nto start model.arch={ours.get('arch')} from a model.arch={theirs.get('arch')} checkpoint, convert it "
            f"first: {convert.format(ckpt=path)}"
            if convert
            else ""
        )
        raise CheckpointError(
            f"checkpoint {path} does not fit this run:\n  - "
            + "\n  - ".join(diffs)
            + (
                f"\nset these keys to the checkpoint's values, or give checkpoint.init_from a checkpoint of this "
                f"model (now {path})"
                if weights_only
                else "\nuse the checkpoint's settings, or start a new run elsewhere (another logging.out_dir and "
                "checkpoint.dir, or --overwrite to delete this one)"
            )
            + upcycle
        )
    return warm


def _text_identity(data_meta: dict) -> dict | None:
    """The part of a data description that fixes what the text ids mean."""
    tokenizer = data_meta.get("tokenizer")
    if tokenizer is None:
        return None
    return {k: v for k, v in tokenizer.items() if k not in ("vocab_size", "codec")}


def data_position(manifest: dict) -> int:
    """The sample a run warm-started from this checkpoint reads first: 0 (a new run reads its data
    from the start), or the source run's consumed samples when the checkpoint was converted to
    continue its data stream (``megafusion convert upcycle --keep-data-order``, MoMa's recipe)."""
    origin = manifest.get("origin") or {}
    return int(origin.get("consumed_samples", 0)) if origin.get("keep_data_order") else 0


def _conversion(ours: str | None, theirs: str | None) -> str | None:
    """The command that converts a checkpoint of family ``theirs`` into family ``ours`` (the family
    says: ``ModelFamily.conversions``), or None."""
    from megafusion.core.registries import FAMILIES

    if ours not in FAMILIES.names() or theirs is None:
        return None
    return FAMILIES.get(ours).conversions.get(theirs)
