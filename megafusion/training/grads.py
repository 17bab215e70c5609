"""Full-shape gradients of every parameter, gathered from any parallel layout.

Used by ``logging.dump_grads`` (and the parity tests) to compare a layout's gradients with a
single process. Gradients live in megatron-core DDP's ``main_grad`` buffers; with the
distributed optimizer each data-parallel rank holds only its reduce-scattered shard of each
bucket, so the shards are all-gathered first (into the buffer itself: every rank then holds
the same, fully reduced gradients, and its own shard is unchanged).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megafusion.models.param_layout import gather_full, global_param_names, is_tied_output_copy


def _all_gather_distopt_shards(ddp_chunk) -> None:
    for bucket_group in ddp_chunk.bucket_groups + ddp_chunk.expert_parallel_bucket_groups:
        group = bucket_group.intra_distributed_optimizer_instance_group
        size = bucket_group.intra_distributed_optimizer_instance_size
        rank = bucket_group.intra_distributed_optimizer_instance_rank
        for bucket in bucket_group.buckets:
            shard = bucket.grad_data.chunk(size)[rank].clone()
            dist.all_gather_into_tensor(bucket.grad_data, shard, group=group)


def full_gradients(model_chunks, distributed_optimizer: bool) -> dict[str, torch.Tensor]:
    """``{global parameter name: full gradient (fp32, CPU)}`` for the trained parameters this rank holds."""
    grads = {}
    for chunk in model_chunks:
        if distributed_optimizer:
            _all_gather_distopt_shards(chunk)
        for name, param in global_param_names(chunk).items():
            if is_tied_output_copy(name, param) or not param.requires_grad:
                continue  # the embedding's gradient, all-reduced into both copies: reported once; frozen: none
            grads[name] = gather_full(param.main_grad, param).float().cpu()
    return grads
