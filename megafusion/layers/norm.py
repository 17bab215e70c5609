"""RMSNorm that megatron-core can build from a spec and that works with sequence parallel.

megatron-core's ``WrappedTorchNorm`` refuses sequence parallelism and its fused norms need
Apex or Transformer Engine. This one is ``torch.nn.functional.rms_norm`` (fp32 statistics)
with the ``sequence_parallel`` attribute set on its weight, which is how megatron-core's
``finalize_model_grads`` knows to all-reduce the weight gradient across tensor-parallel
ranks (each rank saw a different slice of the sequence).

State dict: ``weight`` of shape ``[hidden_size]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class RMSNorm(torch.nn.Module):
    """``y = x / rms(x) * weight``, computed in fp32 (float64 for float64 inputs) and cast back to the input dtype."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)  # fp32 at least; float64 tests stay float64
        y = F.rms_norm(x.to(dtype), (x.shape[-1],), self.weight.to(dtype), self.eps)
        return y.to(x.dtype)
