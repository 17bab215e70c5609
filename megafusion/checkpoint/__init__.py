"""Checkpoints through megatron-core ``dist_checkpointing``: save, resume, reshard, prune, warm-start.

Layout of ``checkpoint.dir``::

    step_0000100/      one dist_checkpointing directory per saved step
      ...              (sharded tensors + common.pt written by megatron-core)
      megafusion.json  written last by rank 0: step, config, model keys, data description,
                       every file's size and checksum, and a digest of itself
    latest             text file naming the newest *complete* step directory

The package by concern:

- ``io``: save and load (model, optimizer, scheduler, progress), ``latest`` and pruning;
- ``manifest``: what ``megafusion.json`` records (the model keys a resume compares, asked of the
  model family and the objective), reading it, and the run config a tool rebuilds a model from;
- ``integrity``: checksums of every file, recorded at save and verified before a load;
- ``warm_start``: ``checkpoint.init_from`` (which differences a new run may bridge, and how);
- ``mcore_patches``: the megatron-core 0.16.1 workarounds, with the version check.

Importers use ``from megafusion import checkpoint as ck`` and the names below.
"""

from megafusion.checkpoint.io import (
    checkpoint_to_resume,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    resolve_checkpoint,
    resolve_dir,
    save_checkpoint,
    save_weights,
    step_dir,
    verify_checkpoint,
)
from megafusion.checkpoint.manifest import (
    LATEST,
    MANIFEST,
    check_compatible,
    data_position,
    model_keys,
    read_manifest,
    run_config,
)
from megafusion.checkpoint.warm_start import WarmStart
from megafusion.core.errors import CheckpointError

__all__ = [
    "CheckpointError",
    "LATEST",
    "MANIFEST",
    "WarmStart",
    "check_compatible",
    "data_position",
    "checkpoint_to_resume",
    "latest_checkpoint",
    "load_checkpoint",
    "load_weights",
    "model_keys",
    "read_manifest",
    "resolve_checkpoint",
    "resolve_dir",
    "run_config",
    "save_checkpoint",
    "save_weights",
    "step_dir",
    "verify_checkpoint",
]
