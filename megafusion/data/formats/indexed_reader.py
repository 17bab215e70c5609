"""An indexed dataset read one document at a time, never loaded whole.

``IndexedDocuments(prefix)`` opens ``PREFIX.{bin,idx,meta.json}`` (see
:mod:`megafusion.data.formats.indexed`) through megatron-core's ``IndexedDataset``: the index
arrays (item lengths, byte offsets, document boundaries, modes) are memory-mapped and the
``.bin`` is memory-mapped too (megatron's ``_MMapBinReader``), so what a process holds does not
grow with the dataset; pages it touched are file cache the kernel may drop. A Transfusion dataset's
``PREFIX.latents.npy`` is memory-mapped the same way.

Opening checks what is cheap: the meta, the files' byte sizes and the ``.idx`` header against the
meta. ``verify()`` is the full check (the blake2b checksums of every file and the index's
structure); it reads everything once, so the sample index (:mod:`megafusion.data.sample_index`)
runs it when it is built and records that it passed.

- ``document(d)``: ``(tokens int64, modalities uint8)`` of document ``d``;
- ``document_lengths()``: tokens per document (from the index alone);
- ``latents(d)``: Transfusion, the document's image latents ``[images, C, h, w]`` (float32).
"""

from __future__ import annotations

import numpy as np

from megafusion.core.errors import DataError
from megafusion.core.modality import Modality
from megafusion.data.formats.indexed import (
    _check_files,
    _rerun_hint,
    check_index_structure,
    dataset_paths,
    read_meta,
)


class IndexedDocuments:
    """Documents of the dataset at ``prefix``, read on demand (see the module docstring)."""

    def __init__(self, prefix: str):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        from megafusion.data.formats.indexed_latents import META_KEY

        self.prefix = prefix
        self.meta = read_meta(prefix)
        _check_files(prefix, self.meta, checksums=False)
        try:
            self._dataset = IndexedDataset(prefix, multimodal=True)
        except Exception as err:  # megatron raises AssertionError / ValueError / OSError on bad files
            raise DataError(
                f"{dataset_paths(prefix)['idx']}: megatron cannot read the index ({type(err).__name__}: {err}); "
                f"the file is corrupt, {_rerun_hint(prefix)}"
            ) from err
        index = self._dataset.index
        self.dtype = np.dtype(index.dtype)
        # The index arrays, memory-mapped: per item (a same-modality run) its length, byte offset
        # and mode; per document its first item (``documents + 1`` entries).
        self.item_lengths = index.sequence_lengths
        self.item_pointers = index.sequence_pointers
        self.document_items = index.document_indices
        # IndexedDataset.sequence_modes asserts on an array's truth value: read the index's own.
        self.item_modes = index.sequence_modes
        self.num_documents = int(self.document_items.shape[0] - 1)
        self._latents = None
        self._latent_starts = None
        self._sources = None  # decoded on the first message that needs one
        if META_KEY in self.meta:
            self._open_latents()

    @property
    def has_latents(self) -> bool:
        return self._latents is not None

    def document_lengths(self, chunk: int = 1 << 20) -> np.ndarray:
        """Tokens of every document (int64), from the index's item lengths, ``chunk`` documents
        at a time (nothing per item is held for the whole dataset)."""
        out = np.empty(self.num_documents, dtype=np.int64)
        for a in range(0, self.num_documents, chunk):
            b = min(a + chunk, self.num_documents)
            bounds = np.asarray(self.document_items[a : b + 1], dtype=np.int64)
            ends = np.concatenate([[0], np.cumsum(self.item_lengths[bounds[0] : bounds[-1]], dtype=np.int64)])
            out[a:b] = np.diff(ends[bounds - bounds[0]])
        return out

    def document(self, d: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens (int64) and per-token modalities (uint8) of document ``d``."""
        lo, hi = int(self.document_items[d]), int(self.document_items[d + 1])
        lengths = np.asarray(self.item_lengths[lo:hi], dtype=np.int64)
        # A document's items are contiguous in the .bin: one read.
        tokens = self._dataset.bin_reader.read(
            dtype=self.dtype, count=int(lengths.sum()), offset=int(self.item_pointers[lo])
        )
        modalities = np.repeat(np.asarray(self.item_modes[lo:hi], dtype=np.uint8), lengths)
        return tokens.astype(np.int64), modalities

    def source(self, d: int) -> str:
        """Where document ``d`` came from (for messages)."""
        from megafusion.data.formats.indexed import _decode_sources

        if self._sources is None:
            self._sources = _decode_sources(self.meta["document_sources"], dataset_paths(self.prefix)["meta"])
        return self._sources[d] if d < len(self._sources) else f"{self.prefix} document {d}"

    def latents(self, d: int) -> np.ndarray:
        """Document ``d``'s image latents ``[images, C, h, w]`` (float32, a copy)."""
        lo, hi = int(self._latent_starts[d]), int(self._latent_starts[d + 1])
        return np.array(self._latents[lo:hi], dtype=np.float32)

    def _open_latents(self) -> None:
        from megafusion.data.formats.indexed_latents import check_latent_file, latents_path

        info = check_latent_file(self.prefix, self.meta, checksum=False)
        path, rerun = (
            latents_path(self.prefix),
            f"re-run `megafusion data prepare ... --latent-codec ... --output {self.prefix}`",
        )
        try:
            self._latents = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise DataError(f"{path}: not a readable .npy array ({err}); {rerun}") from None
        want = (int(info["count"]), *(int(x) for x in info["shape"]))
        if self._latents.shape != want or self._latents.dtype != np.dtype(info["dtype"]):
            raise DataError(
                f"{path}: holds {self._latents.dtype} {self._latents.shape}, but {self.prefix}.meta.json says "
                f"{info['dtype']} {want}; {rerun}"
            )
        # One image per image-mode item (an image is <boi> patches <eoi>, the markers being text).
        image_items = np.asarray(self.item_modes, dtype=np.int64) == int(Modality.IMAGE)
        per_item = np.concatenate([[0], np.cumsum(image_items, dtype=np.int64)])
        self._latent_starts = per_item[np.asarray(self.document_items, dtype=np.int64)]
        if int(self._latent_starts[-1]) != want[0]:
            raise DataError(
                f"{latents_path(self.prefix)}: {want[0]} latents, but the documents of {self.prefix}.bin hold "
                f"{int(self._latent_starts[-1])} images; the files do not belong together, re-run "
                f"`megafusion data prepare ... --latent-codec ... --output {self.prefix}`"
            )

    def verify(self) -> None:
        """The full check: file checksums (the latents' too) and the index's structure (DataError)."""
        from megafusion.data.formats.indexed_latents import check_latent_file

        _check_files(self.prefix, self.meta, checksums=True)
        check_index_structure(
            self.prefix,
            self.meta,
            self.dtype,
            np.asarray(self.item_lengths, dtype=np.int64),
            np.asarray(self.item_pointers, dtype=np.int64),
            np.asarray(self.document_items, dtype=np.int64),
            np.asarray(self.item_modes, dtype=np.int64),
        )
        if self.has_latents:
            check_latent_file(self.prefix, self.meta, checksum=True)
        # Token ids below the vocabulary, read in blocks (a corrupt .bin is caught here, not as an
        # index error deep inside the embedding).
        total, block, vocab = int(np.sum(self.item_lengths, dtype=np.int64)), 1 << 24, int(self.meta["vocab_size"])
        for first in range(0, total, block):
            count = min(block, total - first)
            chunk = self._dataset.bin_reader.read(dtype=self.dtype, count=count, offset=first * self.dtype.itemsize)
            if int(chunk.max()) >= vocab or int(chunk.min()) < 0:
                path = dataset_paths(self.prefix)["bin"]
                raise DataError(
                    f"{path}: token ids outside [0, {vocab}) (vocab_size in {self.prefix}.meta.json); the file is "
                    f"corrupt, {_rerun_hint(self.prefix)}"
                )

    def close(self) -> None:
        self._dataset = None
        self._latents = None


__all__ = ["IndexedDocuments"]
