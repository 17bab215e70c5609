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

import functools
from fractions import Fraction
from functools import partial
from types import SimpleNamespace

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from megafusion.config.schema import ModelConfig
from megafusion.core.modality import MODALITY_NAMES
from megafusion.layers.expert_choice_layer import ExpertChoiceMoELayer
from megafusion.layers.expert_choice_router import ExpertChoiceRouter
from megafusion.layers.expert_groups import ExpertGroups
from megafusion.layers.experts import Experts
from megafusion.models.dense import transformer_layer_spec
from megafusion.models.moma_options import OPTIONS
from megafusion.models.mot import untied_copies, untied_modules
from megafusion.models.spec import LayerCost, ModelFamily

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
    return ExpertChoiceMoELayer.bound(MoESubmodules(experts=experts, router=router), aux_router=cfg.moe.aux_router)


def moma_layer_spec(cfg, layer: int = 1) -> ModuleSpec:
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


def moma_layer_cost(cfg, layer: int) -> LayerCost:
    """Every token meets the router (``E x h``, fp32); each expert of group ``g`` takes
    ``k_g = ceil(c_g x n_g)`` of the group's ``n_g`` routable tokens (padding is never routed).
    Every layer's is the same."""
    moe = cfg.moe
    capacity = None if moe.capacity is None else tuple(sorted(moe.capacity.items()))
    experts = tuple(sorted(moe.experts.items()))
    return _layer_cost(experts, capacity, cfg.model.untie, cfg.model.hidden_size, bool(moe.aux_router))


@functools.cache
def _layer_cost(experts: tuple, capacity: tuple | None, untie: str, hidden: int, aux: bool = False) -> LayerCost:
    groups = ExpertGroups.from_config(SimpleNamespace(experts=dict(experts), capacity=capacity and dict(capacity)))
    untied = ModelConfig(untie=untie).untied_parts()
    parts = [p for p in untied if p in UNTIED]
    return LayerCost(
        copies={**untied_copies(parts), "ffn": groups.total},
        experts=groups.total,
        router=hidden * groups.total,
        aux_router=aux_router_weights(hidden, groups.total) if aux else 0,
        ffn_per_token=partial(nominal_experts_per_token, groups),
        ffn_runs=partial(expert_runs, groups),
        explain=partial(explain_routing, groups),
        describe=describe_experts(groups),
    )


def aux_router_weights(hidden: int, outputs: int) -> int:
    """An auxiliary router's weights: ``h x h/2`` and ``h/2 x outputs``."""
    return hidden * (hidden // 2) + (hidden // 2) * outputs


def routes_causally(cfg) -> bool:
    """Expert choice is not causal; the auxiliary routers (``moe.aux_router``) route causally."""
    return bool(cfg.moe.aux_router)


def _group_of(groups: ExpertGroups, modality: int) -> int:
    return 0 if groups.modality_blind else groups.names.index(MODALITY_NAMES[int(modality)])


def nominal_experts_per_token(groups: ExpertGroups, modality: int) -> float:
    """``E_g x c_g`` (exactly 1 at the default ``c_g = 1 / E_g``); a microbatch's own is
    ``E_g x ceil(c_g x n_g) / n_g``, slightly more where ``c_g x n_g`` is not whole."""
    g = _group_of(groups, modality)
    c = groups.capacities[g]
    return 1 if c is None else groups.sizes[g] * c


def expert_runs(groups: ExpertGroups, routable: list[int]) -> list:
    """Expert FFN runs of a microbatch per modality: a modality group's ``E_g x k_g`` go to its
    modality; the ``mixed`` group's to the modalities in proportion to their routable tokens (every
    routable token is charged the group's mean, as a Fraction: which tokens the experts took is
    known only inside the step)."""
    if groups.modality_blind:
        n = sum(routable)
        runs = groups.sizes[0] * groups.tokens_per_expert(0, n)
        return [Fraction(runs * count, n) if n else 0 for count in routable]
    out = [0] * len(routable)
    for g, name in enumerate(groups.names):
        m = MODALITY_NAMES.index(name)
        out[m] = groups.sizes[g] * groups.tokens_per_expert(g, routable[m])
    return out


def explain_routing(groups: ExpertGroups, routable: list[int]) -> str:
    counts = [sum(routable)] if groups.modality_blind else [routable[MODALITY_NAMES.index(n)] for n in groups.names]
    return "experts x tokens each of the group's routable tokens: " + ", ".join(
        f"{name} {size} x {groups.tokens_per_expert(g, n)} of {n}"
        for g, (name, size, n) in enumerate(zip(groups.names, groups.sizes, counts))
    )


def describe_experts(groups: ExpertGroups) -> str:
    sizes = ", ".join(f"{name} {size}" for name, size in zip(groups.names, groups.sizes))
    met = {name: nominal_experts_per_token(groups, m) for m, name in enumerate(MODALITY_NAMES)}
    per_token = ", ".join(f"{name} {value:g}" for name, value in met.items())
    if len(set(met.values())) == 1:
        per_token = f"{next(iter(met.values())):g}"
    return (
        f"{groups.total} experts ({sizes}), expert choice; a token meets the router and {per_token} of its "
        "group's experts at the nominal capacity"
    )


def manifest_keys(cfg) -> dict:
    groups = ExpertGroups.from_config(cfg.moe)
    return {
        "untie": ",".join(p for p in cfg.model.untied_parts() if p in UNTIED),
        "experts": dict(zip(groups.names, groups.sizes)),
        "capacity": dict(zip(groups.names, groups.capacities)),
        # Written only when on, so older checkpoints (none) compare equal to runs without them.
        **({"aux_routers": True} if cfg.moe.aux_router else {}),
    }


FAMILY = ModelFamily(
    name="moma",
    layer_spec=moma_layer_spec,
    layer_cost=moma_layer_cost,
    conversions=dict.fromkeys(("dense", "mot"), "megafusion convert upcycle --ckpt {ckpt} --output DIR"),
    routed=True,
    causal_routing=routes_causally,
    manifest_keys=manifest_keys,
    options=OPTIONS,
    transformer_config=transformer_config,
    description="MoMa: per-modality expert groups with expert-choice routing (moe.experts), attention as in MoT",
)
