"""Analytic model FLOPs per token and per microbatch, and what FlopCounterMode reports.

A MoT token meets exactly one modality's copy of every untied matrix, so its FLOPs per token
are the dense model's of the same width and depth; only its parameter count differs
(:mod:`megafusion.accounting.params`). A MoMa token meets a router and the experts that chose it
(see "Routed experts" below).

What is counted
---------------
Only matrix multiplications, at 2 FLOPs per multiply-add. Softmax, RMSNorm (incl. QK-norm),
RoPE, SiLU, the gating product, residual adds and the loss are *not* counted: they are
O(s * h) element-wise work, negligible next to the matmuls, and
``torch.utils.flop_counter.FlopCounterMode`` does not count them either. The input embedding
is a table lookup and costs 0 FLOPs (its backward is a scatter-add, also 0 FLOPs here and in
FlopCounterMode).

Per token and layer, forward (h = hidden, d = head dim, H = heads, G = kv groups, f = ffn):

- QKV projection ``2 * h * (H + 2G) * d``; output projection ``2 * H * d * h``;
- SwiGLU MLP: fc1 ``2 * h * 2f`` ([gate; up]), fc2 ``2 * f * h``;

plus, once per token, the output layer ``2 * h * vocab``. This *dense* part is proportional to
tokens and equals exactly ``2 * parameter_counts(cfg)["matmul"]`` per token.

The *attention* part depends on how many keys each query attends: the scores ``QK^T`` and
``PV`` each cost ``2 * H * d`` FLOPs per (query, attended key) pair (GQA broadcasts K/V to
all H query heads, so it is H, not G).

Backward = 2 x forward for every matmul (input and weight gradients; every weight, including
layer 0's QKV, needs both since the embedding is trained), so forward + backward = 3 x
forward. LMFusion (``model.freeze_text``) is the exception: frozen weights get no weight gradient
(megatron-core's ``linear_with_frozen_weight``, autograd in the grouped GEMMs), so the output
layer costs 2 x forward for every token and the layers 2 x forward for text tokens (their text
copies are frozen), while image tokens, attention and the new-row output delta stay at 3 x
(:func:`dense_flops_per_token`); the input gradient is still needed everywhere, since image tokens
attend to text keys and values. These are *model* FLOPs (the convention of MFU): flash attention's
recomputation of the scores in the backward is not counted, and with the real mask (causal, same document,
bidirectional within an image when ``image_ids`` are given) masked-out pairs are not counted.

What FlopCounterMode counts for attention (measured with torch 2.13 and read in
``torch/utils/flop_counter.py``; see ``tests/accounting/test_flops.py``)
----------------------------------------------------------------------------------------------
- The fused CUDA SDPA kernels (flash / memory-efficient / cuDNN) and FlexAttention are
  counted from the *shapes* of q, k, v only: every query attends all ``s`` keys. ``is_causal``
  and ``attn_mask`` / ``attn_bias`` are ignored ("NB: We aren't accounting for causal attention
  here"), FlexAttention's block mask too (only an explicit ``sparsity_hint`` node annotation is
  honoured). Their backward is counted as 5 bmm (it includes the recomputation of ``QK^T``),
  so attention forward + backward = 3.5 x forward = ``14 * H * d * s`` per query.
- The CPU kernel ``aten._scaled_dot_product_flash_attention_for_cpu`` (what SDPA dispatches
  to on CPU, with or without a mask, causal or not) has no flop formula: FlopCounterMode
  counts **0** attention FLOPs on CPU.
- The math backend (``sdpa_kernel(SDPBackend.MATH)``) decomposes into ``bmm`` calls that are
  counted like any matmul: the full ``s x s`` scores (mask ignored, it is applied by an
  element-wise fill), backward 2 x forward, i.e. ``12 * H * d * s`` per query, which is
  ``flops_per_token(cfg, attended_keys=s)``.

:func:`flop_counter_flops` predicts all three; :func:`batch_flops` with ``attention="full"``
is the dense (mask-ignoring) equivalent in model FLOPs.

An objective's extra modules (Transfusion's image modules) run once per *image*, not per token:
:mod:`megafusion.accounting.image_modules` measures them; ``batch_flops`` charges them per image
to the image modality (key ``image_modules``).

Routed experts (MoMa: its ``LayerCost``, :mod:`megafusion.models.spec`)
----------------------------------------------
Each layer's FFN is ``E`` experts (the MLP above, each) and a router. Per layer and microbatch,
forward:

- the router ``2 * h * E`` per token, for *every* token, padding included: its GEMM runs on all
  rows before any selection;
- the experts: group ``g``'s ``n_g`` routable tokens (its modality's, or all for ``mixed``; padding
  is never routed) give each of its ``E_g`` experts ``k_g = ceil(c_g * n_g)`` tokens
  (``ExpertGroups.tokens_per_expert``), so ``E_g * k_g * 2 * (h * 2f + f * h)``;
- the selection (a sort), the sigmoid gates and the weighted combine: 0 FLOPs (no matmul), in
  FlopCounterMode too;
- an auxiliary router (``moe.aux_router``: ``h x h/2`` then ``h/2 x E``) on every token, padding
  included: forward both matrices; its input is detached, so training adds both weight gradients
  and the second matrix's input gradient only (:func:`~megafusion.accounting.params.aux_router_macs`),
  in ``dense``. Under ``train.trainable=aux_routers`` the count is the joint one (the frozen
  weights' gradients are not computed there: an overestimate of what runs).

Backward = 2 x forward for both: the gates carry the router's gradient to its weight and input, and
every expert's input and weight get theirs. :func:`batch_flops` counts this exactly from the
microbatch's routable tokens per modality (``document_ids != PAD_DOCUMENT_ID``, the tokens the
router ranks; in a Mixture-of-Depths layer the tokens it picked, ``LayerCost.block_routable``: exact
with ``mod.split=per_modality`` or a ``mixed`` group, each modality's share of a row's picks charged
in proportion with ``mod.split=global``, see docs/mod.md); key ``experts``, while ``dense`` keeps
every token's own matmuls (attention projections, router, output layer). Per modality: a modality
group's experts are charged to that modality; the ``mixed`` group's are split in proportion to each
modality's routable tokens, i.e. every routable token is charged the group's mean cost ``E * k / n``
expert FFNs (which tokens the experts took is known only inside the step, per layer, after this
count), rounded cumulatively so the split sums exactly to the group's FLOPs. The per-token functions
(:func:`dense_flops_per_token`, :func:`flops_per_token`) use the nominal ``E_g * c_g`` experts per
token (:func:`~megafusion.accounting.params.experts_per_token`: 1 at the default capacity), exact
for a microbatch whenever every ``c_g * n_g`` is whole.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from megafusion.accounting.image_modules import MATMUL_FLOPS_PER_MAC, image_flops_per_image
from megafusion.accounting.params import (
    _dims,
    _layer_matmul,
    _matmul_parts,
    _whole,
    aux_router_macs,
    layer_costs,
    layer_weights_per_token,
    routed_ffns,
)
from megafusion.core.modality import MODALITY_NAMES, NO_IMAGE, NUM_MODALITIES, PAD_DOCUMENT_ID, Modality
from megafusion.layers.attended_keys import attended_keys
from megafusion.objectives.registry import get_objective

BACKWARD_FACTOR = 2  # backward of a matmul = 2 matmuls of the same size (grad input, grad weight)
FROZEN_PASSES = 2  # a frozen weight's matmul: forward + input gradient, no weight gradient
ATTENTION_MODES = ("mask", "full")
FLOP_COUNTER_KERNELS = ("fused", "math", "cpu")


def _passes(forward_only: bool) -> int:
    return 1 if forward_only else 1 + BACKWARD_FACTOR


def dense_flops_per_token(cfg, forward_only: bool = False, modality: int | None = None) -> int | float:
    """FLOPs of every weight matmul for one token (QKV, proj, MLP, output layer).

    MoMa: the router and the nominal ``E_g * c_g`` expert FFNs of the token's group (one at the
    default capacity; a float where ``E_g * c_g`` is not whole; ``modality`` is needed where the
    groups' differ), exact for a microbatch only where every ``c_g * n_g`` is whole:
    :func:`batch_flops` counts a microbatch's experts exactly.

    LMFusion (``model.freeze_text``): a frozen weight gets no weight gradient, so its matmuls cost
    forward + input gradient = 2 x forward: the output layer for every token, the layers for text
    tokens (their text copies are frozen; image tokens' image copies train, 3 x). The new-row output
    delta trains (3 x). The count then depends on the token's ``modality`` (a ``Modality``), which
    must be given.
    """
    parts = _matmul_parts(cfg)
    aux = MATMUL_FLOPS_PER_MAC * aux_router_macs(cfg, forward_only)
    if forward_only or not cfg.model.freeze_text:
        weights = _layer_matmul(cfg, modality) + parts["output"] + parts["new_rows"]
        return _whole(MATMUL_FLOPS_PER_MAC * weights * _passes(forward_only) + aux)
    if modality is None:
        raise ValueError(
            "model.freeze_text=true: a token's FLOPs depend on its modality (frozen text copies): pass modality"
        )
    layers_passes = FROZEN_PASSES if int(modality) == int(Modality.TEXT) else _passes(False)
    return aux + MATMUL_FLOPS_PER_MAC * (
        _layer_matmul(cfg, modality) * layers_passes
        + parts["output"] * FROZEN_PASSES
        + parts["new_rows"] * _passes(False)
    )


def token_flops_without_experts(cfg, forward_only: bool = False, modality: int | None = None) -> int:
    """The matmul FLOPs one token costs whatever the routing does: :func:`dense_flops_per_token`
    when every FFN runs on every token (dense, MoT, LMFusion); otherwise the attention projections,
    the routers, the FFNs of the layers that every token runs, and the output layer
    (:func:`expert_flops` counts the routed FFNs per microbatch)."""
    if not routed_ffns(cfg):
        return dense_flops_per_token(cfg, forward_only, modality)
    parts = _matmul_parts(cfg)
    costs = layer_costs(cfg)
    weights = sum(layer_weights_per_token(cost, parts, modality, ffn=cost.ffn_runs is None) for cost in costs)
    weights += parts["output"] + parts["new_rows"]
    return MATMUL_FLOPS_PER_MAC * (weights * _passes(forward_only) + aux_router_macs(cfg, forward_only))


def expert_flops(cfg, routable_tokens, forward_only: bool = False, routable_rows=None) -> list[int]:
    """Model FLOPs of the routed FFNs of one microbatch, per modality (``Modality`` order), exactly.

    ``routable_tokens``: the microbatch's non-padding tokens per modality, which the routers rank.
    Each layer whose FFN is routed says its FFN runs per modality (``LayerCost.ffn_runs``: MoMa's
    group ``g`` runs ``E_g x k_g`` expert MLPs; a modality-blind group's runs are shared in
    proportion to the modalities' routable tokens, as Fractions); the sum over layers is rounded
    cumulatively over the modalities, whole FLOPs that add up exactly to the total. All zeros
    without routed FFNs. A layer that routes only some tokens into its block (Mixture-of-Depths,
    ``LayerCost.block_routable``) runs its FFN on those, from ``routable_rows`` (``[b][modality]``:
    the routable tokens per row; absent, the microbatch is taken as one row).
    """
    counts = [int(n) for n in routable_tokens]
    if len(counts) != NUM_MODALITIES:
        raise ValueError(f"routable_tokens: one count per modality ({', '.join(MODALITY_NAMES)}), got {counts}")
    rows = [counts] if routable_rows is None else [[int(n) for n in row] for row in routable_rows]
    per_run = MATMUL_FLOPS_PER_MAC * _matmul_parts(cfg)["mlp"] * _passes(forward_only)
    exact = [Fraction(0)] * NUM_MODALITIES
    for cost in layer_costs(cfg):
        if cost.ffn_runs is not None:
            met = counts if cost.block_routable is None else cost.block_routable(rows)
            exact = [e + per_run * Fraction(r) for e, r in zip(exact, cost.ffn_runs(met))]
    # Cumulative rounding: modality m gets floor(F_0 + .. + F_m) - (what the earlier got), each
    # within one FLOP of its exact share.
    out, seen, given = [], Fraction(0), 0
    for value in exact:
        seen += value
        out.append(math.floor(seen) - given)
        given = math.floor(seen)
    return out


def _token_matmul_flops(cfg, documents: torch.Tensor, modalities: torch.Tensor, forward_only: bool) -> dict:
    """Per modality: tokens, routable tokens, every token's own matmuls (``dense``) and the experts'."""
    flat = modalities.reshape(-1)
    routable = flat[documents.reshape(-1) != PAD_DOCUMENT_ID]
    tokens_m = torch.bincount(flat, minlength=NUM_MODALITIES).tolist()
    routable_m = torch.bincount(routable, minlength=NUM_MODALITIES).tolist()
    rows = [
        torch.bincount(m[d != PAD_DOCUMENT_ID], minlength=NUM_MODALITIES).tolist()
        for d, m in zip(documents, modalities)
    ]
    per_token = [token_flops_without_experts(cfg, forward_only, m) for m in Modality]
    return {
        "tokens": tokens_m,
        "routable": routable_m,
        "routable_rows": rows,
        "dense": [per_token[i] * tokens_m[i] for i in range(NUM_MODALITIES)],
        "experts": expert_flops(cfg, routable_m, forward_only, rows),
    }


def attention_flops_per_key(cfg, forward_only: bool = False) -> int:
    """FLOPs of one (query, attended key) pair over all layers: ``QK^T`` and ``PV``, 2*H*d each."""
    k = _dims(cfg)
    per_layer = 2 * (MATMUL_FLOPS_PER_MAC * k["heads"] * k["head_dim"])
    # A Mixture-of-Depths layer attends only among its picked tokens (nominal: c^2 of the pairs).
    layers = _whole(sum(cost.attention_fraction for cost in layer_costs(cfg)))
    return _whole(layers * per_layer * _passes(forward_only))


def causal_mean_attended_keys(seq_length: int) -> float:
    """Mean keys per query for plain causal attention over ``seq_length`` tokens: (s + 1) / 2."""
    return (seq_length + 1) / 2


def flops_per_token(cfg, attended_keys: float, forward_only: bool = False, modality: int | None = None) -> float:
    """Model FLOPs per token (forward + backward unless ``forward_only``).

    ``attended_keys`` is the mean number of keys a query attends: ``(s + 1) / 2`` for one causal
    document of ``s`` tokens (:func:`causal_mean_attended_keys`), ``s`` to count attention the
    way a mask-ignoring counter does. ``modality``: as for :func:`dense_flops_per_token`.
    """
    dense = dense_flops_per_token(cfg, forward_only, modality)
    return dense + attention_flops_per_key(cfg, forward_only) * attended_keys


def _count_images(cfg, num_images: int | None, image_ids, modality_ids: torch.Tensor) -> int:
    """Images whose objective modules run in the microbatch (0 when the objective has none, e.g. ``lm``)."""
    if not get_objective(cfg.objective.name).extra_modules:
        if num_images:
            raise ValueError(
                f"batch_flops: num_images={num_images} but objective.name={cfg.objective.name!r} "
                "has no image modules (its images are tokens, counted as tokens)"
            )
        return 0
    if num_images is not None:
        if int(num_images) < 0:
            raise ValueError(f"batch_flops: num_images must be >= 0, got {num_images}")
        return int(num_images)
    if image_ids is not None:  # distinct (row, image) pairs: image numbers restart in every row
        ids = torch.as_tensor(image_ids).detach().cpu().to(torch.int64).reshape(modality_ids.shape)
        rows = torch.arange(ids.shape[0])[:, None].expand_as(ids)
        is_patch = ids != NO_IMAGE
        return int(torch.unique(torch.stack([rows[is_patch], ids[is_patch]]), dim=1).shape[1])
    if bool((modality_ids == int(Modality.IMAGE)).any()):
        # Silently charging nothing would under-count every Transfusion step.
        raise ValueError(
            f"batch_flops: objective.name={cfg.objective.name} and the microbatch has image tokens: pass "
            "num_images (the microbatch's latents.shape[0]) or image_ids to count the image modules"
        )
    return 0


def batch_flops(
    cfg,
    document_ids: torch.Tensor,
    modality_ids: torch.Tensor | None = None,
    loss_mask: torch.Tensor | None = None,
    *,
    attention: str = "mask",
    forward_only: bool = False,
    keys: torch.Tensor | None = None,
    image_ids: torch.Tensor | None = None,
    num_images: int | None = None,
    latent_shape: tuple[int, int, int] | None = None,
) -> dict:
    """Model FLOPs of one microbatch (forward + backward unless ``forward_only``), exactly.

    ``attention="mask"`` counts each query's real keys (causal, same document or, with
    ``data.attention=causal``, the whole row, plus the bidirectional image spans when
    ``image_ids`` ``[b, s]`` is given: see :func:`attended_keys`;
    pass ``keys`` ``[b, s]`` instead for another mask, e.g. from :func:`attended_keys_from_mask`);
    ``"full"`` counts every query against all ``s`` keys, as a mask-ignoring counter does. Every
    token is charged its own dense matmuls (output layer included) and its attention, and the split
    is by the modality of that (query) token; ``modality_ids=None`` means all text. ``loss_mask``
    changes no FLOP (logits are computed at every position) and is only used to report
    ``loss_tokens_per_modality``. ``Objective.flops_inputs(batch)`` gives the keywords that count
    a microbatch under the objective's own mask (``keys`` or ``image_ids``, ``num_images``).

    MoMa: every token is charged its attention projections, the router and the output layer
    (padding too), and each group's experts their ``k_g`` tokens each (key ``experts``, per modality
    ``experts_per_modality``; the module doc says how the ``mixed`` group is split), from the
    routable (non-padding) tokens per modality (``routable_tokens_per_modality``).

    An objective with extra modules (Transfusion's image modules) also charges each image their
    FLOPs (:func:`image_flops_per_image` of ``latent_shape``, which Transfusion's ``latent_codec=kl``
    needs) to the image modality: ``num_images`` images (the microbatch's ``latents.shape[0]``),
    or, when it is None, the images numbered in ``image_ids``. Such a microbatch with image tokens
    but neither is an error; an objective without extra modules (``lm``) charges none.

    Returns ints: ``total`` = ``dense`` (the transformer's per-token matmuls) + ``experts`` (0 without)
    + ``attention`` + ``image_modules``; ``tokens``, ``images``, ``per_modality``,
    ``attention_per_modality``, ``experts_per_modality``, ``tokens_per_modality``,
    ``routable_tokens_per_modality`` (dicts keyed by ``MODALITY_NAMES``), ``routable_tokens_per_row``
    (``[b][modality]``, what ``LayerCost.block_routable`` reads), the float
    ``mean_attended_keys``, and ``loss_tokens_per_modality`` when a loss mask is given.
    """
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention={attention!r} must be one of {ATTENTION_MODES}")
    if keys is not None and image_ids is not None:
        raise ValueError(
            "batch_flops: pass keys (counted from some mask) or image_ids (the Transfusion mask), not both"
        )
    doc = torch.as_tensor(document_ids).detach().cpu()
    if doc.dim() == 1:
        doc = doc[None]
    b, s = doc.shape
    if modality_ids is None:
        mod = torch.zeros(b, s, dtype=torch.int64)
    else:
        mod = torch.as_tensor(modality_ids).detach().cpu().to(torch.int64).reshape(b, s)
        if mod.numel() and (int(mod.min()) < 0 or int(mod.max()) >= NUM_MODALITIES):
            raise ValueError(f"modality_ids must be in [0, {NUM_MODALITIES}) ({', '.join(MODALITY_NAMES)})")
    if attention == "full":
        nkeys = torch.full((b, s), s, dtype=torch.int64)
    elif keys is not None:
        nkeys = torch.as_tensor(keys).detach().cpu().to(torch.int64).reshape(b, s)
    else:
        img = None if image_ids is None else torch.as_tensor(image_ids).detach().cpu()
        nkeys = attended_keys(doc, img, cross_document=cfg.data.cross_document())

    per_key = attention_flops_per_key(cfg, forward_only)
    images = _count_images(cfg, num_images, image_ids, mod)
    image_flops = images * image_flops_per_image(cfg, latent_shape, forward_only)["total"] if images else 0
    flat_mod = mod.reshape(-1)
    matmuls = _token_matmul_flops(cfg, doc, mod, forward_only)
    keys_m = torch.zeros(NUM_MODALITIES, dtype=torch.int64).index_add_(0, flat_mod, nkeys.reshape(-1))
    attn_m = [per_key * int(keys_m[i]) for i in range(NUM_MODALITIES)]
    dense_m, expert_m = matmuls["dense"], matmuls["experts"]
    image_m = [image_flops if i == int(Modality.IMAGE) else 0 for i in range(NUM_MODALITIES)]
    out = {
        "total": sum(attn_m) + sum(dense_m) + sum(expert_m) + image_flops,
        "dense": sum(dense_m),
        "experts": sum(expert_m),
        "attention": sum(attn_m),
        "image_modules": image_flops,
        "tokens": b * s,
        "images": images,
        "mean_attended_keys": float(nkeys.double().mean()) if nkeys.numel() else 0.0,
        "per_modality": {n: dense_m[i] + expert_m[i] + attn_m[i] + image_m[i] for i, n in enumerate(MODALITY_NAMES)},
        "attention_per_modality": {n: attn_m[i] for i, n in enumerate(MODALITY_NAMES)},
        "experts_per_modality": {n: expert_m[i] for i, n in enumerate(MODALITY_NAMES)},
        "tokens_per_modality": {n: matmuls["tokens"][i] for i, n in enumerate(MODALITY_NAMES)},
        "routable_tokens_per_modality": {n: matmuls["routable"][i] for i, n in enumerate(MODALITY_NAMES)},
        "routable_tokens_per_row": matmuls["routable_rows"],
        "forward_only": forward_only,
        "attention_mode": attention,
    }
    if loss_mask is not None:
        lm = torch.as_tensor(loss_mask).detach().cpu().reshape(-1).double()
        counts = torch.zeros(NUM_MODALITIES, dtype=torch.float64).index_add(0, flat_mod, lm)
        out["loss_tokens_per_modality"] = {n: float(counts[i]) for i, n in enumerate(MODALITY_NAMES)}
    return out


def dense_attention_flops_equivalent(cfg, batch_size: int, seq_length: int, forward_only: bool = False) -> int:
    """Model FLOPs of a ``[batch_size, seq_length]`` microbatch with every query attending all keys.

    The mask-ignoring count (what FlopCounterMode reports for SDPA's math backend, and for the
    fused kernels up to the backward recompute: see :func:`flop_counter_flops`). MoMa: at the
    nominal experts per token (:func:`dense_flops_per_token`); :func:`batch_flops` with
    ``attention="full"`` counts a microbatch's own.
    """
    per_query = dense_flops_per_token(cfg, forward_only) + attention_flops_per_key(cfg, forward_only) * seq_length
    return batch_size * seq_length * per_query


def flop_counter_flops(
    cfg,
    batch_size: int,
    seq_length: int,
    kernel: str = "fused",
    *,
    document_ids: torch.Tensor | None = None,
    modality_ids: torch.Tensor | None = None,
) -> int:
    """What ``FlopCounterMode`` reports around one forward + backward of the model.

    ``kernel``: ``"fused"`` (CUDA flash / efficient / cuDNN SDPA, or FlexAttention): full
    ``s x s`` attention, backward = 2.5 x forward (recomputes ``QK^T``); ``"math"``
    (``SDPBackend.MATH``): full ``s x s``, backward = 2 x forward; ``"cpu"`` (SDPA's default CPU
    kernel): attention not counted at all. Masks and causality never change the count.

    MoMa's experts depend on the microbatch's routable tokens per modality: ``document_ids`` (its
    padding, ``PAD_DOCUMENT_ID``) and ``modality_ids`` ``[b, s]``; absent, no padding and all text
    (as :func:`batch_flops`). Other families ignore them.
    """
    if kernel not in FLOP_COUNTER_KERNELS:
        raise ValueError(f"kernel={kernel!r} must be one of {FLOP_COUNTER_KERNELS}")
    tokens = batch_size * seq_length
    if not routed_ffns(cfg):
        dense = tokens * dense_flops_per_token(cfg)
    else:
        shape = (batch_size, seq_length)
        doc = torch.zeros(shape, dtype=torch.int64) if document_ids is None else torch.as_tensor(document_ids)
        mod = torch.zeros(shape, dtype=torch.int64) if modality_ids is None else torch.as_tensor(modality_ids)
        matmuls = _token_matmul_flops(cfg, doc.cpu().reshape(shape), mod.cpu().to(torch.int64).reshape(shape), False)
        dense = sum(matmuls["dense"]) + sum(matmuls["experts"])
    forward_attention = tokens * seq_length * attention_flops_per_key(cfg, forward_only=True)
    factor = {"fused": 3.5, "math": 3.0, "cpu": 0.0}[kernel]
    return dense + int(forward_attention * factor)
