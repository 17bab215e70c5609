"""Full-vocabulary logits of given token ids from a checkpoint, in any parallel layout.

    [torchrun --nproc-per-node N] python -m megafusion.inference.logits --ckpt CKPT --tokens IN.pt --out OUT.pt
        [parallel.tp=2 parallel.pp=2 ...]

``IN.pt`` holds an int64 tensor ``[b, s]`` of token ids; ``OUT.pt`` gets the fp32 logits
``[b, s, vocab_size]`` (every vocabulary row, padding included), written by the rank that
holds the last pipeline stage with tensor- and data-parallel rank 0. Each row is one
document (causal attention over the whole row, RoPE positions 0 .. s-1) and one microbatch
of megatron-core's forward-only pipeline schedule, so tensor, sequence and pipeline
parallelism (VPP included) run exactly as in training. Overrides take ``section.key=value``
on top of the checkpoint's config (``model.seq_length`` becomes ``s``). Text-only: MoT
checkpoints route every token to the text weights.

:func:`load_model` and :func:`forward_logits` are the pieces for other text evaluations
(``megafusion eval --text``, :mod:`megafusion.evaluation.text`, loads Transfusion checkpoints too and
reduces each row's logits to loss sums on the device); the importer tests compare these logits
with transformers'.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch


def load_model(ckpt: str, overrides: list[str], seq_length: int, batch: int, transfusion_text: bool = False):
    """(config, runtime, model chunks) of checkpoint ``ckpt`` in the layout ``overrides`` name,
    for ``batch`` rows of ``seq_length`` tokens (one row per microbatch).

    ``transfusion_text``: also accept ``objective.name=transfusion`` checkpoints (their model is
    built with its image modules, of the checkpoint's latent shape, and run on text alone)."""
    from megafusion.config import apply_overrides, validate
    from megafusion.objectives.build import build_model_chunks
    from megafusion.models.transformer_config import build_transformer_config
    from megafusion.runtime import initialize
    from megafusion.training import checkpoint as ck

    path = ck.resolve_checkpoint(ckpt)
    cfg = ck.run_config(path)  # the layout: the overrides
    accepted = ("lm", "transfusion") if transfusion_text else ("lm",)
    if cfg.objective.name not in accepted:
        raise ck.CheckpointError(f"{path} was trained with objective.name={cfg.objective.name!r}; "
                                 f"text logits are read from objective.name=lm checkpoints")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    apply_overrides(cfg, [*overrides, f"model.seq_length={seq_length}", "train.micro_batch_size=1"])
    cfg.train.global_batch_size = batch * cfg.data_parallel_size(world)
    validate(cfg, world)
    latent_shape = checkpoint_latent_shape(cfg, path) if cfg.objective.name == "transfusion" else None
    runtime = initialize(cfg)
    chunks = build_model_chunks(cfg, build_transformer_config(cfg, runtime.device), runtime, latent_shape)
    ck.load_weights(path, chunks)
    return cfg, runtime, [chunk.eval() for chunk in chunks]


def checkpoint_latent_shape(cfg, path) -> tuple[int, int, int]:
    """``[C, H, W]`` of one image latent of a Transfusion checkpoint (its image modules' shapes):
    ``(3, S, S)`` for ``objective.latent_codec=pixels`` (``S = data.image_size``), else read off
    the VAE at ``objective.vae_path`` (loaded, on the CPU, only for that)."""
    from megafusion.data.codecs.registry import build_latent_codec
    from megafusion.core.errors import DataError
    from megafusion.training.checkpoint import CheckpointError

    o, size = cfg.objective, cfg.data.image_size
    if o.latent_codec == "pixels":
        return (3, size, size)
    try:
        return tuple(build_latent_codec(o.latent_codec, path=o.vae_path, image_size=size).latent_shape)
    except DataError as err:
        raise CheckpointError(
            f"{path} is a Transfusion checkpoint with objective.latent_codec={o.latent_codec}: the shapes of its "
            f"image modules come from the VAE at objective.vae_path={o.vae_path!r}, which cannot be loaded ({err}); "
            f"make that directory available, or pass objective.vae_path=DIR naming the same AutoencoderKL") from None


def forward_logits(cfg, runtime, chunks, tokens: torch.Tensor, reduce=None):
    """Logits ``[b, s, vocab]`` (fp32, CPU) of ``tokens`` ``[b, s]`` on last-stage ranks, None elsewhere.

    ``reduce(logits, i)``: instead of the logits, keep what it returns for row ``i`` (called on
    the last stage with that row's logits ``[1, s, vocab]`` as the model gives them, on the
    device, the full vocabulary on every tensor-parallel rank); the result is then the list of
    those values in row order. Keeps only the reductions in memory, not every row's logits.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megafusion.core.modality import Modality
    from megafusion.models.registry import get_family
    from megafusion.training.forward_step import attention_mask_for, routing_for

    b, s = tokens.shape
    device = runtime.device
    routed = get_family(cfg.model.arch).routed
    rows = [{"tokens": tokens[i:i + 1], "document_ids": torch.zeros(1, s, dtype=torch.int64),
             "modality_ids": torch.full((1, s), int(Modality.TEXT), dtype=torch.int64), "index": i}
            for i in range(b)]
    whole = reduce is None
    if whole:
        reduce = lambda logits, i: logits.float().cpu()  # noqa: E731

    def step(data_iterator, model):
        row = next(data_iterator)
        mask = attention_mask_for(row, cfg.model.attention_backend, cfg.data.packs_documents(), device)
        positions = torch.arange(s, device=device)[None]
        with routing_for(row, device) if routed else contextlib.nullcontext():
            # runtime_gather_output: the full vocabulary on every tensor-parallel rank.
            out = model(row["tokens"].to(device), positions, mask, labels=None, runtime_gather_output=True)

        def keep(output, non_loss_data=True, i=row["index"]):
            # A Transfusion model gives (logits, image prediction): None without images.
            return reduce((output[0] if isinstance(output, tuple) else output).detach(), i)

        return out, keep

    with torch.no_grad():
        store = get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=[iter(rows) for _ in chunks] if len(chunks) > 1 else iter(rows),
            model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=b, seq_length=s, micro_batch_size=1,
            forward_only=True, collect_non_loss_data=True)
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return torch.cat(store) if whole else list(store)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megafusion.inference.logits", description="logits of token ids")
    p.add_argument("--ckpt", required=True, help="step directory or checkpoint.dir (any layout)")
    p.add_argument("--tokens", required=True, help=".pt file with an int64 tensor [batch, seq]")
    p.add_argument("--out", required=True, help=".pt file for the fp32 logits [batch, seq, vocab]")
    return p


def main(argv: list[str] | None = None) -> int:
    from megafusion.config import ConfigError
    from megafusion.runtime import shutdown
    from megafusion.training.checkpoint import CheckpointError

    args, overrides = _parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    tokens = torch.load(args.tokens)
    if tokens.dim() != 2 or tokens.dtype != torch.int64:
        print(f"megafusion logits: {args.tokens} must hold an int64 tensor [batch, seq], got "
              f"{tuple(tokens.shape)} {tokens.dtype}", file=sys.stderr)
        return 2
    try:
        cfg, runtime, chunks = load_model(args.ckpt, overrides, tokens.shape[1], tokens.shape[0])
    except (CheckpointError, ConfigError) as err:
        print(f"megafusion logits: {err}", file=sys.stderr)
        return 2
    try:
        if int(tokens.max()) >= cfg.model.vocab_size or int(tokens.min()) < 0:
            print(f"megafusion logits: {args.tokens} holds ids outside the model's vocabulary "
                  f"[0, {cfg.model.vocab_size})", file=sys.stderr)
            return 2
        logits = forward_logits(cfg, runtime, chunks, tokens)
        if logits is not None and runtime.tp_rank == 0 and runtime.dp_rank == 0:
            torch.save(logits, args.out)
            print(f"[megafusion] logits {tuple(logits.shape)} -> {args.out}", flush=True)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
