"""Full-vocabulary logits of given token ids from a checkpoint, in any parallel layout.

    [torchrun --nproc-per-node N -m] megafusion logits --ckpt CKPT --tokens IN.pt --output OUT.pt
        [parallel.tp=2 parallel.pp=2 ...]

(the command line: :mod:`megafusion.commands.logits`). ``IN.pt`` holds an int64 tensor ``[b, s]``
of token ids; ``OUT.pt`` gets the fp32 logits ``[b, s, vocab_size]`` (every vocabulary row,
padding included), written by the rank that holds the last pipeline stage with tensor- and
data-parallel rank 0. Each row is one document (causal attention over the whole row, RoPE
positions 0 .. s-1) and one microbatch of megatron-core's forward-only pipeline schedule, so
tensor, sequence and pipeline parallelism (VPP included) run exactly as in training. Overrides
take ``section.key=value`` on top of the checkpoint's config (``model.seq_length`` becomes ``s``).
Text-only: MoT checkpoints route every token to the text weights.

:func:`load_model` and :func:`forward_logits` are the pieces for other text evaluations
(``megafusion eval --text``, :mod:`megafusion.evaluation.text`, loads Transfusion checkpoints too and
reduces each row's logits to loss sums on the device); the importer tests compare these logits
with transformers'.
"""

from __future__ import annotations

import contextlib

import torch


def load_model(ckpt: str, overrides: list[str], seq_length: int, batch: int, extra_modules: bool = False):
    """The model of checkpoint ``ckpt`` (a :class:`~megafusion.inference.load.LoadedModel`) in the
    layout ``overrides`` name, for ``batch`` rows of ``seq_length`` tokens (one row per microbatch).

    ``extra_modules``: also accept checkpoints of an objective that adds modules to the language
    model (Transfusion's image modules: built for the checkpoint's latent shape, and unused on
    text); by default only plain language models' logits are read."""
    from megafusion import checkpoint as ck
    from megafusion.inference.load import checkpoint_config, model_from_checkpoint, objective_names_with
    from megafusion.objectives.registry import get_objective

    source = checkpoint_config(ckpt)  # the layout: the overrides
    name = source.cfg.objective.name
    if get_objective(name).extra_modules and not extra_modules:
        plain = "/".join(objective_names_with("extra_modules", False))
        raise ck.CheckpointError(
            f"{source.path} was trained with objective.name={name!r}; "
            f"text logits are read from objective.name={plain} checkpoints"
        )
    return model_from_checkpoint(source, overrides, rows=(batch, seq_length))


def forward_logits(cfg, runtime, chunks, tokens: torch.Tensor, reduce=None, causal: bool = False):
    """Logits ``[b, s, vocab]`` (fp32, CPU) of ``tokens`` ``[b, s]`` on last-stage ranks, None elsewhere.

    ``reduce(logits, i)``: instead of the logits, keep what it returns for row ``i`` (called on
    the last stage with that row's logits ``[1, s, vocab]`` as the model gives them, on the
    device, the full vocabulary on every tensor-parallel rank); the result is then the list of
    those values in row order. Keeps only the reductions in memory, not every row's logits.
    ``causal``: routed families route each token from its own state (auxiliary routers).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megafusion.core.modality import Modality
    from megafusion.layers.masks import attention_mask_for
    from megafusion.layers.routing import routing_for
    from megafusion.models.registry import routed as needs_routing

    b, s = tokens.shape
    device = runtime.device
    routed = needs_routing(cfg)
    rows = [
        {
            "tokens": tokens[i : i + 1],
            "document_ids": torch.zeros(1, s, dtype=torch.int64),
            "modality_ids": torch.full((1, s), int(Modality.TEXT), dtype=torch.int64),
            "index": i,
        }
        for i in range(b)
    ]
    whole = reduce is None
    if whole:
        reduce = lambda logits, i: logits.float().cpu()  # noqa: E731

    def step(data_iterator, model):
        row = next(data_iterator)
        mask = attention_mask_for(row, cfg.model.attention_backend, cfg.data.packs_documents(), device)
        positions = torch.arange(s, device=device)[None]
        with routing_for(row, device, causal) if routed else contextlib.nullcontext():
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
            num_microbatches=b,
            seq_length=s,
            micro_batch_size=1,
            forward_only=True,
            collect_non_loss_data=True,
        )
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return torch.cat(store) if whole else list(store)
