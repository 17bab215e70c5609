"""Branch-Train-MiX's FFN: megatron-core's ``MoELayer`` with top-k token choice.

megatron's ``MoELayer`` (router -> dispatcher -> experts -> combine) with megafusion's
:class:`~megafusion.layers.token_choice_router.TokenChoiceRouter` (megatron's ``TopKRouter`` that
knows modality groups and padding) and :class:`~megafusion.layers.experts.Experts` (megatron's
``SequentialMLP`` run as grouped GEMMs). What it changes:

1. dispatch sizes: token choice makes each expert's token count a device value. The router reads
   its counts to the host once per layer forward (one device-to-host synchronisation: megatron's
   own all-to-all dispatcher makes the same one, ``tokens_per_expert`` to the host, and its
   all-gather dispatcher a ``.cpu()``); with expert parallelism the EP ranks' counts then meet in one
   host all-gather (gloo, :func:`~megafusion.runtime.distributed.all_gather_host_ints`) per layer
   forward, and megatron's dispatchers run on those host ints
   (:mod:`megafusion.layers.expert_dispatch`: no further device read, forward or backward);
   megatron's dispatchers would instead exchange the counts on the device and read them back.
   Activation recomputation (``train.recompute=full``) routes again: one more of each per layer;
2. without expert parallelism the layer skips the dispatcher: the experts read each routed token's
   row in place and sum their gated outputs into the token's row
   (:meth:`~megafusion.layers.experts.Experts.gathered`), so no permuted copy exists;
3. sequence parallelism as megatron: each tensor-parallel rank routes and dispatches its own
   slice of the sequence (no gather: a token's route depends on itself only), and the experts'
   gradients are summed over the tensor- and data-parallel ranks (``Experts``' marks).

A layer spec names the layer as a class with its submodules bound (:meth:`TokenChoiceMoELayer.bound`),
for the reason :mod:`megafusion.layers.expert_choice_layer` gives.
"""

from __future__ import annotations

from megatron.core.transformer.moe.moe_layer import MoELayer, get_default_pg_collection

from megafusion.layers.expert_dispatch import DISPATCHERS, sorted_by_counts
from megafusion.runtime.distributed import all_gather_host_ints


class TokenChoiceMoELayer(MoELayer):
    SUBMODULES = None  # MoESubmodules bound by `bound` (a layer spec's MLP class)

    @classmethod
    def bound(cls, submodules) -> type[TokenChoiceMoELayer]:
        """This layer with ``submodules`` (``MoESubmodules``: experts, router) as its default."""
        return type(cls.__name__, (cls,), {"SUBMODULES": submodules, "__module__": cls.__module__})

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None):
        submodules = submodules or self.SUBMODULES
        pg_collection = pg_collection or get_default_pg_collection()
        super().__init__(config, submodules, layer_number, pg_collection)
        if self.use_shared_expert or config.moe_latent_size or self.moe_layer_recompute:
            raise ValueError("the token-choice MoE layer has no shared experts, latent projections or MoE recompute")
        self.token_dispatcher = DISPATCHERS[config.moe_token_dispatcher_type](
            self.num_local_experts, self.local_expert_indices, config=self.config, pg_collection=pg_collection
        )
        # Nothing to send without expert parallelism (tests turn it off to run the dispatchers).
        self.skip_dispatch = self.token_dispatcher.ep_size == 1

    def forward(self, hidden_states, intermediate_tensors=None, padding_mask=None):
        if self.skip_dispatch:
            return self._local_forward(hidden_states), None
        return super().forward(hidden_states, intermediate_tensors, padding_mask)

    def _local_forward(self, hidden_states):
        """Route, then every expert on its tokens' rows in place (no dispatch: EP = 1)."""
        probs, routing_map = self.router(hidden_states)
        counts = self.router.dispatch_counts
        indices, permuted_probs = sorted_by_counts(routing_map, counts, probs)
        rows = hidden_states.reshape(-1, hidden_states.shape[-1])
        output = self.experts.gathered(rows, indices, counts, permuted_probs, rows.shape[0])
        return output.view(hidden_states.shape)

    def route(self, hidden_states, padding_mask=None):
        probs, routing_map = super().route(hidden_states, padding_mask)
        own = self.router.dispatch_counts
        group = self.token_dispatcher.ep_group
        ep = self.token_dispatcher.ep_size
        # [ep_rank][expert]: the tokens every expert-parallel rank sends to each expert.
        self.token_dispatcher.counts = [own] if ep == 1 else all_gather_host_ints(own, group)
        return probs, routing_map
