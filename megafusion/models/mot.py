"""Mixture-of-Transformers (``model.arch=mot``): the dense layer with its parameters untied by modality.

Every token runs through its own modality's copy of the untied parts; self-attention is
computed once, globally, over the whole interleaved sequence (arXiv 2411.04996). Which
parts are untied is ``model.untie`` (the paper's ablations):

- ``attention``: Q/K/V and output projections (``self_attention.linear_qkv.<modality>.weight``,
  ``self_attention.linear_proj.<modality>.weight``);
- ``ffn``: the SwiGLU MLP (``mlp.<modality>.linear_fc1.weight``, ``mlp.<modality>.linear_fc2.weight``);
- ``norms``: every RMSNorm (``input_layernorm.<modality>.weight``,
  ``pre_mlp_layernorm.<modality>.weight``, ``self_attention.q_layernorm.<modality>.weight``,
  ``self_attention.k_layernorm.<modality>.weight`` and ``decoder.final_layernorm.<modality>.weight``).

Tied parts keep the dense keys. The input embedding and output layer stay shared: text and
image codes live in one vocabulary (the Chameleon setting). A token's FLOPs are exactly the
dense model's; only the parameter count grows. Modules read the per-token modality from
:mod:`megafusion.layers.routing`, which the forward step sets for each microbatch.
"""

from __future__ import annotations

import functools

import torch
from megatron.core.transformer.spec_utils import ModuleSpec

from megafusion.core.modality import NUM_MODALITIES
from megafusion.layers.modality_linear import ModalityColumnParallelLinear, ModalityRowParallelLinear
from megafusion.layers.modality_mlp import ModalityMLP
from megafusion.layers.modality_norm import ModalityRMSNorm
from megafusion.models.dense import transformer_layer_spec
from megafusion.models.init import tied_name
from megafusion.models.mot_options import OPTIONS
from megafusion.models.spec import LayerCost, ModelFamily, WarmStartRule


def untied_modules(parts) -> dict:
    """``transformer_layer_spec`` arguments that untie ``parts`` (attention, ffn, norms) by modality."""
    kwargs = {}
    if "attention" in parts:
        kwargs.update(linear_column=ModalityColumnParallelLinear, linear_row=ModalityRowParallelLinear)
    if "ffn" in parts:
        kwargs.update(mlp=ModalityMLP)
    if "norms" in parts:
        kwargs.update(attention_norm=ModalityRMSNorm, mlp_norm=ModalityRMSNorm, qk_norm=ModalityRMSNorm)
    return kwargs


def mot_layer_spec(cfg, layer: int = 1) -> ModuleSpec:
    return transformer_layer_spec(cfg, **untied_modules(cfg.model.untied_parts()))


def untied_copies(parts) -> dict[str, int]:
    """One copy per modality of each untied part (``attention``, ``ffn``, ``norms``)."""
    return {part: NUM_MODALITIES for part in parts}


def mot_layer_cost(cfg, layer: int) -> LayerCost:
    """A token meets its own modality's copy of each part: a dense layer's cost, more parameters."""
    return _untied_layer(cfg.model.untied_parts())


@functools.cache
def _untied_layer(parts: tuple[str, ...]) -> LayerCost:
    return LayerCost(copies=untied_copies(parts))


def manifest_keys(cfg) -> dict:
    return {"untie": ",".join(cfg.model.untied_parts())}


def dense_key(key: str) -> str | None:
    """The dense checkpoint's key that a MoT tensor starts from: the text copy reads the dense
    module; the image copy is filled from the text copy after the load (:func:`copy_text_into_image`)."""
    parts = key.split(".")
    if "image" in parts:
        return None
    return tied_name(key) if "text" in parts else key


@torch.no_grad()
def copy_text_into_image(module) -> None:
    """Every image copy becomes its (just loaded) text copy: same shapes, same TP shards."""
    params = dict(module.named_parameters())
    for name, param in params.items():
        parts = name.split(".")
        if "image" in parts:
            param.copy_(params[".".join("text" if p == "image" else p for p in parts)])


FAMILY = ModelFamily(
    name="mot",
    layer_spec=mot_layer_spec,
    layer_cost=mot_layer_cost,
    routed=True,
    manifest_keys=manifest_keys,
    options=OPTIONS,
    warm_starts={
        "dense": WarmStartRule(
            checkpoint_key=dense_key,
            fill=copy_text_into_image,
            ignores=("untie",),
            describe="dense -> MoT: each modality copy starts as the dense module",
        )
    },
    description="Mixture-of-Transformers: the parts in model.untie have one copy per modality",
)
