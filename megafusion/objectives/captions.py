"""Caption dropout, shared by the objectives whose images have captions (Transfusion's latents,
the LM objective's discrete image tokens): which images train without their caption, as the
``first_key`` of :func:`megafusion.layers.masks.dense_mask`.

Random draws per image come from a generator keyed by (seed, sample, image, salt), so every
pipeline stage of every layout draws the same numbers for the same image.
"""

from __future__ import annotations

import zlib

import torch

from megafusion.core.modality import Modality


def image_generator(seed: int, sample: int, image: int, salt: str = "noise") -> torch.Generator:
    key = zlib.crc32(f"{salt}:{seed}:{sample}:{image}".encode())
    return torch.Generator().manual_seed(key)


def captioned(batch: dict, row: int, image: int, image_ids: torch.Tensor | None = None) -> bool:
    """Whether image ``image`` of ``row`` has text of its own document before it (besides the
    document's first token and the image's begin marker): the caption-first case.
    ``image_ids``: the batch's image spans (default ``batch["image_ids"]``)."""
    ids = (batch["image_ids"] if image_ids is None else image_ids)[row]
    docs, mods = batch["document_ids"][row], batch["modality_ids"][row]
    start = int((ids == image).nonzero()[0])
    doc = docs[start]
    before = (docs[: start - 1] == doc) & (mods[: start - 1] == int(Modality.TEXT))
    return int(before.sum()) > 1  # the document's first token (bos) is always there


def caption_dropout(batch: dict, seed: int, rate: float, image_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``first_key`` ``[b, s]`` for :func:`megafusion.layers.masks.dense_mask`: 0, except for a
    dropped image's tokens and its ``<boi>``, whose first visible key (besides the document's
    ``<bos>``) is that ``<boi>``. ``image_ids``: the batch's image spans (default
    ``batch["image_ids"]``; the LM objective's batches carry none, their images are causal).

    Hiding the caption from the image alone is not enough: ``<boi>`` is a text token that reads
    the caption causally, and from the second layer on its keys and values would carry the caption
    to the image. With ``<boi>`` restricted too, every position a dropped image token reads,
    directly or through any chain of layers, sees only ``<bos>``, ``<boi>`` and the image: the
    unconditional prompt ``<bos> <boi>`` at every layer (the caption's length still sets the RoPE
    offsets, as it does in generation's unconditional pass). Later text still reads the caption.

    Each captioned image is dropped with probability ``rate``, from a generator keyed by (seed,
    sample, image), so every layout drops the same images.
    """
    image_ids = batch["image_ids"] if image_ids is None else image_ids
    first_key = torch.zeros_like(image_ids)
    if rate <= 0:
        return first_key
    for row, count in enumerate((image_ids.max(dim=1).values + 1).tolist()):
        for k in range(count):
            gen = image_generator(seed, int(batch["sample_ids"][row]), k, salt="caption-dropout")
            if torch.rand((), generator=gen) < rate and captioned(batch, row, k, image_ids):
                patches = image_ids[row] == k
                boi = int(patches.nonzero()[0]) - 1
                first_key[row][patches] = boi
                first_key[row, boi] = boi  # <boi> sees <bos> and itself
    return first_key
