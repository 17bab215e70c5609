"""MoMa's FLOPs and parameters: the accounting against FlopCounterMode and the built model.

- FlopCounterMode (SDPA's math backend, which counts attention mask-blind, as in
  ``tests/models/test_mot.py``) around a real forward + backward equals ``flop_counter_flops`` and
  ``batch_flops(attention="full")`` exactly: every token's attention projections, router and output
  layer, and each group's ``E_g`` experts on ``k_g`` tokens each, which hooks on the routers
  confirm from the routing maps the model really used. Cases: 4t4i at the default capacity (with a
  ``ceil`` that rounds up), capacity 1 (every expert takes every token), the modality-blind group
  with padding, and a text-only microbatch with padding.
- The per-modality split sums to the total; padding is charged no expert; the nominal per-token
  count is exact where every ``c_g * n_g`` is whole.
- Parameter counts: total = the model's parameter numels (router included), and the active
  parameters are what a token of each modality meets.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from megafusion.accounting import flops as F
from megafusion.accounting import params as P
from megafusion.accounting import recompute as R
from megafusion.accounting.report import flops_report, summary
from megafusion.core.modality import MODALITY_NAMES, PAD_DOCUMENT_ID, Modality
from megafusion.layers.expert_groups import ExpertGroups
from megafusion.layers.masks import dense_mask
from megafusion.layers.routing import routing_for
from megafusion.models.param_layout import global_param_names
from tests.models.test_mot import batch_with_modalities, build, lm_loss, small_cfg

PASSES = 3  # forward + input and weight gradients, for every matmul (router and experts too)


def moma_cfg(experts, capacity=None, untie: str = "all"):
    cfg = small_cfg("moma", untie)
    cfg.moe.experts, cfg.moe.capacity = experts, capacity
    return cfg


def moma_batch(cfg, modalities: str, padding: int):
    """The synthetic microbatch with random (seeded) or text-only modalities, the second row ending
    in ``padding`` tokens (text, ``PAD_DOCUMENT_ID``: what the packer writes)."""
    b, s = 2, cfg.model.seq_length
    ids = torch.zeros(b, s, dtype=torch.int64) if modalities == "text" else None
    batch = batch_with_modalities(cfg, seed=11, modality_ids=ids)
    if padding:
        batch["document_ids"][1, -padding:] = PAD_DOCUMENT_ID
        batch["modality_ids"][1, -padding:] = int(Modality.TEXT)
    return batch


def measure(model, batch) -> tuple[FlopCounterMode, list[int], list[int]]:
    """FlopCounterMode around forward + backward, and per layer the router's input rows and the
    (token, expert) pairs its routing map chose."""
    rows, pairs = [], []

    def record(module, args, out):
        rows.append(args[0].reshape(-1, args[0].shape[-1]).shape[0])
        pairs.append(int(out[1].sum()))

    hooks = [layer.mlp.router.register_forward_hook(record) for layer in model.decoder.layers]
    try:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            with routing_for(batch, torch.device("cpu")):
                logits = model(batch["tokens"], batch["position_ids"], dense_mask(batch["document_ids"]), labels=None)
            lm_loss(logits, batch).backward()
    finally:
        for hook in hooks:
            hook.remove()
    return counter, rows, pairs


CASES = {
    "4t4i": ({"text": 4, "image": 4}, None, "random", 0),
    "4t4i_capacity_1": ({"text": 4, "image": 4}, {"text": 1.0, "image": 1.0}, "random", 0),
    "mixed_4_padding": ({"mixed": 4}, None, "random", 3),
    "2t2i_text_only_padding": ({"text": 2, "image": 2}, None, "text", 5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_moma_flops_equal_flop_counter(runtime, case):
    experts, capacity, modalities, padding = CASES[case]
    cfg = moma_cfg(experts, capacity)
    model = build(cfg, runtime)
    batch = moma_batch(cfg, modalities, padding)
    doc, mod = batch["document_ids"], batch["modality_ids"]
    b, s = doc.shape
    counter, rows, pairs = measure(model, batch)
    measured = counter.get_total_flops()

    assert measured == F.flop_counter_flops(cfg, b, s, "math", document_ids=doc, modality_ids=mod)
    stats = F.batch_flops(cfg, doc, mod, attention="full")
    assert measured == stats["total"]
    by_op = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    assert by_op["aten.mm"] == stats["dense"] + stats["experts"]
    assert by_op["aten.bmm"] == stats["attention"]

    # Independently of the formulas: the routers ran on every token, padding included, and the
    # experts on exactly the (token, expert) pairs the routing maps chose.
    h, f, L = cfg.model.hidden_size, cfg.model.ffn_hidden_size, cfg.model.num_layers
    groups = ExpertGroups.from_config(cfg.moe)
    mlp = h * 2 * f + f * h  # one expert's SwiGLU weights
    assert rows == [b * s] * L
    assert stats["experts"] == 2 * PASSES * mlp * sum(pairs)
    # Every token's own: MoT's (attention as in MoT) without its FFN, plus the router.
    router = 2 * PASSES * h * groups.total * L
    assert stats["dense"] == b * s * (F.dense_flops_per_token(small_cfg("mot")) - 2 * PASSES * L * mlp + router)

    # Routable tokens leave the padding out; the split by modality adds up.
    routable = stats["routable_tokens_per_modality"]
    assert sum(routable.values()) == b * s - padding
    assert routable["text"] == int(((mod == int(Modality.TEXT)) & (doc != PAD_DOCUMENT_ID)).sum())
    assert sum(stats["per_modality"].values()) == stats["total"]
    assert sum(stats["experts_per_modality"].values()) == stats["experts"]
    per_expert_token = 2 * PASSES * L * mlp
    if groups.modality_blind:  # shared in proportion to routable tokens, within one FLOP
        n = sum(routable.values())
        for name in MODALITY_NAMES:
            assert abs(stats["experts_per_modality"][name] - stats["experts"] * routable[name] / n) < 1
    else:
        for g, name in enumerate(groups.names):
            k = groups.tokens_per_expert(g, routable[name])
            assert stats["experts_per_modality"][name] == groups.sizes[g] * k * per_expert_token
    if case == "4t4i":  # a group whose ceil(n / E) rounds up: the experts take more than n pairs
        assert sum(pairs) > L * (b * s)
    if case == "4t4i_capacity_1":
        assert sum(pairs) == L * sum(groups.sizes[g] * routable[name] for g, name in enumerate(groups.names))
    if modalities == "text":
        assert stats["experts_per_modality"]["image"] == 0 and routable["image"] == 0


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_moma_recomputed_forward_matches_flop_counter(runtime, mode):
    """``train.recompute``: the backward (outside the routing context) runs the layers' forward again,
    with the routing the forward saw; FlopCounterMode adds exactly :func:`recompute_flops`: the
    attention (selective), or every layer's projections, router and chosen experts too (full)."""
    cfg = moma_cfg({"text": 4, "image": 4})
    batch = moma_batch(cfg, "random", 3)
    doc, mod = batch["document_ids"], batch["modality_ids"]
    b, s = doc.shape
    plain, _, plain_pairs = measure(build(cfg, runtime), batch)
    cfg.train.recompute = mode
    counter, rows, pairs = measure(build(cfg, runtime), batch)
    L = cfg.model.num_layers
    extra = R.flop_counter_recompute_flops(cfg, doc, mod, "math")
    assert counter.get_total_flops() == plain.get_total_flops() + extra
    forward = F.batch_flops(cfg, doc, mod, attention="full", forward_only=True)
    output = 2 * b * s * P._matmul_parts(cfg)["output"]
    assert extra == (forward["attention"] if mode == "selective" else forward["total"] - output)
    # full: every router ran twice per layer (forward, recomputed forward) and chose the same experts
    assert rows == [b * s] * L * (2 if mode == "full" else 1)
    assert pairs == plain_pairs * (2 if mode == "full" else 1)


def test_nominal_per_token_flops_are_exact_when_every_group_divides():
    """16 text + 16 image tokens over 4 + 4 experts: k = 4 each, one expert per token exactly."""
    cfg = moma_cfg({"text": 4, "image": 4})
    s = cfg.model.seq_length
    doc = torch.zeros(2, s, dtype=torch.int64)
    mod = torch.tensor([[0] * s, [1] * s])
    stats = F.batch_flops(cfg, doc, mod, attention="full")
    assert stats["total"] == 2 * s * F.flops_per_token(cfg, attended_keys=s)
    assert F.dense_flops_per_token(cfg) == 6 * P.parameter_counts(cfg)["matmul"]
    assert F.flops_per_token(cfg, s, forward_only=True) * 3 == F.flops_per_token(cfg, s)
    # Padding costs the router and the rest, never an expert: 12 routable text tokens, k = 3.
    per_expert_token = PASSES * 2 * cfg.model.num_layers * (32 * 96 + 48 * 32)
    padded = doc.clone()
    padded[0, -4:] = PAD_DOCUMENT_ID
    fewer = F.batch_flops(cfg, padded, mod, attention="full")
    assert fewer["dense"] == stats["dense"]
    assert fewer["experts"] == stats["experts"] - 4 * per_expert_token
    # Groups that meet different numbers of experts per token need the modality.
    uneven = moma_cfg({"text": 4, "image": 4}, {"text": 0.5, "image": 0.25})
    with pytest.raises(ValueError, match="pass modality"):
        F.dense_flops_per_token(uneven)
    text, image = (F.dense_flops_per_token(uneven, modality=m) for m in Modality)
    assert text - image == per_expert_token  # one more expert FFN per token


PARAM_CASES = {
    "4t4i_untied": ({"text": 4, "image": 4}, None, "all"),
    "mixed_8_tied": ({"mixed": 8}, None, ""),
    "3t2i_uneven_capacity": ({"text": 3, "image": 2}, {"text": 1.0, "image": 0.5}, "attention"),
}


@pytest.mark.parametrize("case", list(PARAM_CASES))
def test_moma_parameter_counts_match_the_model(runtime, case):
    experts, capacity, untie = PARAM_CASES[case]
    cfg = moma_cfg(experts, capacity, untie)
    named = global_param_names(build(cfg, runtime))
    counts = P.parameter_counts(cfg)
    assert counts["total"] == sum(p.numel() for p in named.values())
    assert counts["router"] == sum(p.numel() for n, p in named.items() if n.endswith("mlp.router.weight"))
    assert counts["experts"] == sum(p.numel() for n, p in named.items() if ".mlp.experts." in n)
    assert counts["non_embedding"] == counts["total"] - counts["embedding"] - counts["output_layer"]
    # Active: every weight but the other modality's copies and the experts, plus the experts a
    # token meets at the nominal capacity (E_g * c_g of its group's).
    L = cfg.model.num_layers
    expert = sum(p.numel() for n, p in named.items() if ".layers.0.mlp.experts.0." in n)  # one, one layer
    met = P.experts_per_token(cfg)
    for name in MODALITY_NAMES:
        other = [o for o in MODALITY_NAMES if o != name]
        own = sum(
            p.numel() for n, p in named.items() if ".mlp.experts." not in n and not any(f".{o}." in n for o in other)
        )
        assert counts[f"active/{name}"] == round(own + L * met[name] * expert), name
    assert counts["active"] == max(counts[f"active/{name}"] for name in MODALITY_NAMES)
    assert counts["active"] < counts["total"]
    if capacity is None:
        assert set(met.values()) == {1}


def test_report_shows_total_and_active_parameters():
    cfg = moma_cfg({"text": 3, "image": 2}, {"text": 1.0, "image": 0.5})
    counts = P.parameter_counts(cfg)
    text = summary(cfg)
    for key in ("total", "experts", "router", "active"):
        assert f"{counts[key]:,}" in text, key
    assert "every layer: 5 experts (text 3, image 2)" in text and "text 3, image 1" in text
    assert "dense matmuls, text" in text and "dense matmuls, image" in text  # the groups' differ
    assert "experts" not in summary(small_cfg("mot")).split("parameters:")[0]
    batch = moma_batch(cfg, "random", 3)
    report = flops_report(cfg, batch)
    assert "3 padding, never routed" in report and "experts " in report


@pytest.mark.parametrize("forward_only", [False, True])
def test_aux_router_flops_and_parameters_equal_the_model(runtime, forward_only):
    """``moe.aux_router``: FlopCounterMode (forward + backward, or forward only) equals
    ``batch_flops``, and the built model's auxiliary weights equal ``parameter_counts``. The
    auxiliary loss joins the backward through the layer outputs, as in training."""
    from megafusion.layers.aux_router import aux_routers_of

    cfg = moma_cfg({"text": 2, "image": 2})
    cfg.moe.aux_router = True
    model = build(cfg, runtime)
    batch = moma_batch(cfg, "random", 3)
    doc, mod = batch["document_ids"], batch["modality_ids"]
    if forward_only:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            with routing_for(batch, torch.device("cpu")):
                model(batch["tokens"], batch["position_ids"], dense_mask(doc), labels=None)
    else:
        counter = measure(model, batch)[0]
    stats = F.batch_flops(cfg, doc, mod, attention="full", forward_only=forward_only)
    assert counter.get_total_flops() == stats["total"]
    # Control: the same model without auxiliary routers counts less, by the formula's share.
    h, L, E = cfg.model.hidden_size, cfg.model.num_layers, 4
    first, second = h * (h // 2), (h // 2) * E
    per_token = 2 * L * ((first + second) if forward_only else (2 * first + 3 * second))
    plain = moma_cfg({"text": 2, "image": 2})
    without = F.batch_flops(plain, doc, mod, attention="full", forward_only=forward_only)
    assert stats["total"] - without["total"] == per_token * doc.numel()
    counts = P.parameter_counts(cfg)
    named = global_param_names(model)
    aux = sum(p.numel() for n, p in named.items() if ".aux_router." in n)
    assert counts["aux_router"] == aux == sum(p.numel() for r in aux_routers_of([model]) for p in r.parameters())
    assert counts["total"] == sum(p.numel() for p in named.values())
    assert counts["total"] - P.parameter_counts(plain)["total"] == aux == L * (first + second)
    cfg.train.trainable = "aux_routers"
    assert P.parameter_counts(cfg)["trainable"] == aux
