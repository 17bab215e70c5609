"""Shard <-> full-tensor mapping agrees with megatron-core's own weight split."""

from __future__ import annotations

import pytest
import torch
from megatron.core.tensor_parallel.layers import _initialize_affine_weight_cpu

from megafusion.models.param_layout import full_shape, shard_of_full


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dim", [0, 1])
def test_shard_of_full_matches_megatron_split(tp, stride, dim):
    full = torch.randn(16, 24)
    per_partition = full.shape[dim] // tp
    for rank in range(tp):
        shape = list(full.shape)
        shape[dim] = per_partition
        param = torch.nn.Parameter(torch.empty(shape))
        _initialize_affine_weight_cpu(
            param,
            full.shape[0],
            full.shape[1],
            per_partition,
            dim,
            lambda w: w.copy_(full),
            stride=stride,
            rank=rank,
            world_size=tp,
        )
        assert full_shape(param, tp) == tuple(full.shape)
        assert torch.equal(shard_of_full(full, param, rank, tp), param.data)


def test_unsharded_parameter_is_its_full_tensor():
    param = torch.nn.Parameter(torch.randn(8))
    assert full_shape(param, 4) == (8,)
    assert torch.equal(shard_of_full(param.detach(), param, 3, 4), param.detach())
