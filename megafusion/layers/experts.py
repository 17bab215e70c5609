"""MoE experts: megatron-core's ``SequentialMLP`` run as one grouped GEMM per projection.

The experts keep ``SequentialMLP``'s modules, parameter names and checkpoint sharding; the
forward replaces its loop of one MLP per expert with :func:`megafusion.layers.grouped_swiglu`
(two :func:`megafusion.ops.grouped_linear` calls for all local experts, each row gated by its
routing probability on fc2's input, where megatron's ``MLP`` applies it: on the torch backend
the result is ``SequentialMLP``'s bit for bit; the Triton kernels gate in fc2's epilogue).
The group sizes are the dispatcher's ``tokens_per_expert``, host ints
(:mod:`megafusion.layers.expert_dispatch`).

megafusion builds whole experts (expert tensor parallelism 1), so every rank of an expert's
expert-data-parallel group (tensor- x data-parallel ranks / EP) holds the full expert and sees
its own tokens. Two marks make that hold whatever ``parallel.ep`` is:

- ``allreduce = False``: megatron-core's DDP and optimizer treat the weights as expert-parallel
  (gradients summed over the expert-data-parallel group, which includes the tensor-parallel
  ranks, each with its own sequence-parallel tokens; optimizer state in the expert optimizer of
  the chained pair). megatron sets it only when EP > 1: with EP = 1 and TP > 1 the gradients of
  tokens on other tensor-parallel ranks would be lost, and the optimizer state's keys would
  change with EP, so a checkpoint could not resume into another EP size.
- ``expert_tensor_parallel = True``: megafusion's layout-independent init and gradient gathering
  (:mod:`megafusion.models.param_layout`) take the shards' group from the expert-tensor-parallel
  group, not the tensor-parallel one (megatron marks expert linears ``tensor_model_parallel``
  like any other).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.experts import SequentialMLP

from megafusion.layers.grouped_swiglu import check_swiglu, grouped_swiglu


class Experts(SequentialMLP):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        check_swiglu(self.config, "megafusion's experts")
        if self.config.moe_apply_probs_on_input or self.config.fp8 or self.config.fp4:
            raise ValueError("megafusion's experts support neither moe_apply_probs_on_input nor fp8 / fp4")
        for param in self.parameters():
            param.allreduce = False
            param.expert_tensor_parallel = True

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert, permuted_probs: torch.Tensor):
        counts = [int(c) for c in tokens_per_expert.tolist()]  # a host tensor: no device sync
        out = grouped_swiglu(
            permuted_local_hidden_states,
            self.local_experts,
            counts,
            self.config.activation_func,
            scale=permuted_probs,
        )
        return out, None

    def gathered(self, hidden_states, indices, counts, probs, tokens: int):
        """The experts on rows gathered straight from ``hidden_states`` (``[tokens, h]``):
        ``indices`` lists each local expert's tokens in turn (``counts`` of them, host ints),
        and each output row is gated by ``probs`` and summed into its token's row. No permuted
        copy of the tokens or of the outputs is made (the expert-parallel size 1 path)."""
        return grouped_swiglu(
            hidden_states,
            self.local_experts,
            counts,
            self.config.activation_func,
            gather=indices,
            gather_permutes=False,
            scatter=indices,
            scale=probs,
            out_rows=tokens,
        )
