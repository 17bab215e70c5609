"""Next-token cross entropy over vocab-parallel logits, with optional z-loss.

Cross entropy is megatron-core's ``vocab_parallel_cross_entropy`` (the logits stay sharded
over tensor-parallel ranks). The z-loss (``z_loss_weight * logsumexp(logits)^2``, PaLM /
Chameleon) needs the log-partition over the *full* vocabulary, so it is assembled from a
max all-reduce (no gradient needed: it only shifts for stability) and a differentiable
sum all-reduce of ``exp(logits - max)``.

Returned values are sums over unmasked tokens, not means: megatron-core's schedules with
``calculate_per_token_loss`` divide by the token count of the whole global batch, which
makes the loss exactly the same whatever the microbatch / data-parallel split.

Caption dropout (``objective.caption_dropout``, default 0 here): a captioned image's tokens and its
``<boi>`` train without seeing the caption (the batch's ``first_key``; the image stays causal),
the unconditional view that classifier-free guidance of ``megafusion generate`` samples from.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel

from megafusion.objectives.caption_options import caption_dropout_rate
from megafusion.objectives.lm_options import DEFAULT_CAPTION_DROPOUT, OPTIONS
from megafusion.objectives.spec import Objective


def vocab_parallel_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """``logsumexp`` over the last (vocab-parallel) dimension, differentiable."""
    local_max = logits.detach().amax(dim=-1)
    if ps.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=ps.get_tensor_model_parallel_group())
    sum_exp = torch.exp(logits - local_max.unsqueeze(-1)).sum(dim=-1)
    sum_exp = tensor_parallel.reduce_from_tensor_model_parallel_region(sum_exp)
    return local_max + torch.log(sum_exp)


def lm_loss_sums(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    z_loss_weight: float,
    label_modality_ids: torch.Tensor | None = None,
    num_modalities: int = 1,
) -> dict[str, torch.Tensor]:
    """Per-microbatch sums: ``total`` (to backpropagate), ``lm``, ``z``, ``tokens``, and
    ``lm_per_modality`` / ``tokens_per_modality`` (``[num_modalities]``, by the modality of
    the predicted token; a scatter-add on the device, no host sync).

    logits: ``[b, s, vocab/tp]``; labels, loss_mask, label_modality_ids: ``[b, s]``.
    """
    logits = logits.float()
    mask = loss_mask.float()
    z = torch.zeros((), device=logits.device)
    if z_loss_weight > 0:
        z = (vocab_parallel_logsumexp(logits).square() * mask).sum()
    # vocab_parallel_cross_entropy may work in place on its input: give it its own copy.
    ce = tensor_parallel.vocab_parallel_cross_entropy(logits.clone(), labels)
    lm = (ce * mask).sum()
    if label_modality_ids is None:
        label_modality_ids = torch.zeros_like(labels)
    index = label_modality_ids.reshape(-1)
    per_mod = torch.zeros(num_modalities, device=logits.device).index_add_(0, index, (ce * mask).reshape(-1).detach())
    tok_mod = torch.zeros(num_modalities, device=logits.device).index_add_(0, index, mask.reshape(-1))
    return {
        "total": lm + z_loss_weight * z,
        "lm": lm,
        "z": z,
        "tokens": mask.sum().to(torch.int),
        "lm_per_modality": per_mod,
        "tokens_per_modality": tok_mod,
    }


class LanguageModelling(Objective):
    """Next-token prediction over the joint vocabulary (text pieces and discrete image codes):
    the LM loss every objective trains, and nothing more."""

    name = "lm"
    options = OPTIONS
    image_tokens = True  # the data's image codes are ids of the vocabulary it predicts

    def prepare_step(self, cfg, source, first_sample, batches, training):
        # Caption dropout trains the unconditional view; evaluation keeps every caption, and a run
        # without dropout keeps its batches as they were (no mask key: the same attention path).
        rate = caption_dropout_rate(cfg.objective, DEFAULT_CAPTION_DROPOUT) if training else 0.0
        if rate <= 0:
            return
        from megafusion.layers.masks import image_spans_from_modality
        from megafusion.objectives.captions import caption_dropout

        for batch in batches:
            # Only to find each image's tokens: the batch carries no image_ids (its images are causal).
            spans = image_spans_from_modality(batch["modality_ids"], batch["document_ids"])
            batch["first_key"] = caption_dropout(batch, cfg.train.seed, rate, spans)

    def flops_inputs(self, batch, cross_document=False):
        if "first_key" not in batch:
            return super().flops_inputs(batch, cross_document)
        from megafusion.layers.attended_keys import attended_keys

        # A dropped position p (first_key f = its <boi>) sees its document's first token and
        # f .. p: p - f + 2 keys, in either attention mode; every other query keeps its causal count.
        first_key = batch["first_key"]
        position = torch.arange(first_key.shape[1])[None]
        causal = attended_keys(batch["document_ids"], cross_document=cross_document)
        return {"keys": torch.where(first_key > 0, position - first_key + 2, causal)}


OBJECTIVE = LanguageModelling()
