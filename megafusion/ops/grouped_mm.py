"""The ``torch_grouped_mm`` backend: torch's own grouped GEMM (``torch.nn.functional.grouped_mm``).

One CUTLASS kernel for all groups on Hopper/Blackwell in bf16 (elsewhere torch loops). It
needs the weights stacked into one ``[G, m, k]`` tensor, a copy per call because megafusion
keeps one parameter per modality / expert (checkpoint keys stay megatron's), and it neither
gathers nor scatters: rows are gathered and scattered by the torch reference's ops around it.
Its backward rejects stride-0 gradients (``y.sum().backward()``), hence the contiguous copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megafusion.ops.device_ints import group_offsets
from megafusion.ops.reference import gather_rows, place_rows


def available() -> bool:
    return hasattr(F, "grouped_mm")


def fast_on(device: torch.device, dtype: torch.dtype, m: int, k: int) -> bool:
    """CUTLASS path: sm90 / sm100, bf16, 16-byte aligned rows."""
    if not (available() and device.type == "cuda" and dtype == torch.bfloat16):
        return False
    return torch.cuda.get_device_capability(device)[0] in (9, 10) and m % 8 == 0 and k % 8 == 0


class _ContiguousGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def grouped_linear_grouped_mm(x, weights, counts, gather, scatter, scale, out_rows, gather_permutes):
    m, k = weights[0].shape
    if (m * x.element_size()) % 16 or (k * x.element_size()) % 16:
        raise ValueError(
            f"ops.backend=torch_grouped_mm needs rows of 16-byte multiples; weights of [{m}, {k}] in {x.dtype} "
            "are not: use ops.backend=auto"
        )
    rows = gather_rows(x, gather, scale)
    ends = group_offsets(counts, x.device)[1:]  # int32 group ends, cached on the device
    stacked = torch.stack(weights)  # [G, m, k]
    y = _ContiguousGrad.apply(F.grouped_mm(rows, stacked.transpose(-2, -1), offs=ends))
    return place_rows(y, scatter, out_rows)
