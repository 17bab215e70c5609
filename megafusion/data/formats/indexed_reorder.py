"""Rewrite an indexed dataset with its documents in another order, one document at a time.

``megafusion data prepare --order icp`` first writes the dataset in input order (to a temporary
prefix), computes the new order (:mod:`megafusion.data.icp`), then writes the final dataset with
``write_reordered``: each document is read back through megatron-core's memory-mapped
``IndexedDataset`` (its same-modality items, see :mod:`megafusion.data.formats.indexed`) and handed
to ``write_indexed`` in the new order; a Transfusion dataset's latents (``PREFIX.latents.npy``,
memory-mapped) follow their documents into a new ``LatentWriter``. Nothing but ``O(documents)``
index arrays is held in memory; the disk holds both copies until the temporary one is removed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from megafusion.core.modality import Modality
from megafusion.data.formats.indexed import dataset_paths, write_indexed
from megafusion.data.formats.indexed_latents import LatentWriter, latents_path
from megafusion.data.types import TokenizedDocument


def _document_bounds(prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """(item bounds ``[documents + 1]``, images per document): BOI / EOI are text tokens, so
    every image is exactly one image item."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix, multimodal=True)
    bounds = np.array(ds.document_indices, dtype=np.int64)
    is_image = np.array(ds.index.sequence_modes, dtype=np.int64) == Modality.IMAGE
    del ds
    images = np.diff(np.concatenate([[0], np.cumsum(is_image)])[bounds])
    return bounds, images


def documents_in_order(prefix: str, order: np.ndarray, sources: list[str]) -> Iterator[TokenizedDocument]:
    """The documents of the dataset at ``prefix`` in ``order`` (input indices), read one at a time."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    bounds, _ = _document_bounds(prefix)
    ds = IndexedDataset(prefix, multimodal=True)
    try:
        for d in np.asarray(order).tolist():
            runs, modes = ds[int(bounds[d]) : int(bounds[d + 1])]
            lengths = [len(run) for run in runs]
            yield TokenizedDocument(
                tokens=np.concatenate(runs).astype(np.int64),
                modalities=np.repeat(np.asarray(modes, dtype=np.uint8), lengths),
                source=sources[d],
            )
    finally:
        del ds


def write_reordered(src: str, dst: str, order: np.ndarray, sources: list[str], meta: dict, latent_codec=None) -> dict:
    """Write the dataset at ``src`` to ``dst`` with its documents in ``order``; ``write_indexed``'s stats.

    ``sources``: the documents' sources in ``src`` order; ``meta``: the caller's meta for ``dst``
    (as for ``write_indexed``). ``latent_codec`` (the ``PlaceholderCodec`` of a Transfusion
    dataset): ``src``'s latents are written to ``dst`` with their documents; the stats then also
    hold ``"latents"``.
    """
    order = np.asarray(order, dtype=np.int64)
    docs = documents_in_order(src, order, sources)
    if latent_codec is None:
        return write_indexed(dst, docs, meta)
    _, images = _document_bounds(src)
    starts = np.concatenate([[0], np.cumsum(images)])
    latents = np.load(latents_path(src), mmap_mode="r", allow_pickle=False)
    writer = LatentWriter(dst, latent_codec)

    def with_latents():
        for d, doc in zip(order.tolist(), docs):
            writer.add(np.asarray(latents[starts[d] : starts[d + 1]]), doc.source)
            yield doc

    stats = write_indexed(dst, with_latents(), meta, sidecar=writer)
    stats["latents"] = {"count": writer.count, "shape": list(writer.shape)}
    return stats


def remove_dataset(prefix: str) -> None:
    """Remove the files of the dataset at ``prefix`` that exist (a temporary copy)."""
    for path in (*dataset_paths(prefix).values(), latents_path(prefix)):
        if os.path.exists(path):
            os.remove(path)


__all__ = ["documents_in_order", "write_reordered", "remove_dataset"]
