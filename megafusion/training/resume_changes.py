"""Resuming with changed settings: each change is applied and said, or refused with the reason.

The checkpoint's ``megafusion.json`` holds the config it was trained with; :func:`review`
compares it with the resuming run's, key by key:

- **refused**: what changes which tokens sample i of the run holds (``model.seq_length``,
  ``train.seed`` and the data settings that build the sample stream): the run would not continue
  its data, so it is refused with the way out (keep the value, or a new run from these weights);
- **applied and said, with what it changes**: ``data.attention`` and ``data.positions`` (what each
  token attends, where RoPE puts it: the weights were trained under the checkpoint's, so the loss
  may jump; a checkpoint from before these keys existed counts as ``isolated`` / ``row``);
- **applied and said**: the schedule (``train.steps``, ``lr``, ``min_lr``, ``warmup_steps``,
  ``weight_decay``: the LR scheduler is rebuilt from the run's config at the saved step, since
  megatron-core's would otherwise keep the checkpoint's; each parameter group's ``max_lr`` /
  ``min_lr`` too), Adam's betas and epsilon (written into the loaded optimizer's parameter
  groups), the batch sizes (samples continue from the consumed count), the objective's weights,
  the layout (resharded on load), the data files' paths;
- **not reported**: logging, evaluation, checkpointing and fault-handling keys, ``data.cache_dir``.

Model shapes are compared by ``checkpoint.check_compatible`` before any of this.
"""

from __future__ import annotations

from megafusion.core.errors import CheckpointError

_STREAM_DATA_KEYS = (
    "source",
    "builtin",
    "num_samples",
    "docs_per_sequence",
    "text_vocab_size",
    "image_size",
    "patch_size",
    "pixel_levels",
    "image_codec",
    "vq_codebook_size",
    "val_fraction",
    "domains",  # which domains train (and at what weights): other tokens at sample i
    "order",  # which documents share a row
    "icp_neighbors",
)
REFUSED = {("model", "seq_length"), ("train", "seed"), *(("data", k) for k in _STREAM_DATA_KEYS)}
QUIET_SECTIONS = ("logging", "eval", "checkpoint")
QUIET_TRAIN_KEYS = ("on_nan", "nan_skip_limit", "spike_factor", "stop_signals", "stop_deadline_s")
SCHEDULE_KEYS = ("steps", "lr", "min_lr", "warmup_steps", "weight_decay")
# What the model computes from the same tokens: applied, said with the consequence. A checkpoint
# written before a key existed was trained with its default (the old behaviour).
SEMANTIC_DATA_KEYS = {
    "attention": ("isolated", "what each token attends across the documents of its row changes"),
    "positions": ("row", "each token's RoPE position changes"),
}


def _changes(saved: dict, now: dict) -> list[tuple[str, str, object, object]]:
    out = []
    for section, values in now.items():
        if section in QUIET_SECTIONS or not isinstance(values, dict):
            continue
        before = saved.get(section, {})
        if section == "data":
            before = {**{k: default for k, (default, _) in SEMANTIC_DATA_KEYS.items()}, **before}
        for key, value in values.items():
            quiet = (section == "train" and key in QUIET_TRAIN_KEYS) or (section, key) == ("data", "cache_dir")
            if key in before and before[key] != value and not quiet:
                out.append((section, key, before[key], value))
    return out


def review(path, saved_config: dict, cfg) -> list[str]:
    """Lines describing the applied changes; raises ``CheckpointError`` for a refused one."""
    changes = _changes(saved_config, cfg.to_dict())
    refused = [(s, k, a, b) for s, k, a, b in changes if (s, k) in REFUSED]
    if refused:
        listed = "; ".join(f"{s}.{k} {a!r} -> {b!r}" for s, k, a, b in refused)
        raise CheckpointError(
            f"cannot resume {path} with {listed}: that changes which tokens each sample of the run holds, so the "
            f"run would not continue its data stream. Keep the checkpoint's value, or start a new run from these "
            f"weights with checkpoint.init_from={path} and a new logging.out_dir"
        )
    lines = []
    for s, k, a, b in changes:
        what = {
            "train": "applied from the next step",
            "parallel": "resharded on load",
            "objective": "applied from the next step",
            "model": "applied (the weights are unchanged)",
            "data": "the run continues at its next sample in these files: they must hold the same data",
        }.get(s, "applied")
        if s == "data" and k in SEMANTIC_DATA_KEYS:
            what = (
                f"applied from the next step: {SEMANTIC_DATA_KEYS[k][1]}, the weights were trained with "
                f"{a!r}; for a clean comparison start a new run with checkpoint.init_from"
            )
        lines.append(f"{s}.{k}: {a!r} -> {b!r} ({what})")
    if any(s == "train" and k in SCHEDULE_KEYS for s, k, _, _ in changes):
        t = cfg.train
        lines.append(
            f"LR schedule now: warmup {t.warmup_steps} steps to {t.lr:g}, cosine decay to {t.min_lr:g} at step "
            f"{max(t.steps, t.warmup_steps + 1)} (continuing from the saved step)"
        )
    return lines


def apply_optimizer_settings(optimizer, cfg) -> None:
    """The run's LR bounds, Adam betas and epsilon in the loaded optimizer's parameter groups (they come
    back from the checkpoint, and megatron-core's scheduler reads each group's ``max_lr`` / ``min_lr``)."""
    t = cfg.train
    for group in optimizer.param_groups:
        if "max_lr" in group:
            group["max_lr"] = t.lr
        if "min_lr" in group:
            group["min_lr"] = t.min_lr
        if "betas" in group:
            group["betas"] = (t.adam_beta1, t.adam_beta2)
        if "eps" in group:
            group["eps"] = t.adam_eps
