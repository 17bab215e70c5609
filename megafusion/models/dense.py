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
from megafusion.layers.post_norm_layer import PostNormLayerSubmodules, PostNormTransformerLayer
from megafusion.models.spec import ModelFamily


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


def transformer_layer_spec(
    cfg,
    *,
    linear_column=ColumnParallelLinear,
    linear_row=RowParallelLinear,
    attention_norm=RMSNorm,
    mlp_norm=RMSNorm,
    qk_norm=RMSNorm,
    mlp=None,
) -> ModuleSpec:
    """The Llama-style layer (pre-norm, or post-norm with ``model.norm_placement=post``); other
    families swap in their own modules (see ``mot.py``).

    ``mlp`` is the MLP module class (default: megatron's SwiGLU ``MLP`` from the two linears).
    """
    # Packed documents need an arbitrary mask; a single document per row is plain causal.
    mask_type = AttnMaskType.arbitrary if cfg.data.packs_documents() else AttnMaskType.causal
    if mlp is None:
        mlp = ModuleSpec(
            module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
        )
    qk_norm = qk_norm if cfg.model.qk_norm else IdentityOp
    post = cfg.model.norm_placement == "post"
    norms = {"post_attention_layernorm": attention_norm, "post_mlp_layernorm": mlp_norm} if post else {}
    return ModuleSpec(
        module=PostNormTransformerLayer if post else TransformerLayer,
        submodules=(PostNormLayerSubmodules if post else TransformerLayerSubmodules)(
            **norms,
            input_layernorm=IdentityOp if post else attention_norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": mask_type},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=linear_column,
                    core_attention=core_attention_module(cfg.model.attention_backend),
                    linear_proj=linear_row,
                    q_layernorm=qk_norm,
                    k_layernorm=qk_norm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=IdentityOp if post else mlp_norm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


def final_norm_of(layer_spec: ModuleSpec) -> type:
    """The block's final norm: the family's attention norm (per modality when MoT unties norms)."""
    sub = layer_spec.submodules
    return getattr(sub, "post_attention_layernorm", None) or sub.input_layernorm


def dense_layer_spec(cfg, layer: int = 1) -> ModuleSpec:
    return transformer_layer_spec(cfg)


FAMILY = ModelFamily(
    name="dense",
    layer_spec=dense_layer_spec,
    description="Chameleon-style dense transformer: one set of weights for every token",
)
