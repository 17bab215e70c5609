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

Under causal routing (``ModalityRouting.causal``: generation, causal evaluation) each modality's
rows are padded to a multiple of :data:`CAUSAL_ROW_BUCKET` (copies of row 0 written to a spare
output row, :func:`modality_groups`): a GEMM's result for one row can depend on how many rows it
multiplies, and a modality's row count is the whole microbatch's, so without it a sequence's
logits would change with the other rows batched beside it. Training (expert choice, teacher
forcing) is untouched: the padding exists only under causal routing.

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

from dataclasses import dataclass

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

# Causal routing: each modality's rows padded to a multiple of this, as MoMa's experts' and MoD's
# picked rows are (:data:`megafusion.layers.expert_choice_layer.CAUSAL_ROW_BUCKET`).
CAUSAL_ROW_BUCKET = 16


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


@dataclass(frozen=True)
class ModalityGroups:
    """The row groups of a per-modality grouped GEMM over ``[s * b]`` tokens (keywords of
    :func:`megafusion.ops.grouped_linear`); ``out_rows`` set: take the output's first ``s * b`` rows."""

    counts: tuple[int, ...]
    gather: torch.Tensor
    scatter: torch.Tensor
    out_rows: int | None = None
    gather_permutes: bool = True

    def keep(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.out_rows is None else y[: self.out_rows - 1]


def modality_groups(routing: ModalityRouting) -> ModalityGroups:
    """The tokens in modality order; under causal routing each modality's rows padded to a multiple
    of :data:`CAUSAL_ROW_BUCKET` with copies of row 0 that land in a spare output row (made once
    per microbatch, kept in the routing's cache)."""
    if not routing.causal:
        return ModalityGroups(routing.counts, routing.order, routing.order)
    key = ("modality_groups", CAUSAL_ROW_BUCKET)
    if key not in routing.cache:
        order, n = routing.order, routing.order.numel()
        gather, scatter, counts, start = [], [], [], 0
        for count in routing.counts:
            pad = -count % CAUSAL_ROW_BUCKET
            part = order[start : start + count]
            gather += [part, part.new_zeros(pad)]
            scatter += [part, part.new_full((pad,), n)]
            counts.append(count + pad)
            start += count
        routing.cache[key] = ModalityGroups(tuple(counts), torch.cat(gather), torch.cat(scatter), n + 1, False)
    return routing.cache[key]


def grouped(x: torch.Tensor, weights, routing: ModalityRouting) -> torch.Tensor:
    """Each token of ``x`` (``[s, b, k]``) times its modality's weight, in token order.

    The grouped GEMM reads the tokens in modality order (``routing.order``) and writes each
    result back to its token's row: no sorted copy of the input or the output is made.
    """
    s, b = x.shape[0], x.shape[1]
    rows = x.reshape(s * b, -1)
    g = modality_groups(routing)
    y = ops.grouped_linear(
        rows,
        weights,
        g.counts,
        gather=g.gather,
        scatter=g.scatter,
        out_rows=g.out_rows,
        gather_permutes=g.gather_permutes,
    )
    return g.keep(y).view(s, b, -1)


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
