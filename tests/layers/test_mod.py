"""Mixture-of-Depths layers in one process, against independent references.

- Capacity 1 with the router weight held at 1 gives the plain model's logits bit for bit
  (dense, MoT, MoMa); control: the learnt weight (< 1) changes them.
- Unpicked tokens leave a MoD layer bit for bit; picked ones change (control).
- A float64 reference written here (full sequence, unpicked keys masked, every token's own
  RoPE position, outputs taken at picked rows, ``x + w (f(x) - x)``) equals the gathered layers,
  forward and every gradient to 1e-12, over three layers (two MoD) with documents and padding,
  both splits; controls: the reference with truncated RoPE positions (0..k-1) or a scaled
  residual (``w * f(x)``) is far from the model.
- Exactly ``k = floor(c n)`` picked per row (and per modality with ``split=per_modality``), ties
  to the earlier token, padding never, for non-integer ``c n``, checked against a sorted() loop.
- The router weight gets a gradient; MoMa + MoD layers hold distinct expert modules.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megafusion.core.modality import MODALITY_NAMES
from megafusion.layers.masks import dense_mask
from megafusion.layers.mod_layer import ModSettings, Selection, row_capacities, select
from megafusion.layers.routing import ModalityRouting, modality_routing, routing_for
from megafusion.models.param_layout import global_param_names
from tests.models.test_dense_reference import apply, rms
from tests.models.test_mot import batch_with_modalities, build, small_cfg

NUM_MODALITIES = len(MODALITY_NAMES)


def mod_cfg(arch="dense", capacity=0.5, every=1, split="global", layers=2, untie="all"):
    cfg = small_cfg(arch, untie)
    cfg.model.num_layers = layers
    cfg.mod.capacity, cfg.mod.every, cfg.mod.split = capacity, every, split
    if arch == "moma":
        cfg.moe.experts = {"text": 2, "image": 2}
    return cfg


def padded_batch(cfg, seed=11):
    batch = batch_with_modalities(cfg, seed)
    batch["document_ids"][1, -3:] = -1  # the second row ends in padding, which MoD never picks
    return batch


def run(model, batch):
    with routing_for(batch, torch.device("cpu")):
        return model(batch["tokens"], batch["position_ids"], dense_mask(batch["document_ids"]), labels=None)


def hold_weight_at_one(model):
    for layer in model.decoder.layers:
        layer.router_logits = lambda x: torch.full(x.shape[:2], 100.0)  # sigmoid(100) == 1.0 in fp32


@pytest.mark.parametrize("arch", ["dense", "mot", "moma"])
def test_capacity_one_weight_one_equals_plain_block(runtime, arch):
    plain_cfg = mod_cfg(arch, capacity=None)
    plain, mod = build(plain_cfg, runtime), build(mod_cfg(arch, capacity=1.0), runtime)
    batch = batch_with_modalities(plain_cfg)  # no padding: capacity 1 picks every token
    want = run(plain, batch)
    learnt = run(mod, batch)
    assert not torch.equal(learnt, want)  # control: the router's weight (< 1) scales the update
    hold_weight_at_one(mod)
    assert torch.equal(run(mod, batch), want)


def one_layer(cfg, runtime, index=0):
    model = build(cfg, runtime)
    return model, model.decoder.layers[index]


def rotary(model, s, dtype=torch.float32):
    return model.rotary_pos_emb(s).to(dtype)


def layer_call(layer, x, batch, rot, mask=None):
    routing = ModalityRouting.from_modality_ids(
        batch["modality_ids"], None, torch.device("cpu"), NUM_MODALITIES, batch["document_ids"] == -1
    )
    mask = dense_mask(batch["document_ids"]) if mask is None else mask
    with modality_routing(routing):
        out, _ = layer(hidden_states=x, attention_mask=mask, rotary_pos_emb=rot)
    return out, routing


@pytest.mark.parametrize("arch", ["dense", "moma"])
def test_unpicked_tokens_pass_through_bit_for_bit(runtime, arch):
    cfg = mod_cfg(arch, capacity=0.3)
    model, layer = one_layer(cfg, runtime)
    batch = padded_batch(cfg)
    x = torch.randn(16, 2, 32, generator=torch.Generator().manual_seed(1))
    out, routing = layer_call(layer, x, batch, rotary(model, 16))
    sel = layer._select(layer.router_logits(x).detach(), routing, 16, 2, 1)
    picked = torch.zeros(16, 2, dtype=torch.bool)
    for r in range(2):
        picked[sel.positions[: sel.picked[r], r], r] = True
    assert torch.equal(out[~picked], x[~picked])
    assert (out[picked] != x[picked]).all(dim=-1).all()  # control: every picked token changed


# --- selection -------------------------------------------------------------------------------


def reference_picks(scores, member, k):
    """sorted() by (-score, position) among members: the first k."""
    ranked = sorted((i for i in range(len(scores)) if member[i]), key=lambda i: (-float(scores[i]), i))
    return sorted(ranked[:k])


@pytest.mark.parametrize("capacity", [0.125, 0.3, 0.5, 2 / 3, 0.29, 1.0])
@pytest.mark.parametrize("split", ["global", "per_modality"])
def test_exactly_k_picked_ties_to_the_earlier_token(capacity, split):
    gen = torch.Generator().manual_seed(int(capacity * 1000))
    b, s = 3, 100
    scores = torch.randint(0, 4, (b, s), generator=gen).float()  # many ties
    modality = torch.randint(0, NUM_MODALITIES, (b, s), generator=gen)
    padding = torch.zeros(b, s, dtype=torch.bool)
    padding[1, -17:] = True
    padding[2, -99:] = True  # one routable token: k = floor(c) = 0 unless c = 1
    rows = [tuple(int(((modality[r] == m) & ~padding[r]).sum()) for m in range(NUM_MODALITIES)) for r in range(b)]
    ks = row_capacities(ModSettings(capacity, split), rows)
    members = [~padding] if split == "global" else [~padding & (modality == m) for m in range(NUM_MODALITIES)]
    sel = select(scores, members, ks)
    for r in range(b):
        want = []
        for g, member in enumerate(members):
            n = int(member[r].sum())
            k = math.floor(round(capacity * n, 9))
            assert ks[r][g] == k
            want += reference_picks(scores[r], member[r], k)
        assert sel.positions[: sel.picked[r], r].tolist() == sorted(want)
        assert sel.picked[r] == len(want)
    assert ks[0][0] == math.floor(round(capacity * sum(rows[0]), 9)) or split == "per_modality"
    if capacity == 0.29 and split == "global":
        assert ks[0] == [29]  # 0.29 * 100 = 28.999999999999996 in floats: still 29 picked (not k - 1)


def test_all_tied_scores_pick_the_first_tokens():
    sel = select(torch.zeros(1, 10), [torch.ones(1, 10, dtype=torch.bool)], [[3]])
    assert sel.positions[:, 0].tolist() == [0, 1, 2]
    assert isinstance(sel, Selection) and sel.picked == (3,)


# --- float64 reference -----------------------------------------------------------------------


def rope_with(x, rot):
    """Rotate-half RoPE of ``x`` ``[b, s, heads, d]`` with angles ``rot`` ``[s, d]`` or ``[b, s, d]``."""
    rot = rot[None] if rot.dim() == 2 else rot
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * rot.cos()[:, :, None] + rotated * rot.sin()[:, :, None]


def reference_block(w, p, h, allowed, rot, m, mod, scale_residual=False):
    """One pre-norm layer on the full sequence ``h`` ``[b, s, hid]`` under ``allowed`` ``[b, 1, s, s]``."""
    heads, groups = m.num_attention_heads, m.effective_num_query_groups()
    d, per = m.hidden_size // heads, heads // groups
    b, s = h.shape[:2]
    linear = lambda x, wt: x @ wt.T  # noqa: E731
    norm = lambda x, wt: rms(x, wt, m.norm_eps)  # noqa: E731
    x = apply(w, p + "input_layernorm.weight", h, norm, mod)
    qkv = apply(w, p + "self_attention.linear_qkv.weight", x, linear, mod).view(b, s, groups, per + 2, d)
    q = qkv[:, :, :, :per].reshape(b, s, heads, d)
    k, v = qkv[:, :, :, per], qkv[:, :, :, per + 1]
    q = rope_with(apply(w, p + "self_attention.q_layernorm.weight", q, norm, mod), rot)
    k = rope_with(apply(w, p + "self_attention.k_layernorm.weight", k, norm, mod), rot)
    k, v = k.repeat_interleave(per, dim=2), v.repeat_interleave(per, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / d**0.5
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    attn = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, heads * d)
    h = h + apply(w, p + "self_attention.linear_proj.weight", attn, linear, mod)
    x = apply(w, p + "pre_mlp_layernorm.weight", h, norm, mod)
    gate, up = apply(w, p + "mlp.linear_fc1.weight", x, linear, mod).chunk(2, dim=-1)
    return h + apply(w, p + "mlp.linear_fc2.weight", F.silu(gate) * up, linear, mod)


def reference_layers(w, h, allowed, rot, cfg, modality, padding, truncate=False, scale_residual=False):
    """float64: every MoD layer picks per row (loops), runs the block on the full sequence with
    unpicked queries and keys masked (an unpicked query sees only itself; its row is discarded)."""
    b, s = h.shape[:2]
    eye = torch.eye(s, dtype=torch.bool)
    for i in range(cfg.model.num_layers):
        p = f"decoder.layers.{i}."
        if p + "mod_router.weight" not in w:
            h = reference_block(w, p, h, allowed, rot, cfg.model, modality)
            continue
        logits = (h @ w[p + "mod_router.weight"].T).squeeze(-1)  # [b, s]
        picked = torch.zeros(b, s, dtype=torch.bool)
        for r in range(b):
            groups = [None] if cfg.mod.split == "global" else range(NUM_MODALITIES)
            for g in groups:
                member = [not padding[r, t] and (g is None or int(modality[r, t]) == g) for t in range(s)]
                k = math.floor(round(cfg.mod.capacity * sum(member), 9))
                picked[r, reference_picks(logits[r].detach(), member, k)] = True
        sub = allowed & picked[:, None, :, None] & picked[:, None, None, :] | (eye & ~picked[:, :, None])[:, None]
        if truncate:  # sramshetty's bug: the routed tokens get positions 0..k-1
            rot_rows = rot[(picked.long().cumsum(1) - 1).clamp(min=0)]  # [b, s, d]
        else:
            rot_rows = rot
        f = reference_block(w, p, h, sub, rot_rows, cfg.model, modality)
        weight = torch.sigmoid(logits)[..., None]
        new = weight * f if scale_residual else h + weight * (f - h)
        h = torch.where(picked[..., None], new, h)
    return h


@pytest.mark.parametrize("arch", ["dense", "mot"])
@pytest.mark.parametrize("split", ["global", "per_modality"])
def test_gathered_layers_equal_float64_reference(runtime, arch, split):
    cfg = mod_cfg(arch, capacity=0.4, every=2, split=split, layers=3)  # layers 1 and 3 are MoD layers
    model = build(cfg, runtime).double()
    batch = padded_batch(cfg)
    b, s, hid = 2, 16, 32
    x0 = torch.randn(s, b, hid, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    inv = 1.0 / cfg.model.rope_theta ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    angles = torch.outer(torch.arange(s, dtype=torch.float64), inv)
    rot = torch.cat([angles, angles], -1)  # [s, d]
    x = x0.clone().requires_grad_()
    h = x
    for layer in model.decoder.layers:
        h, _ = layer_call(layer, h, batch, rot[:, None, None, :])
    weights = torch.randn(s, b, hid, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    (h * weights).sum().backward()

    params = {n: p for n, p in global_param_names(model).items() if n.startswith("decoder.layers.")}
    assert "decoder.layers.0.mod_router.weight" in params and "decoder.layers.1.mod_router.weight" not in params
    ref_w = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
    ref_x = x0.transpose(0, 1).clone().requires_grad_()
    padding = batch["document_ids"] == -1
    allowed = ~dense_mask(batch["document_ids"])
    ref = reference_layers(ref_w, ref_x, allowed, rot, cfg, batch["modality_ids"], padding)
    (ref * weights.transpose(0, 1)).sum().backward()

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert rel(h.transpose(0, 1), ref) < 1e-12
    assert rel(x.grad.transpose(0, 1), ref_x.grad) < 1e-12
    for name, p in params.items():
        assert ref_w[name].grad.norm() > 0, name
        assert rel(p.grad, ref_w[name].grad) < 1e-12, name
    assert params["decoder.layers.2.mod_router.weight"].grad.norm() > 0  # the router weight learns
    # Controls: the public bugs are far from the model.
    with torch.no_grad():
        scaled = reference_layers(ref_w, ref_x, allowed, rot, cfg, batch["modality_ids"], padding, scale_residual=True)
        truncated = reference_layers(ref_w, ref_x, allowed, rot, cfg, batch["modality_ids"], padding, truncate=True)
    assert rel(h.transpose(0, 1).detach(), scaled) > 1e-3
    assert rel(h.transpose(0, 1).detach(), truncated) > 1e-6


def test_moma_mod_layers_hold_their_own_experts(runtime):
    model = build(mod_cfg("moma", capacity=0.5, every=1), runtime)
    layers = model.decoder.layers
    a, b = (dict(layer.mlp.experts.named_parameters()) for layer in layers[:2])
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] is not b[name] and a[name].data_ptr() != b[name].data_ptr()
        assert not torch.equal(a[name], b[name])
    first = [p for n, p in layers[0].mlp.experts.named_parameters() if "local_experts.0." in n]
    second = [p for n, p in layers[0].mlp.experts.named_parameters() if "local_experts.1." in n]
    assert all(not torch.equal(x, y) for x, y in zip(first, second))  # no [expert] * N sharing


@pytest.mark.parametrize("split", ["per_modality", "global"])
def test_moma_mod_reads_a_device_value_only_with_global_selection(runtime, split):
    """On the meta device (shapes, no data) any read of a device value raises: per-modality
    selection needs none; the paper's global selection reads each modality's count of picks."""
    cfg = mod_cfg("moma", capacity=0.5, split=split)
    model, layer = one_layer(cfg, runtime)
    layer.to("meta")
    batch = padded_batch(cfg)
    routing = ModalityRouting.from_modality_ids(
        batch["modality_ids"], None, torch.device("meta"), NUM_MODALITIES, batch["document_ids"] == -1
    )
    x = torch.empty(16, 2, 32, device="meta", requires_grad=True)
    mask = dense_mask(batch["document_ids"]).to("meta")
    rot = torch.empty(16, 1, 1, 8, device="meta")

    def step():
        with modality_routing(routing):
            out, _ = layer(hidden_states=x, attention_mask=mask, rotary_pos_emb=rot)
        out.sum().backward()

    if split == "global":
        with pytest.raises(NotImplementedError, match="(?i)meta"):
            step()
    else:
        step()
        assert x.grad.shape == x.shape and layer.mod_router.weight.grad is not None
