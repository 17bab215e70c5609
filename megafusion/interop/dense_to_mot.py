"""A Mixture-of-Transformers checkpoint warm-started from a dense one: :func:`dense_to_mot`
(``megafusion convert dense-to-mot``; its command line: :mod:`megafusion.commands.convert`).

Every untied module gets one copy of the dense module per modality (MoT paper, and the first
step of LMFusion); tied modules, the embedding and the output layer are copied as they are. The
result is a model-only checkpoint (no optimizer, step 0) with the dense run's data description;
train from it with ``model.arch=mot model.untie=<same> checkpoint.init_from=DIR``. Until the
copies drift apart in training, the MoT computes exactly the dense model's logits.

The input is a step directory or a run's checkpoint directory (its ``latest`` step), saved in
any parallel layout; the conversion runs in one process (TP = PP = 1) and the output loads into
any layout (megatron-core dist_checkpointing reshards at load).
"""

from __future__ import annotations

import copy

from megafusion import checkpoint as ck


def dense_to_mot(src: str, out: str, untie: str = "all") -> str:
    """Convert (in this process, TP = PP = 1); returns the output directory."""
    import torch

    from megafusion.config import load_config
    from megafusion.inference.load import checkpoint_config, model_from_checkpoint
    from megafusion.models.init import tied_name
    from megafusion.models.param_layout import global_param_names
    from megafusion.models.transformer_config import build_transformer_config
    from megafusion.objectives.build import build_model_chunks
    from megafusion.runtime import shutdown

    source = checkpoint_config(src)
    if source.cfg.model.arch != "dense":
        raise ck.CheckpointError(
            f"{source.path} holds a model.arch={source.cfg.model.arch!r} model; dense-to-mot "
            f"converts dense checkpoints only"
        )
    mot_cfg = copy.deepcopy(source.cfg)
    mot_cfg.model.arch, mot_cfg.model.untie = "mot", untie
    load_config(None, [f"model.untie={untie}"])  # validates the spelling of --untie early
    dense = model_from_checkpoint(source)
    try:
        runtime = dense.runtime
        mot = build_model_chunks(
            mot_cfg, build_transformer_config(mot_cfg, runtime.device), runtime, dense.latent_shape
        )
        dense_params = global_param_names(dense.chunks[0])
        with torch.no_grad():
            for name, param in global_param_names(mot[0]).items():
                param.copy_(dense_params[tied_name(name)])
        origin = {"converted_from": str(source.path), "conversion": "dense-to-mot", "step": source.manifest.get("step")}
        ck.save_weights(out, mot, mot_cfg, source.manifest.get("data"), origin)
    finally:
        shutdown()
    return out
