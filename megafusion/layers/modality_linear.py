"""Tensor-parallel linears with one weight per modality (MoT's untied Q/K/V and output projections).

``ModalityColumnParallelLinear`` and ``ModalityRowParallelLinear`` are drop-ins for
megatron-core's ``ColumnParallelLinear`` / ``RowParallelLinear`` in a ``SelfAttention`` spec
(same constructor arguments, same ``(output, bias)`` return). They hold one megatron linear
per modality as children named after the modality, so that state-dict keys read
``self_attention.linear_qkv.image.weight`` and checkpoints shard exactly as megatron's own
linears do. The children's ``forward`` is never called: that would communicate once per
modality. Instead the tensor-parallel communication happens once for all tokens and the
per-modality matmuls run on the local weight shards through :func:`megafusion.ops.grouped_linear`,
each token through its own modality's weight only, read in modality order and written back in
token order by the grouped GEMM itself.

Communication mirrors megatron's linears exactly (so TP / SP parity holds):

========================  ==================================  =================================
                          column (input side)                 row (output side)
========================  ==================================  =================================
sequence parallel         all-gather the sequence (bwd:       reduce-scatter the sequence (bwd:
                          reduce-scatter)                     all-gather)
tensor parallel, no SP    identity (bwd: all-reduce)          all-reduce (bwd: identity)
========================  ==================================  =================================
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.module import MegatronModule

from megafusion import ops
from megafusion.layers.routing import ModalityRouting, current_routing


def enter_tensor_parallel(x: torch.Tensor, config, tp_group) -> torch.Tensor:
    """The column-parallel input region: full sequence, full hidden size on every TP rank."""
    if config.tensor_model_parallel_size == 1:
        return x
    if config.sequence_parallel:
        return gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True, group=tp_group)
    return copy_to_tensor_model_parallel_region(x, group=tp_group)


def exit_tensor_parallel(y: torch.Tensor, config, tp_group) -> torch.Tensor:
    """The row-parallel output region: sum the partial products over TP ranks."""
    if config.tensor_model_parallel_size == 1:
        return y
    if config.sequence_parallel:
        return reduce_scatter_to_sequence_parallel_region(y, group=tp_group)
    return reduce_from_tensor_model_parallel_region(y, group=tp_group)


def grouped(x: torch.Tensor, weights, routing: ModalityRouting) -> torch.Tensor:
    """Each token of ``x`` (``[s, b, k]``) times its modality's weight, in token order.

    The grouped GEMM reads the tokens in modality order (``routing.order``) and writes each
    result back to its token's row: no sorted copy of the input or the output is made.
    """
    s, b = x.shape[0], x.shape[1]
    rows = x.reshape(s * b, -1)
    y = ops.grouped_linear(rows, weights, routing.counts, gather=routing.order, scatter=routing.order)
    return y.view(s, b, -1)


class _ModalityLinear(MegatronModule):
    """One megatron linear per modality (children named after the modalities)."""

    linear_cls: type = None

    def __init__(
        self, input_size: int, output_size: int, *, config, bias: bool = False, tp_group=None, **linear_kwargs
    ):
        super().__init__(config=config)
        if bias:
            raise ValueError("modality-partitioned linears have no bias (model.add_bias_linear is off)")
        self.modalities = tuple(config.modalities)
        self.tp_group = tp_group
        for name in self.modalities:
            self.add_module(
                name,
                self.linear_cls(input_size, output_size, config=config, bias=False, tp_group=tp_group, **linear_kwargs),
            )

    def weights(self) -> list[torch.Tensor]:
        return [getattr(self, name).weight for name in self.modalities]


class ModalityColumnParallelLinear(_ModalityLinear):
    """Output features split over TP ranks; input is this rank's sequence (slice under SP)."""

    linear_cls = ColumnParallelLinear

    def forward(self, x: torch.Tensor):
        routing = current_routing()
        x = enter_tensor_parallel(x, self.config, self.tp_group)
        return grouped(x, self.weights(), routing), None


class ModalityRowParallelLinear(_ModalityLinear):
    """Input features split over TP ranks; output summed (reduce-scattered under SP)."""

    linear_cls = RowParallelLinear

    def forward(self, x: torch.Tensor):
        routing = current_routing()
        y = grouped(x, self.weights(), routing)
        return exit_tensor_parallel(y, self.config, self.tp_group), None
