"""Core attention over an arbitrary mask, as a drop-in for megatron-core's core_attention.

megatron-core's local ``DotProductAttention`` only knows causal/padding masks and uses a
CUDA scratch buffer. ``MaskedCoreAttention`` takes the mask megafusion builds for each
microbatch (see :mod:`megafusion.layers.masks`) and runs it through

- ``torch.nn.functional.scaled_dot_product_attention`` when the mask is a dense boolean
  tensor ``[b, 1, sq, sk]`` (megatron's convention: ``True`` = blocked) or ``None``
  (plain causal), on any device;
- ``torch.nn.attention.flex_attention`` when the mask is a FlexAttention ``BlockMask``
  (sparse block masks for long packed / mixed-modal sequences on GPU).

Grouped-query attention is handled by the kernels (``enable_gqa``), never by copying K/V.
Shapes follow megatron-core: q ``[sq, b, heads/tp, d]``, k/v ``[sk, b, groups/tp, d]``,
output ``[sq, b, heads/tp * d]``.

Context parallelism (``parallel.cp`` > 1; :mod:`megafusion.runtime.context_parallel`): each rank
holds its share of the row's queries and all-gathers keys and values over the context-parallel
group (megatron-core's sequence-parallel all-gather on that group: backward reduce-scatters their
gradients), the shape torch's context-parallel FlexAttention and Transformer Engine's
``all_gather`` CP take. Only the ``groups`` K/V heads travel (GQA keeps it small:
``2 s groups d`` elements per layer). The mask holds this rank's query rows against every key in
gathered order (the forward step cuts it from the whole row's metadata), so any mask works: documents,
bidirectional image spans, caption dropout, padding. A ring (p2p) exchange would save the gathered
K/V's memory; with GQA it is small next to the activations, and all-gather keeps arbitrary masks
simple.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

try:  # FlexAttention exists in every torch this project supports (>= 2.6)
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover - guarded for unusual builds
    BlockMask, flex_attention = None, None

_compiled_flex = None


def _flex(q, k, v, **kwargs):
    """FlexAttention, compiled on GPU (eager flex materialises the scores); eager on CPU."""
    global _compiled_flex
    if q.device.type != "cuda":
        return flex_attention(q, k, v, **kwargs)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, **kwargs)


class MaskedCoreAttention(MegatronModule):
    """Softmax attention with an arbitrary mask; no parameters (nothing in the state dict)."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        self.cp_group = None
        if config.context_parallel_size > 1:
            cp = getattr(pg_collection, "cp", None)
            self.cp_group = cp if cp is not None else ps.get_context_parallel_group()
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias=None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("MaskedCoreAttention takes masks, not attention_bias/packed_seq_params")
        sq, b = query.shape[0], query.shape[1]
        if self.cp_group is not None:
            if attention_mask is None:
                raise ValueError(
                    "context parallelism needs an explicit mask (this rank's query rows against the "
                    "gathered keys): megafusion's forward step builds it; pass one when calling the model"
                )
            key = gather_from_sequence_parallel_region(key, True, group=self.cp_group)
            value = gather_from_sequence_parallel_region(value, True, group=self.cp_group)
        # [s, b, h, d] -> [b, h, s, d], the layout both kernels want.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        gqa = q.shape[1] != k.shape[1]
        dropout = self.dropout_p if self.training else 0.0
        if BlockMask is not None and isinstance(attention_mask, BlockMask):
            if dropout:
                raise ValueError("attention dropout is not available with FlexAttention block masks")
            out = _flex(q, k, v, block_mask=attention_mask, scale=self.softmax_scale, enable_gqa=gqa)
        else:
            if attention_mask is None:
                mask, causal = None, (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal
            else:
                mask, causal = ~attention_mask, False  # SDPA's boolean masks mean "may attend"
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=dropout,
                is_causal=causal,
                scale=self.softmax_scale,
                enable_gqa=gqa,
            )
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)
