"""Per-GPU memory of one rank of a parallel layout, by category, predicted before any run.

Every number is bytes on one rank. ``p`` = bytes of a parameter element (``model.params_dtype``:
4 for fp32, 2 for bf16), ``a`` = bytes of an activation element (same dtype), 4 for fp32
tensors. Notation: h hidden, H heads, G kv groups, d = h / H head dim, f ffn, V vocabulary,
s sequence, b micro-batch size, t TP, P PP, v VPP chunks per stage, D data-parallel size.

Parameters, gradients, optimizer states (exact: they follow megatron-core 0.16.1's allocations)
---------------------------------------------------------------------------------------------
:func:`chunk_parameters` lists the tensors one rank's model chunk holds, TP-sharded as megatron
shards them (column / row parallel linears and the vocabulary split over t, norms and
Transfusion's image modules whole on every TP rank). megatron's DDP (``grad_reduce_in_fp32``,
``overlap_grad_reduce=False``, so one bucket per buffer) puts every chunk's parameters in one
buffer per dtype (:func:`buffer_numel`):

- without the distributed optimizer: ``N = sum(n_i)`` elements, no padding;
- with it: each tensor starts at a multiple of 64 elements and the bucket ends at a multiple of
  ``lcm(D, 128)``: ``N = ceil(sum(ceil(n_i / 64) * 64) / lcm(D, 128)) * lcm(D, 128)``
  (``_ParamAndGradBuffer.__init__``; the padding of one tensor is ``-n_i mod 64``, independent of
  the order).

Bytes: gradients ``4 N`` (fp32 grad buffer); parameters ``p N`` with the distributed optimizer
(the param buffer), ``p sum(n_i)`` without; optimizer (Adam): without the distributed optimizer
``8 sum(n_i)`` (exp_avg, exp_avg_sq) plus ``4 sum(n_i)`` fp32 main params when p = 2; with it
only this rank's shard of the buffer, ``[r N / D, (r + 1) N / D)``, minus the padding inside it:
``E_r`` elements, ``8 E_r`` (+ ``4 E_r`` main params when p = 2). Adam's scalar step counters are
not counted.

Activations saved for backward (:func:`chunk_activation_bytes`)
---------------------------------------------------------------
Counted per tensor that autograd saves in megafusion's layers (read with
``saved_tensors_hooks`` on torch 2.13, ``megafusion/training/saved_activations.py``), per token
of a microbatch and per layer; ``h_s`` = h / t with sequence parallelism, else h (the norms and
the linear inputs run on the sequence shard):

- attention: input RMSNorm ``4 (2 h_s) + 4 r`` (input and normalised input in fp32, the rstd; r =
  1 / t with SP, else 1), QKV input ``a h_s``, QKV output ``a (H + 2G) d / t``; QK-norm ``4 (2 H d
  + 2 G d - [p=4] G d) / t + 4 (H + G) / t`` (fp32 inputs, normalised, rstds; in fp32 runs the
  k input is a view of the QKV output); RoPE'd q and k ``a (H + G) d / t``; attention output ``a H
  d / t`` (also the projection's input) and log-sum-exp ``4 H / t``; without QK-norm ``a (H + G) d
  / t`` less;
- per layer and microbatch: RoPE's cos / sin ``4 * 4 s d`` (fp32), and with a dense mask
  (packed documents or images, any backend but flex) the additive float mask ``a b s^2``;
- MLP: pre-MLP RMSNorm ``4 (2 h_s) + 4 r``, fc1 input ``a h_s``, fc1 output, SiLU output, the
  gated product and the fc2 input ``a 5 f / t``; each further FFN a token runs on the same input
  (``LayerCost.ffn_per_token`` above 1 without per-modality copies, or experts' nominal runs where
  every modality's are equal: top-k token choice's ``k``; not measured for experts) ``a 4 f / t``;
- a Mixture-of-Depths layer (``LayerCost.block_fraction`` c): all of the above for the picked c of
  the tokens (the mask's for c^2 of the pairs), plus per token ``4 h + 4`` (the router's fp32
  input and sigmoid) and per picked token ``a h + a + 24`` (the combine's operands and the
  gather / scatter indices); its auxiliary router's are not counted;
- a layer with per-modality copies of some part (``LayerCost.copies``: MoT, MoMa) or experts: the
  per-modality gathers and scatters of the grouped linears and
  norms add ``a (6 h_s + (H d + G d - f) / t) + 5`` (fitted to the saved tensors at h 32 / 64,
  f 64 / 128);
- first stage, first chunk: token ids ``8``; the objective's extra modules, per image token
  (``Objective.activation_bytes_per_image_token``; Transfusion: ``a (C p^2 + h) + 8``, patches,
  patch-embedding output and index, ``C`` the latent's channels) for the ``image_fraction`` of
  tokens;
- last stage, last chunk: final norm ``4 (2 h_s) + 4`` (per-modality norms ``+ a h``), output-layer
  input ``a h_s``, fp32 logits ``4 (1 + [z-loss]) V / t``, loss ``4 * 3 + 1 + 8``; the extra
  modules' per image token (Transfusion: the head's input ``a h``).

Recompute (``train.recompute``, megatron-core's ``recompute_granularity``): ``full`` keeps a
layer's input ``a h_s`` per token per layer and re-runs one layer in the backward (its
activations added once); ``selective`` recomputes core attention: its log-sum-exp and float mask
are not kept (its q, k, v are, and its output is the projection's saved input). Both keep the
checkpointed regions' boolean mask, ``b s^2`` bytes per chunk and microbatch (one tensor shared
by the chunk's layers).

With full recompute the peak is the forward's state plus one rebuilt layer, less what the first
backward released before rebuilding it: on the last stage the output layer's and the loss's
tensors (``max(0, layer - tail)``).

In flight (:func:`in_flight`): no pipelining 1 microbatch; 1F1B stage p: ``min(P - p, M)``;
interleaved: ``min((P - p - 1) 2 + (v - 1) P + 1, M v)`` chunk-microbatches (megatron's
``get_pp_rank_microbatches`` warmup + 1), taken in the schedule's order (groups of P microbatches
per chunk).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from megafusion.accounting.params import _dims as model_dims
from megafusion.accounting.params import _ffns_met, layer_costs
from megafusion.core.modality import Modality
from megafusion.models.spec import PARTS
from megafusion.objectives.registry import get_objective

FP32 = 4


def dtype_bytes(params_dtype: str) -> int:
    """Bytes per element of ``model.params_dtype`` as a GPU run resolves it (auto = bf16)."""
    return {"fp32": 4, "bf16": 2, "auto": 2}[params_dtype]


@dataclass(frozen=True)
class Rank:
    """Where a rank sits: sizes and coordinates that change its memory."""

    tp: int
    pp: int
    vpp: int
    dp: int
    pp_rank: int = 0
    dp_rank: int = 0
    sp: bool = False
    ep: int = 1


# ---------------------------------------------------------------------------------------------
# Parameters


def _dims(cfg) -> tuple[int, int, int, int]:
    """h, H, G, f (:func:`megafusion.accounting.params._dims`, the one reading of the model's shape)."""
    k = model_dims(cfg)
    return k["hidden"], k["heads"], k["groups"], k["ffn"]


def chunk_layers(cfg, rank: Rank, chunk: int) -> range:
    """The global layer numbers (1-based) of this rank's model chunk, placed as megatron places them
    (``get_transformer_layer_offset`` without a custom layout: chunk c of stage p holds the
    ``(c P + p)``-th run of ``L / (P v)`` layers)."""
    per_chunk = cfg.model.num_layers // (rank.pp * rank.vpp)
    first = (chunk * rank.pp + rank.pp_rank) * per_chunk + 1
    return range(first, first + per_chunk)


_IMAGE_TENSORS: dict[tuple, dict[str, list[int]]] = {}


def _extra_module_tensors(cfg, latent_shape) -> dict[str, list[int]]:
    """The objective's extra modules (Transfusion's image modules): tensor sizes per module, from
    the real modules on meta (cached: they depend on the objective, the width and the image / latent
    shape only)."""
    key = (repr(cfg.objective), cfg.model.hidden_size, cfg.data.image_size, latent_shape)
    if key not in _IMAGE_TENSORS:
        modules = get_objective(cfg.objective.name).accounting_modules(cfg, latent_shape)
        _IMAGE_TENSORS[key] = {
            name: [p.numel() for p in module.parameters()] for name, (module, _run) in modules.items()
        }
    return _IMAGE_TENSORS[key]


def chunk_parameters(cfg, rank: Rank, chunk: int, latent_shape=None) -> dict[str, list[int]]:
    """Tensor sizes (elements) of one model chunk on this rank, by buffer: ``dense`` (the model's
    dtype), ``fp32`` (routers) and ``expert`` (experts, reduced over expert DP), layer by layer as
    the family describes each (``LayerCost``)."""
    h, heads, groups, f = _dims(cfg)
    d = h // heads
    t = rank.tp
    costs = layer_costs(cfg)
    first = rank.pp_rank == 0 and chunk == 0
    last = rank.pp_rank == rank.pp - 1 and chunk == rank.vpp - 1
    vocab = cfg.model.vocab_size
    out = {"dense": [], "fp32": [], "expert": []}
    if first:
        out["dense"].append(vocab // t * h)
    made: dict[int, dict[str, list[int]]] = {}  # one layer's tensors, per distinct LayerCost
    for layer in chunk_layers(cfg, rank, chunk):
        cost = costs[layer - 1]
        if id(cost) not in made:
            attention, ffn, norms = (cost.copies_of(part) for part in PARTS)
            mine = {"dense": [h] * norms, "fp32": [], "expert": []}
            mine["dense"] += [h * heads * d // t, (heads + 2 * groups) * d // t * h] * attention
            if cfg.model.qk_norm:
                mine["dense"] += [d, d] * norms
            mine["dense"] += [h] * norms
            if cost.experts:
                mine["expert"] += [2 * f * h, h * f] * (cost.experts // rank.ep)
            else:
                mine["dense"] += [2 * f // t * h, h * f // t] * ffn
            if cost.router:
                mine["fp32"].append(cost.router)
            if cost.aux_router:  # fp32, replicated like the router
                mine["fp32"].append(cost.aux_router)
            made[id(cost)] = mine
        for kind, numels in made[id(cost)].items():
            out[kind] += numels
    if last:
        out["dense"] += [h] * costs[-1].copies_of("norms")
        if not cfg.model.tie_embeddings:
            out["dense"].append(vocab // t * h)
        elif rank.pp > 1:
            out["dense"].append(vocab // t * h)  # the last stage's synced copy of the embedding
    objective = get_objective(cfg.objective.name)
    if objective.extra_modules:
        tensors = _extra_module_tensors(cfg, latent_shape)
        for name, stage in objective.module_stages.items():
            if (first and stage == "first") or (last and stage == "last"):
                out["dense"] += tensors.get(name, [])
    return out


def buffer_numel(numels: list[int], dp: int, distributed_optimizer: bool) -> int:
    """Elements of megatron's param / grad buffer for these tensors (one bucket)."""
    if not numels:
        return 0
    if not distributed_optimizer:
        return sum(numels)
    step = math.lcm(dp, 128)
    padded = sum(-(-n // 64) * 64 for n in numels)
    return -(-padded // step) * step


def shard_elements(numels: list[int], dp: int, dp_rank: int) -> int:
    """Elements of real parameters inside this DP rank's shard of the distributed optimizer's
    buffer (the buffer is laid out in reverse parameter order, each tensor 64-aligned)."""
    total = buffer_numel(numels, dp, True)
    if total == 0:
        return 0
    size = total // dp
    lo, hi = dp_rank * size, (dp_rank + 1) * size
    start, inside = 0, 0
    for n in reversed(numels):
        start = -(-start // 64) * 64
        inside += max(0, min(hi, start + n) - max(lo, start))
        start += n
    return inside


def state_bytes(cfg, rank: Rank, params_dtype: str, latent_shape=None) -> dict[str, int]:
    """``params``, ``grads``, ``optimizer`` bytes on this rank (see the module docstring)."""
    p = dtype_bytes(params_dtype)
    dist = cfg.parallel.distributed_optimizer
    expert_dp = rank.tp * rank.dp // rank.ep  # expert tensor parallel size 1: experts span TP x DP
    totals = {"params": 0, "grads": 0, "optimizer": 0}
    for chunk in range(rank.vpp):
        tensors = chunk_parameters(cfg, rank, chunk, latent_shape)
        for kind, numels in tensors.items():
            if not numels:
                continue
            elem = FP32 if kind == "fp32" else p
            dp = expert_dp if kind == "expert" else rank.dp
            n = buffer_numel(numels, dp, dist)
            totals["grads"] += FP32 * n
            if dist:
                totals["params"] += elem * n
                owned = shard_elements(numels, dp, rank.dp_rank % dp)
            else:
                totals["params"] += elem * sum(numels)
                owned = sum(numels)
            totals["optimizer"] += 2 * FP32 * owned + (FP32 * owned if elem < FP32 else 0)
    return totals


# ---------------------------------------------------------------------------------------------
# Activations


def _has_dense_mask(cfg) -> bool:
    if cfg.model.attention_backend == "flex":
        return False
    # Continuous image latents attend bidirectionally inside their span (Transfusion's mask).
    return cfg.data.packs_documents() or get_objective(cfg.objective.name).image_latents


def _split_by_modality(cost) -> bool:
    """Whether a layer runs some part as per-modality copies, a token meeting one of them (grouped
    linears and norms): attention or norms copies, experts, or more FFN copies than a token runs."""
    ffn_runs = _ffns_met(cost, None) if len({cost.ffn_per_token(int(m)) for m in Modality}) == 1 else 1
    return (
        cost.copies_of("attention") > 1
        or cost.copies_of("norms") > 1
        or bool(cost.experts)
        or cost.copies_of("ffn") > ffn_runs
    )


def layer_activation_bytes(
    cfg, rank: Rank, params_dtype: str, micro_batch: int | None = None, layer: int = 1, costs=None
) -> dict[str, float]:
    """Bytes transformer layer ``layer`` saves for one microbatch on this rank, by part (no recompute);
    ``costs``: the layers' ``LayerCost``s when the caller has them."""
    h, heads, groups, f = _dims(cfg)
    d, s = h // heads, cfg.model.seq_length
    b = micro_batch or cfg.train.micro_batch_size
    t, a = rank.tp, dtype_bytes(params_dtype)
    sp = rank.sp and t > 1
    hs, r = (h / t, 1 / t) if sp else (h, 1)
    tokens = s * b
    norm = FP32 * 2 * hs + FP32 * r
    attn = norm + a * hs + a * (heads + 2 * groups) * d / t
    if cfg.model.qk_norm:
        k_input = 0 if a == FP32 else groups * d
        attn += FP32 * (2 * heads * d + groups * d + k_input) / t + FP32 * (heads + groups) / t
    attn += a * (heads + groups) * d / t + a * heads * d / t + FP32 * heads / t
    cost = (costs or layer_costs(cfg))[layer - 1]
    # A further FFN run on the same input (a layer whose token runs two FFNs) saves its fc1 output
    # (2f), SiLU output and gated product (f each): 4f, measured (tests/planning/
    # test_plan_memory_measured.py, the plugin family); experts count their nominal runs per token
    # where every modality's is the same (MoMa's default capacity: 1; top-k token choice: k), else one.
    uniform = len({cost.ffn_per_token(int(m)) for m in Modality}) == 1
    if cost.experts:
        runs = _ffns_met(cost, None) if uniform else 1
    else:
        runs = 1 if _split_by_modality(cost) else _ffns_met(cost, None)
    mlp = norm + a * hs + a * 5 * f / t + a * 4 * f / t * (runs - 1)
    parts = {
        "attention": tokens * attn,
        "rope": FP32 * 4 * s * d,
        "mask": a * b * s * s if _has_dense_mask(cfg) else 0,
        "mlp": tokens * mlp,
    }
    # Per-modality copies: the grouped linears' and norms' gathers and scatters (an expert FFN is
    # counted as MoT's, one expert per token at the default capacity, checked on one CPU run only:
    # -2% at mixed_small).
    if _split_by_modality(cost):
        parts["by_modality"] = tokens * (a * (6 * hs + (heads * d + groups * d - f) / t) + 5)
    if cost.block_fraction != 1:
        parts = _mod_layer(parts, cost.block_fraction, tokens, h, a)
    return parts


def _mod_layer(parts: dict, c: float, tokens: int, h: int, a: int) -> dict:
    """A Mixture-of-Depths layer (``LayerCost.block_fraction`` = c): the block runs on the picked
    ``c`` of the tokens (its mask on ``c^2`` of the pairs); the router saves, for every token of the
    whole microbatch (gathered under SP), its fp32 input ``4 h`` (a view of the layer input in fp32
    runs) and ``sigmoid(r)`` ``4``; each picked token the combine's ``y - x`` ``a h`` and ``w - 1``
    ``a``, and three int64 indices (the gather of the picked rows and of their weights, the scatter
    back) ``24``. The rotary table, per microbatch, stays."""
    scaled = {k: v * (c * c if k == "mask" else 1 if k == "rope" else c) for k, v in parts.items()}
    scaled["mod"] = tokens * (FP32 * h + FP32) + c * tokens * (a * h + a + 3 * 8)
    return scaled


def chunk_activation_bytes(
    cfg,
    rank: Rank,
    chunk: int,
    params_dtype: str,
    recompute: str = "none",
    image_fraction: float = 0.5,
    micro_batch: int | None = None,
    latent_shape=None,
) -> dict[str, float]:
    """Bytes one chunk saves for one microbatch: ``layers`` (kept through the schedule),
    ``ends`` (embedding / output / loss parts), ``tail`` (of ``ends``: the output layer and loss,
    last stage) and ``transient`` (full recompute: one layer's activations rebuilt in the backward)."""
    h, _, _, _ = _dims(cfg)
    b = micro_batch or cfg.train.micro_batch_size
    tokens = cfg.model.seq_length * b
    t, a = rank.tp, dtype_bytes(params_dtype)
    sp = rank.sp and t > 1
    hs = h / t if sp else h
    kept, transient, ends, mask = 0.0, 0.0, 0.0, 0.0
    costs = layer_costs(cfg)
    made: dict[int, dict[str, float]] = {}  # one layer's bytes, per distinct LayerCost
    for layer in chunk_layers(cfg, rank, chunk):
        cost = costs[layer - 1]
        if id(cost) not in made:
            made[id(cost)] = layer_activation_bytes(cfg, rank, params_dtype, b, layer, costs)
        parts = made[id(cost)]
        one_layer, mask = sum(parts.values()), parts["mask"]
        if recompute == "full":
            kept += tokens * a * hs
            transient = max(transient, one_layer)
        elif recompute == "selective":
            kept += one_layer - mask - tokens * FP32 * cfg.model.num_attention_heads / t
        else:
            kept += one_layer
    objective = get_objective(cfg.objective.name)
    image_tokens = tokens * image_fraction if objective.extra_modules else 0
    per_image_token = objective.activation_bytes_per_image_token(cfg, latent_shape, a)
    if recompute != "none" and mask:
        # The checkpointed regions keep their arguments, the boolean mask among them: one tensor
        # for every layer of the chunk, 1 byte per element.
        ends += b * cfg.model.seq_length**2
    if rank.pp_rank == 0 and chunk == 0:
        ends += 8 * tokens + image_tokens * per_image_token["first"]
    tail = 0.0
    if rank.pp_rank == rank.pp - 1 and chunk == rank.vpp - 1:
        vocab = cfg.model.vocab_size
        z = 1 if cfg.model.z_loss_weight > 0 else 0
        split_norm = costs[-1].copies_of("norms") > 1  # the final norm follows the last layer
        final_norm = FP32 * 2 * hs + FP32 + (a * h if split_norm else 0)
        tail = tokens * (final_norm + a * hs + FP32 * (1 + z) * vocab / t + FP32 * 3 + 1 + 8)
        tail += image_tokens * per_image_token["last"]
        ends += tail
    return {"layers": kept, "ends": ends, "tail": tail, "transient": transient}


def in_flight(rank: Rank, num_microbatches: int) -> list[int]:
    """The chunks of the microbatches in flight at this rank's peak (one entry per microbatch)."""
    P, v, M, p = rank.pp, rank.vpp, num_microbatches, rank.pp_rank
    if P == 1:
        return [0]
    if v == 1:
        return [0] * min(P - p, M)
    count = min((P - p - 1) * 2 + (v - 1) * P + 1, M * v)
    # megatron's order: microbatch groups of size P, each through chunk 0, 1, ..., v - 1.
    order = []
    for group_start in range(0, M, P):
        group = range(group_start, min(group_start + P, M))
        for c in range(v):
            order += [c] * len(group)
    return order[:count]


def activation_bytes(
    cfg,
    rank: Rank,
    params_dtype: str,
    num_microbatches: int,
    recompute: str = "none",
    image_fraction: float = 0.5,
    micro_batch: int | None = None,
    latent_shape=None,
) -> float:
    """Peak saved-activation bytes on this rank over the pipeline schedule."""
    total, transient, tail = 0.0, 0.0, 0.0
    # Each chunk's bytes once, times the microbatches in flight on it (the planner calls this for
    # thousands of layouts, some with dozens of microbatches in flight).
    for chunk, count in sorted(Counter(in_flight(rank, num_microbatches)).items()):
        part = chunk_activation_bytes(
            cfg, rank, chunk, params_dtype, recompute, image_fraction, micro_batch, latent_shape
        )
        total += count * (part["layers"] + part["ends"])
        transient = max(transient, part["transient"])
        tail = max(tail, part["tail"])
    # Full recompute rebuilds a layer in the backward. On the last stage the first backward is the
    # loss chunk's, whose output-layer and loss tensors are released before its layers are rebuilt.
    return total + max(0.0, transient - tail)


def memory(
    cfg,
    rank: Rank,
    params_dtype: str,
    num_microbatches: int,
    recompute: str = "none",
    latent_shape=None,
    image_fraction: float = 0.5,
) -> dict[str, float]:
    """Everything above for one rank: params, grads, optimizer, activations, total (bytes)."""
    out = dict(state_bytes(cfg, rank, params_dtype, latent_shape))
    out["activations"] = activation_bytes(
        cfg, rank, params_dtype, num_microbatches, recompute, image_fraction, latent_shape=latent_shape
    )
    out["total"] = sum(out.values())
    return out
