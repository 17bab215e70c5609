"""Expert-choice routing inside modality groups (MoMa), as a router for megatron-core's ``MoELayer``.

megatron-core has token-choice routers only (``TopKRouter``); its ``MoELayer``, token dispatchers
and experts take any router that returns ``(probs [N, E], routing_map [N, E] bool)`` for the
``N`` tokens a rank holds. This one makes every expert choose its tokens:

1. logits ``[N, E]`` = the tokens' hidden states times the fp32 router weight (megatron's
   ``Router.gating``);
2. per group ``g`` (a modality, or all tokens for ``mixed``): every expert of the group takes the
   ``k_g`` tokens of the group with the highest logits, over the whole microbatch
   (:class:`~megafusion.layers.expert_groups.ExpertGroups` has ``k_g``; a token may be taken by
   zero, one or several experts); ties go to the earlier token, so the choice is the same on every
   device and layout;
3. a chosen token's gate is ``sigmoid(logit)``; its output is the gate-weighted sum of its
   experts' outputs (megatron's combine), and a token no expert chose keeps only its residual.

No device-to-host synchronisation: the group sizes come from the batch's host-side modality
counts (:mod:`megafusion.layers.routing`), the group's tokens from the routing's stable modality
sort, and the selection is a stable sort on the device. The router also hands the layer
``dispatch_counts``, the tokens this rank dispatches to each expert (host ints), from which
:mod:`megafusion.layers.expert_dispatch` sizes every buffer and collective.

The router always sees the whole microbatch: under sequence parallelism
:class:`~megafusion.layers.expert_choice_layer.ExpertChoiceMoELayer` all-gathers it first and sets
``share = (t, T)``, and tensor-parallel rank ``t`` keeps the ``t``-th of ``T`` contiguous shares
(in position order) of each expert's tokens, so the ranks together dispatch each chosen token
once and every share's size is a host int. Every rank selects over the whole microbatch, exactly
as one process would. The selection carries no gradient (as in any top-k router); the gates do,
through this rank's shares only, and megatron's gradient reduction sums the router weight's
gradient over the tensor-parallel ranks (``sequence_parallel`` attribute, set by ``Router``).

Optional Gumbel-sigmoid noise (``moe.router_noise``, MoMa's upcycling recipe) perturbs the
selection in training, not the gates: ``logits + scale x (G' - G'')``, drawn as the logistic
sample ``logit(u)`` it equals in distribution. The noise of a token is keyed by what the data
defines: the run seed, the layer and the global sample number of its row (the routing's
``sample_ids``), one generator per row. So a sample gets the same noise in every TP / SP / EP / PP
/ DP layout, at any position in any microbatch and after a resume, and activation recomputation
(``train.recompute``, which runs the layer again under the same routing:
:mod:`megafusion.layers.recompute`) draws the same noise again. A sample is routed by a layer once
per step it is trained in; a later epoch reads the same row as another sample number.

Causal routing (``ModalityRouting.causal``: generation, causal evaluation): the layer's
auxiliary router (:mod:`megafusion.layers.aux_router`) predicts, from each token alone, which
experts of its group would take it; those take it, with the same sigmoid gate
(:meth:`ExpertChoiceRouter.causal_routing`). Each expert's count then depends on the data: one
device-to-host copy per layer, and the expert-parallel counts are exchanged per layer.

Selection margin: in training the router keeps, as a device scalar (no synchronisation), the
smallest gap between an expert's ``k``-th chosen score and the best score below it that it did
not choose (:func:`selection_margin`; exact ties, which go to the earlier token in every layout,
are left out), over its groups and the microbatches of the step; :func:`take_min_margin` hands
the step's minimum to the trainer (``moe/min_margin``, reduced once per step over the ranks). Two
layouts compute the scores with rounding differences of the order of fp32 rounding; a margin
above that keeps every choice the same in both, a margin at that level can flip one (a near-tie),
after which the two runs are slightly different trainings.
"""

from __future__ import annotations

import zlib

import torch
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.router import Router

from megafusion.core.modality import MODALITY_NAMES
from megafusion.layers.expert_groups import ExpertGroups
from megafusion.layers.routing import current_routing

# megatron-core 0.16.1 imports Transformer Engine's router GEMM inside try/except without a
# fallback name, and the router's autograd function tests `te_general_gemm is not None`: without
# TE that is a NameError on the first call. None selects its plain torch.mm path.
if not hasattr(moe_utils, "te_general_gemm"):
    moe_utils.te_general_gemm = None

GATES = ("sigmoid", "one")


class ExpertChoiceRouter(Router):
    """``MoESubmodules(router=partial(ExpertChoiceRouter, groups=..., noise=..., seed=...))``."""

    def __init__(self, config, pg_collection=None, *, groups: ExpertGroups, noise: float = 0.0, seed: int = 0):
        super().__init__(config, pg_collection)
        if groups.total != config.num_moe_experts:
            raise ValueError(f"expert groups hold {groups.total} experts, the config {config.num_moe_experts}")
        self.groups = groups
        self.noise = noise
        self.seed = seed
        # "one" holds every chosen token's gate at 1 (an upcycled 1t1i model at capacity 1 then
        # computes exactly its MoT FFN; tests check the wiring with it).
        self.gate = "sigmoid"
        self.min_margin: torch.Tensor | None = None  # smallest selection margin since take_min_margin
        self.share = (0, 1)  # (this rank's share, shares): set by the layer under sequence parallelism
        self.dispatch_counts: list[int] = []  # tokens this rank dispatches to each expert, last forward
        self._expert_id_tensors: dict = {}  # (group, device) -> the group's global expert ids
        # With an auxiliary router (the layer sets these): the whole microbatch's selection
        # ([N, E] bool, every rank's shares), its training targets; and, under causal routing, its
        # predictions ([N, E] bool), which choose instead of the ranking.
        self.keep_selection = False
        self.selection: torch.Tensor | None = None
        self.predicted: torch.Tensor | None = None

    def forward(self, input: torch.Tensor, padding_mask: torch.Tensor | None = None):
        logits = self.gating(input.reshape(-1, input.shape[-1]))  # [N, E], the whole microbatch
        routing = current_routing()
        if routing.causal:
            predicted, self.predicted = self.predicted, None
            routing_map, self.dispatch_counts = self.causal_routing(predicted, routing)
        else:
            routing_map, self.dispatch_counts = self.routing(logits.detach(), routing)
        if self.gate == "one":
            return routing_map.to(logits.dtype), routing_map
        return torch.sigmoid(logits) * routing_map, routing_map

    def routing(self, logits: torch.Tensor, routing) -> tuple[torch.Tensor, list[int]]:
        """The ``[N, E]`` bool map of this rank's share (expert ``e`` takes token ``t``) and its
        column sums as host ints."""
        if self.training and self.noise > 0:
            logits = logits + self.noise * self._logistic_noise(logits, routing)
        n_tokens, num_experts = logits.shape
        routing_map = torch.zeros(n_tokens, num_experts, dtype=torch.bool, device=logits.device)
        selection = torch.zeros_like(routing_map) if self.keep_selection else None
        counts = [0] * num_experts
        share, shares = self.share
        for g, expert_ids in enumerate(self.groups.global_ids):
            tokens = self._group_tokens(g, routing)
            n_group = n_tokens if tokens is None else tokens.numel()
            k = self.groups.tokens_per_expert(g, n_group)
            start, size = share_bounds(k, share, shares)
            if size == 0:
                continue
            experts = self._expert_ids(g, logits.device)
            scores = logits.index_select(1, experts)
            if tokens is not None:
                scores = scores.index_select(0, tokens)
            # Stable: among equal scores the earlier token wins, on every device and layout.
            ranked = torch.sort(scores, dim=0, descending=True, stable=True)
            chosen = ranked.indices[:k]  # [k, E_g]
            if self.training and k < n_group:
                self._note_margin(selection_margin(ranked.values, k))
            if tokens is not None:
                chosen = tokens[chosen]
            if selection is not None:
                selection[chosen.reshape(-1), experts.repeat(k)] = True
            if shares > 1:  # this rank's contiguous share of each expert's tokens, in position order
                chosen = chosen.sort(dim=0).values[start : start + size]
            routing_map[chosen.reshape(-1), experts.repeat(size)] = True
            for e in expert_ids:
                counts[e] = size
        self.selection = selection
        return routing_map, counts

    def causal_routing(self, predicted: torch.Tensor | None, routing) -> tuple[torch.Tensor, list[int]]:
        """Causal routing: expert ``e`` takes a routable token of its group iff the auxiliary
        router predicted so (``predicted`` ``[N, E]`` bool); this rank's share as in
        :meth:`routing`. The counts depend on the data: one device-to-host copy per layer."""
        if predicted is None:
            raise ValueError("causal routing reached an expert-choice router without its auxiliary predictions")
        allowed = self._group_mask(routing, predicted.device) & routing.routable_mask()[:, None]
        picked = predicted & allowed
        totals = picked.sum(dim=0).tolist()  # the one synchronisation
        share, shares = self.share
        if shares == 1:
            return picked, totals
        # Each expert's picked tokens first, in position order; this rank takes its contiguous share.
        order = torch.sort(picked.T.to(torch.int8), dim=1, descending=True, stable=True).indices
        routing_map = torch.zeros_like(picked)
        counts = []
        for e, total in enumerate(totals):
            start, size = share_bounds(total, share, shares)
            routing_map[order[e, start : start + size], e] = True
            counts.append(size)
        return routing_map, counts

    def _group_mask(self, routing, device: torch.device) -> torch.Tensor:
        """``[N, E]`` bool: expert ``e`` may take token ``t`` (same modality group), made once per
        microbatch and router."""
        key = ("expert_group_mask", id(self.groups), device)
        if key not in routing.cache:
            n = routing.token_modality.numel()
            if self.groups.modality_blind:
                mask = torch.ones(n, self.groups.total, dtype=torch.bool, device=device)
            else:
                modality_of_expert = torch.empty(self.groups.total, dtype=torch.int64)
                for g, name in enumerate(self.groups.names):
                    modality_of_expert[list(self.groups.global_ids[g])] = MODALITY_NAMES.index(name)
                mask = routing.token_modality.to(device)[:, None] == modality_of_expert.to(device)[None, :]
            routing.cache[key] = mask
        return routing.cache[key]

    def _expert_ids(self, g: int, device: torch.device) -> torch.Tensor:
        """Group ``g``'s global expert ids on ``device``, copied there once: a host-to-device copy
        of a fresh tensor in every forward would wait for the device."""
        key = (g, device)
        if key not in self._expert_id_tensors:
            self._expert_id_tensors[key] = torch.tensor(self.groups.global_ids[g], device=device)
        return self._expert_id_tensors[key]

    def _group_tokens(self, g: int, routing) -> torch.Tensor | None:
        """The microbatch's tokens of group ``g`` in position order, padding left out (None: all)."""
        # routing.order lists each modality's real tokens in position order, then its padding.
        starts = [sum(routing.counts[:m]) for m in range(len(routing.counts))]
        if not self.groups.modality_blind:
            return routing.order[starts[g] : starts[g] + routing.routable(g)]
        if routing.routable_counts is None or routing.routable_counts == routing.counts:
            return None
        real = [routing.order[start : start + routing.routable(m)] for m, start in enumerate(starts)]
        return torch.cat(real).sort().values

    def _note_margin(self, margin: torch.Tensor) -> None:
        self.min_margin = margin if self.min_margin is None else torch.minimum(self.min_margin, margin)

    def _logistic_noise(self, logits: torch.Tensor, routing) -> torch.Tensor:
        """``[N, E]`` standard logistic noise (``G' - G''``), each row's from its own generator
        seeded by (seed, layer, the row's sample number), in megatron's token order."""
        if routing.sample_ids is None:
            raise ValueError(
                "moe.router_noise > 0 needs each row's sample number: give the batch `sample_ids` "
                "(megafusion's trainer does) or set moe.router_noise=0"
            )
        s, b = routing.seq_length, routing.micro_batch_size
        rows = []
        for sample in routing.sample_ids:
            key = zlib.crc32(f"router-noise:{self.seed}:{self.layer_number}:{sample}".encode())
            gen = torch.Generator(device=logits.device).manual_seed(key)
            rows.append(torch.rand((s, logits.shape[1]), generator=gen, device=logits.device))
        # rand gives k / 2^24; the half step makes u symmetric in (0, 1), so logit(u) is finite.
        u = torch.stack(rows, dim=1).reshape(s * b, -1) + 2.0**-25  # token i = pos * b + row
        return torch.logit(u).to(logits.dtype)


def selection_margin(ranked: torch.Tensor, k: int) -> torch.Tensor:
    """The smallest gap, over the experts (columns of ``ranked``, each column's scores in descending
    order), between the ``k``-th chosen score and the best unchosen score below it; +inf if none.

    Exact ties are left out: equal scores go to the earlier token in any layout that computes them
    equal, and those that occur are identical tokens (the same document prefix twice in a
    microbatch), which every layout computes alike. Identical tokens that round one ulp apart
    (the same prefix at another offset in the row) count: a near-tie like any other.
    """
    kth = ranked[k - 1]
    rest = ranked[k:]
    below = torch.where(rest < kth, rest, float("-inf")).max(dim=0).values
    return (kth - below).min()


def take_min_margin(routers, device: torch.device) -> torch.Tensor:
    """The smallest selection margin of ``routers`` since the last call, as a device scalar (+inf
    where no expert left a token unchosen), and start again. No synchronisation."""
    margins = [r.min_margin for r in routers if r.min_margin is not None]
    for r in routers:
        r.min_margin = None
    return torch.stack(margins).min() if margins else torch.full((), float("inf"), device=device)


def routers_of(modules) -> list[ExpertChoiceRouter]:
    """The expert-choice routers inside ``modules`` (model chunks)."""
    return [m for module in modules for m in module.modules() if isinstance(m, ExpertChoiceRouter)]


def share_bounds(k: int, share: int, shares: int) -> tuple[int, int]:
    """Start and size of share ``share`` of ``shares`` near-equal contiguous parts of ``k`` items."""
    base, extra = divmod(k, shares)
    return share * base + min(share, extra), base + (share < extra)
