"""MoMa's FFN: megatron-core's ``MoELayer`` run so that every dispatch size is a host int.

megatron's ``MoELayer`` (router -> dispatcher -> experts -> combine) with three changes:

1. the dispatcher is :mod:`megafusion.layers.expert_dispatch`'s (megatron's, fed host counts);
2. the counts: this rank's row comes from the router
   (:class:`~megafusion.layers.expert_choice_router.ExpertChoiceRouter`, ``dispatch_counts``, host
   ints from the microbatch's modality counts); with expert parallelism the other EP ranks' rows
   (their microbatches differ) come from one gloo all-gather of host ints per microbatch, shared
   by every MoMa layer of it (cached on the microbatch's routing), so nothing waits for the device;
3. without expert parallelism there is nothing to send, and the layer skips the dispatcher: the
   experts read each chosen token's row in place and sum their gated outputs into the tokens' rows
   (:meth:`~megafusion.layers.experts.Experts.gathered`: the fused grouped GEMMs), so neither the
   permuted tokens nor the permuted outputs exist;
4. under sequence parallelism the layer all-gathers the microbatch over the tensor-parallel ranks
   first and reduce-scatters the output after, as megatron's dense MLP does. Which of an expert's
   ``k`` tokens a tensor-parallel rank holds depends on the scores, so its count is a device
   value; with the whole microbatch on every rank, rank ``t`` of ``T`` instead dispatches the
   ``t``-th of ``T`` contiguous shares of each expert's tokens (in position order), whose sizes
   are host ints; the reduce-scatter sums the shares back onto the ranks that hold the tokens.

   Context parallelism does the same over the context-parallel group
   (:func:`~megafusion.layers.context_rows.gather_rows`: after the TP gather, the CP gather and the
   permutation to row order), routes under the whole microbatch's routing (``routing.whole``), so
   the choice is one process's, ties included; CP rank ``c`` and TP rank ``t`` dispatch share
   ``c x tp + t`` of ``cp x tp``, and the output is reduce-scattered back over CP, then TP.

5. an auxiliary router (``aux_router``: :mod:`megafusion.layers.aux_router`, one output per
   expert) learns to predict the router's choices from each token alone: in training and
   teacher-forced evaluation it reads this rank's (sequence-parallel) slice of the layer's input and
   the router's whole-microbatch selection, adds its BCE to the backward pass through the layer's
   output and records its statistics; under causal routing (``ModalityRouting.causal``) its
   predictions choose the tokens instead (:meth:`ExpertChoiceRouter.causal_routing`).

A layer spec names the layer as a class with its submodules bound (:meth:`ExpertChoiceMoELayer.bound`),
not as a ``ModuleSpec``: megatron's ``TransformerLayer`` hands its process groups only to the MLP
modules it lists by identity (``MoELayer``, not a subclass) and warns "Unknown MLP type ... Using
default kwargs" for any other ``ModuleSpec``; a class it builds from the config alone, as it
does MoT's ``ModalityMLP``. The layer takes megatron's default process groups either way.
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer, get_default_pg_collection

from megafusion.layers.aux_router import AuxRouter, attach, sequence_rows
from megafusion.layers.context_rows import gather_rows, scatter_rows
from megafusion.layers.expert_dispatch import DISPATCHERS, sorted_by_counts
from megafusion.layers.grouped_swiglu import grouped_swiglu
from megafusion.layers.routing import current_routing, modality_routing
from megafusion.runtime.distributed import all_gather_host_ints

CAUSAL_ROW_BUCKET = 16  # causal routing: each expert's rows padded to a multiple of this


class ExpertChoiceMoELayer(MoELayer):
    SUBMODULES = None  # MoESubmodules bound by `bound` (a layer spec's MLP class)
    AUX_ROUTER = False  # whether the layer has an auxiliary router (bound by `bound`)

    @classmethod
    def bound(cls, submodules, aux_router: bool = False) -> type[ExpertChoiceMoELayer]:
        """This layer with ``submodules`` (``MoESubmodules``: experts, router) as its default, and
        an auxiliary router if ``aux_router``."""
        attrs = {"SUBMODULES": submodules, "AUX_ROUTER": aux_router, "__module__": cls.__module__}
        return type(cls.__name__, (cls,), attrs)

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None):
        submodules = submodules or self.SUBMODULES
        pg_collection = pg_collection or get_default_pg_collection()
        super().__init__(config, submodules, layer_number, pg_collection)
        if self.use_shared_expert or config.moe_latent_size or self.moe_layer_recompute:
            raise ValueError("MoMa's MoE layer has no shared experts, latent projections or MoE-layer recompute")
        self.token_dispatcher = DISPATCHERS[config.moe_token_dispatcher_type](
            self.num_local_experts, self.local_expert_indices, config=self.config, pg_collection=pg_collection
        )
        # Nothing to send without expert parallelism (tests turn it off to run the dispatchers).
        self.skip_dispatch = self.token_dispatcher.ep_size == 1
        self.aux_router = None
        if self.AUX_ROUTER:
            # It reads this rank's sequence-parallel slice, so its weights' gradients are summed
            # over the tensor-parallel ranks (megatron's `sequence_parallel` attribute).
            self.aux_router = AuxRouter(
                config.hidden_size, config.num_moe_experts, sequence_parallel=config.sequence_parallel
            )
            self.router.keep_selection = True

    def _whole_microbatch(self) -> bool:
        return self.config.sequence_parallel and self.tp_group.size() > 1

    def forward(self, hidden_states, intermediate_tensors=None, padding_mask=None):
        routing = current_routing()
        shard = routing.shard  # context parallelism: this rank's rows of the microbatch
        tp_group = self.tp_group if self._whole_microbatch() else None
        tp = 1 if tp_group is None else tp_group.size()
        cp_rank, cp = (0, 1) if shard is None else (shard.rank, shard.size)
        self.router.share = (cp_rank * tp + (0 if tp_group is None else tp_group.rank()), cp * tp)
        local = hidden_states  # this rank's (sequence-parallel) rows: what the auxiliary router learns on
        if tp_group is not None or shard is not None:
            # [s/cp/tp, b, h] -> [s, b, h] in row order; its backward reduce-scatters the gradient
            hidden_states = gather_rows(hidden_states, shard, tp_group)
        with modality_routing(routing.whole) if shard is not None else contextlib.nullcontext():
            if self.skip_dispatch:
                output, bias = self._local_forward(hidden_states), None
            else:
                output, bias = super().forward(hidden_states, intermediate_tensors, padding_mask)
        if tp_group is not None or shard is not None:
            # each rank holds its shares' outputs for the whole microbatch: sum, keep its rows
            output = scatter_rows(output, shard, tp_group)
        if self.aux_router is not None and not routing.causal:
            output = attach(output, self._aux_loss(local))
        return output, bias

    def _aux_loss(self, local):
        """The auxiliary router's BCE on this rank's tokens ``local`` against the router's
        whole-microbatch selection (statistics recorded)."""
        routing = current_routing()
        rows, b = local.shape[0], routing.micro_batch_size
        selection = self.router.selection
        if routing.shard is not None:  # the whole microbatch's selection, row order: this rank's rows
            n = routing.whole.seq_length
            selection = selection.view(n, b, -1).index_select(0, routing.shard.positions.to(selection.device))
            selection = selection.reshape(-1, selection.shape[-1])
        targets = sequence_rows(selection, rows, routing.seq_length, b)
        valid = sequence_rows(routing.routable_mask(), rows, routing.seq_length, b)
        return self.aux_router.loss(local, targets, valid, key=routing)

    def _local_forward(self, hidden_states):
        """Route, then every expert on its tokens' rows in place (no dispatch: EP = 1)."""
        probs, routing_map = self.route(hidden_states)
        counts = self.router.dispatch_counts
        indices, permuted_probs = sorted_by_counts(routing_map, counts, probs)
        rows = hidden_states.reshape(-1, hidden_states.shape[-1])
        if current_routing().causal:
            return self._row_independent(rows, indices, counts, permuted_probs).view(hidden_states.shape)
        output = self.experts.gathered(rows, indices, counts, permuted_probs, rows.shape[0])
        return output.view(hidden_states.shape)

    def _row_independent(self, rows, indices, counts, probs):
        """The experts under causal routing, where each expert's token count depends on the data.

        A GEMM's result for one row can depend on how many rows it multiplies (small row counts
        take other kernels: on CPU, fewer than 12 rows that are not a multiple of 4), so a token's
        output would depend on how many other tokens, later ones included, an expert took. Each
        expert's rows are padded to a multiple of :data:`CAUSAL_ROW_BUCKET` with copies of row 0
        that land in a spare output row, so every GEMM has a row count its kernels treat alike
        (bit-identical causality where the library's per-row results agree for such counts)."""
        n = rows.shape[0]
        gather, scatter, gates, padded = [], [], [], []
        start = 0
        for count in counts:
            pad = -(-count // CAUSAL_ROW_BUCKET) * CAUSAL_ROW_BUCKET - count
            part = indices[start : start + count]
            gather += [part, part.new_zeros(pad)]
            scatter += [part, part.new_full((pad,), n)]
            gates += [probs[start : start + count], probs.new_zeros(pad)]
            padded.append(count + pad)
            start += count
        out = grouped_swiglu(
            rows,
            self.experts.local_experts,
            padded,
            self.config.activation_func,
            gather=torch.cat(gather),
            gather_permutes=False,
            scatter=torch.cat(scatter),
            scale=torch.cat(gates),
            out_rows=n + 1,
        )
        return out[:n]

    def route(self, hidden_states, padding_mask=None):
        if current_routing().causal:
            if self.aux_router is None:
                raise ValueError(
                    "causal routing of an expert-choice layer needs its auxiliary router: train with "
                    "moe.aux_router=true (or route with expert choice, causal=False)"
                )
            self.router.predicted = self.aux_router.picks(hidden_states.reshape(-1, hidden_states.shape[-1]))
        probs, routing_map = super().route(hidden_states, padding_mask)
        self.token_dispatcher.counts = self._ep_counts(self.router.dispatch_counts)
        return probs, routing_map

    def _ep_counts(self, own: list[int]) -> list[list[int]]:
        """``[ep_rank][expert]``: the tokens every expert-parallel rank sends to each expert."""
        group = self.token_dispatcher.ep_group
        if self.token_dispatcher.ep_size == 1:
            return [own]
        # The same for every MoMa layer of the microbatch (and on every rank of the EP group
        # either found or exchanged in the same layer), so it is exchanged once per microbatch.
        routing = current_routing()
        if routing.causal:  # the counts are the predictions' and differ by layer: exchange every time
            return all_gather_host_ints(own, group)
        cache = routing.cache
        key = ("expert_counts", tuple(own))
        if key not in cache:
            cache[key] = all_gather_host_ints(own, group)
        return cache[key]
