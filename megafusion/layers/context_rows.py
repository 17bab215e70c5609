"""The whole microbatch's rows from a context-parallel shard, and back (``parallel.cp`` > 1).

Most of a transformer layer is per token and runs on a rank's shard of the rows
(:mod:`megafusion.runtime.context_parallel`). What ranks tokens against each other (MoMa's expert
choice, Mixture-of-Depths' top-c per row) or reads whole images (Transfusion's patch head) runs on
the whole microbatch instead, as it already does under sequence parallelism:

- :func:`gather_rows`: ``[s / cp (/ tp), b, ...]`` -> ``[s, b, ...]`` in row order on every rank:
  megatron's sequence-parallel all-gather over the tensor-parallel group (under SP), then over
  the context-parallel group (keys come in rank order, :attr:`ContextShard.key_positions`), then
  the permutation back to row order. Backward: the context-parallel ranks' gradients are
  **summed** (reduce-scatter), since each rank uses the whole rows for its own part of the work;
  the tensor-parallel ones summed (``tp_summed``) or, where every TP rank computes the same
  thing, split;
- :func:`scatter_rows`: the inverse for an output each rank holds a *part* of (the sum over the
  ranks is the output): back to gathered order, reduce-scatter over CP, then over TP;
- :func:`local_rows`: this rank's rows of an output every rank holds whole and alike.

Cost per call: the layer's ``[s, b, h]`` activations all-gathered over CP (and TP), and for
:func:`scatter_rows` reduce-scattered back; their backward the same in reverse.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)


def row_order(shard, device) -> torch.Tensor:
    """Indices that put gathered (rank-order) positions back in row order."""
    return torch.argsort(shard.key_positions).to(device)


def gather_rows(x: torch.Tensor, shard, tp_group=None, tp_summed: bool = True) -> torch.Tensor:
    """The whole microbatch's ``[s, b, ...]`` in row order from this rank's ``x`` (its context shard,
    sliced again over ``tp_group`` under sequence parallelism; None: not sliced)."""
    if tp_group is not None:
        x = gather_from_sequence_parallel_region(x, tp_summed, group=tp_group)
    if shard is not None:
        x = gather_from_sequence_parallel_region(x, True, group=ps.get_context_parallel_group())
        x = x.index_select(0, row_order(shard, x.device))
    return x


def scatter_rows(x: torch.Tensor, shard, tp_group=None) -> torch.Tensor:
    """This rank's rows of ``sum over ranks of x`` (``x`` ``[s, b, ...]`` in row order, each rank a part)."""
    if shard is not None:
        x = x.index_select(0, shard.key_positions.to(x.device))
        x = reduce_scatter_to_sequence_parallel_region(x, group=ps.get_context_parallel_group())
    if tp_group is not None:
        x = reduce_scatter_to_sequence_parallel_region(x, group=tp_group)
    return x


def local_rows(x: torch.Tensor, shard, tp_group=None) -> torch.Tensor:
    """This rank's rows of ``x`` ``[s, b, ...]`` (row order), which every rank holds whole and alike."""
    if shard is not None:
        x = x.index_select(0, shard.positions.to(x.device))
    if tp_group is not None:
        x = scatter_to_sequence_parallel_region(x, group=tp_group)
    return x
