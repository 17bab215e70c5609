"""Packing whole tokenized documents into fixed-length training rows.

Each row holds ``seq_length + 1`` tokens: the model reads ``row[:-1]`` and predicts
``row[1:]``. Documents are never cut (a cut image would train the model on half a picture);
they are placed greedily in the given order (next-fit: a document that does not fit in what
is left of the current row starts a new row) and the rest of a row is padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megafusion.core.errors import DataError
from megafusion.core.modality import MODALITY_NAMES, NUM_MODALITIES, PAD_DOCUMENT_ID, Modality
from megafusion.data.types import TokenizedDocument


@dataclass
class PackedRows:
    """Packed rows, every array ``[num_rows, seq_length + 1]``.

    - ``tokens`` (int64): token ids, padding = the ``pad_id`` given to ``pack_documents``.
    - ``modalities`` (uint8): ``Modality`` of each token; padding is ``Modality.TEXT``.
    - ``document_ids`` (int64): documents numbered 0, 1, 2, ... within each row;
      padding is ``PAD_DOCUMENT_ID`` (-1).
    - ``positions`` (int64): position of each token within its document; padding is 0.
    - ``latents`` (Transfusion only, else None): per row, float32 ``[images, C, h, w]``, the
      latents of the row's images in order (see :mod:`megafusion.data.transfusion_data`).
    """

    tokens: np.ndarray
    modalities: np.ndarray
    document_ids: np.ndarray
    positions: np.ndarray
    latents: list[np.ndarray] | None = None

    @property
    def num_rows(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def row_length(self) -> int:
        """``seq_length + 1``."""
        return int(self.tokens.shape[1])

    def tokens_per_modality(self) -> dict[str, int]:
        """Document tokens (padding excluded) per modality name."""
        real = self.document_ids != PAD_DOCUMENT_ID
        counts = np.bincount(self.modalities[real].astype(np.int64), minlength=NUM_MODALITIES)
        return {name: int(c) for name, c in zip(MODALITY_NAMES, counts)}

    def padding_tokens(self) -> int:
        return int((self.document_ids == PAD_DOCUMENT_ID).sum())


def pack_documents(docs: list[TokenizedDocument], seq_length: int, pad_id: int) -> PackedRows:
    """Pack ``docs`` (whole, in order, next-fit) into rows of ``seq_length + 1`` tokens.

    A document longer than ``seq_length + 1`` tokens raises ``DataError`` naming its source and
    length; so does an empty document. No documents give zero rows.
    """
    if seq_length < 1:
        raise ValueError(f"pack_documents: seq_length must be >= 1, got {seq_length}")
    width = seq_length + 1

    # First decide where every document goes, then fill preallocated arrays.
    placements: list[tuple[int, int, int]] = []  # (row, start column, id within row)
    row, used, ids_in_row = -1, width, 0
    for index, doc in enumerate(docs):
        n = int(np.asarray(doc.tokens).shape[0])
        name = doc.source or f"document {index}"
        if np.asarray(doc.modalities).shape != (n,):
            raise DataError(f"{name}: {n} tokens but modalities of shape {np.asarray(doc.modalities).shape}")
        if n == 0:
            raise DataError(f"{name}: the document has no tokens; drop it before packing")
        if n > width:
            raise DataError(
                f"{name}: the document is {n} tokens long but a row holds model.seq_length + 1 = "
                f"{width} and documents are never cut: raise model.seq_length to at least {n - 1}"
            )
        if used + n > width:
            row, used, ids_in_row = row + 1, 0, 0
        placements.append((row, used, ids_in_row))
        used += n
        ids_in_row += 1

    num_rows = row + 1
    tokens = np.full((num_rows, width), pad_id, dtype=np.int64)
    modalities = np.full((num_rows, width), int(Modality.TEXT), dtype=np.uint8)
    document_ids = np.full((num_rows, width), PAD_DOCUMENT_ID, dtype=np.int64)
    positions = np.zeros((num_rows, width), dtype=np.int64)
    for doc, (r, start, doc_id) in zip(docs, placements):
        n = int(np.asarray(doc.tokens).shape[0])
        tokens[r, start : start + n] = doc.tokens
        modalities[r, start : start + n] = doc.modalities
        document_ids[r, start : start + n] = doc_id
        positions[r, start : start + n] = np.arange(n)
    latents = None
    if docs and "latents" in docs[0].meta:  # Transfusion: each row keeps its documents' latents
        per_row: list[list[np.ndarray]] = [[] for _ in range(num_rows)]
        for doc, (r, _, _) in zip(docs, placements):
            per_row[r].append(doc.meta["latents"])
        latents = [np.concatenate(parts) for parts in per_row]
    return PackedRows(
        tokens=tokens, modalities=modalities, document_ids=document_ids, positions=positions, latents=latents
    )
