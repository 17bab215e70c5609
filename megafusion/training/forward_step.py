"""The forward step handed to megatron-core's pipeline schedules.

Every pipeline stage (and every virtual chunk) pulls the same microbatch from its own
iterator: the first stage needs the tokens, every stage needs the attention mask (and, for
modality-partitioned families, the per-token modality routing), the last stage needs labels,
loss mask and the modality of each label. Metadata travels with the
batch; no stage asks another.

The loss function reports one vector per microbatch (``REPORT_FIELDS``), summed over the
step's microbatches and data-parallel ranks by the loop.
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch

from megafusion.data.types import MODALITY_NAMES, NUM_MODALITIES
from megafusion.layers.masks import block_mask, dense_mask
from megafusion.layers.routing import ModalityRouting, modality_routing
from megafusion.models import ROUTED_ARCHS
from megafusion.objectives.lm_loss import lm_loss_sums

REPORT_FIELDS = ("total", "lm", "z", "tokens",
                 *(f"lm/{m}" for m in MODALITY_NAMES), *(f"tokens/{m}" for m in MODALITY_NAMES))


def attention_mask_for(batch: dict, backend: str, packs_documents: bool, device: torch.device):
    """None (plain causal, the fast path), a dense boolean mask, or a FlexAttention BlockMask."""
    if not packs_documents and backend != "flex":
        return None
    doc_ids = batch["document_ids"].to(device)
    if backend == "flex":
        return block_mask(doc_ids)
    return dense_mask(doc_ids)


def routing_for(batch: dict, device: torch.device):
    """The modality routing of a microbatch, as a context for the model call (MoT families)."""
    routing = ModalityRouting.from_modality_ids(batch["modality_ids"], batch.get("modality_counts"),
                                                device, NUM_MODALITIES)
    return modality_routing(routing)


def _loss_func(labels, loss_mask, label_modality_ids, z_loss_weight, logits):
    sums = lm_loss_sums(logits, labels, loss_mask, z_loss_weight, label_modality_ids, NUM_MODALITIES)
    report = torch.cat([
        torch.stack([sums["total"].detach(), sums["lm"].detach(), sums["z"].detach(), sums["tokens"].float()]),
        sums["lm_per_modality"], sums["tokens_per_modality"],
    ])
    return sums["total"], sums["tokens"], {"report": report}


def make_forward_step(cfg, device: torch.device):
    """``forward_step(data_iterator, model)`` for megatron-core's ``get_forward_backward_func``.

    Packed real data always needs the document mask; synthetic data only when it packs
    several documents per row.
    """
    backend, z_weight, packs = cfg.model.attention_backend, cfg.model.z_loss_weight, cfg.data.packs_documents()
    routed = cfg.model.arch in ROUTED_ARCHS

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        mask = attention_mask_for(batch, backend, packs, device)
        with routing_for(batch, device) if routed else contextlib.nullcontext():
            logits = model(batch["tokens"].to(device), batch["position_ids"].to(device), mask, labels=None)
        loss = partial(_loss_func, batch["labels"].to(device), batch["loss_mask"].to(device),
                       batch["label_modality_ids"].to(device), z_weight)
        return logits, loss

    return forward_step
