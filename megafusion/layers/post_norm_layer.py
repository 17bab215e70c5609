"""A transformer layer with the norms on the sublayer outputs ("norm reordering").

``model.norm_placement=post`` is the form of Chameleon and of the Mixture-of-Transformers
paper's algorithm, which keeps activations bounded in deep mixed-modal models::

    h = x + norm(attention(x))
    y = h + norm(mlp(h))

instead of megatron-core's pre-norm ``h = x + attention(norm(x))``. The sublayers are
megatron-core's (or MoT's) own modules; only the order changes, so tensor / sequence / pipeline
parallelism and checkpoints work as for the pre-norm layer. State-dict keys:
``post_attention_layernorm.weight`` and ``post_mlp_layernorm.weight`` (``.<modality>.weight``
when MoT unties norms); ``input_layernorm`` / ``pre_mlp_layernorm`` are identities.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.utils import make_viewless_tensor


@dataclass
class PostNormLayerSubmodules(TransformerLayerSubmodules):
    post_attention_layernorm: ModuleSpec | type = IdentityOp
    post_mlp_layernorm: ModuleSpec | type = IdentityOp


class PostNormTransformerLayer(TransformerLayer):
    def __init__(self, config, submodules: PostNormLayerSubmodules, layer_number: int = 1, **kwargs):
        super().__init__(config, submodules, layer_number, **kwargs)
        if self.hidden_dropout:
            raise ValueError("PostNormTransformerLayer has no hidden dropout (megafusion trains without it)")
        norm_args = {
            "config": self.config,
            "hidden_size": self.config.hidden_size,
            "eps": self.config.layernorm_epsilon,
        }
        self.post_attention_layernorm = build_module(submodules.post_attention_layernorm, **norm_args)
        self.post_mlp_layernorm = build_module(submodules.post_mlp_layernorm, **norm_args)

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        context=None,
        rotary_pos_emb=None,
        attention_bias=None,
        packed_seq_params=None,
        inference_context=None,
        rotary_pos_cos=None,
        rotary_pos_sin=None,
        sequence_len_offset=None,
        **unused,
    ):
        # Everything megatron's self-attention reads (incl. its inference KV cache) is passed on
        # unchanged; norms and MLP are per-token and need none of it.
        attention, _ = self.self_attention(
            hidden_states,
            attention_mask=attention_mask,
            rotary_pos_emb=rotary_pos_emb,
            attention_bias=attention_bias,
            packed_seq_params=packed_seq_params,
            inference_context=inference_context,
            rotary_pos_cos=rotary_pos_cos,
            rotary_pos_sin=rotary_pos_sin,
            sequence_len_offset=sequence_len_offset,
        )
        hidden_states = hidden_states + self.post_attention_layernorm(attention)
        mlp, _ = self.mlp(hidden_states)
        output = hidden_states + self.post_mlp_layernorm(mlp)
        # The pipeline schedules free stage outputs by their storage: hand back a tensor, not a view.
        return make_viewless_tensor(inp=output, requires_grad=output.requires_grad, keep_graph=True), context
