"""Translate a megafusion ``Config`` into megatron-core's ``TransformerConfig``.

Everything the dense family shares lives here: Llama/Chameleon-style blocks (RMSNorm,
SwiGLU, no biases, RoPE, optional QK-norm), no dropout, fp32 on CPU and bf16 on GPU,
token-weighted loss averaging across microbatches and data-parallel ranks
(``calculate_per_token_loss``), and megatron's own weight init switched to a no-op:
weights are filled afterwards by :mod:`megafusion.models.init`, identically in every layout.

``train.recompute`` maps onto megatron-core's activation recomputation (:data:`RECOMPUTE`):
``selective`` recomputes core attention (``recompute_modules=["core_attn"]``: our
:class:`~megafusion.layers.core_attention.MaskedCoreAttention`; norms, MLPs and MoMa's MoE layer keep
their activations), ``full`` keeps only each transformer layer's input (``uniform`` over units of one
layer) and runs the layer again in the backward pass. The recomputed forward sees the forward's
modality routing through :mod:`megafusion.layers.recompute` (installed at model build).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from megafusion.core.modality import MODALITY_NAMES
from megafusion.models.registry import get_family


@dataclass
class MegafusionTransformerConfig(TransformerConfig):
    """megatron-core's config plus what modality-partitioned layers need to know."""

    # One weight copy per name in modality-partitioned modules, in modality-id order.
    modalities: tuple[str, ...] = MODALITY_NAMES


# train.recompute -> megatron-core's recompute settings (recompute_num_layers=1 with "uniform": every
# layer is its own checkpointed unit, so each layer keeps only its input).
RECOMPUTE = {
    "none": {},
    "selective": {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]},
    "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
}


def _skip_init(weight: torch.Tensor) -> None:
    """megatron-core's init hook; weights are set by megafusion.models.init instead."""


def resolve_dtype(params_dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` means fp32 on CPU and bf16 on GPU."""
    if params_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[params_dtype]


def build_transformer_config(cfg, device: torch.device) -> MegafusionTransformerConfig:
    m, p = cfg.model, cfg.parallel
    dtype = resolve_dtype(m.params_dtype, device)
    vpp = p.vpp if p.vpp and p.vpp > 1 else None
    with warnings.catch_warnings():
        # megatron warns that Transformer Engine's fused attention needs no core_attn recompute;
        # selective recompute here runs megafusion's own (unfused) core attention again.
        warnings.filterwarnings("ignore", message=".*no need to set 'core_attn' to recompute.*")
        return MegafusionTransformerConfig(
            num_layers=m.num_layers,
            hidden_size=m.hidden_size,
            num_attention_heads=m.num_attention_heads,
            num_query_groups=m.effective_num_query_groups(),
            ffn_hidden_size=m.effective_ffn_hidden_size(),
            kv_channels=m.hidden_size // m.num_attention_heads,
            normalization="RMSNorm",
            layernorm_epsilon=m.norm_eps,
            qk_layernorm=m.qk_norm,
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            tensor_model_parallel_size=p.tp,
            pipeline_model_parallel_size=p.pp,
            virtual_pipeline_model_parallel_size=vpp,
            sequence_parallel=p.sp,
            context_parallel_size=p.cp,
            expert_model_parallel_size=p.ep,
            params_dtype=dtype,
            pipeline_dtype=dtype,
            bf16=dtype == torch.bfloat16,
            use_cpu_initialization=device.type != "cuda",
            init_method=_skip_init,
            output_layer_init_method=_skip_init,
            calculate_per_token_loss=True,
            # The schedules need activation shapes known up front: fixed [s, b, h] per stage.
            variable_seq_lengths=False,
            # gloo matches point-to-point messages between two ranks in posting order. With
            # PP=2 both neighbours are the same rank, and the batched path posts
            # "send grad, send activation" against "recv activation, recv grad": same shapes,
            # silently swapped (seen with VPP). The unbatched path puts the two directions on
            # different process groups, which keeps them apart.
            batch_p2p_comm=device.type == "cuda",
            **RECOMPUTE[cfg.train.recompute],
            **get_family(m.arch).transformer_config(cfg),
        )
