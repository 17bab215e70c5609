"""The forward step handed to megatron-core's pipeline schedules.

Every pipeline stage (and every virtual chunk) pulls the same microbatch from its own
iterator: the first stage needs the tokens, every stage needs the attention mask, the last
stage needs labels and loss mask. Metadata travels with the batch; no stage asks another.
"""

from __future__ import annotations

from functools import partial

import torch

from megafusion.layers.masks import block_mask, dense_mask
from megafusion.objectives.lm_loss import lm_loss_sums


def attention_mask_for(batch: dict, backend: str, docs_per_sequence: int, device: torch.device):
    """None (plain causal, the fast path), a dense boolean mask, or a FlexAttention BlockMask."""
    if docs_per_sequence == 1 and backend != "flex":
        return None
    doc_ids = batch["document_ids"].to(device)
    if backend == "flex":
        return block_mask(doc_ids)
    return dense_mask(doc_ids)


def _loss_func(labels, loss_mask, z_loss_weight, logits):
    sums = lm_loss_sums(logits, labels, loss_mask, z_loss_weight)
    report = torch.stack([sums["total"].detach(), sums["lm"].detach(), sums["z"].detach(), sums["tokens"].float()])
    return sums["total"], sums["tokens"], {"sums": report}


def make_forward_step(cfg, device: torch.device):
    backend, docs, z_weight = cfg.model.attention_backend, cfg.data.docs_per_sequence, cfg.model.z_loss_weight

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        mask = attention_mask_for(batch, backend, docs, device)
        logits = model(
            batch["tokens"].to(device), batch["position_ids"].to(device), mask, labels=None
        )
        return logits, partial(_loss_func, batch["labels"].to(device), batch["loss_mask"].to(device), z_weight)

    return forward_step
