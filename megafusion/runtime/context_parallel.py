"""Context parallelism (``parallel.cp``): which positions of a row each context-parallel rank holds.

Each rank of a context-parallel group holds ``s / cp`` of a microbatch's ``s`` positions (the
queries it computes) and sees every key: the attention all-gathers keys and values over the
group (:mod:`megafusion.layers.context_attention`). Everything else in a transformer layer is
per token, so the rest of the model runs unchanged on the rank's share.

**Load balance: head-tail chunks** (megatron-core's ``get_batch_on_this_cp_rank``, torch's
``_HeadTailLoadBalancer``): the row is cut into ``2 cp`` equal chunks and rank ``r`` holds chunks
``r`` and ``2 cp - 1 - r``. Under a causal mask an early chunk's queries see few keys and a late
chunk's many, so every rank gets the same number of query-key pairs (exactly, for one document per
row). Packed documents and image spans change the counts: :func:`query_key_pairs` reports the
unmasked pairs per rank of a real microbatch (training logs the imbalance).

**Shift, then shard** (torchtitan PR #4544): labels, the loss mask, positions, document and image
ids and caption dropout are all made on the whole row (by the data pipeline and the objective);
the forward step builds this rank's rows of the attention mask from the whole row's metadata and
then shards every per-token tensor with the same permutation (:func:`shard_batch`). Nothing is
computed from a shard that needs its neighbours.

Keys after the all-gather come in rank order: rank 0's positions, then rank 1's, ...
(:attr:`ContextShard.key_positions`); the mask's columns follow that order, and RoPE is applied
at each token's true position (:attr:`ContextShard.positions`), so the attention a query computes
is the one-process attention up to the order of the softmax's sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from megafusion.core.modality import NUM_MODALITIES

# The microbatch's per-token [b, s] tensors: sharded along the sequence (dim 1).
PER_TOKEN_KEYS = (
    "tokens",
    "labels",
    "position_ids",
    "document_ids",
    "modality_ids",
    "label_modality_ids",
    "loss_mask",
    "image_ids",
    "first_key",
)


def head_tail_positions(seq_length: int, size: int, rank: int) -> torch.Tensor:
    """The row positions rank ``rank`` of ``size`` holds: chunks ``rank`` and ``2 size - 1 - rank``
    of ``2 size`` equal chunks, in row order (int64 ``[seq_length / size]``)."""
    if seq_length % (2 * size):
        raise ValueError(
            f"model.seq_length={seq_length} is not divisible by 2 x parallel.cp = {2 * size}: context "
            f"parallelism cuts each row into 2 x cp equal chunks; choose a multiple of {2 * size}"
        )
    chunk = seq_length // (2 * size)
    first, second = rank * chunk, (2 * size - 1 - rank) * chunk
    return torch.cat([torch.arange(first, first + chunk), torch.arange(second, second + chunk)])


@dataclass(frozen=True)
class ContextShard:
    """Rank ``rank`` of a context-parallel group of ``size`` over rows of ``seq_length`` tokens."""

    rank: int
    size: int
    seq_length: int

    @cached_property
    def positions(self) -> torch.Tensor:
        """``[s / cp]`` int64: the row positions this rank holds, in the order it holds them."""
        return head_tail_positions(self.seq_length, self.size, self.rank)

    @cached_property
    def key_positions(self) -> torch.Tensor:
        """``[s]`` int64: the row position of each all-gathered key (every rank's, in rank order)."""
        return torch.cat([head_tail_positions(self.seq_length, self.size, r) for r in range(self.size)])

    def shard(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's positions of ``t`` along ``dim`` (the sequence dimension)."""
        if t.shape[dim] != self.seq_length:
            raise ValueError(
                f"a tensor of {t.shape[dim]} positions along dim {dim} is not a row of {self.seq_length}"
            )
        return t.index_select(dim, self.positions.to(t.device))

    def unshard(self, parts: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
        """The whole row from every rank's shard (``parts`` in rank order): the inverse of :meth:`shard`."""
        gathered = torch.cat(parts, dim=dim)
        inverse = torch.argsort(self.key_positions).to(gathered.device)
        return gathered.index_select(dim, inverse)


def current_shard(seq_length: int) -> ContextShard | None:
    """This rank's shard when ``parallel.cp`` > 1 (megatron-core's context-parallel group), else None."""
    from megatron.core import parallel_state as ps

    size = ps.get_context_parallel_world_size() if ps.model_parallel_is_initialized() else 1
    if size == 1:
        return None
    return ContextShard(ps.get_context_parallel_rank(), size, seq_length)


def shard_batch(batch: dict, shard: ContextShard) -> dict:
    """The microbatch as this rank holds it: every per-token tensor sharded along the sequence,
    ``modality_counts`` recounted for the shard (modality routing checks them), the rest (latents,
    sample ids, the step's loss normalisers) as it was."""
    out = dict(batch)
    for key in PER_TOKEN_KEYS:
        if key in batch and batch[key] is not None:
            out[key] = shard.shard(batch[key])
    if "modality_counts" in batch:
        out["modality_counts"] = torch.bincount(out["modality_ids"].reshape(-1), minlength=NUM_MODALITIES)
    return out


def query_key_pairs(keys_per_query: torch.Tensor, size: int) -> list[int]:
    """Unmasked query-key pairs each of ``size`` ranks computes, from the keys each query attends
    (``[b, s]``, e.g. :func:`megafusion.layers.attended_keys.attended_keys`)."""
    s = keys_per_query.shape[-1]
    return [int(keys_per_query[..., head_tail_positions(s, size, r)].sum()) for r in range(size)]
