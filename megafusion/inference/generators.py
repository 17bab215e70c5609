"""Which generator a checkpoint gets, asked of its objective's spec (never its name):
``image_latents`` -> :class:`~megafusion.inference.generate.Generator` (denoised latents),
``image_tokens`` -> :class:`~megafusion.inference.token_images.TokenImageGenerator` (discrete tokens).
"""

from __future__ import annotations


def generator_classes() -> tuple:
    from megafusion.inference.generate import Generator
    from megafusion.inference.token_images import TokenImageGenerator

    return (Generator, TokenImageGenerator)


def generator_class(source):
    """The generator class for checkpoint ``source`` (a :class:`~megafusion.inference.load.CheckpointRun`);
    CheckpointError naming the objectives that generate images when none fits."""
    from megafusion.inference.decoding import refuse_unless
    from megafusion.objectives.registry import get_objective

    classes = generator_classes()
    refuse_unless(classes, source)
    objective = get_objective(source.cfg.objective.name)
    return next(c for c in classes if c.generates(objective))


def load_generator(ckpt: str, kv_cache: bool = True):
    """The generator of checkpoint ``ckpt`` (any layout), its model and data loaded in this process."""
    from megafusion.inference.load import checkpoint_config

    source = checkpoint_config(ckpt)
    return generator_class(source).from_checkpoint(source, kv_cache)
