"""Triton kernels: a grouped GEMM over variable-size row groups with the gather and scatter fused in.

Both kernels walk the rows ``p = 0 .. P-1`` of a problem in *group order*: group ``g`` owns
rows ``offsets[g] .. offsets[g+1]-1`` (``offsets`` is the cumulative sum of host-side counts,
so no kernel ever asks the device how large a group is). A row's data need not be stored in
that order: an optional index maps row ``p`` to the row of the tensor it reads from or writes
to, so no permuted copy of the activations is ever made.

``gather_gemm_scatter`` computes, for every row ``p`` of group ``g``::

    C[c_row(p)]  = scale[p] * (A[a_row(p)] @ B_g)      (store; c_row is a permutation)
    C[c_row(p)] += scale[p] * (A[a_row(p)] @ B_g)      (ACCUMULATE: c_row may repeat)

with ``B_g`` found at ``b_ptr + b_delta[g]`` (element offsets from the first group's weight, so
each group's weight stays its own tensor: no stacked copy) and read through strides, which
lets one kernel serve the forward (``B_g = W_gᵀ``) and the input gradient (``B_g = W_g``).
With ``HAS_DSCALE`` it also writes the gradient of ``scale`` for the input-gradient pass:
``dscale[p] = Σ_n acc[p, n] · E[c_row(p), n]`` (``acc`` before scaling), one partial sum per
column tile, summed afterwards in a fixed order (deterministic, no atomics).

``group_weight_grad`` computes ``dW_g = Σ_{p in g} (scale[p] · dY[dy_row(p)])ᵀ X[x_row(p)]``,
one program per output tile of one group, looping over that group's rows; an empty group's
gradient is written as zeros.

Accumulation is fp32 (``tl.dot`` with an fp32 accumulator); fp32 inputs use IEEE products
(Triton's fp32 default is TF32). ``UPCAST`` converts tiles to fp32 before ``tl.dot``: the
CPU interpreter (``TRITON_INTERPRET=1``) multiplies bf16 bit patterns in ``tl.dot`` (triton
issue 11584), so on CPU every dtype is computed in fp32.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


# The interpreter runs one config (autotuning would benchmark each in Python) with large
# tiles: it pays per program and per op, not per element (a 256x32x64 problem, forward and
# backward: 3.6 s in 16-wide tiles, 0.13 s in 64-wide, 0.07 s in 128-wide).
_INTERPRETER_TILES = [(128, 128, 128, 1, 1)]


def _configs(gpu_tiles) -> list[triton.Config]:
    """Autotune configs from (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); one in the interpreter."""
    tiles = _INTERPRETER_TILES if INTERPRETED else gpu_tiles
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for m, n, k, w, s in tiles
    ]


GEMM_CONFIGS = _configs(
    [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 3)]
)
WGRAD_CONFIGS = _configs([(128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 3)])
# Row tiles of the dscale partial sums: the smallest BLOCK_N of any config.
MIN_BLOCK_N = min(c.kwargs["BLOCK_N"] for c in GEMM_CONFIGS)


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.autotune(configs=GEMM_CONFIGS, key=["N", "K", "G"], reset_to_zero=["c_ptr", "dscale_ptr"])
@triton.jit
def gather_gemm_scatter(
    a_ptr, a_rows_ptr, stride_am, stride_ak,
    b_ptr, b_delta_ptr, stride_bk, stride_bn,
    c_ptr, c_rows_ptr, stride_cm, stride_cn,
    scale_ptr, e_ptr, stride_em, stride_en, dscale_ptr,
    offsets_ptr, G, P, N, K,
    HAS_A_ROWS: tl.constexpr, HAS_C_ROWS: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_DSCALE: tl.constexpr, ACCUMULATE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # Which group owns row tile pid_m: each group's rows start a fresh tile, so the grid has
    # at most G more row tiles than cdiv(P, BLOCK_M); the surplus ones find no group.
    group = -1
    row0 = 0
    row_end = 0
    tiles_before = 0
    for g in range(0, G):
        start = tl.load(offsets_ptr + g)
        end = tl.load(offsets_ptr + g + 1)
        tiles = tl.cdiv(end - start, BLOCK_M)
        hit = (pid_m >= tiles_before) & (pid_m < tiles_before + tiles)
        group = tl.where(hit, g, group)
        row0 = tl.where(hit, start + (pid_m - tiles_before) * BLOCK_M, row0)
        row_end = tl.where(hit, end, row_end)
        tiles_before += tiles
    if group >= 0:
        rows = row0 + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        a_rows = tl.load(a_rows_ptr + rows, mask=row_mask, other=0) if HAS_A_ROWS else rows
        c_rows = tl.load(c_rows_ptr + rows, mask=row_mask, other=0) if HAS_C_ROWS else rows
        a_rows = a_rows.to(tl.int64)
        c_rows = c_rows.to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        b_group = b_ptr + tl.load(b_delta_ptr + group)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < K
            a = tl.load(
                a_ptr + a_rows[:, None] * stride_am + ks[None, :] * stride_ak,
                mask=row_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            b = tl.load(
                b_group + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                mask=k_mask[:, None] & col_mask[None, :],
                other=0.0,
            )
            acc += _dot(a, b, UPCAST, IEEE)
        out_mask = row_mask[:, None] & col_mask[None, :]
        if HAS_DSCALE:
            e = tl.load(e_ptr + c_rows[:, None] * stride_em + cols[None, :] * stride_en, mask=out_mask, other=0.0)
            partial = tl.sum(acc * e.to(tl.float32), axis=1)
            tl.store(dscale_ptr + pid_n * P + rows, partial, mask=row_mask)
        if HAS_SCALE:
            acc *= tl.load(scale_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
        c = c_ptr + c_rows[:, None] * stride_cm + cols[None, :] * stride_cn
        if ACCUMULATE:
            tl.atomic_add(c, acc.to(c_ptr.dtype.element_ty), mask=out_mask)
        else:
            tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=out_mask)


@triton.autotune(configs=WGRAD_CONFIGS, key=["M", "K", "G"])
@triton.jit
def group_weight_grad(
    dy_ptr, dy_rows_ptr, stride_dym, stride_dyn,
    x_ptr, x_rows_ptr, stride_xm, stride_xk,
    scale_ptr, dw_ptr, stride_dwg, stride_dwm, stride_dwk,
    offsets_ptr, groups_ptr, G, M, K,
    HAS_DY_ROWS: tl.constexpr, HAS_X_ROWS: tl.constexpr, HAS_SCALE: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # Output tile: rows (BLOCK_N of the weight's M output features) x columns (BLOCK_K of its
    # K inputs); the reduction runs over the group's token rows, BLOCK_M at a time. Only the
    # groups listed in groups_ptr get programs (frozen weights need no gradient); the i-th
    # listed group's gradient goes to dW[i].
    group = tl.load(groups_ptr + tl.program_id(0))
    tiles_k = tl.cdiv(K, BLOCK_K)
    out_m = (tl.program_id(1) // tiles_k) * BLOCK_N + tl.arange(0, BLOCK_N)
    out_k = (tl.program_id(1) % tiles_k) * BLOCK_K + tl.arange(0, BLOCK_K)
    m_mask = out_m < M
    k_mask = out_k < K
    start = tl.load(offsets_ptr + group)
    end = tl.load(offsets_ptr + group + 1)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for p0 in range(start, end, BLOCK_M):
        rows = p0 + tl.arange(0, BLOCK_M)
        row_mask = rows < end
        dy_rows = tl.load(dy_rows_ptr + rows, mask=row_mask, other=0) if HAS_DY_ROWS else rows
        x_rows = tl.load(x_rows_ptr + rows, mask=row_mask, other=0) if HAS_X_ROWS else rows
        dy_t = tl.load(
            dy_ptr + dy_rows.to(tl.int64)[None, :] * stride_dym + out_m[:, None] * stride_dyn,
            mask=m_mask[:, None] & row_mask[None, :],
            other=0.0,
        )
        if HAS_SCALE:
            scale = tl.load(scale_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
            dy_t = (dy_t.to(tl.float32) * scale[None, :]).to(dy_ptr.dtype.element_ty)
        x = tl.load(
            x_ptr + x_rows.to(tl.int64)[:, None] * stride_xm + out_k[None, :] * stride_xk,
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        acc += _dot(dy_t, x, UPCAST, IEEE)
    dw = dw_ptr + tl.program_id(0) * stride_dwg + out_m[:, None] * stride_dwm + out_k[None, :] * stride_dwk
    tl.store(dw, acc.to(dw_ptr.dtype.element_ty), mask=m_mask[:, None] & k_mask[None, :])
