"""Attention masks built from per-token metadata (never from token values).

A microbatch carries ``document_ids`` ``[b, s]``: tokens of one packed document share an
id. Query i may attend key j iff j <= i and both belong to the same document. Later
objectives (Transfusion) add bidirectional spans for image patches through the same
functions.

Two forms of the same mask:
- ``dense_mask``: boolean ``[b, 1, s, s]`` in megatron-core's convention (``True`` =
  blocked), for SDPA / Transformer Engine;
- ``block_mask``: a FlexAttention ``BlockMask`` (sparse, skips fully masked tiles).
"""

from __future__ import annotations

import torch


def dense_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Causal + same-document mask, ``True`` where attention is blocked: ``[b, 1, s, s]``."""
    s = document_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=document_ids.device).tril_()
    same_doc = document_ids[:, :, None] == document_ids[:, None, :]
    return ~(same_doc & causal)[:, None]


def block_mask(document_ids: torch.Tensor, block_size: int = 128):
    """The same mask as :func:`dense_mask`, as a FlexAttention ``BlockMask``."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q, kv):
        return (kv <= q) & (document_ids[b, q] == document_ids[b, kv])

    b, s = document_ids.shape
    return create_block_mask(
        mask_mod, B=b, H=None, Q_LEN=s, KV_LEN=s, device=document_ids.device, BLOCK_SIZE=block_size
    )
