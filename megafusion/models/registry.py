"""Model assembly: the layer spec of ``model.arch`` (see ``megafusion.models.ARCHS``) into GPTModels.

``build_model_chunks`` returns one megatron-core ``GPTModel`` per virtual-pipeline chunk held
by this rank (a list of one without VPP), with layout-independent weights.
"""

from __future__ import annotations

import importlib

from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from megafusion.models import ARCHS
from megafusion.models.dense import final_norm_of
from megafusion.models.init import initialize_weights
from megafusion.models.lmfusion import attach_new_token_rows, freeze_text
from megafusion.models.rope import apply_rope_scaling, rotary_base


def layer_spec_builder(arch: str):
    if arch not in ARCHS:
        raise ValueError(f"model.arch={arch!r} is unknown: choose one of {sorted(ARCHS)}")
    module, function = ARCHS[arch].split(":")
    return getattr(importlib.import_module(module), function)


def build_model_chunks(cfg, tconfig, runtime, latent_shape: tuple[int, int, int] | None = None) -> list[GPTModel]:
    """``latent_shape`` (``[C, H, W]`` of one image latent) is needed for ``objective.name=transfusion``;
    None means the pixel latents of ``data.image_size`` images."""
    layer_spec = layer_spec_builder(cfg.model.arch)(cfg)
    model_cls, extra = GPTModel, {}
    if cfg.objective.name == "transfusion":
        from megafusion.models.transfusion import TransfusionGPTModel

        size = cfg.data.image_size
        model_cls = TransfusionGPTModel
        extra = {"objective": cfg.objective, "latent_shape": tuple(latent_shape or (3, size, size))}
    chunks = []
    for vp_stage in range(runtime.vpp or 1):
        vp = vp_stage if runtime.vpp else None
        num_layers = get_num_layers_to_build(tconfig, vp_stage=vp)
        block = TransformerBlockSubmodules(layer_specs=[layer_spec] * num_layers, layer_norm=final_norm_of(layer_spec))
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
        if cfg.model.freeze_text:
            attach_new_token_rows(model, frozen_vocab_rows(cfg))
        chunks.append(model.to(runtime.device))
    initialize_weights(
        chunks, cfg.train.seed, cfg.model.init_std, cfg.model.num_layers, runtime.tp_rank, runtime.tp
    )
    if cfg.model.freeze_text:  # before DDP: megatron-core gives frozen weights no buffers or state
        for chunk in chunks:
            freeze_text(chunk)
    return chunks


def frozen_vocab_rows(cfg) -> int:
    """``model.frozen_vocab_rows``, which the run sets from its data (the text tokenizer's size)."""
    rows = cfg.model.frozen_vocab_rows
    if rows is None:
        raise ValueError("model.freeze_text=true needs model.frozen_vocab_rows: the number of vocabulary rows "
                         "that stay frozen (the text tokenizer's size; a run sets it from data.tokenizer, "
                         "synthetic data has none: set it explicitly)")
    return rows
