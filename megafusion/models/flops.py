"""Exact parameter counts and analytic model FLOPs of the dense and MoT families.

A MoT token meets exactly one modality's copy of every untied matrix, so its FLOPs per token
are the dense model's of the same width and depth; only ``parameter_counts`` differs.

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
forward. These are *model* FLOPs (the convention of MFU): flash attention's recomputation of
the scores in the backward is not counted, and with the real mask (causal, same document,
bidirectional within an image when ``image_ids`` are given) masked-out pairs are not counted.

What FlopCounterMode counts for attention (measured with torch 2.13 and read in
``torch/utils/flop_counter.py``; see ``tests/test_flops.py``)
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
"""

from __future__ import annotations

import torch

from megafusion.data.types import MODALITY_NAMES, NUM_MODALITIES

MATMUL_FLOPS_PER_MAC = 2
BACKWARD_FACTOR = 2  # backward of a matmul = 2 matmuls of the same size (grad input, grad weight)
ATTENTION_MODES = ("mask", "full")
FLOP_COUNTER_KERNELS = ("fused", "math", "cpu")


FAMILIES = ("dense", "mot")


def _dims(cfg) -> dict[str, int]:
    m = cfg.model
    if m.arch not in FAMILIES:
        raise ValueError(
            f"model.arch={m.arch!r}: megafusion.models.flops has formulas for {', '.join(FAMILIES)}; add this "
            f"architecture's parameter and FLOP formulas there (MoE: count active experts for 'active')"
        )
    heads = m.num_attention_heads
    return {
        "layers": m.num_layers,
        "hidden": m.hidden_size,
        "heads": heads,
        "groups": m.effective_num_query_groups(),
        "head_dim": m.hidden_size // heads,  # the kv_channels given to megatron-core
        "ffn": m.effective_ffn_hidden_size(),
        "vocab": m.vocab_size,
    }


def _copies(cfg, part: str) -> int:
    """How many copies of a layer part the model holds: one per modality where MoT unties it."""
    if cfg.model.arch == "mot" and part in cfg.model.untied_parts():
        return NUM_MODALITIES
    return 1


def parameter_counts(cfg) -> dict[str, int]:
    """Exact parameter counts of the model that ``build_model_chunks`` builds (all ranks together).

    Keys: ``total``; ``embedding`` (input lookup table); ``output_layer`` (untied); ``norm``
    (every RMSNorm weight incl. QK-norm); ``non_embedding`` = total - embedding - output_layer
    (Kaplan et al.'s N); ``matmul`` = weights that multiply each token (the "N" of the 6N
    rule, output layer included; MoT: one modality's copy, since a token only meets its own);
    ``active`` = parameters used per token (dense: == total; MoT: one modality's copy of every
    untied part; MoE will count only the routed experts).
    """
    k = _dims(cfg)
    h, d, ffn, L = k["hidden"], k["head_dim"], k["ffn"], k["layers"]
    attention = h * (k["heads"] + 2 * k["groups"]) * d + k["heads"] * d * h  # QKV + output projection
    mlp = h * 2 * ffn + ffn * h
    norms = L * (2 * h + (2 * d if cfg.model.qk_norm else 0)) + h  # input, pre-MLP (+ q, k), final
    embedding = k["vocab"] * h
    output_layer = h * k["vocab"]
    active_matmul = L * (attention + mlp) + output_layer
    total = (embedding + output_layer + L * attention * _copies(cfg, "attention")
             + L * mlp * _copies(cfg, "ffn") + norms * _copies(cfg, "norms"))
    return {
        "total": total,
        "embedding": embedding,
        "output_layer": output_layer,
        "norm": norms * _copies(cfg, "norms"),
        "non_embedding": total - embedding - output_layer,
        "matmul": active_matmul,
        "active": embedding + active_matmul + norms,
    }


def _passes(forward_only: bool) -> int:
    return 1 if forward_only else 1 + BACKWARD_FACTOR


def dense_flops_per_token(cfg, forward_only: bool = False) -> int:
    """FLOPs of every weight matmul for one token (QKV, proj, MLP, output layer)."""
    return MATMUL_FLOPS_PER_MAC * parameter_counts(cfg)["matmul"] * _passes(forward_only)


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


def _rank_in_group(*columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For flat int64 columns of equal length: each element's 1-based rank among the elements with
    the same tuple of values (in original order), and the size of that group.

    ``torch.unique(dim=0)`` numbers the groups (no arithmetic key, so ids of any size cannot
    overflow); a stable sort keeps original order inside a group, so the rank is the position
    in the sorted order minus the group's first position.
    """
    group = torch.unique(torch.stack(columns, dim=1), dim=0, return_inverse=True)[1]
    order = torch.sort(group, stable=True).indices
    sorted_group = group[order]
    idx = torch.arange(group.numel(), dtype=torch.int64, device=group.device)
    new_group = torch.ones_like(sorted_group, dtype=torch.bool)
    new_group[1:] = sorted_group[1:] != sorted_group[:-1]
    group_start = torch.cummax(torch.where(new_group, idx, torch.zeros_like(idx)), dim=0).values
    rank = torch.empty_like(idx)
    rank[order] = idx - group_start + 1
    size = torch.bincount(group)[group]
    return rank, size


def attended_keys(document_ids: torch.Tensor, image_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Keys each query attends under the mask of :mod:`megafusion.layers.masks`: ``[b, s]`` int64.

    Query i attends key j iff ``document_ids[j] == document_ids[i]`` and (j <= i, or both are
    patches of one image: ``image_ids[i] == image_ids[j] != -1``). So the count is

        (tokens of i's document up to and including i)
        + (patches of i's image in i's document that come after i),

    i.e. its position within the document + 1 for contiguous packed documents, plus the rest of
    its image; still exact if a document or image id reappears later in the row.
    ``image_ids=None`` (or all -1) is causal + same document. Vectorised, no ``s x s`` tensor: a
    stable sort per (row, document) and per (row, document, image) gives ranks and group sizes,
    O(b s log(b s)).
    """
    doc = torch.as_tensor(document_ids).to(torch.int64)
    if doc.dim() == 1:
        doc = doc[None]
    b, s = doc.shape
    if image_ids is not None:
        img = torch.as_tensor(image_ids).to(device=doc.device, dtype=torch.int64)
        if img.numel() != doc.numel():
            raise ValueError(f"image_ids has shape {tuple(img.shape)}, document_ids {tuple(doc.shape)}: "
                             "both must be [b, s]")
        img = img.reshape(b, s)
    if doc.numel() == 0:
        return torch.zeros(b, s, dtype=torch.int64, device=doc.device)
    row = torch.arange(b, dtype=torch.int64, device=doc.device)[:, None].expand(b, s).reshape(-1)
    counts, _ = _rank_in_group(row, doc.reshape(-1))
    if image_ids is not None:
        flat_img = img.reshape(-1)
        rank, size = _rank_in_group(row, doc.reshape(-1), flat_img)
        is_patch = flat_img != -1  # NO_IMAGE in megafusion.layers.masks
        counts = counts + torch.where(is_patch, size - rank, torch.zeros_like(rank))
    return counts.view(b, s)


def attended_keys_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Keys per query from a boolean mask ``[b, 1, s, s]`` in megatron's convention (True = blocked)."""
    return (~mask.bool()).sum(-1).squeeze(1).to(torch.int64)


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
) -> dict:
    """Model FLOPs of one microbatch (forward + backward unless ``forward_only``), exactly.

    ``attention="mask"`` counts each query's real keys (causal, same document, plus the
    bidirectional image spans when ``image_ids`` ``[b, s]`` is given: see :func:`attended_keys`;
    pass ``keys`` ``[b, s]`` instead for another mask, e.g. from :func:`attended_keys_from_mask`);
    ``"full"`` counts every query against all ``s`` keys, as a mask-ignoring counter does. Every token is charged its own dense matmuls (output layer
    included) and its attention, and the split is by the modality of that (query) token;
    ``modality_ids=None`` means all text. ``loss_mask`` changes no FLOP (logits are computed at
    every position) and is only used to report ``loss_tokens_per_modality``.

    Returns ints: ``total``, ``dense``, ``attention``, ``tokens``, ``per_modality``,
    ``attention_per_modality``, ``tokens_per_modality`` (dicts keyed by ``MODALITY_NAMES``), the
    float ``mean_attended_keys``, and ``loss_tokens_per_modality`` when a loss mask is given.
    """
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention={attention!r} must be one of {ATTENTION_MODES}")
    if keys is not None and image_ids is not None:
        raise ValueError("batch_flops: pass keys (counted from some mask) or image_ids (the Transfusion mask), "
                         "not both")
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

    dense_tok = dense_flops_per_token(cfg, forward_only)
    per_key = attention_flops_per_key(cfg, forward_only)
    flat_mod = mod.reshape(-1)
    tokens_m = torch.bincount(flat_mod, minlength=NUM_MODALITIES)
    keys_m = torch.zeros(NUM_MODALITIES, dtype=torch.int64).index_add_(0, flat_mod, nkeys.reshape(-1))
    attn_m = [per_key * int(keys_m[i]) for i in range(NUM_MODALITIES)]
    dense_m = [dense_tok * int(tokens_m[i]) for i in range(NUM_MODALITIES)]
    out = {
        "total": sum(attn_m) + sum(dense_m),
        "dense": sum(dense_m),
        "attention": sum(attn_m),
        "tokens": b * s,
        "mean_attended_keys": float(nkeys.double().mean()) if nkeys.numel() else 0.0,
        "per_modality": {n: dense_m[i] + attn_m[i] for i, n in enumerate(MODALITY_NAMES)},
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
