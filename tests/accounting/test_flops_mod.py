"""Mixture-of-Depths costs: parameter counts equal the built model's, and the analytic FLOPs
(``LayerCost.block_fraction`` / ``attention_fraction`` / ``router`` of the MoD layers) equal
``FlopCounterMode`` around a forward + backward (SDPA's math backend: attention as bmm over the
picked tokens only), for dense + MoD, MoT + MoD and MoMa + MoD (the experts run on the picked tokens:
``LayerCost.block_routable``). Controls: the same model without MoD costs more, and the counter sees
it; counting MoMa's experts on the whole microbatch (the count before ``block_routable``) misses.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from megafusion.accounting import flops
from megafusion.accounting import params as acc_params
from megafusion.core.modality import NUM_MODALITIES
from megafusion.layers.masks import dense_mask
from megafusion.layers.routing import routing_for
from tests.layers.test_mod import mod_cfg
from tests.models.test_mot import batch_with_modalities, build


def measure(model, batch):
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter, routing_for(batch, torch.device("cpu")):
        logits = model(batch["tokens"], batch["position_ids"], dense_mask(batch["document_ids"]), labels=None)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1)).backward()
    return counter


@pytest.mark.parametrize("arch", ["dense", "mot"])
def test_mod_flops_and_parameters_match_the_built_model(runtime, arch):
    cfg = mod_cfg(arch, capacity=0.25, every=2, layers=3)  # layers 1 and 3 run 4 of each row's 16 tokens
    model = build(cfg, runtime)
    counts = acc_params.parameter_counts(cfg)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["router"] == 2 * cfg.model.hidden_size
    batch = batch_with_modalities(cfg)  # no padding: every row's c x n = 4 is whole
    b, s = batch["tokens"].shape
    counter = measure(model, batch)
    by_op = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    assert by_op["aten.mm"] == b * s * flops.dense_flops_per_token(cfg)
    assert counter.get_total_flops() == b * s * flops.flops_per_token(cfg, attended_keys=s)

    plain = mod_cfg(arch, capacity=None, layers=3)
    full = measure(build(plain, runtime), batch).get_total_flops()
    assert full == b * s * flops.flops_per_token(plain, attended_keys=s) > counter.get_total_flops()


@pytest.mark.parametrize("arch", ["dense", "moma"])
def test_mod_aux_router_flops_and_parameters_match_the_built_model(runtime, arch):
    """``mod.aux_router`` (and MoMa's ``moe.aux_router`` inside MoD layers): parameter counts equal
    the built model's; what the auxiliary routers add to FlopCounterMode (forward + backward, the
    BCE through the layer outputs) equals what they add to the analytic count: MoD's on every
    token, MoMa's only on the tokens a MoD layer picked. Dense + MoD: the totals are equal too
    (MoMa + MoD's: :func:`test_moma_mod_flops_equal_flop_counter`)."""

    def config(aux: bool):
        cfg = mod_cfg(arch, capacity=0.25, every=2, layers=3)
        cfg.mod.aux_router = aux
        if arch == "moma":
            cfg.moe.aux_router = aux
        return cfg

    cfg, plain = config(True), config(False)
    model = build(cfg, runtime)
    counts = acc_params.parameter_counts(cfg)
    named = dict(model.named_parameters())
    assert counts["total"] == sum(p.numel() for p in named.values())
    assert counts["aux_router"] == sum(p.numel() for n, p in named.items() if "aux_router." in n) > 0
    batch = batch_with_modalities(cfg)
    b, s = batch["tokens"].shape
    total = measure(model, batch).get_total_flops()
    without = measure(build(plain, runtime), batch).get_total_flops()
    analytic = b * s * (flops.flops_per_token(cfg, attended_keys=s) - flops.flops_per_token(plain, attended_keys=s))
    assert total - without == analytic > 0
    h = cfg.model.hidden_size
    mod_share = b * s * 2 * 2 * (2 * h * (h // 2) + 3 * (h // 2))  # 2 MoD layers' routers, every token
    assert analytic == mod_share if arch == "dense" else analytic > mod_share  # control: MoMa's add to it
    if arch == "dense":  # MoMa + MoD's global split is exact only in proportion (below)
        assert total == b * s * flops.flops_per_token(cfg, attended_keys=s)


def balanced_modalities(cfg, seed=5):
    """Each row: half of each modality, shuffled, so every row's c x n_{b,m} is whole at c = 1/4."""
    s, gen = cfg.model.seq_length, torch.Generator().manual_seed(seed)
    row = torch.arange(s) % NUM_MODALITIES
    return torch.stack([row[torch.randperm(s, generator=gen)] for _ in range(2)])


def counted(cfg, batch):
    """``batch_flops`` under SDPA math's full attention (``attention="full"``), as FlopCounterMode counts it."""
    return flops.batch_flops(cfg, batch["document_ids"], batch["modality_ids"], attention="full")


@pytest.mark.parametrize(("split", "experts"), [("per_modality", {"text": 2, "image": 2}), ("global", {"mixed": 4})])
def test_moma_mod_flops_equal_flop_counter(runtime, monkeypatch, split, experts):
    """MoMa + MoD where the picked tokens per expert group are host ints (``per_modality``; or one
    modality-blind group, which takes all of a row's ``floor(c x n)`` picks): ``batch_flops`` (what
    the trainer's ``flops`` and ``megafusion flops`` count) equals FlopCounterMode exactly."""
    cfg = mod_cfg("moma", capacity=0.25, every=2, layers=3, split=split)
    cfg.moe.experts = experts
    batch = batch_with_modalities(cfg, modality_ids=balanced_modalities(cfg))
    got = measure(build(cfg, runtime), batch).get_total_flops()
    want = counted(cfg, batch)
    assert got == want["total"]
    # Control: the MoD layers' experts counted on every routable token (not the picked) miss.
    costs = flops.layer_costs(cfg)
    whole = tuple(dataclasses.replace(cost, block_routable=None) for cost in costs)
    monkeypatch.setattr(flops, "layer_costs", lambda c: whole)
    assert counted(cfg, batch)["experts"] > want["experts"]
    assert counted(cfg, batch)["total"] != got


def test_moma_mod_global_split_is_charged_in_proportion(runtime):
    """``mod.split=global`` with one group per modality: each modality's share of a row's picks is
    the router's; the count charges it in proportion. At the default capacities (``E_g x c_g = 1``)
    the total is then off by at most ``sum_g (E_g - 1)`` expert runs per MoD layer (docs/mod.md)."""
    cfg = mod_cfg("moma", capacity=0.25, every=2, layers=3, split="global")
    batch = batch_with_modalities(cfg)
    got = measure(build(cfg, runtime), batch).get_total_flops()
    per_run = 3 * 2 * flops._matmul_parts(cfg)["mlp"]
    bound = 2 * sum(e - 1 for e in cfg.moe.experts.values()) * per_run  # 2 MoD layers
    assert abs(got - counted(cfg, batch)["total"]) <= bound
