"""Deterministic synthetic token data with packed documents.

Each sample is ``seq_length + 1`` tokens cut into ``docs_per_sequence`` documents. A document
is an arithmetic progression ``a, a+d, a+2d, ... (mod vocab)`` with random ``a`` and ``d``:
learnable in context (the loss falls quickly) yet never memorisable. Sample ``i`` of the
run depends only on ``(seed, i)``, so every data-parallel split of a global batch sees the
same samples, and a run can be resumed at any sample.

A microbatch is a dict of ``[b, s]`` tensors: ``tokens``, ``labels``, ``loss_mask`` (0 where
the label is the first token of the next document: no prediction across documents),
``document_ids`` and ``position_ids`` (each token's position within its document, as packed real
data gives it; RoPE reads it under ``data.positions=document``).
"""

from __future__ import annotations

import torch

from megafusion.layers.masks import document_positions


def synthetic_sample(index: int, seed: int, seq_length: int, vocab_size: int, docs: int):
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    n = seq_length + 1
    # Cut points leave every document at least two tokens long.
    cuts = (torch.randperm(n // 2 - 1, generator=gen)[: docs - 1] + 1) * 2 if docs > 1 else torch.tensor([])
    bounds = [0, *sorted(int(c) for c in cuts), n]
    seq = torch.empty(n, dtype=torch.long)
    doc = torch.empty(n, dtype=torch.long)
    for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        start = torch.randint(vocab_size, (), generator=gen)
        step = torch.randint(1, 8, (), generator=gen)
        seq[lo:hi] = (start + step * torch.arange(hi - lo)) % vocab_size
        doc[lo:hi] = k
    return seq, doc


def synthetic_microbatch(first_index: int, size: int, seed: int, seq_length: int, vocab_size: int, docs: int):
    """Samples ``first_index .. first_index + size - 1`` as one microbatch."""
    seqs, doc_ids = zip(*(synthetic_sample(first_index + j, seed, seq_length, vocab_size, docs) for j in range(size)))
    seq, doc = torch.stack(seqs), torch.stack(doc_ids)
    tokens, labels = seq[:, :-1], seq[:, 1:]
    document_ids = doc[:, :-1]
    loss_mask = (doc[:, 1:] == document_ids).float()
    position_ids = document_positions(document_ids)  # restart at 0 in each packed document
    return {
        "tokens": tokens.contiguous(),
        "labels": labels.contiguous(),
        "loss_mask": loss_mask,
        "document_ids": document_ids.contiguous(),
        "position_ids": position_ids.contiguous(),
    }
