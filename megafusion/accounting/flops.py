"""Analytic model FLOPs per token and per microbatch, and what FlopCounterMode reports.

A MoT token meets exactly one modality's copy of every untied matrix, so its FLOPs per token
are the dense model's of the same width and depth; only its parameter count differs
(:mod:`megafusion.accounting.params`).

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
``torch/utils/flop_counter.py``; see ``tests/unit/test_flops.py``)
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
"""

from __future__ import annotations

import torch

from megafusion.accounting.image_modules import MATMUL_FLOPS_PER_MAC, image_flops_per_image
from megafusion.accounting.params import _dims, _matmul_parts, _transformer_parameter_counts
from megafusion.core.modality import MODALITY_NAMES, NO_IMAGE, NUM_MODALITIES, Modality
from megafusion.layers.attended_keys import attended_keys
from megafusion.objectives.registry import get_objective

BACKWARD_FACTOR = 2  # backward of a matmul = 2 matmuls of the same size (grad input, grad weight)
FROZEN_PASSES = 2  # a frozen weight's matmul: forward + input gradient, no weight gradient
ATTENTION_MODES = ("mask", "full")
FLOP_COUNTER_KERNELS = ("fused", "math", "cpu")


def _passes(forward_only: bool) -> int:
    return 1 if forward_only else 1 + BACKWARD_FACTOR


def dense_flops_per_token(cfg, forward_only: bool = False, modality: int | None = None) -> int:
    """FLOPs of every weight matmul for one token (QKV, proj, MLP, output layer).

    LMFusion (``model.freeze_text``): a frozen weight gets no weight gradient, so its matmuls cost
    forward + input gradient = 2 x forward: the output layer for every token, the layers for text
    tokens (their text copies are frozen; image tokens' image copies train, 3 x). The new-row output
    delta trains (3 x). The count then depends on the token's ``modality`` (a ``Modality``), which
    must be given.
    """
    parts = _matmul_parts(cfg)
    if forward_only or not cfg.model.freeze_text:
        return MATMUL_FLOPS_PER_MAC * _transformer_parameter_counts(cfg)["matmul"] * _passes(forward_only)
    if modality is None:
        raise ValueError(
            "model.freeze_text=true: a token's FLOPs depend on its modality (frozen text copies): pass modality"
        )
    layers_passes = FROZEN_PASSES if int(modality) == int(Modality.TEXT) else _passes(False)
    return MATMUL_FLOPS_PER_MAC * (
        parts["layers"] * layers_passes + parts["output"] * FROZEN_PASSES + parts["new_rows"] * _passes(False)
    )


def attention_flops_per_key(cfg, forward_only: bool = False) -> int:
    """FLOPs of one (query, attended key) pair over all layers: ``QK^T`` and ``PV``, 2*H*d each."""
    k = _dims(cfg)
    per_layer = 2 * (MATMUL_FLOPS_PER_MAC * k["heads"] * k["head_dim"])
    return k["layers"] * per_layer * _passes(forward_only)


def causal_mean_attended_keys(seq_length: int) -> float:
    """Mean keys per query for plain causal attention over ``seq_length`` tokens: (s + 1) / 2."""
    return (seq_length + 1) / 2


def flops_per_token(cfg, attended_keys: float, forward_only: bool = False) -> float:
    """Model FLOPs per token (forward + backward unless ``forward_only``).

    ``attended_keys`` is the mean number of keys a query attends: ``(s + 1) / 2`` for one causal
    document of ``s`` tokens (:func:`causal_mean_attended_keys`), ``s`` to count attention the
    way a mask-ignoring counter does.
    """
    return dense_flops_per_token(cfg, forward_only) + attention_flops_per_key(cfg, forward_only) * attended_keys


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

    ``attention="mask"`` counts each query's real keys (causal, same document, plus the
    bidirectional image spans when ``image_ids`` ``[b, s]`` is given: see :func:`attended_keys`;
    pass ``keys`` ``[b, s]`` instead for another mask, e.g. from :func:`attended_keys_from_mask`);
    ``"full"`` counts every query against all ``s`` keys, as a mask-ignoring counter does. Every
    token is charged its own dense matmuls (output layer included) and its attention, and the split
    is by the modality of that (query) token; ``modality_ids=None`` means all text. ``loss_mask``
    changes no FLOP (logits are computed at every position) and is only used to report
    ``loss_tokens_per_modality``. ``Objective.flops_inputs(batch)`` gives the keywords that count
    a microbatch under the objective's own mask (``keys`` or ``image_ids``, ``num_images``).

    An objective with extra modules (Transfusion's image modules) also charges each image their
    FLOPs (:func:`image_flops_per_image` of ``latent_shape``, which Transfusion's ``latent_codec=kl``
    needs) to the image modality: ``num_images`` images (the microbatch's ``latents.shape[0]``),
    or, when it is None, the images numbered in ``image_ids``. Such a microbatch with image tokens
    but neither is an error; an objective without extra modules (``lm``) charges none.

    Returns ints: ``total`` = ``dense`` (the transformer's per-token matmuls) + ``attention``
    + ``image_modules``; ``tokens``, ``images``, ``per_modality``, ``attention_per_modality``,
    ``tokens_per_modality`` (dicts keyed by ``MODALITY_NAMES``), the float
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
        nkeys = attended_keys(doc, img)

    dense_tok = [dense_flops_per_token(cfg, forward_only, m) for m in Modality]
    per_key = attention_flops_per_key(cfg, forward_only)
    images = _count_images(cfg, num_images, image_ids, mod)
    image_flops = images * image_flops_per_image(cfg, latent_shape, forward_only)["total"] if images else 0
    flat_mod = mod.reshape(-1)
    tokens_m = torch.bincount(flat_mod, minlength=NUM_MODALITIES)
    keys_m = torch.zeros(NUM_MODALITIES, dtype=torch.int64).index_add_(0, flat_mod, nkeys.reshape(-1))
    attn_m = [per_key * int(keys_m[i]) for i in range(NUM_MODALITIES)]
    dense_m = [dense_tok[i] * int(tokens_m[i]) for i in range(NUM_MODALITIES)]
    image_m = [image_flops if i == int(Modality.IMAGE) else 0 for i in range(NUM_MODALITIES)]
    out = {
        "total": sum(attn_m) + sum(dense_m) + image_flops,
        "dense": sum(dense_m),
        "attention": sum(attn_m),
        "image_modules": image_flops,
        "tokens": b * s,
        "images": images,
        "mean_attended_keys": float(nkeys.double().mean()) if nkeys.numel() else 0.0,
        "per_modality": {n: dense_m[i] + attn_m[i] + image_m[i] for i, n in enumerate(MODALITY_NAMES)},
        "attention_per_modality": {n: attn_m[i] for i, n in enumerate(MODALITY_NAMES)},
        "tokens_per_modality": {n: int(tokens_m[i]) for i, n in enumerate(MODALITY_NAMES)},
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
    fused kernels up to the backward recompute: see :func:`flop_counter_flops`).
    """
    per_query = dense_flops_per_token(cfg, forward_only) + attention_flops_per_key(cfg, forward_only) * seq_length
    return batch_size * seq_length * per_query


def flop_counter_flops(cfg, batch_size: int, seq_length: int, kernel: str = "fused") -> int:
    """What ``FlopCounterMode`` reports around one forward + backward of the model.

    ``kernel``: ``"fused"`` (CUDA flash / efficient / cuDNN SDPA, or FlexAttention): full
    ``s x s`` attention, backward = 2.5 x forward (recomputes ``QK^T``); ``"math"``
    (``SDPBackend.MATH``): full ``s x s``, backward = 2 x forward; ``"cpu"`` (SDPA's default CPU
    kernel): attention not counted at all. Masks and causality never change the count.
    """
    if kernel not in FLOP_COUNTER_KERNELS:
        raise ValueError(f"kernel={kernel!r} must be one of {FLOP_COUNTER_KERNELS}")
    tokens = batch_size * seq_length
    dense = tokens * dense_flops_per_token(cfg)
    forward_attention = tokens * seq_length * attention_flops_per_key(cfg, forward_only=True)
    factor = {"fused": 3.5, "math": 3.0, "cpu": 0.0}[kernel]
    return dense + int(forward_attention * factor)
