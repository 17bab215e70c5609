"""MoMa's dispatch reads no device value: every split size and token count is a host int.

- The whole MoE layer (router, dispatcher or the in-place expert GEMMs of EP = 1, experts,
  combine) runs forward and backward on PyTorch's ``meta`` device, whose tensors have shapes and
  no data: any op that needs a device value on the host (``.tolist()``, ``.item()``, ``.cpu()``,
  ``masked_select``, ``nonzero``) raises there, as it would synchronise with a GPU.
  megatron-core's own dispatchers fail the same run (checked, so the test can fail).
- ``permute_by_counts`` equals megatron's ``permute`` (tokens, probs, indices), empty experts too.
- Sequence-parallel shares: the ``T`` ranks' routing maps are disjoint, add up to the
  one-process map, and each rank's host counts are its map's column sums.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.moe.moe_layer import get_default_pg_collection
from megatron.core.transformer.moe.moe_utils import permute
from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher, MoEAlltoAllTokenDispatcher

from megafusion.layers.expert_dispatch import permute_by_counts
from megafusion.layers.routing import ModalityRouting, modality_routing
from tests.models.test_moma import BATCH, NUM_MODALITIES, SEQ, layer_inputs, moe_layer, moma_cfg

MEGATRON = {"alltoall": MoEAlltoAllTokenDispatcher, "allgather": MoEAllGatherTokenDispatcher}


def meta_step(layer):
    """Forward and backward of ``layer`` on the meta device; the input's gradient."""
    layer.to("meta")
    modality = torch.randint(NUM_MODALITIES, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    padding = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    padding[1, -3:] = True
    routing = ModalityRouting.from_modality_ids(modality, None, torch.device("meta"), NUM_MODALITIES, padding)
    x = torch.empty(SEQ, BATCH, 32, device="meta", requires_grad=True)
    with modality_routing(routing):
        out, _ = layer(x)
    out.sum().backward()
    return x.grad


@pytest.mark.parametrize("dispatcher", ["none (EP = 1)", *MEGATRON])
def test_moe_layer_reads_no_device_value(runtime, dispatcher):
    cfg = moma_cfg({"text": 3, "image": 2})
    _, layer = moe_layer(cfg, runtime)
    assert layer.skip_dispatch  # one process: the experts read the tokens in place
    if dispatcher in MEGATRON:
        cfg.moe.dispatcher = dispatcher
        _, layer = moe_layer(cfg, runtime)
        layer.skip_dispatch = False
    grad = meta_step(layer)
    assert grad.shape == (SEQ, BATCH, 32) and grad.device.type == "meta"
    assert all(p.grad is not None for p in layer.parameters())


@pytest.mark.parametrize("dispatcher", list(MEGATRON))
def test_megatron_dispatcher_reads_device_values(runtime, dispatcher):
    cfg = moma_cfg({"text": 3, "image": 2})
    cfg.moe.dispatcher = dispatcher
    _, layer = moe_layer(cfg, runtime)
    layer.skip_dispatch = False
    d = layer.token_dispatcher
    layer.token_dispatcher = MEGATRON[dispatcher](
        d.num_local_experts, d.local_expert_indices, config=d.config, pg_collection=get_default_pg_collection()
    )
    # alltoall: masked_select in its permutation; allgather: .cpu() of its token counts.
    with pytest.raises(NotImplementedError, match="(?i)meta"):
        meta_step(layer)


@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 0, 0], [7, 7, 7, 7]])
def test_permute_by_counts_equals_megatron_permute(counts):
    gen = torch.Generator().manual_seed(sum(counts))
    n, h = 7, 5
    routing_map = torch.zeros(n, len(counts), dtype=torch.bool)
    for e, c in enumerate(counts):
        routing_map[torch.randperm(n, generator=gen)[:c], e] = True
    tokens = torch.randn(n, h, generator=gen)
    probs = torch.rand(n, len(counts), generator=gen) * routing_map
    ours = permute_by_counts(tokens, routing_map, counts, probs)
    theirs = permute(tokens, routing_map, probs=probs, num_out_tokens=sum(counts))
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shares", [2, 3])
def test_sequence_parallel_shares_partition_the_routing(runtime, shares):
    _, layer = moe_layer(moma_cfg({"text": 3, "image": 2}), runtime)
    router = layer.router
    _, routing = layer_inputs(3)
    logits = torch.randn(SEQ * BATCH, 5, generator=torch.Generator().manual_seed(4))
    whole, whole_counts = router.routing(logits, routing)
    maps = []
    for share in range(shares):
        router.share = (share, shares)
        rank_map, counts = router.routing(logits, routing)
        assert counts == rank_map.sum(0).tolist()
        maps.append(rank_map.int())
    router.share = (0, 1)
    assert torch.equal(sum(maps), whole.int())  # disjoint (no entry above 1) and complete
    assert [sum(c) for c in zip(*(m.sum(0).tolist() for m in maps))] == whole_counts
