"""The dense megatron-core model equals an independent float64 Llama/Chameleon reference.

The reference below is written from the architecture's definition (RMSNorm pre-norm, grouped
QKV, per-head QK-norm, rotate-half RoPE, GQA, causal + same-document mask, SwiGLU) with
plain tensor operations in float64, using the model's own weights. Logits and every
parameter's gradient of the LM loss must agree.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megafusion.config import Config
from megafusion.core.modality import MODALITY_NAMES
from megafusion.data.builtin.synthetic import synthetic_microbatch
from megafusion.layers.masks import dense_mask
from megafusion.models.param_layout import global_param_names
from megafusion.models.transformer_config import build_transformer_config
from megafusion.objectives.build import build_model_chunks


def rms(x, w, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x, theta, positions=None):
    """Rotate-half RoPE on [b, s, heads, d] at ``positions`` [b, s] (default 0..s-1 in every row)."""
    b, s, d = x.shape[0], x.shape[1], x.shape[-1]
    positions = torch.arange(s).expand(b, s) if positions is None else positions
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = positions.double()[..., None] * inv  # [b, s, d/2]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


def modality_key(name: str, modality: str) -> str:
    """The MoT key of one modality's copy: ``mlp.image.linear_fc1.weight``, ``x.image.weight``."""
    if ".mlp." in name:
        return name.replace(".mlp.", f".mlp.{modality}.")
    return name[: -len("weight")] + f"{modality}.weight"


def apply(w: dict, name: str, x, fn, modality_ids):
    """``fn(x, weight)`` with the dense weight, or each token with its modality's copy (MoT).

    The reference computes every modality's result for every token and then selects: the
    simplest correct form, independent of the model's routing.
    """
    if name in w:
        return fn(x, w[name])
    out = 0
    for m, modality in enumerate(MODALITY_NAMES):
        keep = (modality_ids == m).view(*modality_ids.shape, *([1] * (x.dim() - 2)))
        out = out + torch.where(keep, fn(x, w[modality_key(name, modality)]), 0.0)
    return out


def reference_logits(w: dict, tokens, doc_ids, m, modality_ids=None, allowed=None, positions=None):
    """Float64 logits; ``modality_ids`` [b, s] picks MoT copies, ``allowed`` [b, 1, s, s] overrides the
    mask, ``positions`` [b, s] the RoPE positions (default: the row indices)."""
    heads, groups = m.num_attention_heads, m.effective_num_query_groups()
    d, per = m.hidden_size // heads, heads // groups
    b, s = tokens.shape
    mod = torch.zeros_like(tokens) if modality_ids is None else modality_ids
    allowed = ~dense_mask(doc_ids) if allowed is None else allowed
    linear = lambda x, wt: x @ wt.T  # noqa: E731
    norm = lambda x, wt: rms(x, wt, m.norm_eps)  # noqa: E731
    post = m.norm_placement == "post"  # h + norm(f(h)) instead of h + f(norm(h))
    h = w["embedding.word_embeddings.weight"][tokens]
    for i in range(m.num_layers):
        p = f"decoder.layers.{i}."
        x = h if post else apply(w, p + "input_layernorm.weight", h, norm, mod)
        qkv = apply(w, p + "self_attention.linear_qkv.weight", x, linear, mod).view(b, s, groups, per + 2, d)
        q = qkv[:, :, :, :per].reshape(b, s, heads, d)
        k, v = qkv[:, :, :, per], qkv[:, :, :, per + 1]
        q = rope(apply(w, p + "self_attention.q_layernorm.weight", q, norm, mod), m.rope_theta, positions)
        k = rope(apply(w, p + "self_attention.k_layernorm.weight", k, norm, mod), m.rope_theta, positions)
        k, v = k.repeat_interleave(per, dim=2), v.repeat_interleave(per, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / d**0.5
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        attn = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, heads * d)
        out = apply(w, p + "self_attention.linear_proj.weight", attn, linear, mod)
        h = h + (apply(w, p + "post_attention_layernorm.weight", out, norm, mod) if post else out)
        x = h if post else apply(w, p + "pre_mlp_layernorm.weight", h, norm, mod)
        gate, up = apply(w, p + "mlp.linear_fc1.weight", x, linear, mod).chunk(2, dim=-1)
        out = apply(w, p + "mlp.linear_fc2.weight", F.silu(gate) * up, linear, mod)
        h = h + (apply(w, p + "post_mlp_layernorm.weight", out, norm, mod) if post else out)
    return apply(w, "decoder.final_layernorm.weight", h, norm, mod) @ w["output_layer.weight"].T


@pytest.mark.parametrize("norm_placement", ["pre", "post"])
def test_dense_model_matches_float64_reference(runtime, norm_placement):
    cfg = Config()
    cfg.model.norm_placement = norm_placement
    cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_attention_heads = 2, 32, 4
    cfg.model.num_query_groups, cfg.model.ffn_hidden_size, cfg.model.vocab_size = 2, 48, 64
    cfg.model.seq_length, cfg.data.docs_per_sequence, cfg.model.init_std = 16, 3, 0.2
    tconfig = build_transformer_config(cfg, runtime.device)
    model = build_model_chunks(cfg, tconfig, runtime)[0]
    batch = synthetic_microbatch(0, 2, 11, cfg.model.seq_length, cfg.model.vocab_size, 3)
    assert batch["document_ids"].max() > 0, "the batch must exercise the document mask"

    logits = model(batch["tokens"], batch["position_ids"], dense_mask(batch["document_ids"]), labels=None)
    params = global_param_names(model)
    ref_w = {n: p.detach().double().requires_grad_() for n, p in params.items()}
    ref = reference_logits(ref_w, batch["tokens"], batch["document_ids"], cfg.model)
    assert ((logits.double() - ref).norm() / ref.norm()).item() < 1e-5

    def loss(lg):
        return F.cross_entropy(lg.reshape(-1, lg.shape[-1]), batch["labels"].reshape(-1))

    loss(logits.double()).backward()
    loss(ref).backward()
    for name, param in params.items():
        want = ref_w[name].grad
        assert want.norm() > 0, name
        rel = ((param.grad.double() - want).norm() / want.norm()).item()
        assert rel < 1e-4, f"gradient of {name}: relative error {rel:.2e}"


@pytest.mark.parametrize("attention,positions", [("causal", "document"), ("causal", "row"), ("isolated", "document")])
def test_cross_document_attention_and_document_positions_match_float64_reference(runtime, attention, positions):
    """``data.attention`` / ``data.positions`` as the forward step applies them, against the reference
    with the rule written pair by pair (tests/layers/test_transfusion_masks.py) and RoPE at the
    positions asked for; a row ends in padding (a key of nothing but itself in causal mode)."""
    import contextlib

    from megafusion.layers.masks import attention_mask_for
    from megafusion.models.token_positions import token_positions
    from tests.layers.test_transfusion_masks import brute_force_blocked, brute_force_cross

    cfg = Config()
    cfg.data.attention, cfg.data.positions = attention, positions
    cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_attention_heads = 2, 32, 4
    cfg.model.num_query_groups, cfg.model.ffn_hidden_size, cfg.model.vocab_size = 2, 48, 64
    cfg.model.seq_length, cfg.data.docs_per_sequence, cfg.model.init_std = 16, 3, 0.2
    model = build_model_chunks(cfg, build_transformer_config(cfg, runtime.device), runtime)[0]
    batch = synthetic_microbatch(0, 2, 11, cfg.model.seq_length, cfg.model.vocab_size, 3)
    batch["document_ids"][1, -3:], batch["position_ids"][1, -3:] = -1, 0  # padding, as packing writes it
    doc = batch["document_ids"]
    assert (batch["position_ids"] != torch.arange(16)).any(), "documents restart their positions"
    mask = attention_mask_for(batch, cfg.model.attention_backend, True, runtime.device, cfg.data.cross_document())
    by_document = positions == "document"
    with torch.no_grad(), token_positions(batch["position_ids"]) if by_document else contextlib.nullcontext():
        logits = model(batch["tokens"], batch["position_ids"], mask, labels=None)
    w = {n: p.detach().double() for n, p in global_param_names(model).items()}
    blocked = brute_force_cross(doc, None) if attention == "causal" else brute_force_blocked(doc, None)
    ref = reference_logits(
        w, batch["tokens"], doc, cfg.model, allowed=~blocked, positions=batch["position_ids"] if by_document else None
    )
    assert ((logits.double() - ref).norm() / ref.norm()).item() < 1e-5
    # Control: the other positions give other logits in causal mode; in isolated mode the same up to
    # rounding (RoPE sees offsets within a document only), except at the padding, whose positions are 0.
    other = reference_logits(
        w, batch["tokens"], doc, cfg.model, allowed=~blocked, positions=None if by_document else batch["position_ids"]
    )
    real = doc != -1
    assert (((other - ref)[real].norm() / ref[real].norm()).item() > 1e-3) == (attention == "causal")
