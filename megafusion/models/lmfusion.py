"""LMFusion (arXiv 2412.15188) on a Mixture-of-Transformers: the text half frozen, the rest trained.

``model.freeze_text=true`` (with ``model.arch=mot``, ``model.untie=all``) turns the MoT into
LMFusion. Start it from a pretrained text model (``checkpoint.init_from`` a dense checkpoint, e.g.
a Hugging Face Llama imported with ``megafusion convert hf-to-mf``: every image copy then starts
as a copy of its text module, see ``checkpoint/warm_start.py``). What trains and what does not:

- frozen (``requires_grad=False``, so megatron-core's DDP gives them no gradient buffer and its
  optimizers no state): every ``.text.`` copy (Q/K/V, output projection, SwiGLU MLP, every
  RMSNorm incl. QK-norm and the final norm), the input embedding and the output layer;
- trained: every ``.image.`` copy, Transfusion's image modules, and the vocabulary rows of the
  tokens that come after the text tokenizer's ids (``<boi>``, ``<eoi>``, image ids, padding).

The new rows cannot be a slice of the frozen embedding (a parameter is trained whole), so they
are deltas of their own, added to the frozen rows: ``embedding_new_rows.weight`` and
``output_new_rows.weight``, ``[vocab - first, h]`` each, zero at the start (the model starts as
the checkpoint it came from), ``first = model.frozen_vocab_rows`` (the text tokenizer's size).
The input delta is added to the embedding output at positions holding a new token; the output
delta adds ``hidden @ delta.T`` to the logits of the new columns. The frozen rows of the new
tokens keep whatever the checkpoint held (zero for rows a vocabulary growth added), so a new
token's effective row is ``frozen row + delta``. The output delta is kept apart from the input
one even for tied embeddings, so tied models under pipeline parallelism need no extra sync.

The deltas are not tensor-parallel: each TP rank holds them whole. The input delta is computed
on the full sequence on every rank (then scattered under sequence parallelism), so its
gradient agrees across ranks by itself; the output delta goes through megatron's
``copy_to_tensor_model_parallel_region`` (identity forward, all-reduce backward), because each
rank computes only the new columns of its own vocabulary shard.

Frozen weights skip their weight-gradient GEMMs (megatron's ``linear_with_frozen_weight`` for the
output layer; autograd for the per-modality grouped GEMMs), which ``megafusion/accounting`` counts.
Text logits (columns ``< first``) of text-only inputs are exactly the pretrained model's, before
and after any amount of training (``tests/models/test_lmfusion.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)

from megafusion.core.modality import Modality
from megafusion.models.param_layout import EMBEDDING, OUTPUT_LAYER

INPUT_ROWS, OUTPUT_ROWS = "embedding_new_rows", "output_new_rows"  # module names on the GPTModel
_TEXT = Modality.TEXT.name.lower()


def is_frozen(name: str) -> bool:
    """Whether parameter ``name`` (global or local name) stays frozen under ``model.freeze_text``."""
    return _TEXT in name.split(".") or name in (EMBEDDING, OUTPUT_LAYER)


class NewTokenRows(torch.nn.Module):
    """``weight`` ``[vocab - first, hidden]``: trainable deltas of vocabulary rows ``[first, vocab)``."""

    def __init__(self, first: int, vocab: int, hidden: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        if not 0 < first <= vocab:
            raise ValueError(f"model.frozen_vocab_rows={first} must be in [1, model.vocab_size={vocab}]")
        self.first, self.vocab = first, vocab
        # The model's params_dtype (bf16 on GPUs): megatron's mixed-precision optimizer keeps the
        # fp32 master copy, as for every other weight.
        self.weight = torch.nn.Parameter(torch.zeros(vocab - first, hidden, dtype=dtype))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[b, s, h]``: the delta of each position's token (zero for the frozen ids)."""
        rel = input_ids - self.first
        is_new = (rel >= 0).unsqueeze(-1)
        return F.embedding(rel.clamp(min=0), self.weight) * is_new.to(self.weight.dtype)

    def logits(self, hidden: torch.Tensor, lo: int, width: int) -> torch.Tensor:
        """``[s, b, width]``: the delta logits of vocabulary columns ``[lo, lo + width)`` (zero outside
        the new rows). ``hidden`` is the full sequence; every TP rank must call this (collective)."""
        weight = copy_to_tensor_model_parallel_region(self.weight)  # all-reduce of the gradient
        start = min(max(lo, self.first), lo + width)
        stop = max(min(lo + width, self.vocab), start)
        part = F.linear(hidden, weight[start - self.first : stop - self.first])
        return F.pad(part, (start - lo, lo + width - stop))


def attach_new_token_rows(model, first: int) -> None:
    """Give one GPTModel chunk its new-row deltas (first stage: input, last stage: output) and hooks."""
    config, vocab = model.config, model.vocab_size
    if model.pre_process:
        model.add_module(INPUT_ROWS, NewTokenRows(first, vocab, config.hidden_size, config.params_dtype))
        model.embedding.register_forward_hook(_embedding_hook(model), with_kwargs=True)
    if model.post_process:
        model.add_module(OUTPUT_ROWS, NewTokenRows(first, vocab, config.hidden_size, config.params_dtype))
        model.output_layer.register_forward_hook(_output_hook(model), with_kwargs=True)


def _embedding_hook(model):
    def hook(module, args, kwargs, output):
        input_ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        delta = getattr(model, INPUT_ROWS).embed(input_ids).transpose(0, 1).to(output.dtype)  # [s, b, h]
        if model.config.sequence_parallel:
            delta = scatter_to_sequence_parallel_region(delta)
        return output + delta

    return hook


def _output_hook(model):
    def hook(module, args, kwargs, output):
        logits, bias = output
        hidden = args[0] if args else kwargs["input_"]
        config, tp = model.config, ps.get_tensor_model_parallel_world_size()
        if tp > 1:  # the full sequence, with the backward of a column-parallel input
            group = ps.get_tensor_model_parallel_group()
            hidden = (
                gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True, group=group)
                if config.sequence_parallel
                else copy_to_tensor_model_parallel_region(hidden, group=group)
            )
        width = logits.shape[-1]
        # Logits gathered over TP (runtime_gather_output) hold every column; else this rank's shard.
        lo = 0 if width == model.vocab_size else ps.get_tensor_model_parallel_rank() * width
        delta = getattr(model, OUTPUT_ROWS).logits(hidden, lo, width)
        return logits + delta.to(logits.dtype), bias

    return hook


def freeze_text(model) -> None:
    """Freeze every parameter :func:`is_frozen` names (before DDP wraps the model)."""
    for name, param in model.named_parameters():
        if is_frozen(name):
            param.requires_grad_(False)
