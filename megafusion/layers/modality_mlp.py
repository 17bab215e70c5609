"""SwiGLU MLP with one megatron ``MLP`` per modality (MoT's untied feed-forward network).

Children are full megatron-core ``MLP`` modules named after the modalities, so state-dict
keys read ``mlp.image.linear_fc1.weight`` and checkpoints keep megatron's SwiGLU resharding
(the ``[gate; up]`` fc1 is saved as two tensors and can be loaded under any TP size). Their
``forward`` is not used: tokens are gathered / copied into the tensor-parallel region once,
sorted by modality once, pushed through fc1 -> SiLU(gate) * up -> fc2 of their own modality
with grouped GEMMs, unsorted and reduced once (see :mod:`megafusion.layers.modality_linear`).
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule

from megafusion import ops
from megafusion.layers.modality_linear import enter_tensor_parallel, exit_tensor_parallel, routed
from megafusion.layers.routing import current_routing


class ModalityMLP(MegatronModule):
    def __init__(self, config, tp_group=None, **unused):
        super().__init__(config=config)
        if not config.gated_linear_unit:
            raise ValueError("ModalityMLP implements the SwiGLU MLP (gated_linear_unit=True) only")
        self.modalities = tuple(config.modalities)
        self.tp_group = tp_group
        submodules = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
        for name in self.modalities:
            self.add_module(name, MLP(config, submodules, ffn_hidden_size=config.ffn_hidden_size, tp_group=tp_group))

    def _swiglu_rows(self, rows: torch.Tensor, counts) -> torch.Tensor:
        mlps = [getattr(self, name) for name in self.modalities]
        fc1 = ops.grouped_linear(rows, [m.linear_fc1.weight for m in mlps], counts)
        gate, up = torch.chunk(fc1, 2, dim=-1)  # this rank's [gate; up] rows (stride-2 sharding)
        act = self.config.activation_func(gate) * up
        return ops.grouped_linear(act, [m.linear_fc2.weight for m in mlps], counts)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        routing = current_routing()
        x = enter_tensor_parallel(hidden_states, self.config, self.tp_group)
        y = routed(x, routing, lambda rows: self._swiglu_rows(rows, routing.counts))
        return exit_tensor_parallel(y, self.config, self.tp_group), None
