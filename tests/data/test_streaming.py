"""Streamed indexed data equals the in-memory path, its index is cached, blends meet their shares,
and memory does not grow with the dataset."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest

from megafusion.core.errors import DataError
from megafusion.core.modality import Modality
from megafusion.data import loader
from megafusion.data.blend import PERIOD, BlendedSource
from megafusion.data.formats.indexed import read_indexed, write_indexed
from megafusion.data.formats.indexed_latents import LatentWriter, attach_latents, read_latents
from megafusion.data.formats.indexed_reader import IndexedDocuments
from megafusion.data.loader import MicrobatchSource, split_documents
from megafusion.data.packing import pack_documents
from megafusion.data.sample_index import build_sample_index, cache_permutations
from megafusion.data.streaming import StreamedRows
from megafusion.data.types import TokenizedDocument
from tests.data.test_indexed import random_docs, write
from tests.helpers import ROOT

PAD, SEQ, SEED, VAL = 0, 72, 7, 0.2


def in_memory(docs, seq=SEQ, val=VAL, seed=SEED):
    train, held = split_documents(docs, val, seed)
    return (
        MicrobatchSource(pack_documents(train, seq, PAD), seed, "mem train"),
        MicrobatchSource(pack_documents(held, seq, PAD), seed + 1, "mem val"),
    )


def streamed(prefix, root, seq=SEQ, val=VAL, seed=SEED):
    documents = IndexedDocuments(prefix)
    splits = build_sample_index(documents, str(root), seed, val, seq, True, lambda: None)
    return tuple(
        MicrobatchSource(StreamedRows(documents, splits[s], seq, PAD), seed + k, f"disk {s}", splits[s].permutation)
        for k, s in enumerate(("train", "val"))
    ), splits


def assert_same_batches(a: MicrobatchSource, b: MicrobatchSource, samples: int, size: int = 3) -> None:
    assert a.num_rows == b.num_rows and a.tokens_per_modality() == b.tokens_per_modality()
    assert a.rows.padding_tokens() == b.rows.padding_tokens()
    for first in range(0, samples, size):
        x, y = a.microbatch(first, size), b.microbatch(first, size)
        assert x.keys() == y.keys()
        for key in x:
            assert x[key].dtype == y[key].dtype and x[key].equal(y[key]), (first, key)


def test_streamed_rows_equal_the_in_memory_path_over_epochs(tmp_path):
    docs = random_docs(np.random.default_rng(0), 120, 1000)
    prefix, _ = write(tmp_path, docs)
    (train, val), splits = streamed(prefix, tmp_path / "cache")
    ref_train, ref_val = in_memory(docs)
    # Three epochs of each split: the split, the packing and every epoch's order agree.
    assert_same_batches(ref_train, train, 3 * train.num_rows)
    assert_same_batches(ref_val, val, 3 * val.num_rows)
    assert isinstance(splits["train"].docs, np.memmap)  # the index is read from disk, not rebuilt


def _latent_docs(rng, n):
    """Documents of text, then an image run (its latents beside), then text: like <boi> .. <eoi>."""
    docs, latents = [], []
    for i in range(n):
        images = int(rng.integers(0, 3))
        parts = [np.zeros(int(rng.integers(1, 4)), np.uint8)]
        for _ in range(images):
            parts += [np.ones(int(rng.integers(1, 5)), np.uint8), np.zeros(1, np.uint8)]
        mods = np.concatenate(parts)
        docs.append(TokenizedDocument(rng.integers(1, 300, mods.size).astype(np.int64), mods, f"s.jsonl:{i}"))
        latents.append(rng.standard_normal((images, 2, 2, 2)).astype(np.float32))
    return docs, latents


def test_streamed_latents_follow_their_documents(tmp_path):
    docs, latents = _latent_docs(np.random.default_rng(1), 60)
    prefix = str(tmp_path / "tf")
    codec = SimpleNamespace(
        latent_codec=SimpleNamespace(latent_shape=(2, 2, 2), config=lambda: {"name": "pixels"}), patch_size=1
    )
    writer = LatentWriter(prefix, codec)

    def stream():
        for doc, lat in zip(docs, latents):
            writer.add(lat, doc.source)
            yield doc

    write_indexed(prefix, stream(), {"vocab_size": 300}, sidecar=writer)
    written, meta = read_indexed(prefix)
    attach_latents(written, read_latents(prefix, meta), prefix)
    ref_train, _ = in_memory(written, seq=24)
    (train, _), _ = streamed(prefix, tmp_path / "cache", seq=24)
    assert_same_batches(ref_train, train, 2 * train.num_rows)
    assert train.microbatch(0, 4)["latents"].shape[1:] == (2, 2, 2)


def test_index_is_built_once_per_setting_and_reused(tmp_path, monkeypatch):
    docs = random_docs(np.random.default_rng(2), 50, 1000)
    prefix, _ = write(tmp_path, docs)
    root = tmp_path / "cache"
    streamed(prefix, root)
    # A second run reuses the verified index: no checksum pass, no scores, no packing.
    monkeypatch.setattr(IndexedDocuments, "verify", lambda self: pytest.fail("verified twice"))
    monkeypatch.setattr(IndexedDocuments, "document", lambda self, d: pytest.fail("read a document"))
    (_, _), splits = streamed(prefix, root)
    folders = sorted(p.name for p in next(root.iterdir()).iterdir())
    assert [f for f in folders if f.startswith("plan-")] == [os.path.basename(splits["train"].folder)]
    monkeypatch.undo()
    streamed(prefix, root, seq=SEQ + 8)  # another length: another plan beside it, same scores
    assert len([p for p in next(root.iterdir()).iterdir() if p.name.startswith("plan-")]) == 2
    assert len([p for p in next(root.iterdir()).iterdir() if p.name.startswith("scores-")]) == 1


def test_cached_epoch_orders_are_the_drawn_ones(tmp_path, monkeypatch):
    docs = random_docs(np.random.default_rng(3), 80, 1000)
    prefix, _ = write(tmp_path, docs)
    (train, _), splits = streamed(prefix, tmp_path / "cache")
    cache_permutations(splits["train"], SEED, 2)
    stored = splits["train"].permutation(SEED, 1)
    assert isinstance(stored, np.memmap) and splits["train"].permutation(SEED, 2) is None
    reference = in_memory(docs)[0]
    drawn = []
    real = loader.epoch_permutation
    monkeypatch.setattr(loader, "epoch_permutation", lambda n, s, e: drawn.append(e) or real(n, s, e))
    assert_same_batches(reference, train, 3 * train.num_rows)
    # The in-memory source draws epochs 0, 1, 2; the streamed one only 2 (0 and 1 are cached).
    assert sorted(drawn) == [0, 1, 2, 2]


def test_streaming_errors_name_the_document_and_the_cache(tmp_path):
    docs = random_docs(np.random.default_rng(4), 10, 1000)
    docs[6] = TokenizedDocument(np.ones(90, np.int64), np.zeros(90, np.uint8), source="big.jsonl:7")
    prefix, _ = write(tmp_path, docs)
    with pytest.raises(DataError, match=r"big\.jsonl:7: the document is 90 tokens long.*at least 89"):
        streamed(prefix, tmp_path / "cache")
    blocked = tmp_path / "a_file"  # a cache "directory" under a file cannot be created, even by root
    blocked.write_text("")
    with pytest.raises(DataError, match="set data.index_cache to a writable directory"):
        streamed(prefix, blocked / "cache")


def _source(seed, doc_len, n=200):
    rng = np.random.default_rng(seed)
    docs = [
        TokenizedDocument(rng.integers(1, 50, k).astype(np.int64), np.full(k, i % 2, np.uint8))
        for i, k in enumerate(rng.integers(1, doc_len, n))
    ]
    return MicrobatchSource(pack_documents(docs, SEQ, PAD), seed, f"set{seed}")


def test_blend_meets_its_token_shares_and_is_a_function_of_the_sample():
    # Rows of short documents pack fuller than rows of long ones: the token shares still hold.
    sources = [_source(1, 40), _source(2, 8), _source(3, 20)]
    weights = [0.5, 0.3, 0.2]
    blend = BlendedSource(sources, weights, ["a", "b", "c"], "blend")
    totals = np.zeros(3)
    for first in range(0, 3 * PERIOD, 500):
        totals += blend.microbatch(first, 500)["dataset_tokens"].numpy()
    shares = totals / totals.sum()
    assert np.abs(shares - weights).max() < 0.01, shares
    # Sample i is the same whichever microbatch asks for it (what resuming relies on).
    whole = blend.microbatch(12_345, 12)
    for first in (12_345, 12_349):
        part = blend.microbatch(first, 4)
        assert part["tokens"].equal(whole["tokens"][first - 12_345 : first - 12_345 + 4])
    # A blend of one dataset is that dataset.
    alone = BlendedSource([sources[0]], [1.0], ["a"], "one")
    assert alone.microbatch(77, 5)["tokens"].equal(sources[0].microbatch(77, 5)["tokens"])
    with pytest.raises(DataError, match="would get no sample"):
        BlendedSource(sources[:2], [1.0, 1e-6], ["a", "b"], "starved")


MEMORY_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np
    from megafusion.data.formats.indexed import read_indexed, write_indexed
    from megafusion.data.formats.indexed_reader import IndexedDocuments
    from megafusion.data.loader import MicrobatchSource
    from megafusion.data.sample_index import build_sample_index
    from megafusion.data.streaming import StreamedRows
    from megafusion.data.types import TokenizedDocument

    def anon():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024

    prefix, doc_len, docs = sys.argv[1], 2000, 16_000   # 32M uint16 tokens: a 64 MB .bin
    rng = np.random.default_rng(0)
    block = rng.integers(0, 30_000, doc_len * 64).astype(np.int64)
    make = lambda i: TokenizedDocument(np.roll(block, i)[:doc_len], np.zeros(doc_len, np.uint8), f"d{i}")
    write_indexed(prefix, (make(i) for i in range(docs)), {"vocab_size": 30_000})
    documents = IndexedDocuments(prefix)
    split = build_sample_index(documents, prefix + ".index", 1, 0.0, 4096, True, lambda: None)["train"]
    source = MicrobatchSource(StreamedRows(documents, split, 4096, 0), 1, "big")
    source.microbatch(0, 4)
    before = anon()
    for first in range(0, source.num_rows, 4):   # every row of the dataset, once
        source.microbatch(first, 4)
    streamed = anon() - before
    read_indexed(prefix)                          # the old way holds it all: the measure can see that
    print(streamed, anon() - before)
    """
)


def test_streaming_memory_does_not_grow_with_the_dataset(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path / "big")],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    streamed, loaded = map(int, out.stdout.split()[-2:])
    print(f"anonymous memory: +{streamed / 1e6:.1f} MB streaming every row, +{loaded / 1e6:.1f} MB loading")
    data = 64_000_000
    assert streamed < data / 8, f"reading every row grew anonymous memory by {streamed / 1e6:.1f} MB"
    assert loaded > data, f"loading the dataset grew it by {loaded / 1e6:.1f} MB only"


def test_modalities_round_trip_through_the_reader(tmp_path):
    docs = random_docs(np.random.default_rng(5), 30, 70_000)  # int32 tokens
    prefix, _ = write(tmp_path, docs, vocab_size=70_000)
    documents = IndexedDocuments(prefix)
    assert documents.num_documents == 30
    assert documents.document_lengths().tolist() == [d.tokens.size for d in docs]
    for d, doc in enumerate(docs):
        tokens, modalities = documents.document(d)
        assert np.array_equal(tokens, doc.tokens) and np.array_equal(modalities, doc.modalities)
        assert set(modalities.tolist()) <= {int(m) for m in Modality}
