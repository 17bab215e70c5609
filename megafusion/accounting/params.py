"""Exact parameter counts of the model a config builds (all ranks together), and the per-token
matmul weights that the FLOPs formulas multiply by.

The transformer's parts are the dense model's formulas times the family's copies of each part
(``ModelFamily.copies``: MoT holds one per modality of each untied part; a token meets one);
the objective's extra modules (Transfusion's image modules) are measured on the real modules
(:mod:`megafusion.accounting.image_modules`). LMFusion (``model.freeze_text``) adds its new-row
deltas and freezes the text half (``trainable``).
"""

from __future__ import annotations

from megafusion.accounting.image_modules import image_module_layers
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


def parameter_counts(cfg, latent_shape: tuple[int, int, int] | None = None) -> dict[str, int]:
    """Exact parameter counts of the model that ``build_model_chunks`` builds (all ranks together).

    Keys: ``total``; ``embedding`` (input lookup table); ``output_layer`` (untied); ``norm``
    (every RMSNorm weight of the transformer incl. QK-norm); ``non_embedding`` = total -
    embedding - output_layer (Kaplan et al.'s N); ``matmul`` = weights that multiply each token
    (the "N" of the 6N rule, output layer included; MoT: one modality's copy, since a token only
    meets its own); ``active`` = parameters used per token (dense: == total; MoT: one modality's
    copy of every untied part; MoE will count only the routed experts); ``image_modules``: the
    objective's extra modules (``Objective.accounting_modules``; 0 for ``lm``), and one key per
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
    for key in ("total", "non_embedding", "active", "trainable"):
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
    """Weights that multiply each token, by where they sit: ``layers`` (one modality's copy),
    ``output`` (the output layer), ``new_rows`` (LMFusion's output delta: its own matmul)."""
    k = _dims(cfg)
    h, d, ffn = k["hidden"], k["head_dim"], k["ffn"]
    attention = h * (k["heads"] + 2 * k["groups"]) * d + k["heads"] * d * h  # QKV + output projection
    mlp = h * 2 * ffn + ffn * h
    return {
        "attention": attention,
        "mlp": mlp,
        "layers": k["layers"] * (attention + mlp),
        "output": h * k["vocab"],
        "new_rows": h * new_token_rows(cfg),
    }


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
    active_matmul = parts["layers"] + parts["output"] + parts["new_rows"]
    total = (
        embedding
        + output_layer
        + deltas
        + L * attention * _copies(cfg, "attention")
        + L * mlp * _copies(cfg, "ffn")
        + norms * _copies(cfg, "norms")
    )
    # LMFusion freezes the embedding, the output layer and the text copy of every (untied) part.
    frozen = embedding + output_layer + parts["layers"] + norms if cfg.model.freeze_text else 0
    return {
        "total": total,
        "embedding": embedding,
        "output_layer": output_layer,
        "new_token_rows": deltas,
        "norm": norms * _copies(cfg, "norms"),
        "non_embedding": total - embedding - output_layer - deltas,
        "matmul": active_matmul,
        "active": embedding + output_layer + deltas + parts["layers"] + norms,
        "trainable": total - frozen,
    }
