"""The order documents are packed in, one split at a time: ``data.order`` of the built-in sets,
and the held-out split of a dataset prepared in In-Context Pretraining order.

Packing (:mod:`megafusion.data.packing`) fills rows next-fit in the order it is given, so the order
decides which documents share a row: with ``data.attention=causal`` (attention across the documents
of a row), what a token sees. The orders (``data.order``):

- ``input``: as the sets generate them, one set after the other (what every run did before);
- ``random``: a seeded shuffle (``train.seed``): rows of unrelated documents, the baseline of
  In-Context Pretraining (Shi et al., arXiv 2310.10638);
- ``icp``: the paper's order (:mod:`megafusion.data.icp`: TF-IDF of text pieces, ``data.icp_neighbors``
  nearest neighbours, the greedy walk), so related documents share a row.

**Windows.** The held-out split is drawn first (by content, or by group:
:func:`megafusion.data.loader.held_documents`), and each split is then ordered *on its own*: the
ICP walk of the training documents has no holes where held-out documents were, the held-out rows
are windows of related held-out documents too (ordered with the training documents, a held-out
document's neighbours would be training documents, and the held-out rows would hold documents
from all over the walk), and every order holds out the same documents, so runs of different
orders are evaluated on the same documents. Adjacent rows are unrelated in training: the loader
draws rows in a fresh random permutation every epoch
(:class:`megafusion.data.loader.MicrobatchSource`), which is the paper's shuffling of windows.

An ICP order is cached in ``data.cache_dir`` (``icp-order-<hash>.npz``, keyed by the split's
tokens, the neighbours and the ids left out of the bags), computed by the first rank, like the
built-in tokenizer.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable, Sequence

import numpy as np

from megafusion.data.icp import EMBEDDING_NAME, BagOfPieces, IcpOrder, icp_order
from megafusion.data.types import TokenizedDocument

CACHE_VERSION = 1  # bump when what a cached order means changes
SPLITS = ("train", "val")
_RANDOM_SALT = 0x5EED0  # data.order=random: a stream of its own


def special_ids(tok) -> tuple[int, ...]:
    """The ids every document has (pad / bos / eos / ``<boi>`` / ``<eoi>``): left out of the bags."""
    return (tok.pad_id, tok.bos_id, tok.eos_id, tok.boi_id, tok.eoi_id)


def icp_of(docs: Sequence[TokenizedDocument], exclude: Sequence[int], vocab_size: int, neighbors: int) -> IcpOrder:
    """The ICP order of ``docs`` (bags of text pieces without the ids ``exclude``)."""
    bag = BagOfPieces(exclude=exclude)
    for doc in docs:
        bag.add(doc)
    return icp_order(bag.matrix(vocab_size), neighbors)


def _cache_path(docs, exclude, vocab_size: int, neighbors: int, cache_dir: str) -> str:
    digest = hashlib.sha256(
        f"v{CACHE_VERSION}:{EMBEDDING_NAME}:{neighbors}:{sorted(set(exclude))}:{vocab_size}:{len(docs)}\0".encode()
    )
    for doc in docs:
        tokens = np.ascontiguousarray(doc.tokens, dtype=np.int64)
        digest.update(f"{tokens.size}:".encode())  # length prefix: [1, 2], [3] != [1], [2, 3]
        digest.update(tokens.tobytes())
        digest.update(np.ascontiguousarray(doc.modalities, dtype=np.uint8).tobytes())
    return os.path.join(cache_dir, f"icp-order-{digest.hexdigest()[:20]}.npz")


def cached_icp(
    docs: Sequence[TokenizedDocument],
    exclude: Sequence[int],
    vocab_size: int,
    neighbors: int,
    cache_dir: str,
    is_first_rank: bool = True,
    barrier: Callable[[], None] = lambda: None,
) -> IcpOrder:
    """:func:`icp_of`, computed once by the first rank into ``cache_dir`` and read from there."""
    path = _cache_path(docs, exclude, vocab_size, neighbors, cache_dir)
    if is_first_rank and not os.path.exists(path):
        result = icp_of(docs, exclude, vocab_size, neighbors)
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}.npz"
        cosine = np.array([result.input_cosine, result.icp_cosine])
        np.savez(tmp, order=result.order, paths=np.int64(result.paths), cosine=cosine)
        os.replace(tmp, path)  # concurrent writers write the same bytes: any winner is right
    barrier()  # the others read what the first rank wrote
    with np.load(path) as f:
        order, paths, (input_cos, icp_cos) = f["order"], int(f["paths"]), f["cosine"].tolist()
    return IcpOrder(order=order, paths=paths, neighbors=int(neighbors), input_cosine=input_cos, icp_cosine=icp_cos)


def split_order(
    docs: Sequence[TokenizedDocument],
    held: np.ndarray,
    order: str,
    seed: int,
    neighbors: int,
    exclude: Sequence[int],
    vocab_size: int,
    cache_dir: str,
    is_first_rank: bool = True,
    barrier: Callable[[], None] = lambda: None,
) -> tuple[np.ndarray, dict]:
    """``(perm, meta)``: the training documents (``~held``) in ``order``, then the held-out ones in
    theirs, as indices into ``docs``; ``meta`` describes the order (the data's ``"order"`` entry).

    Packing ``[docs[i] for i in perm]`` split by ``held[perm]`` packs each split in its order (the
    split keeps the order of the list it is drawn from). ``input`` gives ``arange(len(docs))``.
    """
    n = len(docs)
    if order == "input":
        return np.arange(n, dtype=np.int64), {"name": "input"}
    held = np.asarray(held, dtype=bool)
    parts, meta = [], {"name": order}
    if order == "icp":
        meta.update(neighbors=int(neighbors), embedding=EMBEDDING_NAME)
    for k, split in enumerate(SPLITS):
        idx = np.flatnonzero(held if split == "val" else ~held)
        if order == "random":
            parts.append(idx[np.random.default_rng([seed, _RANDOM_SALT, k]).permutation(idx.size)])
        elif idx.size < 2:
            parts.append(idx)
        else:
            result = cached_icp(
                [docs[i] for i in idx], exclude, vocab_size, neighbors, cache_dir, is_first_rank, barrier
            )
            parts.append(idx[result.order])
            info = result.meta()
            meta[split] = {"paths": info["paths"], "adjacent_cosine": info["adjacent_cosine"]}
    return np.concatenate(parts).astype(np.int64), meta


__all__ = ["SPLITS", "special_ids", "icp_of", "cached_icp", "split_order"]
