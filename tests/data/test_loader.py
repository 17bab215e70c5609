"""Loader: microbatch contents against brute-force references, the epoch order, resumption, split."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megafusion.core.errors import DataError
from megafusion.core.modality import NUM_MODALITIES, Modality
from megafusion.data.loader import MicrobatchSource, split_documents
from megafusion.data.packing import pack_documents
from megafusion.data.types import TokenizedDocument

PAD = 0
KEYS = (
    "tokens",
    "labels",
    "position_ids",
    "document_ids",
    "modality_ids",
    "label_modality_ids",
    "loss_mask",
    "modality_counts",
)


def random_docs(rng, n, max_len, vocab=40):
    docs = []
    for i in range(n):
        k = int(rng.integers(1, max_len + 1))
        docs.append(
            TokenizedDocument(
                tokens=rng.integers(1, vocab, size=k),
                modalities=rng.integers(0, len(Modality), size=k).astype(np.uint8),
                source=f"d.jsonl:{i + 1}",
            )
        )
    return docs


@pytest.fixture
def source():
    docs = random_docs(np.random.default_rng(0), 40, 10)
    return MicrobatchSource(pack_documents(docs, seq_length=12, pad_id=PAD), seed=5), docs


def reference_sample(docs, seq_length, row):
    """Rebuild one packed row's microbatch by walking the documents by hand (next-fit)."""
    width = seq_length + 1
    rows, cur = [], []
    for d in docs:
        if sum(len(x[0]) for x in cur) + len(d.tokens) > width:
            rows.append(cur)
            cur = []
        cur.append((list(d.tokens), list(d.modalities)))
    rows.append(cur)
    toks, mods, dids, pos = [], [], [], []
    for k, (t, m) in enumerate(rows[row]):
        toks += t
        mods += m
        dids += [k] * len(t)
        pos += list(range(len(t)))
    pad = width - len(toks)
    toks += [PAD] * pad
    mods += [0] * pad
    dids += [None] * pad  # padding: no document
    pos += [0] * pad
    ref = {
        "tokens": toks[:-1],
        "labels": toks[1:],
        "position_ids": pos[:-1],
        "modality_ids": mods[:-1],
        "label_modality_ids": mods[1:],
    }
    ref["loss_mask"] = [1.0 if dids[j] is not None and dids[j] == dids[j + 1] else 0.0 for j in range(seq_length)]
    ref["real_doc"] = dids[:-1]
    return ref


def test_microbatch_matches_brute_force(source):
    src, docs = source
    mb = src.microbatch(0, src.num_rows)
    for k in KEYS:
        assert isinstance(mb[k], torch.Tensor)
        want = torch.float32 if k == "loss_mask" else torch.int64
        assert mb[k].dtype == want, k
    assert mb["tokens"].shape == (src.num_rows, 12)
    rows = src.row_indices(0, src.num_rows)
    for b, row in enumerate(rows.tolist()):
        ref = reference_sample(docs, 12, row)
        for k in ("tokens", "labels", "position_ids", "modality_ids", "label_modality_ids", "loss_mask"):
            assert mb[k][b].tolist() == ref[k], (k, row)
        # document ids: same partition of the row as the reference (real documents numbered 0,1,..)
        got = mb["document_ids"][b].tolist()
        for j, d in enumerate(ref["real_doc"]):
            assert (got[j] == d) if d is not None else (got[j] not in ref["real_doc"])
    # labels are the next tokens of the row
    assert torch.equal(mb["labels"][:, :-1], mb["tokens"][:, 1:])
    counts = [sum(int(v == m) for v in mb["modality_ids"].flatten().tolist()) for m in range(NUM_MODALITIES)]
    assert mb["modality_counts"].tolist() == counts and mb["modality_counts"].shape == (NUM_MODALITIES,)
    # every document token except the last of each document is a prediction target exactly once
    assert int(mb["loss_mask"].sum()) == sum(len(d.tokens) - 1 for d in docs)


def test_each_epoch_visits_every_row_once(source):
    src, _ = source
    n = src.num_rows
    order = src.row_indices(0, 3 * n)
    for e in range(3):
        assert sorted(order[e * n : (e + 1) * n].tolist()) == list(range(n))
    assert not np.array_equal(order[:n], order[n : 2 * n])  # reshuffled per epoch


def test_order_depends_only_on_seed(source):
    src, _ = source
    same = MicrobatchSource(src.rows, seed=5)
    other = MicrobatchSource(src.rows, seed=6)
    n = src.num_rows
    np.testing.assert_array_equal(src.row_indices(0, 2 * n), same.row_indices(0, 2 * n))
    assert not np.array_equal(src.row_indices(0, n), other.row_indices(0, n))


@pytest.mark.parametrize("first,size", [(0, 5), (7, 9), (13, 40)])  # spans epoch boundaries too
def test_microbatch_is_concatenation_of_single_samples(source, first, size):
    src, _ = source
    fresh = MicrobatchSource(src.rows, seed=5)  # a resumed run: a new object, same seed
    whole = fresh.microbatch(first, size)
    singles = [src.microbatch(first + j, 1) for j in range(size)]
    for k in KEYS:
        if k == "modality_counts":
            assert torch.equal(whole[k], sum(s[k] for s in singles))
        else:
            assert torch.equal(whole[k], torch.cat([s[k] for s in singles]))


def test_tokens_per_modality(source):
    src, docs = source
    mods = np.concatenate([d.modalities for d in docs])
    assert src.tokens_per_modality() == {m.name.lower(): int((mods == m).sum()) for m in Modality}
    assert "rows" in src.describe()


def test_empty_rows_error():
    with pytest.raises(DataError, match="no packed rows"):
        MicrobatchSource(pack_documents([], 8, PAD), seed=0, name="validation")


def test_split_documents():
    docs = random_docs(np.random.default_rng(1), 200, 8)
    train, val = split_documents(docs, 0.1, seed=3)
    assert len(val) == 20 and len(train) == 180
    # a partition that keeps the input order
    ids = [id(d) for d in docs]
    assert sorted(map(id, train + val)) == sorted(ids)
    assert [id(d) for d in train] == [i for i in ids if i in set(map(id, train))]
    # deterministic, and independent of the order the documents arrive in
    assert [id(d) for d in split_documents(docs, 0.1, seed=3)[1]] == [id(d) for d in val]
    rev_val = split_documents(docs[::-1], 0.1, seed=3)[1]
    assert set(map(id, rev_val)) == set(map(id, val))
    # the seed matters
    assert set(map(id, split_documents(docs, 0.1, seed=4)[1])) != set(map(id, val))


def test_split_edge_cases():
    docs = random_docs(np.random.default_rng(2), 3, 5)
    train, val = split_documents(docs, 0.01, seed=0)
    assert len(val) == 1 and len(train) == 2  # at least one validation document
    train, val = split_documents(docs[:2], 0.99, seed=0)
    assert len(val) == 1 and len(train) == 1  # and at least one training document
    assert split_documents(docs, 0.0, seed=0) == (docs, [])
    assert split_documents(docs[:1], 0.9, seed=0) == (docs[:1], [])
    assert split_documents([], 0.5, seed=0) == ([], [])
    with pytest.raises(ValueError, match="val_fraction"):
        split_documents(docs, 1.0, seed=0)
