"""The data contracts every part of ``megafusion.data`` agrees on.

- ``Modality``: integer ids carried per token (text = 0, image = 1; speech will be 2).
  Begin/end-of-image markers are *text* tokens: they are predicted by the text side.
- ``Document`` = ordered ``TextSegment`` / ``ImageSegment`` list plus ``source`` (where it came
  from: ``file.jsonl:12`` or ``builtin:shapes:41``), used in every error message, and ``group``
  (documents that belong together: the held-out split keeps a group whole).
- ``ImageCodec``: turns an RGB ``uint8 [H, W, 3]`` image into ``tokens_per_image`` discrete codes
  in ``[0, vocab_size)`` and back.
- ``TokenizedDocument``: the flat ``tokens`` (int64) and per-token ``modalities`` (uint8) of one
  document in the joint vocabulary (see ``megafusion.data.tokenizers.joint``).
- A *microbatch* (what the loader yields and every pipeline stage reads) is a dict of tensors:
  ``tokens``, ``labels``, ``position_ids``, ``document_ids``, ``modality_ids``,
  ``label_modality_ids`` (all ``[b, s]`` int64), ``loss_mask`` (``[b, s]`` float) and
  ``modality_counts`` (``[NUM_MODALITIES]`` int64: input tokens per modality, counted on the
  host when the batch is made, so that no layer ever syncs to count).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

# Re-exported: these names live in megafusion.core, where every layer can import them.
from megafusion.core.errors import DataError  # noqa: F401
from megafusion.core.modality import MODALITY_NAMES, NUM_MODALITIES, Modality  # noqa: F401


@dataclass
class TextSegment:
    text: str


@dataclass
class ImageSegment:
    pixels: np.ndarray  # uint8 [H, W, 3]
    source: str = ""  # the image file, for error messages


Segment = TextSegment | ImageSegment


@dataclass
class Document:
    segments: list[Segment]
    source: str = ""
    # Documents that belong together (a built-in set's related documents, e.g. builtin:facts):
    # the held-out split keeps a group whole. "" = none.
    group: str = ""


@dataclass
class TokenizedDocument:
    tokens: np.ndarray  # int64 [n]
    modalities: np.ndarray  # uint8 [n], values from Modality
    source: str = ""
    meta: dict = field(default_factory=dict)


class ImageCodec(Protocol):
    name: str
    vocab_size: int
    tokens_per_image: int

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 ``[H, W, 3]`` -> int64 ``[tokens_per_image]`` codes in ``[0, vocab_size)``."""

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """int64 ``[tokens_per_image]`` -> uint8 ``[h, w, 3]`` image."""

    def config(self) -> dict:
        """Everything that determines the codes (stored with datasets and checkpoints)."""
