"""Measure what real runs allocate, one config after another in ONE process group (torchrun).

``torchrun --nproc-per-node=N tests/planning/memory_probe.py OUT.json CASES.json``: CASES is a
list of ``{"name", "config", "overrides"}``; for each, this builds the run (model, DDP, optimizer,
data) for the layout its overrides say, runs one training step under
:class:`~megafusion.training.saved_activations.SavedActivations`, and writes per case and rank the
bytes of parameters, gradients and optimizer states and the peak saved-activation bytes.
"""

from __future__ import annotations

import json
import sys

import torch.distributed as dist


def measure(case: dict) -> dict:
    from megafusion.config import load_config, validate
    from megafusion.runtime import initialize, seed_everything
    from megafusion.training.saved_activations import SavedActivations, state_bytes
    from megafusion.training.trainer import Trainer

    cfg = load_config(case["config"], case.get("overrides", []))
    validate(cfg, dist.get_world_size())
    runtime = initialize(cfg)
    seed_everything(cfg.train.seed)
    trainer = Trainer(cfg, runtime)
    params = [p for chunk in trainer.model for p in chunk.parameters()]
    with SavedActivations(params) as saved:
        trainer.train_step(0, 0, None)
    out = state_bytes(trainer.model, trainer.optimizer)
    out["activations"] = saved.peak
    from megatron.core import parallel_state as ps

    out.update(rank=dist.get_rank(), tp_rank=runtime.tp_rank, pp_rank=runtime.pp_rank, dp_rank=runtime.dp_rank)
    out.update(cp_rank=ps.get_context_parallel_rank())
    # What the planner takes as inputs: the data's vocabulary, the latent shape, the image share.
    batches = trainer._microbatches(trainer.data.train, 0)
    image = sum(int((mb["modality_ids"] == 1).sum()) for mb in batches)
    total = sum(mb["modality_ids"].numel() for mb in batches)
    out.update(
        vocab_size=cfg.model.vocab_size,
        latent_shape=list(trainer.latent_shape) if trainer.latent_shape else None,
        image_fraction=image / total,
        num_microbatches=trainer.num_microbatches,
    )
    return out


def main(out_path: str, cases_path: str) -> None:
    from megafusion.runtime import shutdown
    from megafusion.runtime.distributed import init_process_group

    init_process_group()
    cases = json.loads(open(cases_path).read())
    results = {}
    for case in cases:
        row = measure(case)
        rows = [None] * dist.get_world_size()
        dist.all_gather_object(rows, row)
        results[case["name"]] = rows
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
