"""From packed rows to microbatches: the train/validation split and the sample order.

- ``split_documents`` holds out a deterministic fraction of documents for validation. Which
  documents are held out depends on ``seed`` and each document's *content* (a hash of its
  tokens and modalities), not on its position, so reordering or adding input shards does not
  reshuffle the split of the documents that were already there. Documents of a group
  (``Document.group``: a built-in set's related documents) are held out together.
- ``MicrobatchSource`` maps sample ``i`` of the run (0, 1, 2, ... forever) to a packed row
  through a fresh permutation per epoch (``epoch = i // num_rows``, permutation drawn from a
  numpy Generator seeded with ``(seed, epoch)``). Sample ``i`` depends only on
  ``(rows, seed, i)``: the loader's whole state is the number of samples consumed so far, and
  resuming a run means calling ``microbatch(consumed, size)`` with that number again. The rows
  are in memory (``PackedRows``: the built-in sets) or made from the documents on disk when a
  microbatch asks (``StreamedRows``, :mod:`megafusion.data.streaming`: indexed data), whose
  sample index may hold the epochs' permutations (``cached_permutation``; the same values).
- ``to_microbatch`` turns packed rows into the microbatch dict every source yields.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np
import torch

from megafusion.core.errors import DataError
from megafusion.core.modality import NUM_MODALITIES, Modality
from megafusion.data.packing import PAD_DOCUMENT_ID, PackedRows
from megafusion.data.types import TokenizedDocument


def content_score(tokens: np.ndarray, modalities: np.ndarray, seed: int) -> int:
    """``hash(seed, content)`` of a document: what decides whether it is held out."""
    h = hashlib.blake2b(digest_size=8)
    h.update(int(seed).to_bytes(8, "little", signed=True))
    h.update(np.ascontiguousarray(tokens, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(modalities, dtype=np.uint8).tobytes())
    return int.from_bytes(h.digest(), "little")


def held_out(scores: np.ndarray, val_fraction: float) -> np.ndarray:
    """Which documents (by content score, uint64) go to validation (see ``split_documents``)."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"split_documents: val_fraction={val_fraction} must be in [0, 1)")
    n = len(scores)
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n >= 2:
        n_val = max(n_val, 1)
    n_val = min(n_val, max(n - 1, 0))  # training never loses its last document
    held = np.zeros(n, dtype=bool)
    # A stable sort: ties in the score are broken by position.
    held[np.argsort(np.asarray(scores, dtype=np.uint64), kind="stable")[:n_val]] = True
    return held


def group_score(group: str, seed: int) -> int:
    """``hash(seed, group)``: what decides whether a group of documents is held out."""
    h = hashlib.blake2b(digest_size=8, person=b"group")
    h.update(int(seed).to_bytes(8, "little", signed=True))
    h.update(group.encode("utf-8"))
    return int.from_bytes(h.digest(), "little")


def held_documents(
    docs: list[TokenizedDocument], val_fraction: float, seed: int, groups: list[str] | None = None
) -> np.ndarray:
    """Which of ``docs`` ``split_documents`` holds out (bool ``[len(docs)]``).

    ``groups`` (one per document, "" for none; ``Document.group``): the documents of a group are
    held out together. A grouped document is scored by its group's key instead of its content, so
    a group's documents sort together; a group the cut goes through is held out whole (the split
    then holds out up to a group more than ``round(len(docs) * val_fraction)``), unless that
    would leave nothing to train on.
    """
    scores = np.array([content_score(d.tokens, d.modalities, seed) for d in docs], dtype=np.uint64)
    if groups is None or not any(groups):
        return held_out(scores, val_fraction)
    keys = np.asarray(groups, dtype=object)
    grouped = keys != ""
    scores[grouped] = [group_score(g, seed) for g in keys[grouped]]
    held = held_out(scores, val_fraction)
    whole = held | (grouped & np.isin(keys, keys[held & grouped]))
    return whole if not whole.all() else held


def split_documents(
    docs: list[TokenizedDocument], val_fraction: float, seed: int
) -> tuple[list[TokenizedDocument], list[TokenizedDocument]]:
    """``(train, val)``: ``round(len(docs) * val_fraction)`` documents go to ``val``.

    The held-out documents are those with the smallest ``hash(seed, content)`` (ties broken by
    position). Both lists keep the input order. ``train`` always keeps at least one document
    (if there is one); with ``val_fraction > 0`` and at least two documents ``val`` gets at least
    one.
    """
    held = held_documents(docs, val_fraction, seed)
    train = [d for i, d in enumerate(docs) if not held[i]]
    val = [d for i, d in enumerate(docs) if held[i]]
    return train, val


def epoch_permutation(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The row order of one epoch (also what the sample index caches)."""
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def to_microbatch(rows: PackedRows, sample_ids: np.ndarray, name: str, row_ids: np.ndarray) -> dict[str, torch.Tensor]:
    """The microbatch dict (see types.py) of packed ``rows``, which samples ``sample_ids`` read
    (packed rows ``row_ids`` of the dataset ``name``, for messages)."""
    tok, mod, doc, pos = rows.tokens, rows.modalities.astype(np.int64), rows.document_ids, rows.positions
    # Predict the next token only inside a document: not across a document boundary, and
    # never a padding token (padding shares one id, so check it separately).
    loss_mask = (doc[:, 1:] == doc[:, :-1]) & (doc[:, 1:] != PAD_DOCUMENT_ID)
    modality_ids = mod[:, :-1]

    def t(a: np.ndarray, dtype=torch.int64) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)

    batch = {
        "tokens": t(tok[:, :-1]),
        "labels": t(tok[:, 1:]),
        "position_ids": t(pos[:, :-1]),
        "document_ids": t(doc[:, :-1]),
        "modality_ids": t(modality_ids),
        "label_modality_ids": t(mod[:, 1:]),
        "loss_mask": t(loss_mask, torch.float32),
        "modality_counts": t(np.bincount(modality_ids.ravel(), minlength=NUM_MODALITIES)),
    }
    if rows.latents is not None:
        _add_latents(batch, rows.latents, name, row_ids)
        # Which samples these are: the forward step keys each image's noise on it, so every
        # parallel layout draws the same noise for the same image.
        batch["sample_ids"] = torch.as_tensor(np.asarray(sample_ids, dtype=np.int64))
    return batch


def _add_latents(batch: dict, latents: list[np.ndarray], name: str, row_ids: np.ndarray) -> None:
    """Transfusion rows: ``image_ids``, ``latents``, and image positions out of the LM loss."""
    from megafusion.layers.masks import image_spans_from_modality

    image_ids = image_spans_from_modality(batch["modality_ids"], batch["document_ids"])
    for row, (ids, lat) in enumerate(zip(image_ids, latents)):
        if int(ids.max()) + 1 != lat.shape[0]:
            raise DataError(
                f"{name}: packed row {int(row_ids[row])} has {int(ids.max()) + 1} image spans but "
                f"{lat.shape[0]} latents; the dataset is inconsistent: rebuild it"
            )
    image = int(Modality.IMAGE)
    text_only = (batch["modality_ids"] != image) & (batch["label_modality_ids"] != image)
    batch["loss_mask"] = batch["loss_mask"] * text_only
    batch["image_ids"] = image_ids
    batch["latents"] = torch.from_numpy(np.concatenate(latents))


class MicrobatchSource:
    """Microbatches of packed rows in a seeded, per-epoch shuffled order (see the module doc)."""

    _CACHED_EPOCHS = 4  # a microbatch spans at most a few epochs; older permutations are dropped

    def __init__(self, rows: PackedRows, seed: int, name: str = "dataset", cached_permutation=None):
        if rows.num_rows == 0:
            raise DataError(
                f"{name}: no packed rows to draw samples from (the split is empty); add documents or "
                "lower data.val_fraction"
            )
        if seed < 0:
            raise ValueError(f"MicrobatchSource: seed must be >= 0, got {seed}")
        self.rows = rows
        self.seed = int(seed)
        self.name = name
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()
        # (seed, epoch) -> a stored permutation (memory-mapped) or None: the sample index's cache.
        self._cached_permutation = cached_permutation

    @property
    def num_rows(self) -> int:
        return self.rows.num_rows

    @property
    def seq_length(self) -> int:
        return self.rows.row_length - 1

    def tokens_per_modality(self) -> dict[str, int]:
        """Document tokens (padding excluded) per modality name, over all rows (one epoch)."""
        return self.rows.tokens_per_modality()

    def _permutation(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            if self._cached_permutation is not None:
                perm = self._cached_permutation(self.seed, epoch)
            if perm is None:
                perm = epoch_permutation(self.num_rows, self.seed, epoch)
            self._perms[epoch] = perm
            while len(self._perms) > self._CACHED_EPOCHS:
                self._perms.popitem(last=False)
        return perm

    def row_indices(self, first_sample: int, size: int) -> np.ndarray:
        """The packed rows that samples ``first_sample .. first_sample + size - 1`` read."""
        if first_sample < 0 or size < 1:
            raise ValueError(f"row_indices: need first_sample >= 0 and size >= 1, got {first_sample}, {size}")
        return self.rows_of(np.arange(first_sample, first_sample + size))

    def rows_of(self, samples: np.ndarray) -> np.ndarray:
        """The packed row each of ``samples`` (sample numbers >= 0, any order) reads."""
        epochs, offsets = np.divmod(np.asarray(samples, dtype=np.int64), self.num_rows)
        return np.array([self._permutation(int(e))[o] for e, o in zip(epochs, offsets)], dtype=np.int64)

    def microbatch(self, first_sample: int, size: int) -> dict[str, torch.Tensor]:
        """Samples ``first_sample .. first_sample + size - 1`` as a microbatch dict (see types.py)."""
        idx = self.row_indices(first_sample, size)
        return to_microbatch(self.rows.take(idx), np.arange(first_sample, first_sample + size), self.name, idx)

    def describe(self) -> str:
        per = ", ".join(f"{k} {v}" for k, v in self.tokens_per_modality().items())
        return (
            f"{self.name}: {self.num_rows} rows of {self.seq_length + 1} tokens ({per}, "
            f"padding {self.rows.padding_tokens()})"
        )


__all__ = [
    "split_documents",
    "held_documents",
    "content_score",
    "group_score",
    "held_out",
    "epoch_permutation",
    "to_microbatch",
    "MicrobatchSource",
]
