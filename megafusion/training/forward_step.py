"""The forward step handed to megatron-core's pipeline schedules.

Every pipeline stage (and every virtual chunk) pulls the same microbatch from its own
iterator: the first stage needs the tokens, every stage needs the attention mask (and, for
modality-partitioned families, the per-token modality routing), the last stage needs labels,
loss mask and the modality of each label. Metadata travels with the
batch; no stage asks another.

The loss function reports one vector per microbatch (``report_fields``), summed over the
step's microbatches and data-parallel (and context-parallel) ranks by the loop.

Context parallelism (``parallel.cp`` > 1, :mod:`megafusion.runtime.context_parallel`): the
objective's inputs (Transfusion's noise and timesteps) and this rank's rows of the mask are made
from the whole microbatch, then every per-token tensor is sharded ("shift, then shard"); RoPE
reads each token's true position; the loss sums this rank's tokens, and megatron-core divides by
the global token count summed over data x context ranks.
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch

from megafusion.core.modality import MODALITY_NAMES, NUM_MODALITIES
from megafusion.layers.attended_keys import attended_keys
from megafusion.layers.masks import attention_mask_for, context_mask
from megafusion.layers.routing import routing_for
from megafusion.models.registry import routed as needs_routing
from megafusion.models.token_positions import token_positions
from megafusion.objectives.lm import lm_loss_sums
from megafusion.objectives.registry import get_objective
from megafusion.runtime.context_parallel import active_shard, context_parallel_size, shard_batch, shard_for

LM_FIELDS = (
    "total",
    "lm",
    "z",
    "tokens",
    *(f"lm/{m}" for m in MODALITY_NAMES),
    *(f"tokens/{m}" for m in MODALITY_NAMES),
)


def report_fields(objective) -> tuple[str, ...]:
    """What one microbatch's loss reports: the LM sums, then the objective's own."""
    return (*LM_FIELDS, *objective.report_fields)


def _loss_func(labels, loss_mask, label_modality_ids, z_loss_weight, objective, context, output):
    """Sums of one microbatch: the LM's, then the objective's (``report_fields``)."""
    logits, extra = output if isinstance(output, tuple) else (output, None)
    sums = lm_loss_sums(logits, labels, loss_mask, z_loss_weight, label_modality_ids, NUM_MODALITIES)
    total, objective_sums = objective.loss(sums["total"], extra, context)
    report = torch.cat(
        [
            torch.stack([total.detach(), sums["lm"].detach(), sums["z"].detach(), sums["tokens"].float()]),
            sums["lm_per_modality"],
            sums["tokens_per_modality"],
            objective_sums.detach().float(),
        ]
    )
    return total, sums["tokens"], {"report": report}


def keys_per_query(objective, batch: dict, cross_document: bool = False) -> torch.Tensor:
    """``[b, s]``: the keys each query attends under the microbatch's mask, as FLOPs accounting
    counts them (the objective's own count where its mask differs: caption dropout)."""
    inputs = objective.flops_inputs(batch, cross_document)
    if "keys" in inputs:
        return inputs["keys"]
    return attended_keys(batch["document_ids"], inputs.get("image_ids"), cross_document=cross_document)


def make_forward_step(cfg, device: torch.device, causal: bool = False):
    """``forward_step(data_iterator, model)`` for megatron-core's ``get_forward_backward_func``.

    Packed real data always needs the document mask; synthetic data only when it packs
    several documents per row (in either ``data.attention`` mode). ``data.positions=document``
    rotates each token at its position within its document (the batch's ``position_ids``,
    :mod:`megafusion.models.token_positions`). Families that route by modality get the
    microbatch's routing around the model call (``causal``: each token routed from its own state,
    evaluation's causal column); the objective adds its model inputs and its loss.
    """
    backend, z_weight, packs = cfg.model.attention_backend, cfg.model.z_loss_weight, cfg.data.packs_documents()
    cross_document, by_document = cfg.data.cross_document(), cfg.data.positions == "document"
    routed = needs_routing(cfg)
    objective = get_objective(cfg.objective.name)

    cp = context_parallel_size()

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        extra, context = objective.forward_inputs(cfg, batch, device)
        whole = batch
        positions = batch["position_ids"].to(device) if by_document else None
        shard = None if cp == 1 else shard_for(batch, keys_per_query(objective, batch, cross_document), cp)
        if shard is None:
            mask = attention_mask_for(batch, backend, packs, device, cross_document)
        else:  # shift (done: the batch and the objective's inputs are the whole row's), then shard
            mask = context_mask(batch, backend, device, shard.positions, shard.key_positions, cross_document)
            batch = shard_batch(batch, shard)
            rows = shard.positions.to(device)[None].expand(batch["tokens"].shape[0], -1)
            positions = shard.shard(positions) if by_document else rows
        with contextlib.ExitStack() as stack:
            stack.enter_context(active_shard(shard))
            if routed:
                stack.enter_context(routing_for(batch, device, causal, shard, whole))
            if positions is not None:
                stack.enter_context(token_positions(positions))
            output = model(batch["tokens"].to(device), batch["position_ids"].to(device), mask, labels=None, **extra)
        if batch.get("inject_nan"):  # test hook of the trainer (MEGAFUSION_FAULT=nan:<step>:<microbatch>)
            output = (output[0] * float("nan"), output[1]) if isinstance(output, tuple) else output * float("nan")
        loss = partial(
            _loss_func,
            batch["labels"].to(device),
            batch["loss_mask"].to(device),
            batch["label_modality_ids"].to(device),
            z_weight,
            objective,
            context,
        )
        return output, loss

    return forward_step
