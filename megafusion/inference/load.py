"""A trained model, built and loaded in this process's layout: :func:`model_from_checkpoint`.

The one load sequence of every tool that runs a checkpoint (``megafusion generate``, the logits
tool, ``megafusion eval`` and ``eval --text``, ``convert dense-to-mot`` and ``mf-to-hf``):

1. resolve the checkpoint (a step directory, or a run's ``checkpoint.dir`` and its ``latest``)
   and read the run config it records, minus the training layout
   (``checkpoint.run_config``): :func:`checkpoint_config`, which a tool may call first
   to check or adapt the config before any process group exists;
2. the caller's ``section.key=value`` overrides on top (the layout to run in);
3. ``megafusion.runtime.initialize``;
4. the run's data where asked for (its tokenizer and image codec; it also fixes the vocabulary),
   else, for an objective whose model is built for an image latent shape, that shape read off
   the checkpoint's config;
5. ``objectives.build.build_model_chunks`` (or the caller's builder, e.g. the trainer's);
6. ``checkpoint.load_weights`` (megatron-core's dist_checkpointing reshards any saved
   layout into this one).

Whoever gets the model owns the runtime and shuts it down (``megafusion.runtime.shutdown``; the
commands' :func:`megafusion.commands.main.run` does); a failure once the process groups exist
tears them down before it propagates.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from megafusion import checkpoint as ck
from megafusion.core.errors import ConfigError


@dataclass
class CheckpointRun:
    """A checkpoint and the config a tool rebuilds its model from."""

    path: Path  # the step directory
    manifest: dict  # its megafusion.json
    cfg: object  # the run config (one process's layout), with the caller's overrides

    @property
    def step(self) -> int:
        return int(self.manifest.get("step", 0))


@dataclass
class LoadedModel(CheckpointRun):
    """The checkpoint's model on this rank, its weights loaded, in eval mode."""

    runtime: object  # megafusion.runtime.Runtime
    chunks: list  # one model per virtual-pipeline chunk of this rank
    data: object | None  # the run's data (tokenizer, sources), when asked for
    latent_shape: tuple[int, int, int] | None  # what the objective's image modules were built for


def checkpoint_config(ckpt: str | Path, overrides: Sequence[str] = ()) -> CheckpointRun:
    """Steps 1 and 2: the checkpoint ``ckpt`` names and its run config with ``overrides``; no
    process group, no model."""
    from megafusion.config import apply_overrides

    path = ck.resolve_checkpoint(ckpt)
    manifest = ck.read_manifest(path)
    cfg = apply_overrides(ck.run_config(path, manifest), list(overrides))
    return CheckpointRun(path, manifest, cfg)


def model_from_checkpoint(
    ckpt: str | Path | CheckpointRun,
    overrides: Sequence[str] = (),
    *,
    rows: tuple[int, int] | None = None,
    data: bool = False,
    build: Callable[[object, object], tuple[list, object]] | None = None,
) -> LoadedModel:
    """The model of checkpoint ``ckpt`` (a path, or what :func:`checkpoint_config` gave, checked
    or adapted by the caller) in the layout its config and ``overrides`` give.

    ``rows = (batch, seq_length)``: forward-only inference of ``batch`` rows of ``seq_length``
    tokens per data-parallel rank, one row per microbatch (``model.seq_length``,
    ``train.micro_batch_size=1`` and the global batch set accordingly; the layout is then
    validated against the world size, as the caller chose it). ``data``: also build the run's
    data (``LoadedModel.data``; the image latent shape comes from its codec). ``build(cfg,
    runtime) -> (chunks, data)``: builds the model (and data) instead, e.g. a ``Trainer``'s
    DDP-wrapped chunks for a validation pass; the weights are still loaded here.
    """
    import torch.distributed as dist

    from megafusion.config import apply_overrides, validate
    from megafusion.models.transformer_config import build_transformer_config
    from megafusion.objectives.build import build_model_chunks
    from megafusion.objectives.registry import get_objective
    from megafusion.runtime import initialize, shutdown

    source = ckpt if isinstance(ckpt, CheckpointRun) else checkpoint_config(ckpt)
    cfg = apply_overrides(source.cfg, list(overrides))
    if cfg.parallel.cp > 1 and build is None:
        # Text logits, windows and generation feed the model whole rows (or one new token at a time
        # with a KV cache): context parallelism shards training rows only (validation uses it too).
        raise ConfigError(
            f"parallel.cp={cfg.parallel.cp}: context parallelism is for training and validation loss; "
            "logits, text evaluation and generation run with parallel.cp=1 (parallel.tp / parallel.pp "
            "split the model)"
        )
    if rows is not None:
        batch, seq_length = rows
        world = int(os.environ.get("WORLD_SIZE", "1"))
        apply_overrides(cfg, [f"model.seq_length={seq_length}", "train.micro_batch_size=1"])
        cfg.train.global_batch_size = batch * cfg.data_parallel_size(world)
        validate(cfg, world)
    # Before any process group exists: a VAE that cannot be loaded stops every rank alike, with the message.
    latent_shape = None
    if build is None and not data and get_objective(cfg.objective.name).image_latents:
        latent_shape = checkpoint_latent_shape(cfg, source.path)
    runtime = initialize(cfg)
    try:
        bundle = None
        if build is not None:
            chunks, bundle = build(cfg, runtime)
            latent_shape = data_latent_shape(bundle)
        else:
            if data:
                from megafusion.data.sources import build_data

                bundle = build_data(cfg, runtime.tp, dist.get_rank() == 0, dist.barrier)
                bundle.set_model_vocabulary(cfg.model)
                latent_shape = data_latent_shape(bundle)
            chunks = build_model_chunks(cfg, build_transformer_config(cfg, runtime.device), runtime, latent_shape)
        ck.load_weights(source.path, chunks)
    except BaseException:
        shutdown()
        raise
    return LoadedModel(
        source.path, source.manifest, cfg, runtime, [chunk.eval() for chunk in chunks], bundle, latent_shape
    )


def data_latent_shape(bundle) -> tuple[int, int, int] | None:
    """``[C, H, W]`` of one image latent of the run's data (None: no data, or its images are not latents)."""
    codec = getattr(getattr(bundle, "tokenizer", None), "codec", None)
    return tuple(codec.latent_codec.latent_shape) if hasattr(codec, "latent_codec") else None


def checkpoint_latent_shape(cfg, path) -> tuple[int, int, int]:
    """``[C, H, W]`` of one image latent of a checkpoint whose objective samples images (its image
    modules' shapes), without its data: ``(3, S, S)`` for ``objective.latent_codec=pixels``
    (``S = data.image_size``), else read off the VAE at ``objective.vae_path`` (loaded, on the
    CPU, only for that)."""
    from megafusion.core.errors import DataError
    from megafusion.data.codecs.registry import build_latent_codec

    o, size = cfg.objective, cfg.data.image_size
    if o.latent_codec == "pixels":
        return (3, size, size)
    try:
        return tuple(build_latent_codec(o.latent_codec, path=o.vae_path, image_size=size).latent_shape)
    except DataError as err:
        raise ck.CheckpointError(
            f"{path} is a Transfusion checkpoint with objective.latent_codec={o.latent_codec}: the shapes of its "
            f"image modules come from the VAE at objective.vae_path={o.vae_path!r}, which cannot be loaded ({err}); "
            f"make that directory available, or pass objective.vae_path=DIR naming the same AutoencoderKL"
        ) from None


def objective_names_with(capability: str, value: bool = True) -> list[str]:
    """The objectives (built in and registered) whose ``capability`` attribute is ``value``, for messages."""
    from megafusion.objectives.registry import get_objective, objective_names

    return [name for name in objective_names() if bool(getattr(get_objective(name), capability)) == value]
