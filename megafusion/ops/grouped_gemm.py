"""Grouped GEMM over row groups, and the row permutations that make groups contiguous.

Contract (shared by every backend):

- ``x`` is ``[n, k]`` with its rows already sorted by group: the first ``counts[0]`` rows
  belong to group 0, the next ``counts[1]`` to group 1, and so on;
- ``weights[g]`` is ``[m, k]`` (``torch.nn.functional.linear``'s layout, i.e. megatron's
  ``ColumnParallelLinear.weight``);
- ``counts`` is a sequence of Python ints known on the host (from batch metadata), so no
  backend ever has to synchronise with the device to learn the group sizes;
- the result is ``[n, m]`` with ``y[rows of g] = x[rows of g] @ weights[g].T``.

Each row is multiplied by exactly one weight: the FLOPs are those of one dense matmul over
all rows, never ``len(weights)`` times that. A group with zero rows still takes part in
autograd (its weight gets an all-zero gradient), so every parameter always has a gradient
and data-parallel reductions see the same set of gradients on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

BACKENDS = ("torch",)


def _check(x: torch.Tensor, weights: Sequence[torch.Tensor], counts: Sequence[int]) -> None:
    if len(weights) != len(counts):
        raise ValueError(f"grouped_linear: {len(weights)} weights but {len(counts)} group counts")
    if sum(counts) != x.shape[0]:
        raise ValueError(
            f"grouped_linear: group counts {list(counts)} sum to {sum(counts)}, but the input has {x.shape[0]} rows"
        )


def grouped_linear(
    x: torch.Tensor, weights: Sequence[torch.Tensor], counts: Sequence[int], backend: str = "torch"
) -> torch.Tensor:
    """``y[rows of g] = x[rows of g] @ weights[g].T`` for contiguous row groups (see module doc)."""
    if backend not in BACKENDS:
        raise ValueError(f"grouped_linear backend {backend!r} is not available; choose one of {BACKENDS}")
    _check(x, weights, list(counts))
    parts = torch.split(x, list(counts), dim=0)
    return torch.cat([F.linear(part, w) for part, w in zip(parts, weights)], dim=0)


class _Permute(torch.autograd.Function):
    """``x[index]`` for a permutation ``index``; the backward is the gather by its inverse.

    ``index_select``'s own backward is a zero-fill plus scatter-add (atomics on GPU, not
    deterministic); for a permutation the inverse gather gives the same result exactly.
    """

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def permute_rows(x: torch.Tensor, order: torch.Tensor, inverse_order: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` ``[n, ...]`` in group order: ``x[order]`` (``order`` from a stable argsort)."""
    return _Permute.apply(x, order, inverse_order)


def unpermute_rows(y: torch.Tensor, order: torch.Tensor, inverse_order: torch.Tensor) -> torch.Tensor:
    """Back to the original row order: ``y[inverse_order]``, the inverse of :func:`permute_rows`."""
    return _Permute.apply(y, inverse_order, order)
