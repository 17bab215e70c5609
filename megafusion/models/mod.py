"""Mixture-of-Depths (``mod.capacity``), a layer extension any family's layers take (arXiv 2404.02258).

Every ``mod.every``-th layer from ``mod.first`` (global, 1-based) becomes a MoD layer: the
family's own layer class with a router in front that runs the block on ``floor(c x n)`` of each
row's ``n`` routable tokens and lets the others skip it
(:mod:`megafusion.layers.mod_layer`, which states the selection, positions, mask and output
rules). MoD on dense, MoT and MoMa layers (MoMa + MoD: the experts see only the picked tokens).
Parameter names: the family's, plus ``mod_router.weight`` (``[1, h]``, fp32) in each MoD layer.
Options and checks: :mod:`megafusion.models.mod_options` (the ``mod`` section).
"""

from __future__ import annotations

import dataclasses
from functools import partial

from megatron.core.transformer.spec_utils import ModuleSpec

from megafusion.layers.mod_layer import ModSettings, mod_layer_class, picked_count
from megafusion.models.mod_options import OPTIONS, has_aux_routers, is_mod_layer
from megafusion.models.spec import LayerCost, LayerExtension


def settings_of(cfg, family) -> ModSettings:
    return ModSettings(
        capacity=float(cfg.mod.capacity), split=cfg.mod.split, routed=family.routed, aux_router=has_aux_routers(cfg)
    )


def wrap_spec(cfg, layer: int, spec: ModuleSpec, family) -> ModuleSpec:
    if not is_mod_layer(cfg, layer):
        return spec
    return ModuleSpec(
        module=mod_layer_class(spec.module, settings_of(cfg, family)), params=spec.params, submodules=spec.submodules
    )


def picked_routable(capacity: float, split: str, rows: list[list[int]]) -> list[int]:
    """The picked tokens per modality of a microbatch with ``rows[b][m]`` routable tokens (what a
    routed block, MoMa's experts, ranks). ``per_modality``: ``sum_b floor(c x n_{b,m})``, exact.
    ``global``: row ``b`` picks ``k_b = floor(c x n_b)``, exact, but which modalities they are is the
    router's (a device value): charged in proportion to the row's routable tokens, rounded
    cumulatively so each row's charges add up to ``k_b`` (each modality within one token of its
    share of the row)."""
    out = [0] * (len(rows[0]) if rows else 0)
    for row in rows:
        if split == "per_modality":
            picked = [picked_count(capacity, n) for n in row]
        else:
            n, k = sum(row), picked_count(capacity, sum(row))
            seen, given, picked = 0, 0, []
            for count in row:
                seen += count
                picked.append(k * seen // n - given if n else 0)
                given += picked[-1]
        out = [a + p for a, p in zip(out, picked)]
    return out


def wrap_cost(cfg, layer: int, cost: LayerCost) -> LayerCost:
    """A MoD layer: its router (``h`` weights) meets every token; the block (attention projections,
    norms, FFN or experts and their router) a fraction ``c`` of them, attention ``c^2`` of the pairs
    (nominal: exact per microbatch where every row's ``c x n`` is whole and there is no padding).
    A routed FFN inside (MoMa's experts) runs on the picked tokens (``block_routable``:
    :func:`picked_routable`)."""
    if not is_mod_layer(cfg, layer):
        return cost
    c = float(cfg.mod.capacity)
    h = cfg.model.hidden_size
    aux = h * (h // 2) + h // 2 if has_aux_routers(cfg) else 0  # its auxiliary router: h x h/2, h/2 x 1
    note = f"Mixture-of-Depths: floor({c:g} x n) of each row's tokens run the block ({cfg.mod.split} selection)"
    return dataclasses.replace(
        cost,
        router=cost.router + h,
        block_router=cost.router,
        aux_router=cost.aux_router + aux,
        block_aux_router=cost.aux_router,
        block_fraction=c,
        attention_fraction=c * c,
        block_routable=partial(picked_routable, c, cfg.mod.split),
        describe=f"{cost.describe}; {note}" if cost.describe else note,
    )


def manifest_keys(cfg) -> dict:
    m = cfg.mod
    keys = {"capacity": m.capacity, "every": m.every, "first": m.first, "split": m.split}
    if has_aux_routers(cfg):  # written only when on: checkpoints without them compare equal
        keys["aux_router"] = True
    return keys


def routed(cfg) -> bool:
    return True  # per-row capacities and padding come with the microbatch's routing


def causal_routing(cfg) -> bool:
    """Top-k over each row ranks a token against later ones; the auxiliary routers
    (``mod.aux_router``) decide each token from its own state instead."""
    return has_aux_routers(cfg)


EXTENSION = LayerExtension(
    name="mod",
    wrap_spec=wrap_spec,
    wrap_cost=wrap_cost,
    routed=routed,
    causal_routing=causal_routing,
    manifest_keys=manifest_keys,
    options=OPTIONS,
    description="Mixture-of-Depths: every mod.every-th layer runs floor(mod.capacity x n) of each row's tokens",
)
