"""Branch-Train-MiX's MoE layer in one process (``model.arch=btx``, ``layers/token_choice_layer.py``).

- The layer equals a float64 reference written here as loops (per token: its group's logits, the
  top-k, softmax over the k, the gated sum of those experts' SwiGLU FFNs; the load-balancing loss
  from its formula), forward and every gradient with ``aux_loss_coeff x n x L`` in the loss, for a
  modality-blind group, modality groups, padding and ``pre_softmax`` both ways.
- Uniform logits (zero router weight) give the analytic loss 1 (``load_balance``'s convention), and
  their ties go to the lowest expert numbers of each group; the loss's gradient reaches the router
  weight (with the coefficient, and not without it).
- K identical experts (copies of one FFN) give that FFN's output for any router weights with
  ``pre_softmax=false`` (1e-6), and not with ``pre_softmax=true`` (control); top-1 routing forced to
  expert i gives expert i's FFN (1e-6).
- The routing equals megatron-core's ``topk_routing_with_score_function`` on tie-free logits; padding
  and other groups' experts are never picked; megatron's dispatchers (host counts) equal the
  in-place path; the parameter names are MoMa's.
- Decoding with a KV cache equals the full forward (token choice is causal).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

from megafusion.config import Config
from megafusion.config.validate import ConfigError, validate
from megafusion.core.modality import MODALITY_NAMES
from megafusion.layers import load_balance
from megafusion.layers.masks import dense_mask
from megafusion.layers.routing import ModalityRouting, modality_routing
from megafusion.models.btx import expert_groups
from megafusion.models.param_layout import global_param_names
from tests.models.test_mot import build, small_cfg

NUM_MODALITIES = len(MODALITY_NAMES)
SEQ, BATCH, H = 16, 2, 32


def btx_cfg(experts=None, topk: int = 2, pre_softmax: bool = False, coeff: float = 0.01, untie: str = "all"):
    cfg = small_cfg("btx", untie)
    cfg.btx.experts = experts or {"mixed": 4}
    cfg.btx.topk, cfg.btx.pre_softmax, cfg.btx.aux_loss_coeff = topk, pre_softmax, coeff
    return cfg


def moe_layer(cfg, runtime):
    model = build(cfg, runtime)
    return model, model.decoder.layers[0].mlp


def inputs(seed: int, pad: int = 3, text_only: bool = False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(SEQ, BATCH, H, generator=gen)
    modality = torch.randint(NUM_MODALITIES, (BATCH, SEQ), generator=gen)
    if text_only:
        modality.zero_()
    padding = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    if pad:
        padding[1, -pad:] = True
    routing = ModalityRouting.from_modality_ids(modality, None, torch.device("cpu"), NUM_MODALITIES, padding)
    return x, routing, padding.t().reshape(-1)


def run(layer, x, routing):
    x = x.clone().requires_grad_()
    with modality_routing(routing):
        out, bias = layer(x)
    assert bias is None
    return x, out


def weights_of(model):
    params = global_param_names(model)
    router = params["decoder.layers.0.mlp.router.weight"]
    experts = [
        (
            params[f"decoder.layers.0.mlp.experts.{e}.linear_fc1.weight"],
            params[f"decoder.layers.0.mlp.experts.{e}.linear_fc2.weight"],
        )
        for e in range(router.shape[0])
    ]
    return router, experts


def ffn(fc1, fc2, x):
    gate, up = (x @ fc1.t()).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ fc2.t()


def group_of(groups, modality: int) -> list[int]:
    if groups.modality_blind:
        return list(groups.global_ids[0])
    return list(groups.global_ids[groups.names.index(MODALITY_NAMES[modality])])


def reference(x, router_w, experts, groups, modality, padding, k: int, pre_softmax: bool):
    """float64 loops: the layer's output and its load-balancing loss L (coefficient 1)."""
    tokens = x.reshape(-1, x.shape[-1])
    logits = tokens @ router_w.t()
    out = torch.zeros_like(tokens)
    group_tokens = {g: [] for g in range(len(groups.sizes))}
    counts = [0] * groups.total
    for t in range(tokens.shape[0]):
        if bool(padding[t]):
            continue
        ids = group_of(groups, int(modality[t]))
        g = 0 if groups.modality_blind else groups.names.index(MODALITY_NAMES[int(modality[t])])
        group_tokens[g].append(t)
        lg = logits[t, ids]
        soft = torch.softmax(lg, dim=0)
        key = (soft if pre_softmax else lg).detach()
        top = sorted(range(len(ids)), key=lambda j: -float(key[j]))[:k]  # stable: lower number first
        gates = soft[top] if pre_softmax else torch.softmax(lg[top], dim=0)
        for j, gate in zip(top, gates):
            counts[ids[j]] += 1
            out[t] = out[t] + gate * ffn(*experts[ids[j]], tokens[t])
    n = sum(len(v) for v in group_tokens.values())
    loss = logits.new_zeros(())
    for g, members in group_tokens.items():
        if not members:
            continue
        ids = list(groups.global_ids[g])
        probs = torch.softmax(logits[members][:, ids], dim=1).mean(dim=0)  # P_i
        f = torch.tensor([counts[i] for i in ids], dtype=logits.dtype) / (k * len(members))
        loss = loss + (len(members) / n) * len(ids) * (f * probs).sum()
    return out.view_as(x), loss, n


CASES = {
    "mixed_4_top2": ({"mixed": 4}, 2, False, False),
    "2t3i_top2_groups": ({"text": 2, "image": 3}, 2, False, False),
    "3t3i_top2_pre_softmax": ({"text": 3, "image": 3}, 2, True, False),
    "mixed_5_top3_text_only": ({"mixed": 5}, 3, False, True),
    "2t2i_top1_pre_softmax_no_image_tokens": ({"text": 2, "image": 2}, 1, True, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_layer_matches_float64_reference(runtime, case):
    experts, k, pre, text_only = CASES[case]
    coeff = 0.3  # large, so that the loss's gradient is far above rounding
    cfg = btx_cfg(experts, k, pre, coeff)
    model, layer = moe_layer(cfg, runtime)
    x, routing, pad = inputs(5, text_only=text_only)
    x, out = run(layer, x, routing)
    w = torch.randn_like(out)
    (out * w).sum().backward()  # the balancing loss joins through the gates

    router, expert_ws = weights_of(model)
    r64 = router.detach().double().requires_grad_()
    e64 = [(a.detach().double().requires_grad_(), b.detach().double().requires_grad_()) for a, b in expert_ws]
    x64 = x.detach().double().requires_grad_()
    groups = expert_groups(cfg)
    ref, loss, n = reference(x64, r64, e64, groups, routing.token_modality, pad, k, pre)
    ((ref * w.double()).sum() + coeff * n * loss).backward()

    def close(got, want, what, tol=1e-5):
        rel = ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()
        assert rel < tol, f"{case}: {what} differs by {rel:.2e}"

    close(out, ref, "output")
    assert abs(float(layer.router.last_loss) - float(loss.detach())) < 1e-6 * float(loss.detach())
    close(x.grad, x64.grad, "input gradient")
    close(router.grad, r64.grad, "router weight gradient")
    for e, ((a, b), (a64, b64)) in enumerate(zip(expert_ws, e64)):
        if a64.grad is None or a64.grad.norm() == 0:  # an expert no token picked
            assert a.grad is None or a.grad.norm() == 0, f"expert {e}"
            continue
        close(a.grad, a64.grad, f"expert {e} fc1 gradient")
        close(b.grad, b64.grad, f"expert {e} fc2 gradient")
    # padding took no expert; every routable token took exactly k of its group's
    assert sum(layer.router.dispatch_counts) == k * n
    assert out.detach().reshape(-1, H)[pad].abs().max() == 0


@pytest.mark.parametrize("experts", [{"mixed": 4}, {"text": 2, "image": 3}])
def test_uniform_logits_give_the_analytic_loss_and_ties_go_to_the_lowest_experts(runtime, experts):
    cfg = btx_cfg(experts, 2, coeff=0.01)
    model, layer = moe_layer(cfg, runtime)
    with torch.no_grad():
        layer.router.weight.zero_()
    x, routing, pad = inputs(3)
    x, out = run(layer, x, routing)
    # Uniform softmax: P_i = 1 / E_g in every group, so L = sum_g (n_g / n) E_g sum_i f_i / E_g = 1.
    assert float(layer.router.last_loss) == pytest.approx(1.0, abs=1e-7)
    # Ties: every token picks its group's two lowest expert numbers, with gates 1/2 each.
    groups = expert_groups(cfg)
    counts = layer.router.dispatch_counts
    for g, ids in enumerate(groups.global_ids):
        members = sum(
            1
            for t in range(SEQ * BATCH)
            if not bool(pad[t]) and (groups.modality_blind or int(routing.token_modality[t]) == g)
        )
        assert [counts[e] for e in ids] == [members, members] + [0] * (len(ids) - 2)
    # megatron's f_i divides by k: the "fraction of tokens" per expert (1 here for the two picked)
    # would give k = 2 times this value.
    stats = load_balance.take_stats([layer.router], cfg.model.num_layers, groups.total, torch.device("cpu"))
    summary = load_balance.summarize(stats, groups, 2)
    assert summary["moe/aux_loss"] == pytest.approx(1.0, abs=1e-7)
    assert summary["moe/share_entropy"] == pytest.approx(math.log(2), abs=1e-9)  # two of each group's experts


def test_the_balancing_loss_enters_the_backward_with_its_coefficient(runtime):
    """The router's gradient with coefficient a minus without = a x n x dL/dW (float64 reference)."""
    grads = {}
    for coeff in (0.0, 0.5):
        cfg = btx_cfg({"mixed": 4}, 2, coeff=coeff)
        model, layer = moe_layer(cfg, runtime)
        x, routing, pad = inputs(9)
        x, out = run(layer, x, routing)
        out.sum().backward()
        grads[coeff] = layer.router.weight.grad.clone()
    router, experts = weights_of(model)
    r64 = router.detach().double().requires_grad_()
    e64 = [(a.detach().double(), b.detach().double()) for a, b in experts]
    _, loss, n = reference(x.detach().double(), r64, e64, expert_groups(cfg), routing.token_modality, pad, 2, False)
    (0.5 * n * loss).backward()
    diff = (grads[0.5] - grads[0.0]).double()
    assert r64.grad.norm() > 0
    assert ((diff - r64.grad).norm() / r64.grad.norm()).item() < 1e-4


def copy_expert_0(model) -> None:
    _, experts = weights_of(model)
    with torch.no_grad():
        for a, b in experts[1:]:
            a.copy_(experts[0][0])
            b.copy_(experts[0][1])


@pytest.mark.parametrize("experts", [{"mixed": 4}, {"text": 3, "image": 3}])
def test_identical_experts_give_their_ffn_only_with_softmax_after_topk(runtime, experts):
    outputs = {}
    for pre in (False, True):
        cfg = btx_cfg(experts, 2, pre)
        model, layer = moe_layer(cfg, runtime)
        copy_expert_0(model)
        with torch.no_grad():  # random router weights, far from uniform
            layer.router.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(2))
        x, routing, pad = inputs(4)
        _, out = run(layer, x, routing)
        _, expert_ws = weights_of(model)
        want = ffn(*expert_ws[0], x.reshape(-1, H)).detach()
        want[pad] = 0  # padding takes no expert: the layer adds nothing to it
        outputs[pre] = (out.detach().reshape(-1, H) - want).abs().max().item() / want.abs().max().item()
    assert outputs[False] < 1e-6, outputs
    assert outputs[True] > 1e-2, outputs  # gates sum to less than 1: not the FFN (control)


@pytest.mark.parametrize("expert", [0, 2, 3])
def test_top1_routing_forced_to_one_expert_gives_its_ffn(runtime, expert):
    cfg = btx_cfg({"mixed": 4}, 1, pre_softmax=True)  # top-1 gates: the winner's softmax score, 1 here
    model, layer = moe_layer(cfg, runtime)
    router = layer.router
    gating = router.gating
    bias = torch.zeros(4)
    bias[expert] = 1e4  # expert `expert` wins every token's top-1
    router.gating = lambda inp: gating(inp) + bias
    x, routing, pad = inputs(6)
    _, out = run(layer, x, routing)
    _, expert_ws = weights_of(model)
    want = ffn(*expert_ws[expert], x.reshape(-1, H)).detach()
    want[pad] = 0
    got = out.detach().reshape(-1, H)
    assert (got - want).abs().max() / want.abs().max() < 1e-6
    assert router.dispatch_counts[expert] == int((~pad).sum()) and sum(router.dispatch_counts) == int((~pad).sum())


@pytest.mark.parametrize("pre_softmax", [False, True])
def test_routing_equals_megatron_topk_on_tie_free_logits(runtime, pre_softmax):
    cfg = btx_cfg({"mixed": 5}, 2, pre_softmax)
    _, layer = moe_layer(cfg, runtime)
    logits = torch.randn(40, 5, generator=torch.Generator().manual_seed(1))
    everything = torch.ones(40, 5, dtype=torch.bool)
    probs, routing_map, _ = layer.router.routing_of(logits, everything, torch.ones(40, dtype=torch.bool))
    want_probs, want_map = topk_routing_with_score_function(logits, 2, use_pre_softmax=pre_softmax)
    assert torch.equal(routing_map, want_map)
    assert torch.allclose(probs, want_probs, rtol=0, atol=1e-7)
    assert torch.allclose(probs.sum(dim=1), torch.ones(40)) != pre_softmax  # gates sum to 1 only after top-k


@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_megatron_dispatchers_equal_the_in_place_path(runtime, dispatcher):
    cfg = btx_cfg({"text": 2, "image": 2}, 2)
    cfg.btx.dispatcher = dispatcher
    model, layer = moe_layer(cfg, runtime)
    x, routing, _ = inputs(8)
    assert layer.skip_dispatch
    _, direct = run(layer, x, routing)
    layer.skip_dispatch = False  # megatron's dispatcher, EP = 1, on the router's host counts
    _, dispatched = run(layer, x, routing)
    assert torch.allclose(direct, dispatched, rtol=0, atol=1e-6)


def test_parameter_names_are_moma_s(runtime):
    model = build(btx_cfg({"text": 2, "image": 2}, 2, untie="all"), runtime)
    names = set(global_param_names(model))
    local = {n for n, _ in model.named_parameters()}
    assert "decoder.layers.0.mlp.router.weight" in names
    assert {f"decoder.layers.1.mlp.experts.{e}.linear_fc2.weight" for e in range(4)} <= names
    assert "decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight" in local
    assert "decoder.layers.0.self_attention.linear_qkv.image.weight" in names  # attention untied
    assert "decoder.layers.0.input_layernorm.text.weight" in names
    assert not any(".mlp.text." in n or ".mlp.image." in n for n in names)  # the FFN is the experts
    router = dict(model.named_parameters())["decoder.layers.0.mlp.router.weight"]
    assert router.dtype == torch.float32 and router.shape == (4, H)


def test_config_checks_name_the_key():
    cfg = Config()
    cfg.model.arch = "btx"
    cfg.btx.experts, cfg.btx.topk = {"text": 1, "image": 2}, 2
    with pytest.raises(ConfigError, match=r"btx\.topk=2 must be a whole number in \[1, 1\]"):
        validate(cfg, 1)
    cfg.btx.experts, cfg.btx.topk = {"mixed": 4}, 1
    with pytest.raises(ConfigError, match=r"btx\.topk=1 needs btx\.pre_softmax=true"):
        validate(cfg, 1)
    cfg.btx.topk = 2
    cfg.parallel.ep = 3
    with pytest.raises(ConfigError, match="not divisible by parallel.ep=3"):
        validate(cfg, 3)


def test_kv_cached_decoding_equals_the_full_forward(runtime):
    from megatron.core.inference.contexts import StaticInferenceContext

    from megafusion.models.registry import causal_routing

    cfg = btx_cfg({"text": 2, "image": 2}, 2)
    assert causal_routing(cfg)
    model = build(cfg, runtime)
    model.eval()
    gen = torch.Generator().manual_seed(7)
    prompt, new = 5, 8
    tokens = torch.randint(cfg.model.vocab_size, (1, prompt), generator=gen)
    modality = torch.randint(NUM_MODALITIES, (1, SEQ), generator=gen)

    def step(tokens, start, cache):
        s = tokens.shape[1]
        mask = dense_mask(torch.zeros(1, s, dtype=torch.int64), first_query=start)
        routing = ModalityRouting.from_modality_ids(
            modality[:, start:s], None, torch.device("cpu"), NUM_MODALITIES, causal=True
        )
        if cache is not None:
            cache.sequence_len_offset = start
        with torch.no_grad(), modality_routing(routing):
            out = model(
                tokens[:, start:],
                torch.arange(start, s)[None],
                mask,
                labels=None,
                inference_context=cache,
                runtime_gather_output=True,
            )
        return out[0, -1]

    cache = StaticInferenceContext(max_batch_size=1, max_sequence_length=SEQ)
    cache.materialize_only_last_token_logits = False
    cached = step(tokens, 0, cache)
    for _ in range(new):
        full = step(tokens, 0, None)
        assert ((cached - full).abs().max() / full.abs().max()).item() < 1e-5
        tokens = torch.cat([tokens, full.argmax().view(1, 1)], dim=1)
        cached = step(tokens, tokens.shape[1] - 1, cache)


def test_summary_of_step_statistics_by_hand():
    """Two layers of 2 text + 2 image experts, top-1 (k = 1): shares within each group over the
    layers, entropy per layer weighted by the groups' tokens, the loss a token-weighted mean."""
    cfg = btx_cfg({"text": 2, "image": 2}, 1, pre_softmax=True)
    groups = expert_groups(cfg)  # global ids: text 0, 2; image 1, 3
    # [L x n summed, c_0 .. c_3]: layer 1 text 3 / 1, image 2 / 2; layer 2 text 4 / 0, image 1 / 3.
    stats = torch.tensor([[4.0, 3, 2, 1, 2], [8.0, 4, 1, 0, 3]], dtype=torch.float64)
    got = load_balance.summarize(stats, groups, 1)
    assert got["moe/aux_loss"] == pytest.approx(12 / 16)  # sum of L x n over sum of n (8 tokens a layer)
    assert got["moe/share/text.0"] == pytest.approx(7 / 8) and got["moe/share/text.1"] == pytest.approx(1 / 8)
    assert got["moe/share/image.0"] == pytest.approx(3 / 8) and got["moe/share/image.1"] == pytest.approx(5 / 8)

    def h(*p):
        return -sum(x * math.log(x) for x in p if x)

    layer1 = (4 * h(3 / 4, 1 / 4) + 4 * h(1 / 2, 1 / 2)) / 8
    layer2 = (4 * h(1.0, 0.0) + 4 * h(1 / 4, 3 / 4)) / 8
    assert got["moe/share_entropy"] == pytest.approx((layer1 + layer2) / 2)
    assert load_balance.summarize(torch.zeros(2, 5, dtype=torch.float64), groups, 1) == {}


def test_evaluation_records_nothing(runtime):
    cfg = btx_cfg({"mixed": 4}, 2)
    _, layer = moe_layer(cfg, runtime)
    layer.eval()
    x, routing, _ = inputs(2)
    with torch.no_grad():
        run(layer, x, routing)
    assert layer.router.balance_stats is None and layer.router.min_margin is None
    layer.train()
    run(layer, x, routing)
    assert layer.router.balance_stats is not None and layer.router.min_margin is not None
