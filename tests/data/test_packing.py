"""Packing: whole documents, in order, next-fit, nothing lost, ids/positions as recomputed by hand."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from megafusion.core.errors import DataError
from megafusion.core.modality import Modality
from megafusion.data.packing import PAD_DOCUMENT_ID, pack_documents
from megafusion.data.types import TokenizedDocument

PAD = 0


def random_docs(rng, n, max_len, vocab=50):
    docs = []
    for i in range(n):
        k = int(rng.integers(1, max_len + 1))
        toks = rng.integers(1, vocab, size=k)  # 0 is the pad id: never inside a document here
        mods = rng.integers(0, len(Modality), size=k).astype(np.uint8)
        docs.append(TokenizedDocument(tokens=toks, modalities=mods, source=f"d.jsonl:{i + 1}"))
    return docs


def reference_rows(docs, width):
    """Brute force next-fit: lists of (document index) per row."""
    rows, cur, used = [], [], 0
    for i, d in enumerate(docs):
        n = len(d.tokens)
        if used + n > width:
            rows.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        rows.append(cur)
    return rows


@pytest.mark.parametrize("seed,seq_length,max_len", [(0, 16, 17), (1, 7, 3), (2, 31, 32), (3, 8, 1)])
def test_packing_matches_reference(seed, seq_length, max_len):
    rng = np.random.default_rng(seed)
    docs = random_docs(rng, 60, max_len)
    width = seq_length + 1
    packed = pack_documents(docs, seq_length, PAD)
    ref = reference_rows(docs, width)

    for name in ("tokens", "modalities", "document_ids", "positions"):
        assert getattr(packed, name).shape == (len(ref), width)
    assert packed.tokens.dtype == np.int64 and packed.modalities.dtype == np.uint8
    assert packed.document_ids.dtype == np.int64 and packed.positions.dtype == np.int64

    for r, members in enumerate(ref):
        col = 0
        for doc_id, i in enumerate(members):
            n = len(docs[i].tokens)
            np.testing.assert_array_equal(packed.tokens[r, col : col + n], docs[i].tokens)  # whole, in order
            np.testing.assert_array_equal(packed.modalities[r, col : col + n], docs[i].modalities)
            assert (packed.document_ids[r, col : col + n] == doc_id).all()
            np.testing.assert_array_equal(packed.positions[r, col : col + n], np.arange(n))
            col += n
        # the rest is padding
        assert (packed.tokens[r, col:] == PAD).all()
        assert (packed.modalities[r, col:] == Modality.TEXT).all()
        assert (packed.document_ids[r, col:] == PAD_DOCUMENT_ID).all()
        assert (packed.positions[r, col:] == 0).all()
        # next-fit: the next row's first document would not have fitted here
        if r + 1 < len(ref):
            assert col + len(docs[ref[r + 1][0]].tokens) > width

    # no token lost or invented
    real = packed.document_ids != PAD_DOCUMENT_ID
    assert Counter(packed.tokens[real].tolist()) == Counter(np.concatenate([d.tokens for d in docs]).tolist())
    assert int(real.sum()) == sum(len(d.tokens) for d in docs)
    counts = packed.tokens_per_modality()
    all_mods = np.concatenate([d.modalities for d in docs])
    assert counts == {m.name.lower(): int((all_mods == m).sum()) for m in Modality}
    assert packed.padding_tokens() == packed.tokens.size - int(real.sum())


def test_document_exactly_one_row_long():
    doc = TokenizedDocument(np.arange(1, 10), np.zeros(9, np.uint8), source="x")
    packed = pack_documents([doc, doc], seq_length=8, pad_id=PAD)
    assert packed.num_rows == 2 and (packed.document_ids == 0).all()


def test_overlong_document_names_source_and_fix():
    docs = [
        TokenizedDocument(np.arange(5), np.zeros(5, np.uint8), source="ok.jsonl:1"),
        TokenizedDocument(np.arange(1, 14), np.zeros(13, np.uint8), source="big.jsonl:7"),
    ]
    with pytest.raises(DataError, match=r"big\.jsonl:7.*13 tokens.*raise model\.seq_length to at least 12"):
        pack_documents(docs, seq_length=8, pad_id=PAD)
    pack_documents(docs, seq_length=12, pad_id=PAD)  # the suggested fix works


def test_empty_document_and_empty_input():
    with pytest.raises(DataError, match=r"e\.jsonl:2.*no tokens"):
        pack_documents([TokenizedDocument(np.zeros(0, np.int64), np.zeros(0, np.uint8), source="e.jsonl:2")], 8, PAD)
    packed = pack_documents([], 8, PAD)
    assert packed.num_rows == 0 and packed.tokens.shape == (0, 9)
