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

from megatron.core.transformer.spec_utils import ModuleSpec

from megafusion.layers.modality_linear import ModalityColumnParallelLinear, ModalityRowParallelLinear
from megafusion.layers.modality_mlp import ModalityMLP
from megafusion.layers.modality_norm import ModalityRMSNorm
from megafusion.models.dense import transformer_layer_spec


def mot_layer_spec(cfg) -> ModuleSpec:
    parts = set(cfg.model.untied_parts())
    kwargs = {}
    if "attention" in parts:
        kwargs.update(linear_column=ModalityColumnParallelLinear, linear_row=ModalityRowParallelLinear)
    if "ffn" in parts:
        kwargs.update(mlp=ModalityMLP)
    if "norms" in parts:
        kwargs.update(attention_norm=ModalityRMSNorm, mlp_norm=ModalityRMSNorm, qk_norm=ModalityRMSNorm)
    return transformer_layer_spec(cfg, **kwargs)
