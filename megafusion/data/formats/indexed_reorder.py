"""Rewrite an indexed dataset with its documents in another order, one document at a time.

``megafusion data prepare --order icp`` first writes the dataset in input order (to a temporary
prefix), computes the new order (:mod:`megafusion.data.icp`), then writes the final dataset with
``write_reordered``: each document is read back through megatron-core's memory-mapped
``IndexedDataset`` (:mod:`megafusion.data.formats.indexed_reader`) and handed to ``write_indexed``
in the new order; a Transfusion dataset's latents (``PREFIX.latents.npy``, memory-mapped) follow
their documents into a new ``LatentWriter``. Nothing but ``O(documents)``
index arrays is held in memory; the disk holds both copies until the temporary one is removed.
"""

from __future__ import annotations

import os

import numpy as np

from megafusion.data.formats.indexed import dataset_paths, write_indexed
from megafusion.data.formats.indexed_latents import LatentWriter, latents_path
from megafusion.data.formats.indexed_reader import IndexedDocuments
from megafusion.data.types import TokenizedDocument


def write_reordered(src: str, dst: str, order: np.ndarray, meta: dict, latent_codec=None) -> dict:
    """Write the dataset at ``src`` to ``dst`` with its documents in ``order``; ``write_indexed``'s stats.

    ``meta``: the caller's meta for ``dst`` (as for ``write_indexed``). ``latent_codec`` (the
    ``PlaceholderCodec`` of a Transfusion dataset): ``src``'s latents are written to ``dst`` with
    their documents; the stats then also hold ``"latents"``.
    """
    documents = IndexedDocuments(src)
    order = np.asarray(order, dtype=np.int64).tolist()

    def in_order():
        for d in order:
            tokens, modalities = documents.document(d)
            yield d, TokenizedDocument(tokens=tokens, modalities=modalities, source=documents.source(d))

    if latent_codec is None:
        return write_indexed(dst, (doc for _, doc in in_order()), meta)
    writer = LatentWriter(dst, latent_codec)

    def with_latents():
        for d, doc in in_order():
            writer.add(documents.latents(d), doc.source)
            yield doc

    stats = write_indexed(dst, with_latents(), meta, sidecar=writer)
    stats["latents"] = {"count": writer.count, "shape": list(writer.shape)}
    return stats


def remove_dataset(prefix: str) -> None:
    """Remove the files of the dataset at ``prefix`` that exist (a temporary copy)."""
    for path in (*dataset_paths(prefix).values(), latents_path(prefix)):
        if os.path.exists(path):
            os.remove(path)


__all__ = ["write_reordered", "remove_dataset"]
