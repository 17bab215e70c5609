"""Predicted time of one optimizer step of a layout, by part, each a formula a reader can check.

Notation as in :mod:`megafusion.planning.memory`; ``M`` microbatches per DP rank per step,
``T = s b`` tokens per microbatch, ``a`` bytes per activation element, ``R = peak x efficiency``
the achieved FLOP/s of one GPU, ``B_tp``, ``B_dp``, ``B_pp`` the link bandwidths of the groups
(NVLink when the group stays inside a node, else the inter-node bandwidth per GPU), all one
direction in bytes/s. Nothing overlaps (the trainer runs DDP with ``overlap_grad_reduce=False``).

- compute per microbatch on the slowest stage: ``F_stage / R`` where ``F_stage`` = that stage's
  model FLOPs (:mod:`megafusion.accounting.flops`: its ``L / P`` layers' matmuls and attention
  at the mean attended keys, plus the output layer on the last stage) ``/ t``; recompute adds
  hardware FLOPs: ``full`` one more forward of the layers (+1/3 of their 3x-forward FLOPs),
  ``selective`` one more forward of core attention;
- TP (t > 1), per layer and microbatch: 2 all-reduces forward and 2 backward (with SP the same
  volume as all-gather + reduce-scatter) of ``T h a`` bytes, ring cost ``2 (t - 1) / t x T h a /
  B_tp`` each: ``4 x 2 (t - 1) / t x T h a / B_tp`` (+2 forward ones more with full recompute);
- pipeline: per microbatch one send forward and one backward of ``T h a / (t if SP)`` bytes per
  chunk boundary: ``2 v T h a / B_pp``; the bubble: ``(P - 1) / v`` microbatch times (1F1B v = 1;
  interleaved v chunks);
- step = ``(M + (P - 1) / v) x (compute + tp + p2p + a2a per microbatch)`` + DP + optimizer;
- DP gradient reduce of the fp32 grad buffer (``4 N`` bytes, :func:`memory.buffer_numel`):
  all-reduce ``2 (D - 1) / D x 4 N / B_dp``; distributed optimizer: reduce-scatter ``(D - 1) / D x
  4 N / B_dp`` + all-gather of the updated parameters ``(D - 1) / D x p N / B_dp``;
- expert all-to-all (MoMa, Branch-Train-MiX; EP > 1), per MoE layer and microbatch: dispatch and
  combine forward and backward, ``4 x (EP - 1) / EP x r T h a / B_ep`` with ``r`` the layer's nominal
  expert runs per token (``LayerCost.ffn_per_token``: MoMa 1 at the default capacity, top-k ``k``;
  1 where the modalities' differ): each routed copy of a token travels;
- optimizer: reads and writes the states, main params, params and grads once: ``2 x (optimizer +
  params + grads bytes) / HBM bandwidth``.
"""

from __future__ import annotations

from dataclasses import replace

from megafusion.accounting.flops import attention_flops_per_key
from megafusion.accounting.params import _matmul_parts, layer_costs, layer_weights_per_token
from megafusion.core.modality import Modality
from megafusion.planning.memory import Rank, chunk_layers, dtype_bytes


def mean_attended_keys(cfg) -> float:
    """Keys per query, ``(s_doc + 1) / 2``: causal over documents of ``s / data.docs_per_sequence``
    tokens for synthetic data, else causal over the whole row (an upper bound for packed documents:
    a query attends only its own document); with ``data.attention=causal`` always the whole row."""
    s = cfg.model.seq_length
    isolated = cfg.data.source == "synthetic" and not cfg.data.cross_document()
    docs = cfg.data.docs_per_sequence if isolated else 1
    return (s / docs + 1) / 2


def stage_layers(cfg, rank: Rank, pp_rank: int) -> list[int]:
    """Global layer numbers held by pipeline stage ``pp_rank`` (every virtual chunk)."""
    return [layer for chunk in range(rank.vpp) for layer in chunk_layers(cfg, replace(rank, pp_rank=pp_rank), chunk)]


def stage_flops_per_token(cfg, rank: Rank) -> dict[str, float]:
    """Model FLOPs (forward + backward) per token of the heaviest pipeline stage, before dividing by
    TP: ``layers`` (its layers incl. attention, each as its ``LayerCost`` says at the nominal
    routing), ``output`` (the output layer, on the last stage only), ``attention`` (its layers'
    attention), ``expert_layers`` (its layers with experts, each an all-to-all over EP, weighted by
    its nominal expert runs per token)."""
    parts, costs = _matmul_parts(cfg), layer_costs(cfg)
    output = 3 * 2 * (parts["output"] + parts["new_rows"])  # LMFusion's output delta sits beside it
    attention_per_layer = attention_flops_per_key(cfg) * mean_attended_keys(cfg) / cfg.model.num_layers

    made: dict[int, float] = {}  # per distinct LayerCost

    def layer_flops(layer: int) -> float:
        cost = costs[layer - 1]
        if id(cost) not in made:
            weights = layer_weights_per_token(cost, parts)
            # an auxiliary router: < 3 passes (detached input), counted as 3 here (it is small)
            made[id(cost)] = 3 * 2 * (weights + cost.aux_router) + attention_per_layer
        return made[id(cost)]

    stages = []
    for p in range(rank.pp):
        layers = stage_layers(cfg, rank, p)
        total = sum(layer_flops(layer) for layer in layers)
        stages.append(
            {
                "layers": total,
                "output": output if p == rank.pp - 1 else 0.0,
                "attention": attention_per_layer * len(layers),
                "expert_layers": sum(_routed_copies(costs[layer - 1]) for layer in layers if costs[layer - 1].experts),
                "count": len(layers),
            }
        )
    return max(stages, key=lambda st: (st["layers"] + st["output"], st["output"]))


def _routed_copies(cost) -> float:
    """Copies of a token an expert layer dispatches at the nominal routing (1 where modalities differ)."""
    runs = {cost.ffn_per_token(int(m)) for m in Modality}
    return runs.pop() if len(runs) == 1 else 1


def ring(n: int) -> float:
    """The ring factor of a reduce-scatter or all-gather over ``n`` ranks: ``(n - 1) / n``."""
    return (n - 1) / n if n > 1 else 0.0


def bubble_fraction(pp: int, vpp: int, num_microbatches: int) -> float:
    """Pipeline bubble over useful time: ``(P - 1) / (v M)`` (1F1B: v = 1)."""
    return (pp - 1) / (vpp * num_microbatches)


def step_time(
    cfg,
    rank: Rank,
    hw,
    params_dtype: str,
    num_microbatches: int,
    recompute: str,
    efficiency: float,
    state: dict,
) -> dict[str, float]:
    """Seconds per optimizer step by part (see the module docstring); ``state`` = this rank's
    :func:`memory.state_bytes` (its optimizer, params, grads)."""
    a = dtype_bytes(params_dtype)
    h, s, b = cfg.model.hidden_size, cfg.model.seq_length, cfg.train.micro_batch_size
    t, P, v, M, D = rank.tp, rank.pp, rank.vpp, num_microbatches, rank.dp
    tokens = s * b
    rate = hw.peak_tflops * 1e12 * efficiency
    per_node = hw.gpus_per_node
    nvlink, nodes = hw.nvlink_gbps * 1e9, hw.nodes_gbps * 1e9

    flops = stage_flops_per_token(cfg, rank)
    layer_flops = flops["layers"]
    if recompute == "full":
        layer_flops *= 4 / 3
    elif recompute == "selective":
        layer_flops += flops["attention"] / 3
    stage = layer_flops + flops["output"]
    compute = tokens * stage / t / rate

    # Megatron's order tp-cp-ep-dp-pp: TP groups are consecutive ranks, DP strides by TP, PP by TP x DP.
    b_tp = nvlink if t <= per_node else nodes
    b_dp = nvlink if t * D <= per_node else nodes
    b_pp = nvlink if t * D * P <= per_node else nodes
    layers_here = flops["count"]
    collectives = 4 + (2 if recompute == "full" else 0)
    tp_comm = layers_here * collectives * 2 * ring(t) * tokens * h * a / b_tp
    p2p = (2 * v * tokens * h * a / (t if rank.sp else 1) / b_pp) if P > 1 else 0.0
    a2a = 0.0
    if rank.ep > 1:
        b_ep = nvlink if t * rank.ep <= per_node else nodes
        a2a = flops["expert_layers"] * 4 * ring(rank.ep) * tokens * h * a / b_ep
    per_microbatch = compute + tp_comm + p2p + a2a
    bubble = (P - 1) / v * per_microbatch

    grads_numel = state["grads"] / 4
    if D > 1:
        if cfg.parallel.distributed_optimizer:
            dp_comm = ring(D) * (4 * grads_numel + a * grads_numel) / b_dp
        else:
            dp_comm = 2 * ring(D) * 4 * grads_numel / b_dp
    else:
        dp_comm = 0.0
    optimizer = 2 * (state["optimizer"] + state["params"] + state["grads"]) / (hw.hbm_gbps * 1e9)
    out = {
        "compute": M * compute,
        "tp_comm": M * tp_comm,
        "pp_p2p": M * p2p,
        "ep_a2a": M * a2a,
        "bubble": bubble,
        "dp_comm": dp_comm,
        "optimizer": optimizer,
    }
    out["step"] = sum(out.values())
    return out
