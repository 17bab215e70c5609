"""Model assembly: the family's layer specs (``model.arch``, one per global layer) into megatron-core GPTModels.

``assemble_chunks`` returns one ``GPTModel`` (or the given subclass: an objective's model, see
:func:`megafusion.objectives.build.build_model_chunks`, which is what runs call) per
virtual-pipeline chunk held by this rank (a list of one without VPP), with layout-independent
weights; LMFusion (``model.freeze_text``) attaches its new-token rows and freezes the text half.
"""

from __future__ import annotations

from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megafusion import ops
from megafusion.layers import recompute
from megafusion.layers.aux_router import prepare_training
from megafusion.models.dense import final_norm_of
from megafusion.models.init import initialize_weights
from megafusion.models.lmfusion import attach_new_token_rows, freeze_text
from megafusion.models.registry import layer_spec
from megafusion.models.rope import apply_rope_scaling, rotary_base
from megafusion.models.token_positions import install as install_token_positions


def assemble_chunks(cfg, tconfig, runtime, model_cls: type = GPTModel, extra: dict | None = None) -> list[GPTModel]:
    """``model_cls(**GPTModel's arguments, **extra)`` per chunk, with ``model.arch``'s layers."""
    ops.use_backend(cfg.ops.backend)  # the grouped GEMMs' backend for this process
    if tconfig.recompute_granularity:  # train.recompute: the recomputed forward re-enters the routing
        recompute.install()
    extra = extra or {}
    chunks = []
    for vp_stage in range(runtime.vpp or 1):
        vp = vp_stage if runtime.vpp else None
        # Megatron places the layers (pipeline stage, virtual chunk): this chunk builds global layers
        # offset + 1 .. offset + n, each with the family's spec for its depth.
        num_layers = get_num_layers_to_build(tconfig, vp_stage=vp)
        offset = get_transformer_layer_offset(tconfig, vp_stage=vp)
        specs = [layer_spec(cfg, offset + i + 1) for i in range(num_layers)]
        last = layer_spec(cfg, cfg.model.num_layers)  # the final norm follows the last layer's
        block = TransformerBlockSubmodules(layer_specs=specs, layer_norm=final_norm_of(last))
        model = model_cls(
            config=tconfig,
            transformer_layer_spec=block,
            vocab_size=cfg.model.vocab_size,
            max_sequence_length=cfg.model.seq_length,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            parallel_output=True,
            # Tied: under PP the last stage holds a copy that megatron-core syncs from the first
            # stage at build and by gradient all-reduce (its embedding group) in every step.
            share_embeddings_and_output_weights=cfg.model.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=rotary_base(cfg.model.rope_theta),
            vp_stage=vp,
            **extra,
        )
        apply_rope_scaling(model, cfg.model.rope_scaling)
        install_token_positions(model)  # RoPE at given positions inside token_positions(...)
        if cfg.model.freeze_text:
            attach_new_token_rows(model, frozen_vocab_rows(cfg))
        chunks.append(model.to(runtime.device))
    initialize_weights(chunks, cfg.train.seed, cfg.model.init_std, cfg.model.num_layers, runtime.tp_rank, runtime.tp)
    if cfg.model.freeze_text:  # before DDP: megatron-core gives frozen weights no buffers or state
        for chunk in chunks:
            freeze_text(chunk)
    prepare_training(chunks, cfg.train.trainable)  # auxiliary routers: alone, or out of the gradient norm
    return chunks


def frozen_vocab_rows(cfg) -> int:
    """``model.frozen_vocab_rows``, which the run sets from its data (the text tokenizer's size)."""
    rows = cfg.model.frozen_vocab_rows
    if rows is None:
        raise ValueError(
            "model.freeze_text=true needs model.frozen_vocab_rows: the number of vocabulary rows "
            "that stay frozen (the text tokenizer's size; a run sets it from data.tokenizer, "
            "synthetic data has none: set it explicitly)"
        )
    return rows
