"""Mixture-of-Depths costs: parameter counts equal the built model's, and the analytic FLOPs
(``LayerCost.block_fraction`` / ``attention_fraction`` / ``router`` of the MoD layers) equal
``FlopCounterMode`` around a forward + backward (SDPA's math backend: attention as bmm over the
picked tokens only), for dense + MoD and MoT + MoD. Control: the same model without MoD costs more,
and the counter sees it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from megafusion.accounting import flops
from megafusion.accounting import params as acc_params
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
    (MoMa + MoD's expert runs over the picked tokens are not yet exact per microbatch)."""

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
    if arch == "dense":
        assert total == b * s * flops.flops_per_token(cfg, attended_keys=s)
