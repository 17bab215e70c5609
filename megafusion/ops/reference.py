"""The torch reference of :func:`megafusion.ops.grouped_linear`: any device, any dtype (fp64 too).

Gathers the rows (``index_select``), scales them, runs one ``F.linear`` per group and scatters
(``index_copy`` / ``index_add``); autograd comes from those ops. It makes the permuted copy
of the activations the fused kernels avoid, and is what they are tested against. The gate
multiplies the input rows, where megatron's experts apply it (``MLP``'s ``per_token_scale``),
so MoE layers on this backend compute megatron's ``SequentialMLP`` bit for bit (the kernels
apply it in the GEMM's epilogue: the same product up to rounding). Rounding matters more than
usual here: expert choice turns a last-bit difference between two tokens' scores into a
different choice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gather_rows(x: torch.Tensor, gather: torch.Tensor | None, scale: torch.Tensor | None = None) -> torch.Tensor:
    """The rows in group order (``x[gather]``), each times its gate ``scale`` if given."""
    rows = x if gather is None else x.index_select(0, gather)
    if scale is not None:
        rows = (rows * scale.unsqueeze(-1)).to(rows.dtype)
    return rows


def place_rows(y: torch.Tensor, scatter, out_rows) -> torch.Tensor:
    """Scatter the group-ordered rows ``y``: a permutation, or a sum into ``out_rows`` rows."""
    if scatter is None:
        return y
    if out_rows is None:
        return torch.empty_like(y).index_copy(0, scatter, y)
    return y.new_zeros(out_rows, y.shape[1]).index_add(0, scatter, y)


def grouped_linear_torch(x, weights, counts, gather, scatter, scale, out_rows, gather_permutes):
    parts = torch.split(gather_rows(x, gather, scale), counts, dim=0)
    y = torch.cat([F.linear(part, w) for part, w in zip(parts, weights)], dim=0)
    return place_rows(y, scatter, out_rows)
