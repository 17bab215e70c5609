"""Branch-Train-MiX's merged model (``model.arch=btx``): a top-k token-choice MoE (arXiv 2403.07816).

Each layer's FFN is megatron-core's ``MoELayer``
(:mod:`megafusion.layers.token_choice_layer`) with megatron's ``TopKRouter`` arithmetic
(:class:`~megafusion.layers.token_choice_router.TokenChoiceRouter`: top-``btx.topk`` experts per
token within its group, softmax over the k picked when ``btx.pre_softmax=false``, padding never
routed, the load-balancing loss of :mod:`megafusion.layers.load_balance` with weight
``btx.aux_loss_coeff``), megatron's token dispatchers (``btx.dispatcher``, ``parallel.ep``) fed host
counts, and megafusion's :class:`~megafusion.layers.experts.Experts` (grouped GEMMs). Groups as
MoMa's (``btx.experts``, :mod:`megafusion.layers.expert_groups`): ``{mixed: K}`` routes every token
among all K experts (merged from dense branches), ``{text: K, image: K}`` a token among its
modality's (merged from MoT branches). Attention and norms are untied by modality as in MoT
(``model.untie``: ``attention``, ``norms``; the FFN is always the experts).

Parameter names are MoMa's (``megafusion convert btx-merge`` writes them): per layer
``mlp.router.weight`` (``[E, h]``, fp32) and ``mlp.experts.local_experts.<i>.linear_fc1.weight`` /
``linear_fc2.weight`` for this rank's ``i``-th expert; the layout-independent names use
``mlp.experts.<e>.`` with ``e`` the global expert number (groups interleaved); in a checkpoint each
layer's experts are one tensor with a leading expert axis
(``decoder.layers.mlp.experts.experts.linear_fc1.weight`` ``[L, E, ...]``), which any EP / TP / PP
layout reads back.
"""

from __future__ import annotations

import functools
from functools import partial
from types import SimpleNamespace

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from megafusion.config.schema import ModelConfig
from megafusion.core.modality import MODALITY_NAMES
from megafusion.layers.expert_groups import ExpertGroups
from megafusion.layers.experts import Experts
from megafusion.layers.token_choice_layer import TokenChoiceMoELayer
from megafusion.layers.token_choice_router import TokenChoiceRouter
from megafusion.models.btx_options import OPTIONS
from megafusion.models.dense import transformer_layer_spec
from megafusion.models.mot import untied_copies, untied_modules
from megafusion.models.spec import LayerCost, ModelFamily

UNTIED = ("attention", "norms")  # the parts model.untie may untie; the FFN is the experts


def expert_groups(cfg) -> ExpertGroups:
    return ExpertGroups.from_config(SimpleNamespace(experts=cfg.btx.experts, capacity=None))


def experts_layer(cfg) -> type[TokenChoiceMoELayer]:
    """The FFN: megatron's MoE layer with the token-choice router and megafusion's experts bound to it."""
    router = partial(TokenChoiceRouter, groups=expert_groups(cfg))
    experts = ModuleSpec(
        module=Experts,
        submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
    )
    return TokenChoiceMoELayer.bound(MoESubmodules(experts=experts, router=router))


def btx_layer_spec(cfg, layer: int = 1) -> ModuleSpec:
    parts = [p for p in cfg.model.untied_parts() if p in UNTIED]
    return transformer_layer_spec(cfg, **untied_modules(parts), mlp=experts_layer(cfg))


def transformer_config(cfg) -> dict:
    b = cfg.btx
    return {
        "num_moe_experts": expert_groups(cfg).total,
        "moe_ffn_hidden_size": cfg.model.effective_ffn_hidden_size(),
        "moe_token_dispatcher_type": b.dispatcher,
        "moe_router_topk": b.topk,
        "moe_router_score_function": "softmax",
        "moe_router_pre_softmax": b.pre_softmax,
        "moe_router_load_balancing_type": "aux_loss",
        "moe_aux_loss_coeff": float(b.aux_loss_coeff),
        "moe_router_dtype": "fp32",
        "expert_tensor_parallel_size": 1,  # as megafusion.runtime.distributed builds the groups
    }


def btx_layer_cost(cfg, layer: int) -> LayerCost:
    """Every token meets the router (``E x h``, fp32); every routable token runs ``k`` experts of its
    group (padding none). Every layer's is the same."""
    b = cfg.btx
    return _layer_cost(tuple(sorted(b.experts.items())), int(b.topk), cfg.model.untie, cfg.model.hidden_size)


@functools.cache
def _layer_cost(experts: tuple, topk: int, untie: str, hidden: int) -> LayerCost:
    groups = ExpertGroups.from_config(SimpleNamespace(experts=dict(experts), capacity=None))
    parts = [p for p in ModelConfig(untie=untie).untied_parts() if p in UNTIED]
    sizes = ", ".join(f"{name} {size}" for name, size in zip(groups.names, groups.sizes))
    within = "all of them" if groups.modality_blind else "its modality's"
    return LayerCost(
        copies={**untied_copies(parts), "ffn": groups.total},
        experts=groups.total,
        router=hidden * groups.total,
        ffn_per_token=partial(_k_runs, topk),
        ffn_runs=partial(expert_runs, topk),
        explain=partial(explain_routing, topk),
        describe=f"{groups.total} experts ({sizes}), top-{topk} token choice among {within}",
    )


def _k_runs(topk: int, modality: int) -> int:
    return topk


def expert_runs(topk: int, routable: list[int]) -> list[int]:
    """Expert FFN runs of a microbatch per modality: ``k`` per routable token, exactly (a token's runs
    are its own, whichever experts it picked)."""
    return [topk * n for n in routable]


def explain_routing(topk: int, routable: list[int]) -> str:
    return f"top-{topk} token choice: {topk} experts x " + ", ".join(
        f"{name} {n}" for name, n in zip(MODALITY_NAMES, routable)
    )


def manifest_keys(cfg) -> dict:
    groups = expert_groups(cfg)
    return {
        "untie": ",".join(p for p in cfg.model.untied_parts() if p in UNTIED),
        "experts": dict(zip(groups.names, groups.sizes)),
    }


FAMILY = ModelFamily(
    name="btx",
    layer_spec=btx_layer_spec,
    layer_cost=btx_layer_cost,
    # A dense or MoT checkpoint is a seed or a branch: the merge of a seed's branches starts the family.
    conversions=dict.fromkeys(
        ("dense", "mot"),
        "megafusion convert btx-merge --seed SEED --branch {ckpt} [--branch CKPT ...] --output DIR",
    ),
    routed=True,
    causal_routing=True,  # a token's experts depend on its own hidden state only
    manifest_keys=manifest_keys,
    options=OPTIONS,
    transformer_config=transformer_config,
    description="Branch-Train-MiX: a top-k token-choice MoE (btx.experts, btx.topk), attention as in MoT",
)
