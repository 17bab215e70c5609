"""Dense (Chameleon-style) baseline: the megatron-core layer spec and nothing else.

Pre-norm RMSNorm, self-attention with optional per-head QK-norm and megafusion's
``MaskedCoreAttention``, SwiGLU MLP; megatron-core's Column/RowParallelLinear everywhere, so
tensor and sequence parallelism come for free. State-dict keys per layer:
``input_layernorm.weight``, ``self_attention.linear_qkv.weight``,
``self_attention.q_layernorm.weight``, ``self_attention.k_layernorm.weight``,
``self_attention.linear_proj.weight``, ``pre_mlp_layernorm.weight``,
``mlp.linear_fc1.weight`` ([gate; up]), ``mlp.linear_fc2.weight``.
"""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megafusion.layers.core_attention import MaskedCoreAttention
from megafusion.layers.norm import RMSNorm


def core_attention_module(backend: str) -> type:
    """``te`` asks for Transformer Engine's fused attention; everything else is ours."""
    if backend != "te":
        return MaskedCoreAttention
    try:
        from megatron.core.extensions.transformer_engine import TEDotProductAttention
    except ImportError as err:  # Transformer Engine is an optional GPU extra
        raise ImportError(
            "model.attention_backend=te needs Transformer Engine: pip install 'megafusion[te]' "
            "on a CUDA machine, or set model.attention_backend=sdpa"
        ) from err
    return TEDotProductAttention


def dense_layer_spec(cfg) -> ModuleSpec:
    qk_norm = RMSNorm if cfg.model.qk_norm else IdentityOp
    # Packed documents need an arbitrary mask; a single document per row is plain causal.
    mask_type = AttnMaskType.arbitrary if cfg.data.packs_documents() else AttnMaskType.causal
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": mask_type},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=core_attention_module(cfg.model.attention_backend),
                    linear_proj=RowParallelLinear,
                    q_layernorm=qk_norm,
                    k_layernorm=qk_norm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )
