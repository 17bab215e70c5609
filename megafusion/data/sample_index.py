"""The sample index of an indexed dataset, built once and cached next to the data.

What a run needs to draw packed rows from a dataset without loading it: which documents are held
out for validation, which documents each packed row holds, and the order rows are drawn in. The
documents themselves are read when a microbatch is made (:mod:`megafusion.data.streaming`).
megatron-core's ``GPTDataset`` caches its document / sample / shuffle indices the same way; its
samples cut documents at fixed lengths, ours pack whole documents (a cut image would train the
model on half a picture), so the index is ours and only the reading is megatron's.

The split and the packing are exactly those of the in-memory path
(:func:`megafusion.data.loader.split_documents`, :func:`megafusion.data.packing.pack_documents`):
the held-out documents are those with the smallest ``hash(seed, content)``, the rest are packed
next-fit in dataset order. The same documents therefore give the same rows whichever path reads
them. A dataset written in In-Context Pretraining order (``data prepare --order icp``) packs its
held-out documents in the ICP order of the held-out documents among themselves (``_val_order``),
so that its held-out rows hold related documents as its training rows do.

Cache layout, under ``data.index_cache`` (default ``PREFIX.index/``), one folder per dataset
content (the checksums in its meta), written by the first rank under a temporary name and renamed
into place, then memory-mapped by every rank:

    <data id>/verified                 the full check passed (checksums, index structure, token ids)
    <data id>/scores-<seed>.npy        uint64 content score of every document
    <data id>/plan-<key>/              for one (seed, val_fraction, seq_length):
        {train,val}_docs.npy           the split's documents in order (int64)
        {train,val}_rows.npy           row r holds docs[rows[r]:rows[r + 1]]
        {train,val}_perm-<seed>-<epoch>.npy   epoch permutations of the rows (the epochs a run
                                       asked for; later ones are drawn in memory, same values)
        stats.json                     tokens per modality and padding of each split

What grows with the dataset is on disk and memory-mapped: 8 bytes per document per index, 8 per
row, 4 or 8 per row per cached epoch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from megafusion.core.errors import DataError
from megafusion.core.modality import MODALITY_NAMES, NUM_MODALITIES
from megafusion.data.formats.indexed_reader import IndexedDocuments
from megafusion.data.loader import content_score, epoch_permutation, held_out
from megafusion.data.packing import next_fit_rows

INDEX_VERSION = 1  # bump when what the cache holds changes meaning
SPLITS = ("train", "val")
CHUNK = 1 << 20  # documents per pass over the index while building (bounds what a pass holds)


def default_cache(prefix: str) -> str:
    return prefix + ".index"


def data_id(documents: IndexedDocuments) -> str:
    """The dataset's content identity: its files' checksums, as its meta records them."""
    files = documents.meta["files"]
    latents = documents.meta.get("latents", {}).get("blake2b", "")
    # The name and sizes too: a dataset whose meta has no checksums still gets an id of its own.
    name = os.path.basename(documents.prefix)
    text = (
        f"{INDEX_VERSION}:{name}:{files.get('bin_bytes')}:{documents.num_documents}:"
        f"{files.get('bin_blake2b')}:{files.get('idx_blake2b')}:{latents}"
    )
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


@dataclass
class SplitIndex:
    """One split: its documents in order, where each packed row starts, and its token counts."""

    docs: np.ndarray
    rows: np.ndarray
    tokens: dict  # modality name -> document tokens
    padding: int
    folder: str
    name: str

    @property
    def num_rows(self) -> int:
        return int(self.rows.shape[0] - 1)

    def permutation(self, seed: int, epoch: int) -> np.ndarray | None:
        """The cached permutation of epoch ``epoch`` for ``seed`` (memory-mapped), or None."""
        path = os.path.join(self.folder, f"{self.name}_perm-{seed}-{epoch}.npy")
        return _load(path) if os.path.exists(path) else None


def _load(path: str) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except ValueError:  # numpy cannot memory-map an empty array
        return np.load(path)


def _save(folder: str, name: str, array: np.ndarray) -> None:
    np.save(os.path.join(folder, name), array, allow_pickle=False)


def _publish(tmp: str, final: str) -> None:
    """Rename a finished temporary folder into place; another builder that got there first wins."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not os.path.isdir(final):
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _writable_root(root: str, prefix: str) -> None:
    try:
        os.makedirs(root, exist_ok=True)
        probe = os.path.join(root, f".probe-{os.getpid()}-{uuid.uuid4().hex[:6]}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as err:
        raise DataError(
            f"cannot write the sample index of {prefix} to {root} ({err.strerror or err}): set data.index_cache "
            "to a writable directory (the index is built once and read by every rank)"
        ) from None


def _verified(documents: IndexedDocuments, folder: str) -> None:
    marker = os.path.join(folder, "verified")
    if not os.path.exists(marker):
        documents.verify()
        os.makedirs(folder, exist_ok=True)
        with open(marker, "w") as f:
            f.write("checksums, index structure and token ids checked\n")


def _scores(documents: IndexedDocuments, folder: str, seed: int) -> np.ndarray:
    path = os.path.join(folder, f"scores-{seed}.npy")
    if not os.path.exists(path):
        tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}.npy"
        # Written straight into the file: the scores of a large dataset need not fit in memory.
        scores = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint64, shape=(documents.num_documents,))
        for d in range(documents.num_documents):
            scores[d] = content_score(*documents.document(d), seed)
        scores.flush()
        del scores
        os.replace(tmp, path)
    return _load(path)


def _split_tokens(documents: IndexedDocuments, held: np.ndarray) -> dict[str, np.ndarray]:
    """Tokens per modality of the train and the held-out documents, from the index alone, in
    chunks of documents (nothing per item is held for the whole dataset)."""
    items, modes, lengths = documents.document_items, documents.item_modes, documents.item_lengths
    totals = {"train": np.zeros(NUM_MODALITIES, np.int64), "val": np.zeros(NUM_MODALITIES, np.int64)}
    for a in range(0, documents.num_documents, CHUNK):
        b = min(a + CHUNK, documents.num_documents)
        lo, hi = int(items[a]), int(items[b])
        owner = np.repeat(np.arange(b - a), np.diff(np.asarray(items[a : b + 1], dtype=np.int64)))
        in_val = held[a:b][owner]
        mode = np.asarray(modes[lo:hi], dtype=np.int64)
        length = np.asarray(lengths[lo:hi], dtype=np.int64)
        for split, mine in (("train", ~in_val), ("val", in_val)):
            totals[split] += np.bincount(mode[mine], weights=length[mine], minlength=NUM_MODALITIES).astype(np.int64)
    return totals


def _build_plan(documents: IndexedDocuments, folder: str, scores, val_fraction: float, seq_length: int) -> None:
    width = seq_length + 1
    held = held_out(np.asarray(scores), val_fraction)
    lengths = documents.document_lengths()
    split_tokens = _split_tokens(documents, held)
    tmp = f"{folder}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    os.makedirs(tmp)
    stats = {}
    for split, docs in (("train", np.flatnonzero(~held)), ("val", _val_order(documents, np.flatnonzero(held)))):
        rows = next_fit_rows(lengths[docs], width, lambda i, docs=docs: documents.source(int(docs[i])))
        _save(tmp, f"{split}_docs.npy", docs.astype(np.int64))
        _save(tmp, f"{split}_rows.npy", rows)
        tokens = split_tokens[split]
        stats[split] = {
            "tokens": {n: int(c) for n, c in zip(MODALITY_NAMES, tokens)},
            "padding": int((rows.size - 1) * width - tokens.sum()),
        }
    with open(os.path.join(tmp, "stats.json"), "w") as f:
        json.dump(stats, f, indent=1)
    _publish(tmp, folder)


def _val_order(documents: IndexedDocuments, docs: np.ndarray) -> np.ndarray:
    """The held-out documents in the order their rows take: the dataset's, or, for a dataset
    written in In-Context Pretraining order, the ICP order of the held-out documents among
    themselves (held out by content, they come from all over the walk; their neighbours in the
    dataset are training documents), so that held-out rows are windows of related documents as
    the training rows are (:mod:`megafusion.data.order`)."""
    order = documents.meta.get("order") or {}
    if order.get("name") != "icp" or docs.size < 2:
        return docs
    from megafusion.data.order import icp_of
    from megafusion.data.types import TokenizedDocument

    meta = documents.meta
    exclude = [meta[k] for k in ("pad_id", "bos_id", "eos_id", "boi_id", "eoi_id")]
    held = [TokenizedDocument(*documents.document(int(d))) for d in docs]
    return docs[icp_of(held, exclude, meta["vocab_size"], int(order["neighbors"])).order]


def cache_permutations(split: SplitIndex, seed: int, epochs: int) -> None:
    """Write the first ``epochs`` epoch permutations of ``split`` for ``seed`` (first rank only)."""
    dtype = np.uint32 if split.num_rows < 2**32 else np.int64
    for epoch in range(epochs):
        path = os.path.join(split.folder, f"{split.name}_perm-{seed}-{epoch}.npy")
        if split.num_rows and not os.path.exists(path):
            tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}.npy"
            np.save(tmp, epoch_permutation(split.num_rows, seed, epoch).astype(dtype), allow_pickle=False)
            os.replace(tmp, path)


def plan_folder(documents: IndexedDocuments, root: str, seed: int, val_fraction: float, seq_length: int) -> str:
    plan = f"{seed}:{val_fraction!r}:{seq_length}"
    if (documents.meta.get("order") or {}).get("name") == "icp":
        plan += ":icp-val"  # its held-out rows are ICP windows (_val_order); earlier plans were not
    key = hashlib.blake2b(plan.encode(), digest_size=6).hexdigest()
    return os.path.join(root, data_id(documents), f"plan-{key}")


def build_sample_index(
    documents: IndexedDocuments,
    root: str,
    seed: int,
    val_fraction: float,
    seq_length: int,
    is_first_rank: bool,
    barrier: Callable[[], None],
) -> dict[str, SplitIndex]:
    """The cached index of ``documents`` (built by the first rank if missing), per split."""
    folder = plan_folder(documents, root, seed, val_fraction, seq_length)
    if is_first_rank:
        _writable_root(root, documents.prefix)
        data_folder = os.path.dirname(folder)
        _verified(documents, data_folder)
        if not os.path.isdir(folder):
            _build_plan(documents, folder, _scores(documents, data_folder, seed), val_fraction, seq_length)
    barrier()  # the others read what the first rank built
    with open(os.path.join(folder, "stats.json")) as f:
        stats = json.load(f)
    splits = {}
    for split in SPLITS:
        docs, rows = (_load(os.path.join(folder, f"{split}_{name}.npy")) for name in ("docs", "rows"))
        splits[split] = SplitIndex(docs, rows, stats[split]["tokens"], stats[split]["padding"], folder, split)
    return splits


__all__ = ["build_sample_index", "SplitIndex", "default_cache", "INDEX_VERSION"]
