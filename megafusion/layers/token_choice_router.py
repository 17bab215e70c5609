"""Top-k token choice inside modality groups (Branch-Train-MiX), as megatron-core's ``TopKRouter``.

megatron's ``TopKRouter`` (its fp32 gating GEMM, its config: ``moe_router_topk``,
``moe_router_score_function=softmax``, ``moe_router_pre_softmax``, ``moe_aux_loss_coeff``) with its
``routing`` replaced by the same top-k arithmetic (``moe_utils.topk_routing_with_score_function``,
unfused) plus what megafusion's microbatches need:

1. groups: the logits of experts outside a token's group (``btx.experts={text: 2, image: 2}``: the
   other modality's) are ``-inf`` before the top-k, so a token picks among its modality's experts
   only (``mixed``: every expert);
2. padding (``ModalityRouting.routable_mask``) picks no expert: its routing-map row is empty and
   its gates 0, so the experts run exactly ``k`` times per routable token;
3. ties go to the lower expert number (a stable sort instead of ``torch.topk``, whose order among
   equal scores is unspecified), on every device and layout;
4. gates: ``pre_softmax=False`` (BTX) takes the top-k logits, then a softmax over those k (a token's
   gates sum to 1); ``pre_softmax=True`` the softmax over the group, then its top-k;
5. the load-balancing loss (:mod:`megafusion.layers.load_balance`: its formula and convention) over
   routable tokens per group, attached to the gates with megatron's ``MoEAuxLossAutoScaler`` in
   training (``aux_router.attach``, which fixes its process-global scale) as ``coeff x L x n``: the
   trainer divides every gradient by the step's loss tokens (``calculate_per_token_loss``), so the
   step trains on the token-weighted mean of the microbatches' ``L``. Under sequence parallelism each
   rank routes its own tokens (as megatron does) and the per-expert counts are summed over the
   tensor-parallel group (one device all-reduce per layer); the multiplier is the microbatch's
   routable count ``n`` on every rank (megatron multiplies by the rank's local token count, which
   under SP makes the ranks' parts add up to ``L x n / tp``). Context parallelism likewise: each
   rank routes its shard's tokens, the counts are summed over the context-parallel group too and
   ``n`` is the whole microbatch's (``routing.whole``), so the logged loss and shares are one
   process's.

The router hands its layer ``dispatch_counts``, the tokens it sends to each expert, as host ints:
token choice makes them device values, read with one device-to-host copy per layer forward
(:mod:`megafusion.layers.token_choice_layer`). In training it keeps the smallest routing margin
(``min_margin``: the gap between a token's k-th and (k+1)-th score within its group, exact ties
left out), which the trainer logs as ``moe/min_margin`` as for expert choice: a margin at fp32
rounding level is where another layout can pick another expert.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.transformer.moe.router import TopKRouter

import megafusion.layers.expert_choice_router  # noqa: F401 - its te_general_gemm shim for the router GEMM
from megafusion.core.modality import MODALITY_NAMES
from megafusion.layers import load_balance
from megafusion.layers.aux_router import attach
from megafusion.layers.expert_groups import ExpertGroups
from megafusion.layers.routing import current_routing


class TokenChoiceRouter(TopKRouter):
    """``MoESubmodules(router=partial(TokenChoiceRouter, groups=...))``; k, the pre-softmax switch and
    the loss coefficient are megatron's config (``moe_router_topk``, ``moe_router_pre_softmax``,
    ``moe_aux_loss_coeff``)."""

    def __init__(self, config, pg_collection=None, *, groups: ExpertGroups):
        super().__init__(config, pg_collection)
        if groups.total != config.num_moe_experts:
            raise ValueError(f"expert groups hold {groups.total} experts, the config {config.num_moe_experts}")
        if self.score_function != "softmax" or config.moe_router_num_groups or config.moe_expert_capacity_factor:
            raise ValueError("TokenChoiceRouter: softmax scores, no device-limited groups, no token dropping")
        if self.topk > min(groups.sizes):
            raise ValueError(f"top-{self.topk} routing needs every group to hold that many experts: {groups.sizes}")
        self.groups = groups
        self.coeff = float(config.moe_aux_loss_coeff)
        self.dispatch_counts: list[int] = []  # tokens this rank sends to each expert, last forward
        self.balance_stats: torch.Tensor | None = None  # load_balance.record, since take_stats
        self.min_margin: torch.Tensor | None = None  # smallest routing margin since take_min_margin
        self.last_loss: torch.Tensor | None = None  # this rank's L of the last training forward (tests)

    def forward(self, input: torch.Tensor, padding_mask: torch.Tensor | None = None):
        logits = self.gating(input.reshape(-1, input.shape[-1]))  # [N, E] fp32, this rank's tokens
        routing = current_routing()
        routable = _local_rows(routing.routable_mask(), logits.shape[0])
        allowed = _local_rows(self._group_mask(routing, logits.device), logits.shape[0])
        probs, routing_map, scores = self.routing_of(logits, allowed, routable)
        counts = routing_map.sum(dim=0)
        self.dispatch_counts = counts.tolist()  # the one device-to-host copy of the layer
        if self.training:
            # The microbatch's routable tokens: under context parallelism the whole one's.
            n_groups = self._routable_per_group(routing if routing.whole is None else routing.whole)
            total = counts
            if self.tp_group.size() > 1 and logits.shape[0] * self.tp_group.size() == routing.token_modality.numel():
                total = counts.clone()  # sequence parallelism: the microbatch's counts
                dist.all_reduce(total, group=self.tp_group)
            if routing.shard is not None:  # context parallelism: every context rank's tokens too
                total = total.clone()
                dist.all_reduce(total, group=ps.get_context_parallel_group())
            loss = load_balance.balance_loss(scores, total, self.groups, self.topk, n_groups)
            self.last_loss = loss.detach()
            load_balance.record(self, loss, sum(n_groups), counts, routing)
            if self.coeff > 0 and torch.is_grad_enabled():
                probs = attach(probs, loss * (self.coeff * sum(n_groups)))
        return probs, routing_map

    def routing_of(self, logits: torch.Tensor, allowed: torch.Tensor, routable: torch.Tensor):
        """``(probs [N, E], routing_map [N, E] bool, scores [N, E])``: the gates of the picked experts,
        which they are, and the within-group softmax the balancing loss reads (zero rows for padding)."""
        masked = logits.masked_fill(~allowed, float("-inf"))
        softmax = torch.softmax(masked, dim=-1, dtype=torch.float32).type_as(logits)
        select = softmax if self.config.moe_router_pre_softmax else masked
        ranked = torch.sort(select.detach(), dim=1, descending=True, stable=True)
        top = ranked.indices[:, : self.topk]
        if self.config.moe_router_pre_softmax:
            gates = softmax.gather(1, top)
        else:
            gates = torch.softmax(masked.gather(1, top), dim=-1, dtype=torch.float32).type_as(logits)
        if self.config.moe_router_topk_scaling_factor:
            gates = gates * self.config.moe_router_topk_scaling_factor
        keep = routable[:, None]
        probs = torch.zeros_like(logits).scatter(1, top, gates) * keep
        routing_map = torch.zeros_like(allowed).scatter(1, top, True) & keep
        if self.training and self.topk < select.shape[1]:
            # On the logits either way: a softmax score of 0 (another group's expert) is no rival.
            values = torch.sort(masked.detach(), dim=1, descending=True).values if select is softmax else ranked.values
            self._note_margin(routing_margin(values, self.topk, routable))
        return probs, routing_map, softmax * keep

    def _group_mask(self, routing, device: torch.device) -> torch.Tensor:
        """``[s * b, E]`` bool, the whole microbatch: expert ``e`` is in token ``t``'s group (made once
        per microbatch and group layout)."""
        key = ("token_choice_group_mask", self.groups, device)
        if key not in routing.cache:
            n = routing.token_modality.numel()
            if self.groups.modality_blind:
                mask = torch.ones(n, self.groups.total, dtype=torch.bool, device=device)
            else:
                of_expert = torch.empty(self.groups.total, dtype=torch.int64)
                for g, name in enumerate(self.groups.names):
                    of_expert[list(self.groups.global_ids[g])] = MODALITY_NAMES.index(name)
                mask = routing.token_modality.to(device)[:, None] == of_expert.to(device)[None, :]
            routing.cache[key] = mask
        return routing.cache[key]

    def _routable_per_group(self, routing) -> list[int]:
        """The microbatch's routable tokens per group (host ints)."""
        per_modality = [routing.routable(m) for m in range(len(routing.counts))]
        if self.groups.modality_blind:
            return [sum(per_modality)]
        return [per_modality[MODALITY_NAMES.index(name)] for name in self.groups.names]

    def _note_margin(self, margin: torch.Tensor) -> None:
        self.min_margin = margin if self.min_margin is None else torch.minimum(self.min_margin, margin)


def _local_rows(flat: torch.Tensor, rows: int) -> torch.Tensor:
    """The entries of a whole-microbatch per-token tensor (megatron order) for the ``rows`` tokens this
    rank holds: all of them, or its sequence-parallel slice (contiguous in megatron's order)."""
    if flat.shape[0] == rows:
        return flat
    tp = ps.get_tensor_model_parallel_world_size()
    if rows * tp != flat.shape[0]:
        raise ValueError(f"{rows} tokens match neither the microbatch ({flat.shape[0]}) nor its SP slice")
    start = ps.get_tensor_model_parallel_rank() * rows
    return flat[start : start + rows]


def routing_margin(ranked: torch.Tensor, k: int, routable: torch.Tensor) -> torch.Tensor:
    """The smallest gap, over routable tokens (rows of ``ranked``, each row's scores in descending
    order), between the k-th picked score and the best score below it; +inf if none. Exact ties are
    left out: they go to the lower expert number in every layout that computes them equal."""
    kth = ranked[:, k - 1 : k]
    rest = ranked[:, k:]
    below = torch.where(rest < kth, rest, float("-inf")).max(dim=1).values
    gap = torch.where(routable, kth[:, 0] - below, float("inf"))
    return gap.min() if gap.numel() else torch.full((), float("inf"), device=ranked.device)


def token_choice_routers_of(modules) -> list[TokenChoiceRouter]:
    """The token-choice routers inside ``modules`` (model chunks, DDP-wrapped or not)."""
    return [m for module in modules for m in module.modules() if isinstance(m, TokenChoiceRouter)]
