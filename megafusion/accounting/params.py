"""Exact parameter counts of the model a config builds (all ranks together), and the per-token
matmul weights that the FLOPs formulas multiply by.

The transformer's parts are the dense model's formulas, layer by layer, times what the family says
of each layer (``ModelFamily.layer_cost``, a :class:`~megafusion.models.spec.LayerCost`): the
copies of each part it holds (MoT: one per modality of each untied part; a token meets one), its
experts and router, and the FFN runs a token costs; the objective's extra modules (Transfusion's
image modules) are measured on the real modules (:mod:`megafusion.accounting.image_modules`).
LMFusion (``model.freeze_text``) adds its new-row deltas and freezes the text half
(``trainable``).

A layer whose FFN is routed experts (MoMa) holds ``E`` experts (each a whole SwiGLU MLP) and a
router (an fp32 ``[E, h]`` weight, no bias). Every token meets the router; the FFN runs a token
costs are a microbatch's property (expert choice: a token of group ``g`` meets ``E_g * k_g / n_g``
of its group's experts on average, ``n_g`` its routable tokens, ``k_g`` each expert's share:
:mod:`megafusion.accounting.flops` counts it exactly from ``LayerCost.ffn_runs``). Parameter
counts, which know no microbatch, use the nominal ``LayerCost.ffn_per_token`` (expert choice:
``E_g * c_g``, 1 at the default ``c_g = 1 / E_g``).
"""

from __future__ import annotations

from megafusion.accounting.image_modules import image_module_layers
from megafusion.core.modality import MODALITY_NAMES, Modality
from megafusion.models.registry import extension_sections, get_family, layer_cost


def _dims(cfg) -> dict[str, int]:
    m = cfg.model
    heads = m.num_attention_heads
    return {
        "layers": m.num_layers,
        "hidden": m.hidden_size,
        "heads": heads,
        "groups": m.effective_num_query_groups(),
        "head_dim": m.hidden_size // heads,  # the kv_channels given to megatron-core
        "ffn": m.effective_ffn_hidden_size(),
        "vocab": m.vocab_size,
    }


def layer_costs(cfg) -> tuple:
    """Each layer's :class:`~megafusion.models.spec.LayerCost`, layer 1 first (the family says).

    Remembered for the last configs asked about, by what a family's answer may depend on (the
    planner asks for every chunk of thousands of layouts): ``model.*`` and the family's own option
    sections (``ModelFamily.options.sections``)."""
    family = get_family(cfg.model.arch)
    sections = (*family.options.sections, *extension_sections(cfg))
    key = repr(cfg.model) + "".join(repr(getattr(cfg, s)) for s in sections)
    hit = _COSTS.get(key)
    if hit is not None and hit[0] is family:
        return hit[1]
    costs = tuple(layer_cost(cfg, layer) for layer in range(1, cfg.model.num_layers + 1))
    if len(_COSTS) >= 256:
        _COSTS.pop(next(iter(_COSTS)))
    _COSTS[key] = (family, costs)
    return costs


_COSTS: dict[str, tuple] = {}


def routed_ffns(cfg) -> bool:
    """Whether some layer's FFN runs depend on the microbatch (routed experts, skipped FFNs)."""
    return any(cost.ffn_runs is not None for cost in layer_costs(cfg))


def _ffns_met(cost, modality: int | None) -> float:
    """FFN runs a token of ``modality`` costs in a layer at the nominal routing (``modality`` is
    needed only where the modalities' differ)."""
    if modality is not None:
        return cost.ffn_per_token(int(modality))
    met = {cost.ffn_per_token(int(m)) for m in Modality}
    if len(met) > 1:
        raise ValueError(
            f"the layers give the modalities different FFN runs per token ({sorted(met)}, e.g. moe.capacity "
            "per group): a token's FLOPs depend on its modality: pass modality"
        )
    return met.pop()


def experts_per_token(cfg) -> dict[str, float] | None:
    """Per modality name: the expert FFNs a token meets per expert layer at the nominal routing
    (expert choice: ``E_g * c_g``, exactly 1 at the default ``c_g = 1 / E_g``), the mean over the
    layers with experts; None without experts.

    A microbatch's own is ``E_g * ceil(c_g * n_g) / n_g`` over its ``n_g`` routable tokens of the group
    (``ExpertGroups.mean_experts_per_token``): slightly more where ``c_g * n_g`` is not whole.
    """
    expert_layers = [cost for cost in layer_costs(cfg) if cost.experts]
    if not expert_layers:
        return None
    return {
        name: _whole(sum(cost.ffn_per_token(int(m)) for cost in expert_layers) / len(expert_layers))
        for name, m in zip(MODALITY_NAMES, Modality)
    }


def _whole(x: float) -> int | float:
    """``x`` as an int when it is whole (every count but an expectation at a fractional ``E_g * c_g``)."""
    return int(x) if x == int(x) else x


def describe_layers(cfg) -> str:
    """What the layers' routing is, one clause per run of alike layers ("" when every layer is plain),
    for the run banner and ``megafusion flops``."""
    runs: list[list] = []
    for layer, cost in enumerate(layer_costs(cfg), start=1):
        if runs and runs[-1][2] == cost.describe:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer, cost.describe])
    if all(not text for *_, text in runs):
        return ""
    if len(runs) == 1:
        return f"every layer: {runs[0][2]}"
    return "; ".join(
        f"layer{'s' if a != b else ''} {a}{f'-{b}' if a != b else ''}: {text or 'plain (one FFN per token)'}"
        for a, b, text in runs
    )


def parameter_counts(cfg, latent_shape: tuple[int, int, int] | None = None) -> dict[str, int]:
    """Exact parameter counts of the model that ``build_model_chunks`` builds (all ranks together).

    Keys: ``total``; ``embedding`` (input lookup table); ``output_layer`` (untied); ``norm``
    (every RMSNorm weight of the transformer incl. QK-norm); ``non_embedding`` = total -
    embedding - output_layer (Kaplan et al.'s N); ``matmul`` = weights that multiply each token
    (the "N" of the 6N rule, output layer included; MoT: one modality's copy, since a token only
    meets its own; MoMa: the router and :func:`experts_per_token` experts); ``active`` = parameters
    used per token (dense: == total; MoT: one modality's copy of every untied part; MoMa: the
    router and the nominal experts per token of the group, :func:`experts_per_token`), and
    ``active/<modality>`` for each modality (they differ only for MoMa groups of different
    ``E_g * c_g``; ``active`` and ``matmul`` are then the largest, the most a token meets; rounded
    to whole parameters where ``E_g * c_g`` is not); ``experts`` (every expert's weights) and
    ``router`` (every router's; both 0 without experts, in ``total`` and ``non_embedding``);
    ``aux_router``: every auxiliary router's (``LayerCost.aux_router``; in ``total``, ``non_embedding``
    and ``active``, not in ``matmul``: their backward is not the 2 x forward of the 6N rule, see
    :func:`aux_router_macs`; ``trainable`` is only these under ``train.trainable=aux_routers``);
    ``image_modules``: the objective's extra modules (``Objective.accounting_modules``; 0 for ``lm``), and one key per
    module (Transfusion: ``image_time_embed``, ``image_patch_embed`` and ``image_patch_head``;
    none for ``lm``). They are in ``total``, ``non_embedding``,
    ``active`` and ``trainable`` (image tokens use them), not in ``matmul``: they run once per image,
    not per token. ``trainable``: what the optimizer updates and holds state for (``total`` but
    for LMFusion, ``model.freeze_text``, which freezes the embedding, the output layer and every
    text copy); ``new_token_rows``: LMFusion's input and output deltas of the new vocabulary rows
    (in ``total``, ``active``, ``trainable`` and, the output delta, ``matmul``).
    ``latent_shape`` ``[C, H, W]``: one image latent, which the objective may need (Transfusion's
    ``objective.latent_codec=kl``; see :func:`~megafusion.accounting.image_modules.check_latent_shape`).
    """
    counts = _transformer_parameter_counts(cfg)
    layers = image_module_layers(cfg, latent_shape)
    images = {name: sum(layer.params for layer in module_layers) for name, module_layers in layers.items()}
    image_total = sum(images.values())
    for key in ("total", "non_embedding", "active", "trainable", *(f"active/{name}" for name in MODALITY_NAMES)):
        counts[key] += image_total
    return {**counts, "image_modules": image_total, **images}


def new_token_rows(cfg) -> int:
    """LMFusion (``model.freeze_text``): vocabulary rows with a trainable delta (0 otherwise)."""
    m = cfg.model
    if not m.freeze_text:
        return 0
    if m.frozen_vocab_rows is None:
        raise ValueError(
            "model.freeze_text=true: model.frozen_vocab_rows is unset (a run sets it from the text "
            "tokenizer's size); set it to count LMFusion's parameters and FLOPs"
        )
    return m.vocab_size - m.frozen_vocab_rows


def _matmul_parts(cfg) -> dict[str, int]:
    """Weights that multiply each token, by where they sit: ``attention`` and ``mlp`` (one copy, one
    expert) of a layer (a layer's router is its ``LayerCost.router``); ``output`` (the output
    layer), ``new_rows`` (LMFusion's output delta: its own matmul). :func:`_layer_matmul` adds up
    the layers."""
    k = _dims(cfg)
    h, d, ffn = k["hidden"], k["head_dim"], k["ffn"]
    return {
        "attention": h * (k["heads"] + 2 * k["groups"]) * d + k["heads"] * d * h,  # QKV + output projection
        "mlp": h * 2 * ffn + ffn * h,
        "output": h * k["vocab"],
        "new_rows": h * new_token_rows(cfg),
    }


def _layer_matmul(cfg, modality: int | None = None) -> int | float:
    """Layer weights that multiply one token of ``modality``, all layers: one modality's copy of
    attention, the router and the nominal FFN runs of each layer (``modality`` is needed only where
    the modalities' FFN runs differ, e.g. MoMa groups of different ``E_g * c_g``), times the
    fraction of tokens that run the block (Mixture-of-Depths)."""
    parts = _matmul_parts(cfg)
    return _whole(sum(layer_weights_per_token(cost, parts, modality) for cost in layer_costs(cfg)))


def layer_weights_per_token(cost, parts: dict, modality: int | None = None, ffn: bool = True) -> int | float:
    """One layer's weights that multiply a token at the nominal routing: the router part every token
    meets, plus ``block_fraction`` x (attention projections, the block's router, FFN runs)."""
    block = parts["attention"] + cost.block_router + (parts["mlp"] * _ffns_met(cost, modality) if ffn else 0)
    outer = cost.router - cost.block_router
    return outer + block if cost.block_fraction == 1 else outer + cost.block_fraction * block


def aux_router_macs(cfg, forward_only: bool = False) -> int:
    """Multiply-adds per token of every layer's auxiliary router (``LayerCost.aux_router``: ``h x h/2``
    then ``h/2 x outputs``). Forward: both matrices; training adds the weight gradients of both and the
    input gradient of the second only (its input is detached: the first needs none)."""
    h = _dims(cfg)["hidden"]
    total = 0
    for cost in layer_costs(cfg):
        # Every token meets the layer's own router (MoD's); the block's (MoMa's under MoD) only
        # the block_fraction of tokens that run the block.
        for weights, fraction in (
            (cost.aux_router - cost.block_aux_router, 1),
            (cost.block_aux_router, cost.block_fraction),
        ):
            if weights:
                first = h * (h // 2)
                second = weights - first
                macs = first + second if forward_only else 2 * first + 3 * second
                total += macs if fraction == 1 else fraction * macs
    return total


def _transformer_parameter_counts(cfg) -> dict[str, int]:
    """:func:`parameter_counts` of the GPTModel alone (no image modules): needs no latent shape."""
    k, parts = _dims(cfg), _matmul_parts(cfg)
    h = k["hidden"]
    attention, mlp = parts["attention"], parts["mlp"]
    costs = layer_costs(cfg)
    layer_norms = 2 * h + (2 * k["head_dim"] if cfg.model.qk_norm else 0)  # input, pre-MLP (+ q, k)
    norms = len(costs) * layer_norms + h  # one copy of each, the final norm included
    # The final norm has as many copies as the last layer's norms (models/build.py).
    norm_weights = sum(layer_norms * c.copies_of("norms") for c in costs) + h * costs[-1].copies_of("norms")
    embedding = k["vocab"] * h
    # Tied (model.tie_embeddings): the output layer multiplies by the embedding's own weight.
    output_layer = 0 if cfg.model.tie_embeddings else parts["output"]
    deltas = 2 * parts["new_rows"]  # LMFusion: an input and an output delta (even when tied)
    # A token's layer weights by modality (equal but where the modalities' FFN runs differ).
    layers = {name: _layer_matmul(cfg, m) for name, m in zip(MODALITY_NAMES, Modality)}
    aux = sum(c.aux_router for c in costs)  # auxiliary routers: every token meets them
    active = {name: round(embedding + output_layer + deltas + met + norms + aux) for name, met in layers.items()}
    experts = sum(mlp * c.experts for c in costs)
    router = sum(c.router for c in costs)
    total = (
        embedding
        + output_layer
        + deltas
        + sum(attention * c.copies_of("attention") + mlp * c.copies_of("ffn") for c in costs)
        + router
        + aux
        + norm_weights
    )
    # LMFusion freezes the embedding, the output layer and the text copy of every (untied) part.
    frozen = embedding + output_layer + layers["text"] + norms if cfg.model.freeze_text else 0
    if cfg.train.trainable == "aux_routers":  # the second stage: only the auxiliary routers train
        frozen = total - aux
    return {
        "total": total,
        "embedding": embedding,
        "output_layer": output_layer,
        "new_token_rows": deltas,
        "norm": norm_weights,
        "non_embedding": total - embedding - output_layer - deltas,
        "matmul": round(max(layers.values()) + parts["output"] + parts["new_rows"]),
        "active": max(active.values()),
        **{f"active/{name}": count for name, count in active.items()},
        "experts": experts,
        "router": router,
        "aux_router": aux,
        "trainable": total - frozen,
    }
