"""The torch reference of :func:`megafusion.ops.grouped_linear`: any device, any dtype (fp64 too).

Gathers the rows (``index_select``), runs one ``F.linear`` per group, scales and scatters
(``index_copy`` / ``index_add``); autograd comes from those ops. It makes the permuted copy
of the activations the fused kernels avoid, and is what they are tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gather_rows(x: torch.Tensor, gather: torch.Tensor | None) -> torch.Tensor:
    return x if gather is None else x.index_select(0, gather)


def place_rows(y: torch.Tensor, scatter, scale, out_rows) -> torch.Tensor:
    """Gate (``scale``) and scatter the group-ordered rows ``y`` (the contract's epilogue)."""
    if scale is not None:
        y = y * scale.to(y.dtype).unsqueeze(-1)
    if scatter is None:
        return y
    if out_rows is None:
        return torch.empty_like(y).index_copy(0, scatter, y)
    return y.new_zeros(out_rows, y.shape[1]).index_add(0, scatter, y)


def grouped_linear_torch(x, weights, counts, gather, scatter, scale, out_rows, gather_permutes):
    parts = torch.split(gather_rows(x, gather), counts, dim=0)
    y = torch.cat([F.linear(part, w) for part, w in zip(parts, weights)], dim=0)
    return place_rows(y, scatter, scale, out_rows)
