"""Context parallelism (``parallel.cp``): which positions of a row each context-parallel rank holds.

Each rank of a context-parallel group holds ``s / cp`` of a microbatch's ``s`` positions (the
queries it computes) and sees every key: the attention all-gathers keys and values over the
group (:mod:`megafusion.layers.context_attention`). Everything else in a transformer layer is
per token, so the rest of the model runs unchanged on the rank's share.

**Load balance.** Under a causal mask a late query attends many keys and an early one few, so
equal shares of positions are not equal work. Each microbatch's row is cut into ``2 cp k`` equal
chunks (``k`` = :data:`CHUNKS_PER_RANK` when ``s`` allows, fewer otherwise); a chunk's cost is the
number of keys its queries attend, summed over the microbatch's rows (from the mask's metadata:
:func:`megafusion.layers.attended_keys.attended_keys`, what FLOPs accounting counts); the chunks,
sorted by cost, are dealt to the ranks in a snake (0, 1, .., cp-1, cp-1, .., 0, 0, ..), so every rank
gets ``2 k`` chunks and nearly the same number of query-key pairs. With ``k = 1`` and one causal
document per row this is exactly megatron-core's head-tail split (``get_batch_on_this_cp_rank``:
rank ``r`` holds chunks ``r`` and ``2 cp - 1 - r``), which :class:`ContextShard` uses when no costs are
given. Packed documents and image spans are where the head-tail split falls short (measured on
random packed rows of 64-4096 tokens: up to 1.41x the mean pairs on one rank of 4; balanced chunks:
see ``tests/distributed/test_context_parallel.py``). :func:`query_key_pairs` reports the pairs per
rank; training logs the step's worst rank over the mean (``cp/pair_imbalance``). Every CP rank (and
pipeline stage) holds the same microbatch, so they all compute the same assignment.

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

import contextlib
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


CHUNKS_PER_RANK = 4  # chunks of the row each rank holds when balancing (2 x this many per rank)


def _check_divisible(seq_length: int, size: int) -> None:
    if seq_length % (2 * size):
        raise ValueError(
            f"model.seq_length={seq_length} is not divisible by 2 x parallel.cp = {2 * size}: context "
            f"parallelism cuts each row into 2 x cp equal chunks; choose a multiple of {2 * size}"
        )


def head_tail_positions(seq_length: int, size: int, rank: int) -> torch.Tensor:
    """The row positions rank ``rank`` of ``size`` holds in megatron's head-tail split: chunks
    ``rank`` and ``2 size - 1 - rank`` of ``2 size`` equal chunks, in row order (int64 ``[seq_length / size]``)."""
    _check_divisible(seq_length, size)
    chunk = seq_length // (2 * size)
    first, second = rank * chunk, (2 * size - 1 - rank) * chunk
    return torch.cat([torch.arange(first, first + chunk), torch.arange(second, second + chunk)])


def balanced_positions(cost: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Every rank's row positions (each in row order) for per-position costs ``cost`` ``[s]``: the
    row's ``2 size k`` chunks sorted by cost (stable: ties to the earlier chunk) and dealt in a snake."""
    s = cost.shape[-1]
    _check_divisible(s, size)
    k = next(k for k in (CHUNKS_PER_RANK, 2, 1) if s % (2 * size * k) == 0)
    chunks = 2 * size * k
    order = torch.sort(cost.reshape(chunks, -1).sum(1).to(torch.float64), stable=True).indices.tolist()
    owned: list[list[int]] = [[] for _ in range(size)]
    for i, chunk in enumerate(order):
        turn, place = divmod(i, size)
        owned[place if turn % 2 == 0 else size - 1 - place].append(chunk)
    width = s // chunks
    return [torch.cat([torch.arange(c * width, (c + 1) * width) for c in sorted(mine)]) for mine in owned]


@dataclass(frozen=True)
class ContextShard:
    """Rank ``rank`` of a context-parallel group of ``size`` over rows of ``seq_length`` tokens;
    ``cost`` (``[seq_length]``, optional): what each position's query costs (keys it attends,
    summed over the microbatch's rows), which balances the shards; None: megatron's head-tail split."""

    rank: int
    size: int
    seq_length: int
    cost: torch.Tensor | None = None

    @cached_property
    def by_rank(self) -> list[torch.Tensor]:
        """Every rank's positions (int64 ``[s / cp]`` each, in row order), in rank order."""
        if self.cost is None:
            return [head_tail_positions(self.seq_length, self.size, r) for r in range(self.size)]
        if self.cost.shape != (self.seq_length,):
            raise ValueError(f"cost has shape {tuple(self.cost.shape)}, expected [{self.seq_length}]")
        return balanced_positions(self.cost, self.size)

    @property
    def positions(self) -> torch.Tensor:
        """``[s / cp]`` int64: the row positions this rank holds, in the order it holds them."""
        return self.by_rank[self.rank]

    @cached_property
    def key_positions(self) -> torch.Tensor:
        """``[s]`` int64: the row position of each all-gathered key (every rank's, in rank order)."""
        return torch.cat(self.by_rank)

    def shard(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's positions of ``t`` along ``dim`` (the sequence dimension)."""
        if t.shape[dim] != self.seq_length:
            raise ValueError(f"a tensor of {t.shape[dim]} positions along dim {dim} is not a row of {self.seq_length}")
        return t.index_select(dim, self.positions.to(t.device))

    def unshard(self, parts: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
        """The whole row from every rank's shard (``parts`` in rank order): the inverse of :meth:`shard`."""
        gathered = torch.cat(parts, dim=dim)
        inverse = torch.argsort(self.key_positions).to(gathered.device)
        return gathered.index_select(dim, inverse)

    def pairs(self, keys_per_query: torch.Tensor) -> list[int]:
        """Unmasked query-key pairs each rank computes, from the keys each query attends (``[b, s]``)."""
        return [int(keys_per_query[..., mine].sum()) for mine in self.by_rank]


_ACTIVE: list[ContextShard] = []


@contextlib.contextmanager
def active_shard(shard: ContextShard | None):
    """Make ``shard`` the microbatch's shard for model code inside the block (Transfusion's image
    modules read it): the forward step sets it around each model call."""
    _ACTIVE.append(shard)
    try:
        yield shard
    finally:
        _ACTIVE.pop()


def current_shard() -> ContextShard | None:
    """The shard of the microbatch being computed (None without context parallelism)."""
    return _ACTIVE[-1] if _ACTIVE else None


def context_parallel_size() -> int:
    """``parallel.cp`` of this process (1 before megatron-core's groups exist)."""
    from megatron.core import parallel_state as ps

    return ps.get_context_parallel_world_size() if ps.model_parallel_is_initialized() else 1


def shard_for(batch: dict, keys_per_query: torch.Tensor, size: int | None = None) -> ContextShard | None:
    """This rank's balanced shard of ``batch`` (None without context parallelism); the cost of a
    position is the keys its queries attend (``keys_per_query`` ``[b, s]``), summed over the rows."""
    from megatron.core import parallel_state as ps

    size = context_parallel_size() if size is None else size
    if size == 1:
        return None
    s = batch["tokens"].shape[1]
    return ContextShard(ps.get_context_parallel_rank(), size, s, keys_per_query.sum(0))


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
    """Unmasked query-key pairs each of ``size`` ranks computes under megatron's head-tail split."""
    return ContextShard(0, size, keys_per_query.shape[-1]).pairs(keys_per_query)
