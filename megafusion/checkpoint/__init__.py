"""Checkpoints through megatron-core ``dist_checkpointing``: save, resume, reshard, prune, warm-start.

Layout of ``checkpoint.dir``::

    step_0000100/      one dist_checkpointing directory per saved step
      ...              (sharded tensors + common.pt written by megatron-core)
      megafusion.json  written last by rank 0: step, config, model keys, data description,
                       every file's size and checksum, and a digest of itself
    latest             text file naming the newest *complete* step directory

The package by concern:

- ``directory``: a run's checkpoint directory: step directories, ``latest`` (rebuilt when it is
  lost), which step a run resumes from;
- ``io``: save and load (model, optimizer, scheduler, progress) and pruning;
- ``manifest``: what ``megafusion.json`` records (the model keys a resume compares, asked of the
  model family and the objective), reading it, and the run config a tool rebuilds a model from;
- ``integrity``: checksums of every file, recorded at save and verified before a load;
- ``lineage``: the seed a run started from (``checkpoint.init_from``), recorded in its manifests;
- ``warm_start``: ``checkpoint.init_from`` (which differences a new run may bridge, and how);
- ``mcore_patches``: the megatron-core 0.16.1 workarounds, with the version check.

Importers use ``from megafusion import checkpoint as ck`` and the names below. They are imported on
first use, so ``directory``, ``manifest`` and ``integrity`` serve callers that must not import torch
(the training command checks a run's directory before it does).
"""

import importlib

_WHERE = {
    "CheckpointError": "megafusion.core.errors",
    **dict.fromkeys(
        (
            "checkpoint_to_resume",
            "complete_steps",
            "latest_checkpoint",
            "recover_latest",
            "resolve_checkpoint",
            "resolve_dir",
            "step_dir",
        ),
        "megafusion.checkpoint.directory",
    ),
    **dict.fromkeys(
        ("load_checkpoint", "load_weights", "save_checkpoint", "save_weights", "verify_checkpoint"),
        "megafusion.checkpoint.io",
    ),
    **dict.fromkeys(
        ("LATEST", "MANIFEST", "check_compatible", "data_position", "model_keys", "read_manifest", "run_config"),
        "megafusion.checkpoint.manifest",
    ),
    **dict.fromkeys(("identity", "recorded_lineage", "seed_lineage"), "megafusion.checkpoint.lineage"),
    "WarmStart": "megafusion.checkpoint.warm_start",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'megafusion.checkpoint' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
