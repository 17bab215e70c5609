"""A SwiGLU MLP over row groups, one megatron ``MLP`` per group, through :func:`megafusion.ops.grouped_linear`.

Shared by MoT's per-modality FFN (rows gathered from and scattered back to token order by
the grouped GEMMs themselves) and by the MoE experts (rows already grouped by the
dispatcher, each gated by its routing probability). megatron's ``MLP.forward`` is not used:
it would run one GEMM per group. The activation is megatron's SwiGLU without bias: fc1's
local rows are ``[gate; up]`` (its stride-2 TP sharding), ``act(gate) * up`` feeds fc2.
"""

from __future__ import annotations

import torch

from megafusion import ops


def check_swiglu(config, what: str) -> None:
    """Refuse the megatron MLP options this path does not implement."""
    if not config.gated_linear_unit or config.add_bias_linear:
        raise ValueError(f"{what} implements the SwiGLU MLP without bias (gated_linear_unit, no add_bias_linear)")
    if config.activation_func_clamp_value is not None or config.glu_linear_offset:
        raise ValueError(f"{what} does not implement activation_func_clamp_value / glu_linear_offset")


def grouped_swiglu(
    x, mlps, counts, activation, *, gather=None, scatter=None, scale=None, out_rows=None, gather_permutes=True
) -> torch.Tensor:
    """``fc2_g(act(gate) * up)`` with ``[gate; up] = fc1_g(row)`` for each row of group ``g``.

    ``gather`` (and ``gather_permutes``) are fc1's input gather; ``scatter``, ``scale`` and
    ``out_rows`` are fc2's output scatter(-add) and per-row gate (see
    :func:`megafusion.ops.grouped_linear`).
    """
    w1 = [m.linear_fc1.weight for m in mlps]
    fc1 = ops.grouped_linear(x, w1, counts, gather=gather, gather_permutes=gather_permutes)
    gate, up = torch.chunk(fc1, 2, dim=-1)
    w2 = [m.linear_fc2.weight for m in mlps]
    return ops.grouped_linear(activation(gate) * up, w2, counts, scatter=scatter, scale=scale, out_rows=out_rows)
