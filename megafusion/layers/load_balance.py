"""Top-k token choice's load-balancing loss and its step statistics (``model.arch=btx``).

The loss of one microbatch and layer, per expert group ``g`` (a modality's experts, or every
expert for ``mixed``), is megatron-core's switch loss (``moe_utils.switch_load_balancing_loss_func``)
over the group's ``n_g`` routable tokens, weighted by the group's share of the microbatch's ``n``
routable tokens (padding is never routed and not counted)::

    L = sum_g (n_g / n) * E_g * sum_{i in g} f_i * P_i
    f_i = c_i / (k * n_g)           c_i: the group's tokens that picked expert i (top-k), sum_i f_i = 1
    P_i = (1 / n_g) * sum_t s_t,i   s_t: the softmax of token t's logits over its group's experts

so a perfectly balanced router gives ``L = 1`` (every ``f_i = P_i = 1 / E_g``), and uniform logits
(``P_i = 1 / E_g`` whatever the counts) give exactly 1 too. The training loss adds
``aux_loss_coeff x L`` (``btx.aux_loss_coeff``, 0.01 in BTX). megatron divides each count by the
top-k (``f_i`` sums to 1); a "fraction of tokens routed to expert i" that counts a token once per
expert it picked (``sum_i f_i = k``) would make the same loss k times larger, i.e. the same
training with a coefficient k times smaller.

Where a microbatch's tokens are split over ranks (sequence parallelism), each rank sums ``P_i`` over
its own tokens and takes the counts ``c_i`` summed over the tensor-parallel group, so the ranks'
partial losses add up to ``L``; ``n`` and ``n_g`` are the microbatch's, host ints.

Statistics, per router (:func:`record`): a float64 device vector ``[L_r x n, c_0 .. c_{E-1}]`` of
this rank's partial loss times ``n`` and its own tokens' counts, summed over microbatches without
synchronisation; :func:`take_stats` stacks them by layer for the trainer, which sums them over
every rank once per step, and :func:`summarize` turns the sum into ``moe/aux_loss`` (the
token-weighted mean of ``L`` over microbatches and layers, **without** the coefficient),
``moe/share/<expert>`` (the share of its group's routing slots each expert took, over the step's
layers) and ``moe/share_entropy`` (each layer's entropy of those shares, in nats, averaged over
layers; with modality groups, the groups' entropies weighted by their tokens; ``log E_g`` when
balanced).
"""

from __future__ import annotations

import math

import torch
from megatron.core.transformer.moe.moe_utils import switch_load_balancing_loss_func


def balance_loss(scores, counts, groups, topk: int, n_groups: list[int]) -> torch.Tensor:
    """This rank's part of ``L`` (coefficient 1): ``scores`` ``[N, E]`` the within-group softmax of its
    tokens (zero rows for padding and other groups' columns), ``counts`` ``[E]`` the microbatch's
    tokens per expert (every rank's), ``n_groups`` the microbatch's routable tokens per group."""
    n = sum(n_groups)
    loss = scores.new_zeros(())
    if n == 0:
        return loss
    for g, ids in enumerate(groups.global_ids):
        if n_groups[g] == 0:
            continue
        cols = list(ids)
        part = switch_load_balancing_loss_func(
            probs=scores[:, cols],
            tokens_per_expert=counts[cols].to(scores.dtype),
            total_num_tokens=n_groups[g],
            topk=topk,
            num_experts=len(cols),
            moe_aux_loss_coeff=1.0,
        )
        loss = loss + part * (n_groups[g] / n)
    return loss


def record(router, loss: torch.Tensor, n: int, own_counts: torch.Tensor, key) -> None:
    """Add one microbatch's ``[loss x n, own counts]`` to ``router.balance_stats`` (no
    synchronisation), once per ``key`` (the microbatch's routing: a recomputed forward counts nothing)."""
    seen = key.cache.setdefault("balance_recorded", set())
    if id(router) in seen:
        return
    seen.add(id(router))
    values = torch.cat([(loss.detach() * n).double().reshape(1), own_counts.double()])
    router.balance_stats = values if router.balance_stats is None else router.balance_stats + values


def take_stats(routers, num_layers: int, num_experts: int, device: torch.device) -> torch.Tensor:
    """``[num_layers, 1 + E]`` float64: each router's statistics since the last call at its (global,
    1-based) layer's row, zeros elsewhere, and start again. No synchronisation; the caller sums it
    over every rank."""
    out = torch.zeros(num_layers, 1 + num_experts, dtype=torch.float64, device=device)
    for r in routers:
        if r.balance_stats is not None:
            out[r.layer_number - 1] += r.balance_stats.to(device)
        r.balance_stats = None
    return out


def summarize(stats, groups, topk: int) -> dict[str, float]:
    """``moe/aux_loss``, ``moe/share/<expert>`` and ``moe/share_entropy`` from the step's summed
    statistics (``[layers, 1 + E]``, every rank's); {} when no token was routed."""
    stats = torch.as_tensor(stats, dtype=torch.float64)
    counts = stats[:, 1:]
    layers = counts.sum(dim=1) > 0
    if not bool(layers.any()):
        return {}
    counts = counts[layers]
    tokens = counts.sum() / topk  # routable tokens, summed over microbatches and layers
    out = {"moe/aux_loss": float(stats[layers, 0].sum() / tokens)}
    entropy = torch.zeros(counts.shape[0], dtype=torch.float64)
    for ids in groups.global_ids:
        cols = counts[:, list(ids)]
        slots = cols.sum(dim=1)  # the group's routing slots per layer: k x its tokens
        total = float(slots.sum())
        for j, e in enumerate(ids):
            out[f"moe/share/{groups.expert_name(e)}"] = float(cols[:, j].sum()) / total if total else 0.0
        p = cols / slots.clamp_min(1)[:, None]
        h = -(p * torch.log(torch.where(p > 0, p, torch.ones_like(p)))).sum(dim=1)
        entropy += h * slots  # weighted by the group's tokens
    out["moe/share_entropy"] = float((entropy / counts.sum(dim=1)).mean())
    return out


def max_entropy(groups) -> float:
    """``moe/share_entropy`` of perfectly balanced routing with every group's tokens equal (``log E_g``
    averaged over the groups)."""
    return sum(math.log(s) for s in groups.sizes) / len(groups.sizes)
