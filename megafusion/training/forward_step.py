"""The forward step handed to megatron-core's pipeline schedules.

Every pipeline stage (and every virtual chunk) pulls the same microbatch from its own
iterator: the first stage needs the tokens, every stage needs the attention mask (and, for
modality-partitioned families, the per-token modality routing), the last stage needs labels,
loss mask and the modality of each label. Metadata travels with the
batch; no stage asks another.

The loss function reports one vector per microbatch (``report_fields``), summed over the
step's microbatches and data-parallel ranks by the loop.
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch

from megafusion.core.modality import MODALITY_NAMES, NUM_MODALITIES
from megafusion.layers.masks import attention_mask_for
from megafusion.layers.routing import routing_for
from megafusion.models.registry import routed as needs_routing
from megafusion.models.token_positions import token_positions
from megafusion.objectives.lm import lm_loss_sums
from megafusion.objectives.registry import get_objective

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

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        mask = attention_mask_for(batch, backend, packs, device, cross_document)
        extra, context = objective.forward_inputs(cfg, batch, device)
        positions = batch["position_ids"].to(device)
        with (
            routing_for(batch, device, causal) if routed else contextlib.nullcontext(),
            token_positions(positions) if by_document else contextlib.nullcontext(),
        ):
            output = model(batch["tokens"].to(device), positions, mask, labels=None, **extra)
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
