"""megatron-core's token dispatchers, fed host-known counts so that no dispatch step reads the device.

Expert choice fixes every expert's token count before the layer runs (``k_g`` from the
microbatch's host-side modality counts, :mod:`megafusion.layers.expert_groups`), but
megatron-core's dispatchers recount it from the routing map on the device and copy it to the
host: the all-to-all dispatcher moves ``tokens_per_expert`` and the split sizes to the host
(``_maybe_dtoh_and_synchronize``), the all-gather dispatcher calls ``.cpu()``, and both permute
with ``masked_select``, whose output size is itself a device value. Each is a device-to-host
synchronisation per layer, forward and backward.

The two subclasses here keep megatron's collectives, buffers, chunk sorting, combine and
autograd, and replace only what reads the device:

- ``counts`` (set by :class:`~megafusion.layers.expert_choice_layer.ExpertChoiceMoELayer` before
  each dispatch): ``counts[r][e]``, the tokens expert-parallel rank ``r`` sends to global expert
  ``e``; every split size and every ``tokens_per_expert`` is a sum of these host ints;
- :func:`permute_by_counts`: megatron's permutation (expert-major, each expert's tokens in
  position order) from a stable sort of each expert's routing-map column, which puts its
  ``counts[e]`` chosen tokens first; a sort's output size does not depend on the data.

Expert tensor parallelism is 1 in megafusion (:mod:`megafusion.layers.experts`), so the
dispatchers' ``tp_size`` is 1 and the all-gather dispatcher's TP x EP group is the EP group.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.token_dispatcher import (
    MoEAllGatherTokenDispatcher,
    MoEAlltoAllTokenDispatcher,
)


def sorted_by_counts(
    routing_map: torch.Tensor, counts: list[int], probs: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """megatron's permutation order for a routing map whose column ``e`` holds exactly
    ``counts[e]`` (host ints) tokens: ``(sorted token indices, their probs)``, expert-major, each
    expert's tokens in position order."""
    n_tokens = routing_map.shape[0]
    # Each expert's chosen tokens first, in position order (stable), then the rest.
    order = torch.sort(routing_map.T.to(torch.int8), dim=1, descending=True, stable=True).indices
    chosen = [order[e, :c] for e, c in enumerate(counts) if c]
    if not chosen:
        return order.new_empty(0), None if probs is None else probs.new_empty(0)
    permuted_probs = None
    if probs is not None:
        flat = torch.cat([order[e, :c] + e * n_tokens for e, c in enumerate(counts) if c])
        permuted_probs = probs.T.contiguous().view(-1).index_select(0, flat)
    return torch.cat(chosen), permuted_probs


def permute_by_counts(
    tokens: torch.Tensor, routing_map: torch.Tensor, counts: list[int], probs: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """megatron's ``permute`` (unfused, dropless) for a routing map whose column ``e`` holds
    exactly ``counts[e]`` (host ints) tokens: ``(permuted tokens, permuted probs, sorted indices)``."""
    sorted_indices, permuted_probs = sorted_by_counts(routing_map, counts, probs)
    return tokens.index_select(0, sorted_indices), permuted_probs, sorted_indices


def _local_columns(dispatcher) -> slice:
    return slice(dispatcher.local_expert_indices[0], dispatcher.local_expert_indices[-1] + 1)


class _HostCounts:
    """What both dispatchers share: the host count matrix, and whole experts."""

    counts: list[list[int]]  # [ep_size][num_experts], set before each dispatch

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.tp_size != 1:
            raise ValueError("megafusion's experts are whole (expert tensor parallelism 1)")


class HostCountAlltoAllDispatcher(_HostCounts, MoEAlltoAllTokenDispatcher):
    """megatron's all-to-all dispatcher with every split size from ``counts`` (host ints)."""

    def preprocess(self, routing_map: torch.Tensor) -> torch.Tensor:
        """Split sizes and per-expert token counts from ``counts``; returns this rank's experts' counts."""
        rank = torch.distributed.get_rank(self.ep_group) if self.ep_size > 1 else 0
        own = self.counts[rank]
        local = _local_columns(self)
        self.num_out_tokens = sum(own)
        # [source EP rank, local expert]: the tokens each rank sends to each of this rank's experts.
        per_source = [row[local] for row in self.counts]
        if self.ep_size > 1:
            width = self.num_local_experts
            self.input_splits = [sum(own[r * width : (r + 1) * width]) for r in range(self.ep_size)]
            self.output_splits = [sum(row) for row in per_source]
        self.num_global_tokens_per_local_expert = torch.tensor(per_source, dtype=torch.long)
        return torch.tensor([sum(column) for column in zip(*per_source)], dtype=torch.long)

    def dispatch_preprocess(self, hidden_states: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor):
        self.hidden_shape = hidden_states.shape
        self.probs = probs
        self.routing_map = routing_map
        hidden_states = hidden_states.view(-1, self.hidden_shape[-1])
        self.tokens_per_expert = self.preprocess(routing_map)
        self.hidden_shape_before_permute = hidden_states.shape
        rank = torch.distributed.get_rank(self.ep_group) if self.ep_size > 1 else 0
        permuted, permuted_probs, self.reversed_local_input_permutation_mapping = permute_by_counts(
            hidden_states, routing_map, self.counts[rank], probs
        )
        return permuted, permuted_probs

    def _maybe_dtoh_and_synchronize(self, point: str, tokens_per_expert: torch.Tensor | None = None):
        return tokens_per_expert  # every count is on the host already


class HostCountAllGatherDispatcher(_HostCounts, MoEAllGatherTokenDispatcher):
    """megatron's all-gather dispatcher with its local token counts from ``counts`` (host ints)."""

    def dispatch_postprocess(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        """This rank's experts' tokens, grouped by expert, from the gathered microbatches."""
        self.hidden_shape_before_permute = hidden_states.shape
        local = _local_columns(self)
        self.local_map = self.routing_map[:, local].contiguous()
        # The gathered rows are the EP ranks' tokens in rank order; each expert's count sums theirs.
        tokens_per_expert = [sum(column) for column in zip(*(row[local] for row in self.counts))]
        permuted, self.local_probs, self.reversed_local_input_permutation_mapping = permute_by_counts(
            hidden_states, self.local_map, tokens_per_expert, probs[:, local]
        )
        self.routing_map = None
        return permuted, torch.tensor(tokens_per_expert, dtype=torch.long), self.local_probs


DISPATCHERS = {"alltoall": HostCountAlltoAllDispatcher, "allgather": HostCountAllGatherDispatcher}
