"""Packing whole tokenized documents into fixed-length training rows.

Each row holds ``seq_length + 1`` tokens: the model reads ``row[:-1]`` and predicts
``row[1:]``. Documents are never cut (a cut image would train the model on half a picture);
they are placed greedily in the given order (next-fit: a document that does not fit in what
is left of the current row starts a new row) and the rest of a row is padding.
"""

from __future__ import annotations

from collections.abc import Callable
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

    def take(self, idx: np.ndarray) -> PackedRows:
        """Rows ``idx`` (in that order, repeats allowed) as a new ``PackedRows``."""
        latents = None if self.latents is None else [self.latents[i] for i in idx]
        return PackedRows(self.tokens[idx], self.modalities[idx], self.document_ids[idx], self.positions[idx], latents)


def too_long_error(name: str, n: int, width: int) -> DataError:
    return DataError(
        f"{name}: the document is {n} tokens long but a row holds model.seq_length + 1 = "
        f"{width} and documents are never cut: raise model.seq_length to at least {n - 1}"
    )


def next_fit_rows(lengths: np.ndarray, width: int, name: Callable[[int], str]) -> np.ndarray:
    """Where each row starts when documents of ``lengths`` tokens are packed in order, next-fit.

    Returns ``starts`` (int64, ``rows + 1`` entries): row ``r`` holds documents
    ``starts[r] .. starts[r + 1] - 1``. A document longer than ``width`` raises ``DataError``
    naming it (``name(index)``).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    over = np.flatnonzero(lengths > width)
    if over.size:
        raise too_long_error(name(int(over[0])), int(lengths[over[0]]), width)
    # At most one row per document: fill a preallocated array (8 bytes per document, not a list).
    starts, rows, used = np.zeros(lengths.size + 1, dtype=np.int64), 0, 0
    for first in range(0, lengths.size, 1 << 20):  # Python ints a chunk at a time
        for index, n in enumerate(lengths[first : first + (1 << 20)].tolist(), first):
            if used + n > width and index:
                rows += 1
                starts[rows] = index
                used = 0
            used += n
    if lengths.size:
        rows += 1
        starts[rows] = lengths.size
    return starts[: rows + 1].copy()


def fill_rows(rows: list[list[tuple]], width: int, pad_id: int, with_latents: bool) -> PackedRows:
    """``PackedRows`` from, per row, its documents ``(tokens, modalities, latents)`` in order.

    Documents sit back to back from column 0, numbered 0, 1, ... within their row; the rest of a
    row is padding. ``with_latents``: each row keeps its documents' latents, concatenated.
    """
    num_rows = len(rows)
    tokens = np.full((num_rows, width), pad_id, dtype=np.int64)
    modalities = np.full((num_rows, width), int(Modality.TEXT), dtype=np.uint8)
    document_ids = np.full((num_rows, width), PAD_DOCUMENT_ID, dtype=np.int64)
    positions = np.zeros((num_rows, width), dtype=np.int64)
    for r, docs in enumerate(rows):
        start = 0
        for doc_id, (tok, mod, _) in enumerate(docs):
            n = int(np.asarray(tok).shape[0])
            tokens[r, start : start + n] = tok
            modalities[r, start : start + n] = mod
            document_ids[r, start : start + n] = doc_id
            positions[r, start : start + n] = np.arange(n)
            start += n
    latents = [np.concatenate([lat for _, _, lat in docs]) for docs in rows] if with_latents else None
    return PackedRows(
        tokens=tokens, modalities=modalities, document_ids=document_ids, positions=positions, latents=latents
    )


def pack_documents(docs: list[TokenizedDocument], seq_length: int, pad_id: int) -> PackedRows:
    """Pack ``docs`` (whole, in order, next-fit) into rows of ``seq_length + 1`` tokens.

    A document longer than ``seq_length + 1`` tokens raises ``DataError`` naming its source and
    length; so does an empty document. No documents give zero rows.
    """
    if seq_length < 1:
        raise ValueError(f"pack_documents: seq_length must be >= 1, got {seq_length}")
    width = seq_length + 1
    lengths = []
    for index, doc in enumerate(docs):
        n = int(np.asarray(doc.tokens).shape[0])
        name = doc.source or f"document {index}"
        if np.asarray(doc.modalities).shape != (n,):
            raise DataError(f"{name}: {n} tokens but modalities of shape {np.asarray(doc.modalities).shape}")
        if n == 0:
            raise DataError(f"{name}: the document has no tokens; drop it before packing")
        lengths.append(n)
    starts = next_fit_rows(np.asarray(lengths, dtype=np.int64), width, lambda i: docs[i].source or f"document {i}")
    # Transfusion documents carry their latents; each row keeps its documents' latents.
    with_latents = bool(docs) and "latents" in docs[0].meta
    rows = [
        [(d.tokens, d.modalities, d.meta.get("latents")) for d in docs[lo:hi]]
        for lo, hi in zip(starts[:-1].tolist(), starts[1:].tolist())
    ]
    return fill_rows(rows, width, pad_id, with_latents)
