"""Choosing the next token from logits: temperature, top-k, top-p (nucleus), greedy at temperature 0,
over the ids a position may hold. What both generators of ``megafusion generate`` sample with.
"""

from __future__ import annotations

import torch


def restrict(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """``logits`` ``[n]`` with every id outside the top-k and outside the top-p nucleus set to -inf.

    ``top_k`` = 0 keeps every id; ``top_p`` = 1 keeps every id. The nucleus is the smallest set of
    most likely ids whose probabilities sum to at least ``top_p`` (the most likely id always stays;
    ties at the boundary are broken by index, as ``torch.sort`` orders them)."""
    logits = logits.clone()
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits[logits < kth] = float("-inf")
    if top_p < 1.0:
        order = torch.sort(logits, descending=True, stable=True).indices
        probs = torch.softmax(logits[order], -1)
        before = torch.cumsum(probs, -1) - probs  # probability of the ids ranked above each one
        logits[order[before >= top_p]] = float("-inf")
    return logits


def sample_token(logits: torch.Tensor, args, gen: torch.Generator) -> int:
    """One id from ``logits`` ``[n]`` (ids not allowed here already -inf): the argmax at
    ``args.temperature`` <= 0, else a draw from ``softmax(restrict(logits) / temperature)``.
    ``args``: ``temperature``, and optionally ``top_k`` (0: off) and ``top_p`` (1: off)."""
    if args.temperature <= 0:
        return int(logits.argmax())
    kept = restrict(logits.float(), getattr(args, "top_k", 0) or 0, getattr(args, "top_p", 1.0))
    return int(torch.multinomial(torch.softmax(kept / args.temperature, -1), 1, generator=gen))
