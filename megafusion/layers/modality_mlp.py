"""SwiGLU MLP with one megatron ``MLP`` per modality (MoT's untied feed-forward network).

Children are full megatron-core ``MLP`` modules named after the modalities, so state-dict
keys read ``mlp.image.linear_fc1.weight`` and checkpoints keep megatron's SwiGLU resharding
(the ``[gate; up]`` fc1 is saved as two tensors and can be loaded under any TP size). Their
``forward`` is not used: tokens are gathered / copied into the tensor-parallel region once,
pushed through fc1 -> SiLU(gate) * up -> fc2 of their own modality by grouped GEMMs that read
them in modality order and write them back in token order (no sorted copy of the input or
output: :mod:`megafusion.layers.grouped_swiglu`), and reduced once
(:mod:`megafusion.layers.modality_linear`).
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule

from megafusion.layers.grouped_swiglu import check_swiglu, grouped_swiglu
from megafusion.layers.modality_linear import enter_tensor_parallel, exit_tensor_parallel, modality_groups
from megafusion.layers.routing import current_routing


class ModalityMLP(MegatronModule):
    def __init__(self, config, tp_group=None, **unused):
        super().__init__(config=config)
        check_swiglu(config, "ModalityMLP")
        self.modalities = tuple(config.modalities)
        self.tp_group = tp_group
        submodules = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
        for name in self.modalities:
            self.add_module(name, MLP(config, submodules, ffn_hidden_size=config.ffn_hidden_size, tp_group=tp_group))

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        routing = current_routing()
        x = enter_tensor_parallel(hidden_states, self.config, self.tp_group)
        s, b = x.shape[0], x.shape[1]
        mlps = [getattr(self, name) for name in self.modalities]
        g = modality_groups(routing)  # padded row groups under causal routing (batch invariance)
        y = grouped_swiglu(
            x.reshape(s * b, -1),
            mlps,
            g.counts,
            self.config.activation_func,
            gather=g.gather,
            scatter=g.scatter,
            out_rows=g.out_rows,
            gather_permutes=g.gather_permutes,
        )
        y = g.keep(y)
        return exit_tensor_parallel(y.view(s, b, -1), self.config, self.tp_group), None
