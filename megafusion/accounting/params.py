"""Exact parameter counts of the model a config builds (all ranks together), and the per-token
matmul weights that the FLOPs formulas multiply by.

The transformer's parts are the dense model's formulas times the family's copies of each part
(``ModelFamily.copies``: MoT holds one per modality of each untied part; a token meets one);
the objective's extra modules (Transfusion's image modules) are measured on the real modules
(:mod:`megafusion.accounting.image_modules`). LMFusion (``model.freeze_text``) adds its new-row
deltas and freezes the text half (``trainable``).

A family whose FFN is routed experts (``ModelFamily.experts``: MoMa) holds ``E`` experts per
layer (``copies(cfg, "ffn")``, each a whole SwiGLU MLP) and a router (an fp32 ``[E, h]`` weight, no
bias) per layer. Every token meets the router; with expert-choice routing a token of group ``g``
meets ``E_g * k_g / n_g`` of its group's experts on average, a microbatch's property (``n_g`` its
routable tokens, ``k_g`` each expert's share: :mod:`megafusion.accounting.flops` counts it
exactly). Parameter counts, which know no microbatch, use the nominal ``E_g * c_g`` (capacity
``c_g``; 1 at the default ``c_g = 1 / E_g``, and ``E_g`` at capacity 1, where every expert takes
every token).
"""

from __future__ import annotations

from megafusion.accounting.image_modules import image_module_layers
from megafusion.core.modality import MODALITY_NAMES, Modality
from megafusion.models.registry import get_family


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


def _copies(cfg, part: str) -> int:
    """How many copies of a layer part the model holds (the family says: MoT one per modality of
    each untied part); a token meets one of them."""
    return get_family(cfg.model.arch).copies(cfg, part)


def expert_groups(cfg):
    """The FFN's expert groups (an ``ExpertGroups``: MoMa), or None when a token meets one FFN (dense, MoT)."""
    return get_family(cfg.model.arch).experts(cfg)


def experts_per_token(cfg) -> dict[str, float] | None:
    """Per modality name: the expert FFNs a token meets at its group's nominal capacity, ``E_g * c_g``
    (exactly 1 at the default ``c_g = 1 / E_g``); None without experts.

    A microbatch's own is ``E_g * ceil(c_g * n_g) / n_g`` over its ``n_g`` routable tokens of the group
    (``ExpertGroups.mean_experts_per_token``): slightly more where ``c_g * n_g`` is not whole.
    """
    groups = expert_groups(cfg)
    if groups is None:
        return None
    met = [1 if c is None else size * c for size, c in zip(groups.sizes, groups.capacities)]
    if groups.modality_blind:
        return {name: met[0] for name in MODALITY_NAMES}
    return {name: met[groups.names.index(name)] for name in MODALITY_NAMES}


def _experts_met(cfg, modality: int | None) -> float:
    """FFNs a token of ``modality`` meets: 1 without experts; :func:`experts_per_token` with them."""
    met = experts_per_token(cfg)
    if met is None:
        return 1
    if modality is not None:
        return met[MODALITY_NAMES[int(modality)]]
    if len(set(met.values())) > 1:
        raise ValueError(
            f"moe.capacity gives the expert groups different experts per token ({met}): a token's FLOPs "
            "depend on its modality: pass modality"
        )
    return next(iter(met.values()))


def _whole(x: float) -> int | float:
    """``x`` as an int when it is whole (every count but an expectation at a fractional ``E_g * c_g``)."""
    return int(x) if x == int(x) else x


def describe_experts(cfg) -> str:
    """One line about the experts for the banner and ``megafusion flops`` ("" without experts)."""
    groups = expert_groups(cfg)
    if groups is None:
        return ""
    sizes = ", ".join(f"{name} {size}" for name, size in zip(groups.names, groups.sizes))
    met = experts_per_token(cfg)
    per_token = ", ".join(f"{name} {value:g}" for name, value in met.items())
    if len(set(met.values())) == 1:
        per_token = f"{next(iter(met.values())):g}"
    return (
        f"{groups.total} experts per layer ({sizes}); a token meets the router and {per_token} of its "
        "group's experts at the nominal capacity"
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
    expert), ``router`` (MoMa's ``E x h``, 0 without experts), all per layer; ``output`` (the output
    layer), ``new_rows`` (LMFusion's output delta: its own matmul). :func:`_layer_matmul` adds up
    the layers."""
    k = _dims(cfg)
    h, d, ffn = k["hidden"], k["head_dim"], k["ffn"]
    groups = expert_groups(cfg)
    return {
        "attention": h * (k["heads"] + 2 * k["groups"]) * d + k["heads"] * d * h,  # QKV + output projection
        "mlp": h * 2 * ffn + ffn * h,
        "router": 0 if groups is None else h * groups.total,
        "output": h * k["vocab"],
        "new_rows": h * new_token_rows(cfg),
    }


def _layer_matmul(cfg, modality: int | None = None) -> int | float:
    """Layer weights that multiply one token of ``modality``, all layers: one modality's copy of
    attention, the router and :func:`_experts_met` FFNs (one without experts; ``modality`` is
    needed only where MoMa's groups meet different numbers of experts per token)."""
    parts = _matmul_parts(cfg)
    per_layer = parts["attention"] + parts["router"] + parts["mlp"] * _experts_met(cfg, modality)
    return _whole(_dims(cfg)["layers"] * per_layer)


def _transformer_parameter_counts(cfg) -> dict[str, int]:
    """:func:`parameter_counts` of the GPTModel alone (no image modules): needs no latent shape."""
    k, parts = _dims(cfg), _matmul_parts(cfg)
    h, L = k["hidden"], k["layers"]
    attention, mlp = parts["attention"], parts["mlp"]
    norms = L * (2 * h + (2 * k["head_dim"] if cfg.model.qk_norm else 0)) + h  # input, pre-MLP (+ q, k), final
    embedding = k["vocab"] * h
    # Tied (model.tie_embeddings): the output layer multiplies by the embedding's own weight.
    output_layer = 0 if cfg.model.tie_embeddings else parts["output"]
    deltas = 2 * parts["new_rows"]  # LMFusion: an input and an output delta (even when tied)
    # A token's layer weights by modality (equal but for MoMa groups of different E_g * c_g).
    layers = {name: _layer_matmul(cfg, m) for name, m in zip(MODALITY_NAMES, Modality)}
    active = {name: round(embedding + output_layer + deltas + met + norms) for name, met in layers.items()}
    experts = L * mlp * _copies(cfg, "ffn") if expert_groups(cfg) is not None else 0
    router = L * parts["router"]
    total = (
        embedding
        + output_layer
        + deltas
        + L * attention * _copies(cfg, "attention")
        + L * mlp * _copies(cfg, "ffn")
        + router
        + norms * _copies(cfg, "norms")
    )
    # LMFusion freezes the embedding, the output layer and the text copy of every (untied) part.
    frozen = embedding + output_layer + layers["text"] + norms if cfg.model.freeze_text else 0
    return {
        "total": total,
        "embedding": embedding,
        "output_layer": output_layer,
        "new_token_rows": deltas,
        "norm": norms * _copies(cfg, "norms"),
        "non_embedding": total - embedding - output_layer - deltas,
        "matmul": round(max(layers.values()) + parts["output"] + parts["new_rows"]),
        "active": max(active.values()),
        **{f"active/{name}": count for name, count in active.items()},
        "experts": experts,
        "router": router,
        "trainable": total - frozen,
    }
