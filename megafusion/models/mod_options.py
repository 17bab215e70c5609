"""Mixture-of-Depths' config keys and checks (torch-free; :mod:`megafusion.core.options`): the ``mod``
section. MoD is a layer extension (:mod:`megafusion.models.mod`): any family's layers may be
wrapped, so these checks run whatever ``model.arch`` is, and only when ``mod.capacity`` is set."""

from __future__ import annotations

from dataclasses import dataclass

from megafusion.config.checks import is_int
from megafusion.core.choices import MOD_SPLITS
from megafusion.core.options import Options


@dataclass
class ModConfig:
    """Mixture-of-Depths (arXiv 2404.02258): some layers run only a fraction of the tokens."""

    # Fraction c in (0, 1] of each row's routable (non-padding) tokens a MoD layer runs:
    # k = floor(c x n) per row (per modality with split=per_modality); null = MoD off.
    capacity: float | None = None
    every: int = 2  # every every-th layer is a MoD layer, ...
    first: int = 1  # ... starting at this global layer (1-based): layers first, first + every, ...
    # Where the selection ranks tokens: "global" (the paper: all of a row's tokens; a MoT / MoMa
    # layer then reads each modality's count of picked tokens from the device, once per MoD
    # layer) or "per_modality" (floor(c x n_m) of each modality: counts known on the host).
    split: str = "global"
    # An auxiliary router per MoD layer (megafusion.layers.aux_router, one output), trained with
    # stop-gradient against the layer's picks: with it the model routes causally (generation,
    # causal evaluation: a token runs the layer iff its score > 0.5). Trainable alone after the
    # main model with train.trainable=aux_routers.
    aux_router: bool = False


def enabled(cfg) -> bool:
    return cfg.mod.capacity is not None


def is_mod_layer(cfg, layer: int) -> bool:
    """Whether global layer ``layer`` (1-based) is a MoD layer."""
    m = cfg.mod
    return enabled(cfg) and layer >= m.first and (layer - m.first) % m.every == 0


def has_aux_routers(cfg) -> bool:
    """Whether the MoD layers hold auxiliary routers (what ``train.trainable=aux_routers`` trains)."""
    return enabled(cfg) and cfg.mod.aux_router is True


def mod_problems(cfg) -> list[str]:
    m = cfg.mod
    if m.capacity is None:
        return []
    problems = []
    c = m.capacity
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c <= 1:
        problems.append(
            f"mod.capacity={c!r} must be in (0, 1] (the fraction of each row's tokens a MoD layer runs), "
            "e.g. mod.capacity=0.125, or null for no Mixture-of-Depths"
        )
    layers = cfg.model.num_layers
    for key, low in (("every", 1), ("first", 1)):
        v = getattr(m, key)
        if not is_int(v) or not low <= v <= max(layers, 1):
            problems.append(
                f"mod.{key}={v!r} must be a whole number in [1, model.num_layers={layers}]: e.g. mod.{key}=2"
            )
    if m.split not in MOD_SPLITS:
        problems.append(f"mod.split={m.split!r} is not one of {', '.join(MOD_SPLITS)}: set mod.split to one of them")
    if not isinstance(m.aux_router, bool):
        problems.append(f"mod.aux_router={m.aux_router!r} must be true or false")
    if cfg.model.attention_backend in ("flex", "te"):
        problems.append(
            f"mod.capacity={c} with model.attention_backend={cfg.model.attention_backend}: a Mixture-of-Depths "
            "layer restricts the dense mask to its picked tokens; use model.attention_backend=sdpa (or auto)"
        )
    return problems


OPTIONS = Options(sections={"mod": ModConfig}, problems=mod_problems, active=enabled, aux_routers=has_aux_routers)
