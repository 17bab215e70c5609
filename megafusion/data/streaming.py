"""Packed rows of an indexed dataset, made when a microbatch asks for them.

``StreamedRows`` is what ``MicrobatchSource`` draws from for ``data.source=indexed``: the same
interface as the in-memory ``PackedRows`` (``num_rows``, ``row_length``, ``take(idx)``,
``tokens_per_modality()``, ``padding_tokens()``), but a row is assembled from its documents,
read through megatron-core's memory-mapped ``IndexedDataset`` (:mod:`megafusion.data.formats.indexed_reader`),
only when a sample needs it. Which documents a row holds comes from the cached sample index
(:mod:`megafusion.data.sample_index`). The rows equal those ``pack_documents`` makes from the
same documents in memory, latents included.

``streamed_sources(...)`` builds the train / validation ``MicrobatchSource`` pair of one dataset.
"""

from __future__ import annotations

import numpy as np

from megafusion.data.formats.indexed_reader import IndexedDocuments
from megafusion.data.loader import MicrobatchSource
from megafusion.data.packing import PackedRows, fill_rows
from megafusion.data.sample_index import SplitIndex, build_sample_index, cache_permutations, default_cache

# From this many rows an epoch's permutation is cached on disk and memory-mapped (8 MiB in memory).
PERMUTATION_CACHE_MIN_ROWS = 1 << 20


class StreamedRows:
    """The packed rows of one split of an indexed dataset (see the module docstring)."""

    def __init__(self, documents: IndexedDocuments, split: SplitIndex, seq_length: int, pad_id: int):
        self.documents, self.split = documents, split
        self.width, self.pad_id = seq_length + 1, int(pad_id)

    @property
    def num_rows(self) -> int:
        return self.split.num_rows

    @property
    def row_length(self) -> int:
        return self.width

    def take(self, idx: np.ndarray) -> PackedRows:
        rows, docs, starts = [], self.split.docs, self.split.rows
        for r in np.asarray(idx).tolist():
            part = []
            for d in docs[int(starts[r]) : int(starts[r + 1])].tolist():
                tokens, modalities = self.documents.document(d)
                part.append((tokens, modalities, self.documents.latents(d) if self.documents.has_latents else None))
            rows.append(part)
        return fill_rows(rows, self.width, self.pad_id, self.documents.has_latents)

    def tokens_per_modality(self) -> dict[str, int]:
        return dict(self.split.tokens)

    def padding_tokens(self) -> int:
        return self.split.padding


def streamed_sources(
    documents: IndexedDocuments,
    cfg,
    pad_id: int,
    seeds: tuple[int, int],
    where: str,
    is_first_rank: bool,
    barrier,
) -> tuple[MicrobatchSource, MicrobatchSource | None]:
    """``(train, val)`` sources of ``documents`` for the run ``cfg`` (val None when nothing is held out).

    ``seeds``: the row-order seeds of the train and validation sources. The epoch permutations
    the run will use (``train.steps`` x ``train.global_batch_size`` samples; ``eval.batches`` x
    ``train.global_batch_size`` per evaluation) are cached with the index.
    """
    d, m, t = cfg.data, cfg.model, cfg.train
    root = d.index_cache or default_cache(documents.prefix)
    samples = {"train": t.steps * t.global_batch_size, "val": cfg.eval.batches * t.global_batch_size}

    def epochs(split_rows: int, split: str) -> int:
        return -(-samples[split] // split_rows) if split_rows else 0

    splits = build_sample_index(documents, root, t.seed, d.val_fraction, m.seq_length, is_first_rank, barrier)
    if is_first_rank:
        for (split, index), seed in zip(splits.items(), seeds):
            # Small splits draw their permutations in memory (the same values): files would cost more.
            if index.num_rows >= PERMUTATION_CACHE_MIN_ROWS:
                cache_permutations(index, seed, epochs(index.num_rows, split))
    barrier()
    sources = []
    for (split, index), seed in zip(splits.items(), seeds):
        if split == "val" and index.num_rows == 0:
            sources.append(None)
            continue
        rows = StreamedRows(documents, index, m.seq_length, pad_id)
        sources.append(MicrobatchSource(rows, seed, f"{where} {split}", cached_permutation=index.permutation))
    return sources[0], sources[1]


__all__ = ["StreamedRows", "streamed_sources"]
