"""RMSNorm with one weight per modality (MoT's untied attention, FFN, QK and final norms).

Children are :class:`megafusion.layers.norm.RMSNorm` modules named after the modalities
(``input_layernorm.image.weight``). The statistics do not depend on the modality, so the
input is normalised once and each token is scaled by its own modality's weight, gathered
per token: no token is normalised twice and nothing is computed for another modality.
Works on any tensor whose first two dims are megatron's ``[s, b]`` (or a sequence-parallel
slice of ``s``): hidden states ``[s, b, h]`` and per-head queries/keys ``[s, b, heads, d]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from megafusion.layers.norm import RMSNorm
from megafusion.layers.routing import current_routing


class ModalityRMSNorm(MegatronModule):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__(config=config)
        self.modalities = tuple(config.modalities)
        self.eps = eps
        for name in self.modalities:
            self.add_module(name, RMSNorm(config, hidden_size, eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = current_routing().modality_of(x)  # [s, b]
        dtype = torch.promote_types(x.dtype, torch.float32)  # fp32 at least; float64 tests stay float64
        weights = torch.stack([getattr(self, name).weight for name in self.modalities]).to(dtype)
        per_token = weights[ids]  # [s, b, hidden]
        per_token = per_token.view(*ids.shape, *([1] * (x.dim() - 3)), x.shape[-1])
        y = F.rms_norm(x.to(dtype), (x.shape[-1],), None, self.eps) * per_token
        return y.to(x.dtype)
