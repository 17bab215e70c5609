"""Transfusion data: documents whose images are continuous latents instead of discrete codes.

Layout (the plan in docs/architecture.md, "Transfusion"): an image becomes ``<boi>``, ``n``
placeholder tokens (modality image, all the one placeholder id of :class:`PlaceholderCodec`),
``<eoi>``, where ``n`` is the number of ``patch_size`` x ``patch_size`` patches of its latent.
The latents travel beside the tokens:

- ``encode_transfusion_document`` puts them in ``TokenizedDocument.meta["latents"]``
  (float32 ``[images, C, h, w]`` in document order);
- ``pack_documents`` keeps them per packed row (``PackedRows.latents``);
- ``MicrobatchSource.microbatch`` adds ``image_ids`` ``[b, s]`` (-1, or the image's number in
  its row) and ``latents`` (``[images in the microbatch, C, h, w]`` in row, then image order),
  and leaves image positions out of the LM loss: neither a placeholder nor the token after
  the last patch is a next-token prediction (the diffusion loss trains images).
"""

from __future__ import annotations

import numpy as np

from megafusion.core.errors import DataError
from megafusion.data.types import Document, ImageSegment, TokenizedDocument


class PlaceholderCodec:
    """The tokenizer's image codec for Transfusion: one placeholder code per latent patch."""

    name = "latent-placeholder"
    vocab_size = 1

    def __init__(self, latent_codec, patch_size: int):
        channels, height, width = latent_codec.latent_shape
        if patch_size < 1 or height % patch_size or width % patch_size:
            raise DataError(
                f"latents of shape {latent_codec.latent_shape} cannot be cut into {patch_size}x"
                f"{patch_size} patches: choose a patch size that divides {height} and {width}"
            )
        self.latent_codec, self.patch_size = latent_codec, int(patch_size)
        self.tokens_per_image = (height // patch_size) * (width // patch_size)

    def encode(self, pixels: np.ndarray, *, source: str = "") -> np.ndarray:
        return np.zeros(self.tokens_per_image, dtype=np.int64)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        raise DataError("Transfusion images are latents, not codes: decode them with the latent codec")

    def config(self) -> dict:
        return {"name": self.name, "latent": self.latent_codec.config(), "patch_size": self.patch_size}


def encode_transfusion_document(tokenizer, doc: Document) -> TokenizedDocument:
    """Tokens with placeholders (``tokenizer.codec`` must be a :class:`PlaceholderCodec`) + latents."""
    codec = tokenizer.codec
    if not isinstance(codec, PlaceholderCodec):
        raise TypeError(
            f"encode_transfusion_document needs a tokenizer built with a PlaceholderCodec, not {type(codec).__name__}"
        )
    tokenized = tokenizer.encode_document(doc)
    images = [seg for seg in doc.segments if isinstance(seg, ImageSegment)]
    latents = [codec.latent_codec.encode(seg.pixels, source=seg.source or doc.source) for seg in images]
    shape = codec.latent_codec.latent_shape
    tokenized.meta["latents"] = (
        np.stack(latents).astype(np.float32) if latents else np.zeros((0, *shape), dtype=np.float32)
    )
    return tokenized
