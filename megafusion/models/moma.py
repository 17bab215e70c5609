"""MoMa (``model.arch=moma``): modality-aware experts with expert-choice routing (arXiv 2407.21770).

Each layer's FFN is megatron-core's ``MoELayer`` (:mod:`megafusion.layers.expert_choice_layer`:
every dispatch size a host int): megatron's token dispatchers (``moe.dispatcher``: all-to-all or
all-gather over the expert-parallel ranks, ``parallel.ep``, fed host counts), its ``SequentialMLP``
experts (one whole SwiGLU MLP each, :mod:`megafusion.layers.experts`: expert parallelism spans
the tensor- and data-parallel ranks, with no expert tensor parallelism) and its expert
checkpoint sharding, with megafusion's router
(:class:`~megafusion.layers.expert_choice_router.ExpertChoiceRouter`), which megatron lacks:
every expert picks its tokens within its modality group. Attention and norms
are untied by modality as in MoT (``model.untie``: ``attention``, ``norms``; the FFN is always the
experts). ``moe.experts={mixed: 8}`` gives the modality-blind expert-choice MoE.

Parameter names, per layer (``e`` is megatron's global expert number, which interleaves the
groups: :mod:`megafusion.layers.expert_groups`): ``mlp.router.weight`` (``[E, h]``, fp32) and
``mlp.experts.local_experts.<i>.linear_fc1.weight`` / ``linear_fc2.weight`` for this rank's
``i``-th expert; megafusion's layout-independent names (init, gradient dumps) use
``mlp.experts.<e>.``. In a checkpoint (megatron's ``dist_checkpointing``) each layer's experts
are one tensor with a leading expert axis, ``decoder.layers.mlp.experts.experts.linear_fc1.weight``
``[L, E, ...]``, which any EP / TP / PP layout reads back.
"""

from __future__ import annotations

from functools import partial

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from megafusion.core.modality import NUM_MODALITIES
from megafusion.layers.expert_choice_layer import ExpertChoiceMoELayer
from megafusion.layers.expert_choice_router import ExpertChoiceRouter
from megafusion.layers.expert_groups import ExpertGroups
from megafusion.layers.experts import Experts
from megafusion.models.dense import transformer_layer_spec
from megafusion.models.moma_options import OPTIONS
from megafusion.models.mot import untied_modules
from megafusion.models.spec import ModelFamily

UNTIED = ("attention", "norms")  # the parts model.untie may untie; the FFN is the experts


def experts_layer(cfg) -> type[ExpertChoiceMoELayer]:
    """The FFN: megatron's MoE layer with megafusion's router and experts bound to it, as a class
    (a ``ModuleSpec`` of a ``MoELayer`` subclass makes megatron warn: :mod:`~megafusion.layers.expert_choice_layer`)."""
    groups = ExpertGroups.from_config(cfg.moe)
    router = partial(ExpertChoiceRouter, groups=groups, noise=cfg.moe.router_noise, seed=cfg.train.seed)
    experts = ModuleSpec(
        module=Experts,
        submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
    )
    return ExpertChoiceMoELayer.bound(MoESubmodules(experts=experts, router=router))


def moma_layer_spec(cfg) -> ModuleSpec:
    parts = [p for p in cfg.model.untied_parts() if p in UNTIED]
    return transformer_layer_spec(cfg, **untied_modules(parts), mlp=experts_layer(cfg))


def transformer_config(cfg) -> dict:
    groups = ExpertGroups.from_config(cfg.moe)
    return {
        "num_moe_experts": groups.total,
        "moe_ffn_hidden_size": cfg.model.effective_ffn_hidden_size(),
        "moe_token_dispatcher_type": cfg.moe.dispatcher,
        # Read by the dispatchers only to size fused-permutation buffers (off here); a sigmoid
        # score function keeps megatron's check for top-1 softmax routing quiet.
        "moe_router_topk": max(groups.sizes),
        "moe_router_score_function": "sigmoid",
        "moe_router_load_balancing_type": "none",
        "moe_aux_loss_coeff": 0.0,
        "moe_router_dtype": "fp32",
        "expert_tensor_parallel_size": 1,  # as megafusion.runtime.distributed builds the groups
    }


def copies(cfg, part: str) -> int:
    if part == "ffn":
        return ExpertGroups.from_config(cfg.moe).total
    return NUM_MODALITIES if part in cfg.model.untied_parts() else 1


def expert_groups(cfg) -> ExpertGroups:
    """For accounting: the router and each expert's tokens per group (``copies`` counts the experts' weights)."""
    return ExpertGroups.from_config(cfg.moe)


def manifest_keys(cfg) -> dict:
    groups = ExpertGroups.from_config(cfg.moe)
    return {
        "untie": ",".join(p for p in cfg.model.untied_parts() if p in UNTIED),
        "experts": dict(zip(groups.names, groups.sizes)),
        "capacity": dict(zip(groups.names, groups.capacities)),
    }


FAMILY = ModelFamily(
    name="moma",
    layer_spec=moma_layer_spec,
    routed=True,
    copies=copies,
    experts=expert_groups,
    manifest_keys=manifest_keys,
    options=OPTIONS,
    transformer_config=transformer_config,
    description="MoMa: per-modality expert groups with expert-choice routing (moe.experts), attention as in MoT",
)
