"""MoMa in one process: one layer against a float64 loop reference, the router's invariants, isolation.

- The MoE layer (megatron's ``MoELayer`` with megafusion's expert-choice router) equals a float64
  reference written here as plain loops (per group, per expert: rank the group's tokens, take the
  top ``k``, add ``sigmoid(logit) * FFN(x)``), forward and every gradient, for 4t4i, a group with
  no tokens, a capacity that selects every token and the modality-blind MoE.
- Router: each expert takes exactly ``k_e`` tokens, all of its own modality, never padding; ties
  go to the earlier token; tokens no expert chose get nothing from the FFN.
- Perturbing the image experts leaves a text-only sequence's logits bit-identical.
- Router noise (``moe.router_noise``) is keyed by each row's sample number and the layer: the same
  for a sample at any position, in any microbatch, on any call; the selection ranks the noisy
  scores; a noisy run resumed at step 2 equals the straight run bit for bit.
- The router's smallest selection margin (``moe/min_margin``) equals one computed by loops.
- Building MoMa prints nothing from megatron (its "Unknown MLP type" warning).
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from megafusion.core.modality import MODALITY_NAMES, Modality
from megafusion.layers.expert_groups import ExpertGroups
from megafusion.layers.routing import ModalityRouting, modality_routing
from megafusion.models.param_layout import global_param_names
from tests.helpers import ROOT
from tests.models.test_mot import batch_with_modalities, build, forward, small_cfg

NUM_MODALITIES = len(MODALITY_NAMES)
SEQ, BATCH = 16, 2


def moma_cfg(experts=None, capacity=None, untie: str = "all"):
    cfg = small_cfg("moma", untie)
    cfg.moe.experts = experts or {"text": 4, "image": 4}
    cfg.moe.capacity = capacity
    return cfg


def moe_layer(cfg, runtime, layer: int = 0):
    model = build(cfg, runtime)
    return model, model.decoder.layers[layer].mlp


def layer_inputs(seed: int, modality=None, padding=None, sample_ids=None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(SEQ, BATCH, 32, generator=gen)
    if modality is None:
        modality = torch.randint(NUM_MODALITIES, (BATCH, SEQ), generator=gen)
    cpu = torch.device("cpu")
    return x, ModalityRouting.from_modality_ids(modality, None, cpu, NUM_MODALITIES, padding, sample_ids)


def reference_moe(x, router_w, experts, groups: ExpertGroups, modality, padding, capacity):
    """float64 loops: ``out[t] = sum over experts e that chose t of sigmoid(logit[t, e]) FFN_e(x[t])``."""
    tokens = x.reshape(-1, x.shape[-1])
    logits = tokens @ router_w.t()
    out = torch.zeros_like(tokens)
    for g, ids in enumerate(groups.global_ids):
        members = [
            t
            for t in range(tokens.shape[0])
            if (groups.modality_blind or int(modality[t]) == g) and not bool(padding[t])
        ]
        c = capacity.get(groups.names[g]) if capacity else None
        k = math.ceil(len(members) / len(ids)) if c is None else math.ceil(round(c * len(members), 9))
        for e in ids:
            ranked = sorted(members, key=lambda t: -float(logits[t, e]))  # stable: earlier token first
            fc1, fc2 = experts[e]
            for t in ranked[:k]:
                gate, up = (fc1 @ tokens[t]).chunk(2)
                out[t] = out[t] + torch.sigmoid(logits[t, e]) * (fc2 @ (F.silu(gate) * up))
    return out.view_as(x)


def run_layer(layer, x, routing):
    x = x.clone().requires_grad_()
    with modality_routing(routing):
        out, bias = layer(x)
    assert bias is None
    return x, out


def layer_weights(model):
    params = global_param_names(model)
    router = params["decoder.layers.0.mlp.router.weight"]
    n = router.shape[0]
    experts = [
        (
            params[f"decoder.layers.0.mlp.experts.{e}.linear_fc1.weight"],
            params[f"decoder.layers.0.mlp.experts.{e}.linear_fc2.weight"],
        )
        for e in range(n)
    ]
    return router, experts


CASES = {
    "4t4i": ({"text": 4, "image": 4}, None, "random"),
    "3t1i_every_token": ({"text": 3, "image": 1}, {"text": 1.0, "image": 1.0}, "random"),
    "2t2i_no_image_tokens": ({"text": 2, "image": 2}, {"text": 0.3, "image": 0.5}, "text_only"),
    "mixed_4": ({"mixed": 4}, None, "random"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_moma_layer_matches_float64_loop_reference(runtime, case):
    experts, capacity, modalities = CASES[case]
    cfg = moma_cfg(experts, capacity)
    model, layer = moe_layer(cfg, runtime)
    modality = torch.zeros(BATCH, SEQ, dtype=torch.int64) if modalities == "text_only" else None
    padding = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    padding[1, -3:] = True  # the second row ends in padding, which no expert may take
    x, routing = layer_inputs(5, modality, padding)
    x, out = run_layer(layer, x, routing)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()

    router, expert_ws = layer_weights(model)
    ref_router = router.detach().double().requires_grad_()
    ref_experts = [(a.detach().double().requires_grad_(), b.detach().double().requires_grad_()) for a, b in expert_ws]
    ref_x = x.detach().double().requires_grad_()
    groups = ExpertGroups.from_config(cfg.moe)
    pad_flat = padding.t().reshape(-1)
    ref = reference_moe(ref_x, ref_router, ref_experts, groups, routing.token_modality, pad_flat, capacity)
    (ref * weights.double()).sum().backward()

    def close(got, want, what):
        rel = ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()
        assert rel < 1e-5, f"{case}: {what} differs by {rel:.2e}"

    close(out, ref, "output")
    close(x.grad, ref_x.grad, "input gradient")
    close(router.grad, ref_router.grad, "router weight gradient")
    assert ref_router.grad.norm() > 0
    for e, ((fc1, fc2), (r1, r2)) in enumerate(zip(expert_ws, ref_experts)):
        if r1.grad is None:  # an expert of a group with no tokens: no gradient in either
            assert fc1.grad is None or fc1.grad.abs().max() == 0, f"{case}: expert {e} got a gradient"
            continue
        close(fc1.grad, r1.grad, f"expert {e} fc1 gradient")
        close(fc2.grad, r2.grad, f"expert {e} fc2 gradient")
    if modalities == "text_only":  # the image experts saw nothing, and nothing broke
        image = [e for e in range(groups.total) if groups.expert_name(e).startswith("image")]
        assert image and all(ref_experts[e][0].grad is None for e in image)


def test_router_choices_per_expert(runtime):
    cfg = moma_cfg({"text": 3, "image": 2}, {"text": 0.4, "image": 0.7})
    _, layer = moe_layer(cfg, runtime)
    padding = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    padding[0, -4:] = True
    x, routing = layer_inputs(7, padding=padding)
    with modality_routing(routing):
        probs, routing_map = layer.router(x)
    groups = ExpertGroups.from_config(cfg.moe)
    pad_flat = padding.t().reshape(-1)
    assert not routing_map[pad_flat].any(), "padding was routed to an expert"
    for g, ids in enumerate(groups.global_ids):
        n = routing.routable(g)
        k = groups.tokens_per_expert(g, n)
        assert k == math.ceil(round(groups.capacities[g] * n, 9))
        for e in ids:
            chosen = routing_map[:, e].nonzero().flatten()
            assert chosen.numel() == k, f"expert {e} took {chosen.numel()} tokens, not k={k}"
            assert (routing.token_modality[chosen] == g).all(), f"expert {e} took another modality's token"
    # Gates: sigmoid of the logits where chosen, 0 elsewhere.
    logits = x.reshape(-1, x.shape[-1]) @ layer.router.weight.t()
    torch.testing.assert_close(probs, torch.sigmoid(logits) * routing_map, rtol=0, atol=1e-6)


def test_ties_go_to_the_earlier_token(runtime):
    """A zero router (an upcycled model's start) scores every token alike: each expert takes its
    group's first tokens in megatron's order (position-major), on any device and layout."""
    cfg = moma_cfg({"text": 2, "image": 2})
    _, layer = moe_layer(cfg, runtime)
    torch.nn.init.zeros_(layer.router.weight)
    x, routing = layer_inputs(3)
    with modality_routing(routing):
        _, routing_map = layer.router(x)
    groups = ExpertGroups.from_config(cfg.moe)
    for g, ids in enumerate(groups.global_ids):
        members = (routing.token_modality == g).nonzero().flatten()
        k = groups.tokens_per_expert(g, members.numel())
        for e in ids:
            assert torch.equal(routing_map[:, e].nonzero().flatten(), members[:k])


def test_unchosen_tokens_get_nothing_from_the_ffn(runtime):
    cfg = moma_cfg({"text": 2, "image": 2}, {"text": 0.25, "image": 0.25})
    _, layer = moe_layer(cfg, runtime)
    x, routing = layer_inputs(9)
    with modality_routing(routing):
        _, routing_map = layer.router(x)
        out, _ = layer(x)
    unchosen = ~routing_map.any(dim=1)
    assert unchosen.sum() > 0 and (~unchosen).sum() > 0
    flat = out.reshape(-1, out.shape[-1])
    assert flat[unchosen].abs().max() == 0
    assert flat[~unchosen].abs().min(dim=1).values.gt(0).all()


def test_image_experts_cannot_touch_a_text_only_sequence(runtime):
    cfg = moma_cfg({"text": 2, "image": 2}, untie="all")
    cfg.model.num_layers = 3
    model = build(cfg, runtime)
    batch = batch_with_modalities(cfg, modality_ids=torch.full((2, cfg.model.seq_length), int(Modality.TEXT)))
    with torch.no_grad():
        before = forward(model, batch)
        groups = ExpertGroups.from_config(cfg.moe)
        changed = 0
        for name, p in global_param_names(model).items():
            is_image_expert = ".mlp.experts." in name and groups.expert_name(int(name.split(".")[5])).startswith(
                "image"
            )
            if is_image_expert or ".image." in name:
                p.add_(torch.randn_like(p))
                changed += 1
        assert changed >= 3 * (2 * 2 + 1)
        after = forward(model, batch)
    assert torch.equal(before, after)


def test_generation_refuses_expert_choice_routing():
    """One decoded token would be taken by every expert of its group: refused, not silently wrong."""
    from megafusion.inference.generate import Generator

    with pytest.raises(ValueError, match="its routing is not causal"):
        Generator(moma_cfg(), None, None, None)


def noisy_router(runtime, layer: int = 0):
    cfg = moma_cfg({"text": 2, "image": 2})
    cfg.moe.router_noise = 1.0
    model, _ = moe_layer(cfg, runtime)
    return model, model.decoder.layers[layer].mlp.router


def router_noise(router, sample_ids, seq: int = SEQ):
    """The noise ``router`` adds for rows ``sample_ids``, as ``[seq, rows, experts]``."""
    modality = torch.zeros(len(sample_ids), seq, dtype=torch.int64)
    routing = ModalityRouting.from_modality_ids(modality, None, torch.device("cpu"), NUM_MODALITIES, None, sample_ids)
    logits = torch.zeros(seq * len(sample_ids), router.weight.shape[0])
    return router._logistic_noise(logits, routing).view(seq, len(sample_ids), -1)


def test_router_noise_is_keyed_by_the_sample_and_layer(runtime):
    """Not by how often or where the router saw a sample: the same rows in another order, alone, or
    again (recomputation, another microbatch) get the same noise; other samples and layers other."""
    model, router = noisy_router(runtime)
    pair = router_noise(router, (5, 9))
    assert torch.equal(pair, router_noise(router, (5, 9)))  # a second call: the same
    swapped = router_noise(router, (9, 5))
    assert torch.equal(pair[:, 0], swapped[:, 1]) and torch.equal(pair[:, 1], swapped[:, 0])
    assert torch.equal(pair[:, 1], router_noise(router, (9,))[:, 0])
    assert not torch.equal(pair[:, 0], pair[:, 1])
    assert not torch.equal(pair[:, 0], router_noise(model.decoder.layers[1].mlp.router, (5,))[:, 0])
    # G' - G'' of standard Gumbels is standard logistic: mean 0, std pi / sqrt(3) = 1.814
    many = router_noise(router, (1, 2, 3, 4), seq=1024).flatten()  # 16384 draws
    assert abs(many.mean().item()) < 0.05 and abs(many.std().item() - math.pi / math.sqrt(3)) < 0.05
    assert many.isfinite().all()


def test_noisy_selection_ranks_the_noisy_scores_in_training_only(runtime):
    """A zero router scores every token alike: with noise, each expert takes its group's tokens with
    the highest noise (keyed by the row's sample); in evaluation, without noise, the first ones."""
    _, router = noisy_router(runtime)
    torch.nn.init.zeros_(router.weight)
    x, routing = layer_inputs(4, sample_ids=(17, 3))
    noise = router_noise(router, (17, 3)).reshape(SEQ * BATCH, -1)
    groups = ExpertGroups.from_config(moma_cfg({"text": 2, "image": 2}).moe)
    for training in (True, False):
        router.train(training)
        with modality_routing(routing):
            _, routing_map = router(x)
        for g, ids in enumerate(groups.global_ids):
            members = (routing.token_modality == g).nonzero().flatten()
            k = groups.tokens_per_expert(g, members.numel())
            for e in ids:
                want = members[noise[members, e].argsort(descending=True)[:k]] if training else members[:k]
                assert torch.equal(routing_map[:, e].nonzero().flatten(), want.sort().values), (training, e)
    router.train()


def test_router_keeps_its_smallest_selection_margin(runtime):
    """The k-th chosen minus the best unchosen score below it of each expert, minimum over experts,
    groups and calls (fp32, as selected), against loops; exact ties (identical tokens: here two rows
    alike) are left out; :func:`take_min_margin` hands it over and starts again; evaluation records
    none."""
    from megafusion.layers.expert_choice_router import take_min_margin

    cfg = moma_cfg({"text": 3, "image": 2}, {"text": 0.4, "image": 0.7})
    _, layer = moe_layer(cfg, runtime)
    router, groups = layer.router, ExpertGroups.from_config(cfg.moe)
    padding = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    padding[0, -4:] = True
    want = math.inf
    for seed in (7, 8):
        x, routing = layer_inputs(seed, padding=padding)
        x[:, 1] = x[:, 0]  # the second row repeats the first: exact ties at every position
        with modality_routing(routing):
            router(x)
        logits = router.gating(x.reshape(-1, x.shape[-1])).detach()
        real = ~padding.t().reshape(-1)
        for g, ids in enumerate(groups.global_ids):
            members = [t for t in range(logits.shape[0]) if real[t] and routing.token_modality[t] == g]
            k = groups.tokens_per_expert(g, len(members))
            for e in ids:
                scores = sorted((float(logits[t, e]) for t in members), reverse=True)
                below = [v for v in scores[k:] if v < scores[k - 1]]  # an exact tie is left out
                want = min(want, scores[k - 1] - max(below, default=-math.inf))
    assert 0 < want < math.inf
    assert take_min_margin([router], torch.device("cpu")).item() == pytest.approx(want, rel=0, abs=0)
    assert take_min_margin([router], torch.device("cpu")).item() == math.inf  # started again
    router.eval()
    with modality_routing(routing):
        router(x)
    router.train()
    assert router.min_margin is None


def test_a_moma_build_prints_nothing_from_megatron(runtime, capfd, caplog):
    """megatron's TransformerLayer warns "Unknown MLP type ... Using default kwargs" for each layer
    whose MLP is a ModuleSpec of a class it does not list; MoMa's FFN is a class (none)."""
    capfd.readouterr()
    with caplog.at_level(logging.DEBUG, logger="megatron"):
        build(moma_cfg(), runtime)
    out, err = capfd.readouterr()
    assert "Unknown MLP type" not in out + err + caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_noisy_moma_resumed_at_step_2_is_the_straight_run_bit_for_bit(runtime, tmp_path):
    """A run resumed from its step-2 checkpoint continues with the same noise: the straight run's
    losses, bit for bit (one process, the same machine)."""
    from megafusion.config import load_config, validate
    from megafusion.training.trainer import train

    common = [
        *("model.arch=moma", "moe.experts={text: 2, image: 2}", "moe.router_noise=1.0", "model.num_layers=2"),
        *("train.steps=4", "train.global_batch_size=4", "eval.interval=0", "checkpoint.interval=2"),
        f"checkpoint.dir={tmp_path / 'ckpt'}",
    ]

    def run(tag: str, *overrides: str) -> list[float]:
        cfg = load_config(
            str(ROOT / "tests/configs/mixed_small.yaml"), [*common, f"logging.out_dir={tmp_path / tag}", *overrides]
        )
        validate(cfg, 1)
        return train(cfg, runtime)

    straight = run("straight", "checkpoint.save=true")
    resumed = run("resumed", "checkpoint.save=false", "checkpoint.load_step=2")
    assert len(straight) == 4 and len(resumed) == 2
    assert resumed == straight[2:], (resumed, straight[2:])
