"""Where each parameter shard sits in its full tensor, and how to move between the two.

megatron-core marks tensor-parallel weights with ``tensor_model_parallel``,
``partition_dim`` and ``partition_stride``: the full tensor is cut into ``tp * stride``
equal chunks along ``partition_dim`` and rank r holds chunks ``r, r + tp, ...`` (stride 2 is
SwiGLU's ``[gate; up]`` fc1, so that each rank holds matching gate and up rows). Layer
indices in local parameter names restart at 0 on every pipeline stage / virtual chunk, and
expert indices (``mlp.experts.local_experts.<i>``) at 0 on every expert-parallel rank;
``global_param_names`` rewrites them to the global layer number and megatron's global expert
number (``mlp.experts.<e>``), which is what makes layouts comparable and init layout-independent.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_LOCAL_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.")


def _unwrap(module):
    while hasattr(module, "module"):
        module = module.module
    return module


def global_param_names(model_chunk) -> dict[str, torch.nn.Parameter]:
    """``{global name: parameter}`` for one model chunk (DDP wrappers are looked through)."""
    model = _unwrap(model_chunk)
    layers = model.decoder.layers if hasattr(model, "decoder") else []
    out = {}
    for name, param in model.named_parameters():
        match = _LAYER.match(name)
        if match:
            layer = layers[int(match.group(1))]
            rest = name[match.end() :]
            expert = _LOCAL_EXPERT.match(rest)
            if expert:  # megatron's MoELayer knows which global experts this rank holds
                global_expert = layer.mlp.local_expert_indices[int(expert.group(1))]
                rest = f"mlp.experts.{global_expert}." + rest[expert.end() :]
            name = f"decoder.layers.{layer.layer_number - 1}." + rest
        out[name] = param
    return out


EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"


def is_tied_output_copy(name: str, param: torch.Tensor) -> bool:
    """The last pipeline stage's copy of a tied embedding (``model.tie_embeddings`` with PP > 1).

    megatron-core flags it ``shared_embedding``; it always equals the first stage's embedding
    (same start, all-reduced gradients), so it is drawn like the embedding and reported once.
    """
    return name == OUTPUT_LAYER and bool(getattr(param, "shared_embedding", False))


def is_tp_sharded(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def is_expert(param: torch.Tensor) -> bool:
    """An expert's weight: sharded over the expert-tensor-parallel group, not the tensor-parallel one."""
    return bool(getattr(param, "expert_tensor_parallel", False))


def _expert_tp(param: torch.Tensor, tp_rank: int, tp: int) -> tuple[int, int]:
    if is_expert(param):
        return ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()
    return tp_rank, tp


def full_shape(param: torch.Tensor, tp: int) -> tuple[int, ...]:
    _, tp = _expert_tp(param, 0, tp)
    shape = list(param.shape)
    if is_tp_sharded(param):
        shape[param.partition_dim] *= tp
    return tuple(shape)


def shard_of_full(full: torch.Tensor, param: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    """The slice of ``full`` that ``param`` holds on tensor-parallel rank ``tp_rank``
    (an expert's: on its expert-tensor-parallel rank)."""
    tp_rank, tp = _expert_tp(param, tp_rank, tp)
    if not is_tp_sharded(param) or tp == 1:
        return full
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    chunks = full.chunk(tp * stride, dim=dim)
    return torch.cat(chunks[tp_rank::tp], dim=dim)


def gather_full(shard: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """All-gather a tensor-parallel shard (a weight or its gradient) to the full tensor."""
    expert = is_expert(param)
    tp = ps.get_expert_tensor_parallel_world_size() if expert else ps.get_tensor_model_parallel_world_size()
    if not is_tp_sharded(param) or tp == 1:
        return shard.clone()
    group = ps.get_expert_tensor_parallel_group() if expert else ps.get_tensor_model_parallel_group()
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    parts = [torch.empty_like(shard) for _ in range(tp)]
    dist.all_gather(parts, shard.contiguous(), group=group)
    pieces = [p.chunk(stride, dim=dim) for p in parts]
    # rank r holds chunks r, r+tp, ...: put them back in global chunk order.
    ordered = [pieces[r][s] for s in range(stride) for r in range(tp)]
    return torch.cat(ordered, dim=dim)
