"""MoE experts: megatron-core's ``SequentialMLP``, its parameters marked as experts in every layout.

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

from megatron.core.transformer.moe.experts import SequentialMLP


class Experts(SequentialMLP):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for param in self.parameters():
            param.allreduce = False
            param.expert_tensor_parallel = True
