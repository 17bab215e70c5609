"""The ``triton`` backend: :mod:`megafusion.kernels.grouped_gemm` behind one autograd function.

Forward: one kernel launch computes every group's rows, reading ``x`` through ``gather`` and
writing through ``scatter`` (no permuted copy of ``x`` or of the output exists). Backward:
one launch for the input gradient (the same kernel with ``W_g`` instead of ``W_gᵀ`` and the
two indices swapped; the gate's gradient comes out of it too) and one for all weight
gradients. Saved for backward: ``x`` itself (the reference saves its permuted copy), the
indices, the gate and the weights, so this saves no more than the reference.

Rows that may repeat (a scatter with ``out_rows``, a gather with ``gather_permutes=False``)
are summed with atomic adds into an fp64 buffer, cast once at the end. The GPU fixes no order
for atomics, but each term is an fp32 value and a token meets a handful of experts, so the
fp64 sum is exact (unless the terms' exponents span more than 29 bits) and therefore the same
in every order: the combine is deterministic, which expert choice needs (a last-bit difference
between two runs' scores can become a different choice).
"""

from __future__ import annotations

import torch
import triton

from megafusion.kernels import grouped_gemm as kernels
from megafusion.ops.device_ints import device_ints, group_offsets

ACCUMULATOR = torch.float64  # buffers that atomic adds sum repeated rows into (see above)


def grouped_linear_triton(x, weights, counts, gather, scatter, scale, out_rows, gather_permutes):
    return _TritonGroupedLinear.apply(x, scale, gather, scatter, (tuple(counts), out_rows, gather_permutes), *weights)


def _weight_deltas(weights, device) -> torch.Tensor:
    """Element offsets of each weight from the first one (the kernels' per-group base pointer)."""
    first = weights[0]
    size = first.element_size()
    for w in weights:
        if w.stride() != first.stride():
            raise ValueError("grouped_linear (triton): the groups' weights have different strides")
    return device_ints(tuple((w.data_ptr() - first.data_ptr()) // size for w in weights), device)


def _flags(x: torch.Tensor) -> dict:
    return {"UPCAST": kernels.INTERPRETED, "IEEE": x.dtype == torch.float32}


def _gemm(a, a_rows, b, b_delta, b_strides, c, c_rows, scale, offsets, groups, rows, n, k, accumulate, e=None):
    """``c[c_rows] (+)= scale * (a[a_rows] @ B_g)``; with ``e``, also the gate's partial gradients."""
    dummy = offsets  # any tensor: the kernel never reads a pointer whose flag is off
    dscale = None
    if e is not None:
        dscale = torch.zeros(triton.cdiv(n, kernels.MIN_BLOCK_N), rows, device=a.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) + groups, triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    kernels.gather_gemm_scatter[grid](
        a, dummy if a_rows is None else a_rows, a.stride(0), a.stride(1),
        b, b_delta, b_strides[0], b_strides[1],
        c, dummy if c_rows is None else c_rows, c.stride(0), c.stride(1),
        dummy if scale is None else scale,
        dummy if e is None else e, 0 if e is None else e.stride(0), 0 if e is None else e.stride(1),
        torch.zeros(1, device=a.device) if dscale is None else dscale,
        offsets, groups, rows, n, k,
        HAS_A_ROWS=a_rows is not None, HAS_C_ROWS=c_rows is not None, HAS_SCALE=scale is not None,
        HAS_DSCALE=e is not None, ACCUMULATE=accumulate, **_flags(a),
    )  # fmt: skip
    return None if dscale is None else dscale.sum(0)


class _TritonGroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, gather, scatter, meta, *weights):
        counts, out_rows, gather_permutes = meta
        rows, (m, k), device = sum(counts), weights[0].shape, x.device
        offsets, deltas = group_offsets(counts, device), _weight_deltas(weights, device)
        accumulate = out_rows is not None
        if accumulate:
            out = torch.zeros(out_rows, m, device=device, dtype=ACCUMULATOR)
        else:
            out = torch.empty(rows, m, device=device, dtype=x.dtype)
        if rows:  # B_g = W_gᵀ: element (k, n) of B is W_g[n, k]
            w_t = (weights[0].stride(1), weights[0].stride(0))
            _gemm(x, gather, weights[0], deltas, w_t, out, scatter, scale, offsets, len(counts), rows, m, k, accumulate)
        ctx.meta = (counts, gather_permutes)
        ctx.save_for_backward(x, scale, gather, scatter, offsets, deltas, *weights)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        counts, gather_permutes = ctx.meta
        x, scale, gather, scatter, offsets, deltas, *weights = ctx.saved_tensors
        rows, (m, k), groups = sum(counts), weights[0].shape, len(counts)
        w = weights[0]
        grad_x = grad_scale = None
        want_x, want_scale = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if want_x or want_scale:
            # dX[gather[p]] (+)= scale[p] * (dY[scatter[p]] @ W_g); dscale[p] = <dY[scatter[p]] @ W_g, x[gather[p]]>
            accumulate = gather is not None and not gather_permutes
            alloc = torch.zeros if accumulate or not rows else torch.empty  # a permutation writes every row
            grad_x = alloc(x.shape, device=x.device, dtype=ACCUMULATOR if accumulate else x.dtype)
            if rows:  # B_g = W_g
                e = x if want_scale else None
                w_strides = (w.stride(0), w.stride(1))
                grad_scale = _gemm(
                    grad,
                    scatter,
                    w,
                    deltas,
                    w_strides,
                    grad_x,
                    gather,
                    scale,
                    offsets,
                    groups,
                    rows,
                    k,
                    m,
                    accumulate,
                    e,
                )
            grad_x = grad_x.to(x.dtype) if want_x else None
            if want_scale:
                grad_scale = (torch.zeros(rows, device=x.device) if grad_scale is None else grad_scale).to(scale.dtype)
        # Weight gradients of the groups whose weight wants one (LMFusion freezes the text half).
        # Every element is written: an empty group's program stores its zero accumulator.
        active = tuple(g for g in range(groups) if ctx.needs_input_grad[5 + g])
        grad_w = (torch.empty if rows else torch.zeros)(len(active), m, k, device=x.device, dtype=w.dtype)
        if rows and active:
            grid = lambda meta: (len(active), triton.cdiv(m, meta["BLOCK_N"]) * triton.cdiv(k, meta["BLOCK_K"]))  # noqa: E731
            kernels.group_weight_grad[grid](
                grad, offsets if scatter is None else scatter, grad.stride(0), grad.stride(1),
                x, offsets if gather is None else gather, x.stride(0), x.stride(1),
                offsets if scale is None else scale, grad_w, grad_w.stride(0), grad_w.stride(1), grad_w.stride(2),
                offsets, device_ints(active, x.device, torch.int32), groups, m, k,
                HAS_DY_ROWS=scatter is not None, HAS_X_ROWS=gather is not None, HAS_SCALE=scale is not None,
                **_flags(x),
            )  # fmt: skip
        per_group = dict(zip(active, grad_w.unbind(0)))
        return (grad_x, grad_scale, None, None, None, *(per_group.get(g) for g in range(groups)))
