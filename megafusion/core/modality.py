"""Modalities: the integer id every token carries, and their names.

Begin/end-of-image markers are *text* tokens (predicted by the text side). Adding a modality
(speech) is a new member here; layers, losses and metrics iterate over ``MODALITY_NAMES``.
"""

from __future__ import annotations

from enum import IntEnum


class Modality(IntEnum):
    TEXT = 0
    IMAGE = 1


MODALITY_NAMES = tuple(m.name.lower() for m in Modality)
NUM_MODALITIES = len(MODALITY_NAMES)

# ``image_ids`` of a token that belongs to no image (Transfusion microbatches, masks, generation).
NO_IMAGE = -1

# ``document_ids`` of padding: never a document's id (those are 0, 1, 2, ... within each row), so a
# padding token never looks like it belongs to the document before it.
PAD_DOCUMENT_ID = -1
