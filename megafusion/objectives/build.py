"""The model a run trains: the family's layers (``model.arch``) in the objective's model class
(``objective.name``). What the trainer, generation, the logits and evaluation tools and the
converters call to build a model; it sits here, above both registries, because the model depends
on both."""

from __future__ import annotations

from megafusion.models.build import assemble_chunks
from megafusion.objectives.registry import get_objective
from megafusion.runtime import stage_channel


def build_model_chunks(cfg, tconfig, runtime, latent_shape: tuple[int, int, int] | None = None) -> list:
    """One model per virtual-pipeline chunk of this rank. ``latent_shape`` (``[C, H, W]`` of one
    image latent) is what an objective's image modules are built for (None: pixel latents of
    ``data.image_size`` images). Call it on every rank together: an objective that needs the
    first-to-last-stage channel opens it here (a collective)."""
    objective = get_objective(cfg.objective.name)
    if objective.needs_stage_channel(cfg) and runtime.pp > 1 and not stage_channel.is_open():
        stage_channel.open_channel(runtime.device)
    model_cls, extra = objective.model_class(cfg, latent_shape)
    return assemble_chunks(cfg, tconfig, runtime, model_cls, extra)
