"""In-Context Pretraining order: `megafusion data prepare --order icp` puts related documents side by side.

The parts against independent references: the neighbours against scikit-learn's brute-force
``NearestNeighbors`` (cosine), the traversal against a literal transcription of the paper's
Algorithm 1 (sets, recomputed degrees). End to end, through ``megafusion data prepare`` (the
command line's dispatcher, in process), on built-in
data whose groups are known (sklearn digits: the label; shapes: the shape named in the caption):
the written order is a permutation of the input documents, adjacent documents share a group far
more often than in a seeded random order, two prepares write the same bytes, a Transfusion
dataset's latents stay with their documents, and ``--order input`` (the default) is unchanged.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp

from megafusion.commands.main import main as megafusion_main
from megafusion.data.builtin.digits import digit_images, digits_documents
from megafusion.data.builtin.shapes import shapes_documents, shapes_specs
from megafusion.data.formats.indexed import dataset_paths, read_indexed
from megafusion.data.formats.indexed_latents import attach_latents, read_latents
from megafusion.data.formats.shards import write_jsonl_shard
from megafusion.data.icp import adjacent_same_group, document_graph, nearest_neighbors, tfidf_embedding, traverse
from megafusion.data.tokenizers.joint import train_sentencepiece
from megafusion.data.types import Document, ImageSegment, TextSegment

DIGITS, SHAPES, SEED = 600, 300, 3


def _line_index(source: str) -> int:
    """Input index of a document from its shard source ``path:LINE`` (lines count from 1)."""
    return int(source.rsplit(":", 1)[1]) - 1


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Shards of built-in digits and shapes, a SentencePiece model for each, and their groups."""
    root = tmp_path_factory.mktemp("icp")
    out = {"root": root}
    sets = {
        "digits": (digits_documents(8)[:DIGITS], digit_images(8)[1][:DIGITS].tolist(), 8, 48),
        "shapes": (shapes_documents(SHAPES, SEED, 12), [s.shape for s in shapes_specs(SHAPES, SEED)], 12, 96),
    }
    for name, (docs, groups, size, vocab) in sets.items():
        shard = write_jsonl_shard(docs, str(root / name / f"{name}.jsonl"))
        texts = [seg.text for d in docs for seg in d.segments if isinstance(seg, TextSegment)]
        model = train_sentencepiece(texts, vocab, str(root / name / "sp"))
        out[name] = {"shard": shard, "model": model, "groups": np.array(groups), "size": size}
    return out


def prepare(d, output, *flags) -> int:
    """``megafusion data prepare`` (the command line's dispatcher, in process) on the set ``d``."""
    argv = ["data", "prepare", "--input", d["shard"], "--tokenizer", d["model"], "--image-size", str(d["size"])]
    return megafusion_main([*argv, "--output", str(output), *flags])


def file_bytes(prefix, kinds=("bin", "idx", "meta")) -> dict:
    return {k: open(dataset_paths(str(prefix))[k], "rb").read() for k in kinds}


# ------------------------------------------------------------------ the parts against references


def test_neighbours_are_sklearn_brute_force_cosine_neighbours():
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(0)
    counts = sp.random(120, 40, density=0.15, random_state=1, format="csr", dtype=np.float64)
    counts.data = np.ceil(counts.data * 3)
    counts = sp.vstack([counts, counts[:10], counts[5:8]]).tocsr()  # exact duplicates: ties
    emb = tfidf_embedding(counts[rng.permutation(counts.shape[0])])
    emb = emb[np.asarray(emb.sum(axis=1)).ravel() > 0]  # sklearn's cosine is undefined for all-zero rows
    k = 7
    idx, sims = nearest_neighbors(emb, k)
    ref = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(emb)
    ref_dist, ref_idx = ref.kneighbors()  # no query: a point is not its own neighbour
    np.testing.assert_allclose(sims, 1.0 - ref_dist, rtol=0, atol=1e-12)  # the same similarities, in order
    no_ties = np.all(np.diff(sims, axis=1) < -1e-9, axis=1) & (np.abs(sims[:, -1:] - _next_best(emb, k)) > 1e-9).ravel()
    assert no_ties.sum() > 20
    np.testing.assert_array_equal(idx[no_ties], ref_idx[no_ties])
    assert not np.any(idx == np.arange(emb.shape[0])[:, None])
    # Ties: document i prefers i + 1, i + 2, ... (wrapping): two copies of one row list each other.
    dup = sp.vstack([emb[:1]] * 5).tocsr()
    np.testing.assert_array_equal(nearest_neighbors(dup, 2)[0], [[1, 2], [2, 3], [3, 4], [4, 0], [0, 1]])


def _next_best(emb, k):
    """The (k+1)-th best similarity of each row (to tell rows whose k-th neighbour is tied)."""
    sims = (emb @ emb.T).toarray()
    np.fill_diagonal(sims, -np.inf)
    return -np.sort(-sims, axis=1)[:, k : k + 1]


def reference_traversal(n: int, weights: dict) -> list[int]:
    """The paper's Algorithm 1 as written: while documents are left, start at a min-degree one (degree
    among those left), then move to the unvisited neighbour of highest weight until there is none.
    Ties: lower index."""
    adj: dict[int, dict[int, float]] = {v: {} for v in range(n)}
    for (i, j), w in weights.items():
        adj[i][j] = adj[j][i] = w
    left, path = set(range(n)), []
    while left:
        d = min(left, key=lambda v: (sum(w in left for w in adj[v]), v))
        while d is not None:
            path.append(d)
            left.remove(d)
            options = [w for w in adj[d] if w in left]
            d = max(options, key=lambda w: (adj[d][w], -w)) if options else None
    return path


@pytest.mark.parametrize("seed", range(6))
def test_traversal_is_the_papers_algorithm_and_visits_each_document_once(seed):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(5, 60)), int(rng.integers(1, 5))
    idx = np.stack([rng.choice(np.delete(np.arange(n), i), size=min(k, n - 1), replace=False) for i in range(n)])
    # Coarse similarities (ties), some zero (no edge), symmetric as cosine similarities are.
    table = np.round(rng.random((n, n)), 1)
    table = np.maximum(table, table.T)
    sims = np.take_along_axis(table, idx, axis=1)
    indptr, nbrs, _ = document_graph(idx, sims, n)
    order, paths = traverse(indptr, nbrs)
    weights = {(min(i, j), max(i, j)): table[i, j] for i in range(n) for j in idx[i] if table[i, j] > 0}
    assert order.tolist() == reference_traversal(n, weights)
    assert sorted(order.tolist()) == list(range(n))
    assert paths >= 1


def test_traversal_by_hand():
    # k = 2; zero similarities are no edge. Edges: 0-1 (0.9), 1-3 (0.8), 2-4 (0.7), 1-2 (0.5 from 2's
    # side only); 5 has none. Degrees: 0:1, 1:3, 2:2, 3:1, 4:1, 5:0.
    idx = np.array([[1, 5], [0, 3], [4, 1], [1, 0], [2, 0], [0, 1]])
    sims = np.array([[0.9, 0], [0.9, 0.8], [0.7, 0.5], [0.8, 0], [0.7, 0], [0, 0]])
    order, paths = traverse(*document_graph(idx, sims, 6)[:2])
    # 5 (degree 0) alone; then 0 (degree 1, lowest index) -> 1 -> 3 (0.8 beats 0.5); stuck. Left: 2
    # and 4, each with one unvisited neighbour now (2 lost 1): 2 first -> 4. (With the degrees of
    # the whole graph, 4 (1) would start before 2 (2).)
    assert order.tolist() == [5, 0, 1, 3, 2, 4] and paths == 3


def test_image_codes_would_order_by_look_not_by_caption(data, capsys):
    """Why only text pieces count (megafusion.data.icp, step 1): counted, pixel codes make the order
    follow the background colour, which no caption names (they also raise the shape share a bit)."""
    from megafusion.core.modality import Modality
    from megafusion.data.codecs.registry import build_codec
    from megafusion.data.icp import BagOfPieces, icp_order
    from megafusion.data.tokenizers.joint import MultimodalTokenizer

    d = data["shapes"]
    tok = MultimodalTokenizer.from_files(d["model"], build_codec("pixel", image_size=12, patch_size=2, levels=4))
    specs = shapes_specs(SHAPES, SEED)
    background, shape = np.array([s.background for s in specs]), np.array([s.shape for s in specs])
    share = {}
    for name, modalities in (("text", (Modality.TEXT,)), ("text+image", (Modality.TEXT, Modality.IMAGE))):
        bag = BagOfPieces((tok.pad_id, tok.bos_id, tok.eos_id, tok.boi_id, tok.eoi_id), modalities)
        for doc in shapes_documents(SHAPES, SEED, 12):
            bag.add(tok.encode_document(doc))
        order = icp_order(bag.matrix(tok.vocab_size), 10).order
        share[name] = (adjacent_same_group(background, order), adjacent_same_group(shape, order))
    rnd = np.random.default_rng(0).permutation(SHAPES)
    with capsys.disabled():
        print(
            f"\nshapes, adjacent pairs sharing (background, shape): text {share['text']}, text+image "
            f"{share['text+image']}, random {(adjacent_same_group(background, rnd), adjacent_same_group(shape, rnd))}"
        )
    assert share["text+image"][0] > 0.9 and share["text"][0] < 0.65


# ------------------------------------------------------------------ end to end through `data prepare`


@pytest.mark.parametrize("name, least", [("digits", 0.95), ("shapes", 0.7)])
def test_icp_order_puts_documents_of_a_group_next_to_each_other(data, name, least, capsys):
    d = data[name]
    root = data["root"] / name
    assert prepare(d, root / "input") == 0
    capsys.readouterr()
    assert prepare(d, root / "icp", "--order", "icp", "--icp-neighbors", "10") == 0
    printed = capsys.readouterr().out
    docs_in, _ = read_indexed(str(root / "input"))
    docs, meta = read_indexed(str(root / "icp"))

    # A permutation of the input documents, each written whole and exactly once.
    order = np.array([_line_index(doc.source) for doc in docs])
    assert sorted(order.tolist()) == list(range(len(docs_in))) == [_line_index(x.source) for x in docs_in]
    for doc in docs:
        ref = docs_in[_line_index(doc.source)]
        np.testing.assert_array_equal(doc.tokens, ref.tokens)
        np.testing.assert_array_equal(doc.modalities, ref.modalities)

    groups = d["groups"]
    icp = adjacent_same_group(groups, order)
    shuffled = adjacent_same_group(groups, np.random.default_rng(0).permutation(len(docs)))
    as_read = adjacent_same_group(groups, np.arange(len(docs)))
    print(f"{name}: adjacent pairs of one group: icp {icp:.3f}, random {shuffled:.3f}, input {as_read:.3f}")
    assert icp >= least and icp >= 2 * shuffled, (icp, shuffled)

    info = meta["order"]
    assert info["name"] == "icp" and info["neighbors"] == 10 and info["embedding"] == "tfidf-bag-of-pieces"
    cos = info["adjacent_cosine"]
    assert cos["icp"] > cos["input"] + 0.3
    line = [x for x in printed.splitlines() if x.startswith("order icp:")]
    assert line == [
        f"order icp: mean cosine similarity of adjacent documents {cos['input']:.3f} in input order, "
        f"{cos['icp']:.3f} as written (TF-IDF of text pieces; {info['paths']} paths through the "
        "10-nearest-neighbour graph)"
    ]
    assert not list(root.glob("*.tmp-*"))  # the input-order copy is gone


def test_held_out_rows_of_an_icp_dataset_are_windows_too(tmp_path, capsys):
    """The sample index packs the held-out documents of an ICP dataset in their own ICP order: held
    out by content, in the dataset's order they sit next to documents from further along the walk."""
    from megafusion.data.builtin.facts import facts_documents
    from megafusion.data.formats.indexed_reader import IndexedDocuments
    from megafusion.data.icp import BagOfPieces, adjacent_cosine
    from megafusion.data.loader import content_score, held_out
    from megafusion.data.sample_index import build_sample_index
    from megafusion.data.types import TokenizedDocument

    # The probe set's groups of 2 or 3 documents: related documents come in small clusters.
    docs = facts_documents(2000, SEED)
    shard = write_jsonl_shard(docs, str(tmp_path / "facts.jsonl"))
    model = train_sentencepiece([s.text for doc in docs for s in doc.segments], 200, str(tmp_path / "sp"))
    d = {"shard": shard, "model": model, "size": 12}
    assert prepare(d, tmp_path / "windows", "--order", "icp") == 0
    documents = IndexedDocuments(str(tmp_path / "windows"))
    splits = build_sample_index(documents, str(tmp_path / "index"), 3, 0.1, 64, True, lambda: None)
    scores = [content_score(*documents.document(i), 3) for i in range(documents.num_documents)]
    plain = np.flatnonzero(held_out(np.array(scores, dtype=np.uint64), 0.1))  # the held-out ones, as written
    val = np.asarray(splits["val"].docs)
    assert sorted(val.tolist()) == plain.tolist() and val.size == 200
    # Similarity of the held-out documents next to each other, by the embedding the order uses.
    meta = documents.meta
    bag = BagOfPieces(exclude=[meta[k] for k in ("pad_id", "bos_id", "eos_id", "boi_id", "eoi_id")])
    for i in plain:
        bag.add(TokenizedDocument(*documents.document(int(i))))
    emb = tfidf_embedding(bag.matrix(meta["vocab_size"]))
    position = {int(doc): k for k, doc in enumerate(plain)}
    windows = adjacent_cosine(emb, np.array([position[int(i)] for i in val]))
    as_written = adjacent_cosine(emb, np.arange(plain.size))
    rnd = adjacent_cosine(emb, np.random.default_rng(0).permutation(plain.size))
    with capsys.disabled():
        print(
            f"\nheld-out facts, adjacent cosine: windows {windows:.3f}, as written {as_written:.3f}, random {rnd:.3f}"
        )
    assert windows > as_written + 0.15 and windows > 2 * rnd
    # The training rows keep the dataset's order: the walk, less the held-out documents.
    np.testing.assert_array_equal(splits["train"].docs, np.setdiff1d(np.arange(documents.num_documents), plain))


def test_icp_prepare_is_deterministic(data):
    d = data["shapes"]
    root = data["root"] / "shapes"
    for name in ("det_a", "det_b"):
        assert prepare(d, root / name, "--order", "icp", "--icp-neighbors", "4") == 0
    a, b = file_bytes(root / "det_a"), file_bytes(root / "det_b")
    assert a == b
    assert json.loads(a["meta"])["order"]["neighbors"] == 4


def test_order_input_is_the_default_and_writes_what_it_always_did(data):
    d = data["shapes"]
    root = data["root"] / "shapes"
    assert prepare(d, root / "default") == 0
    assert prepare(d, root / "as_input", "--order", "input") == 0
    a, b = file_bytes(root / "default"), file_bytes(root / "as_input")
    assert a == b
    meta = json.loads(a["meta"])
    assert "order" not in meta
    assert [_line_index(s) for s in [x.source for x in read_indexed(str(root / "default"))[0]]] == list(range(SHAPES))


def test_transfusion_latents_stay_with_their_documents(data):
    d = data["shapes"]
    root = data["root"] / "shapes"
    flags = ("--latent-codec", "pixels", "--latent-patch-size", "3")
    assert prepare(d, root / "tf_input", *flags) == 0
    assert prepare(d, root / "tf_icp", *flags, "--order", "icp") == 0
    assert prepare(d, root / "lm_icp", "--order", "icp") == 0
    by_source = {}
    for prefix in ("tf_input", "tf_icp"):
        docs, meta = read_indexed(str(root / prefix))
        attach_latents(docs, read_latents(str(root / prefix), meta), str(root / prefix))
        by_source[prefix] = {doc.source: doc for doc in docs}
        assert meta["latents"]["count"] == SHAPES  # one image per document
    sources = [doc.source for doc in read_indexed(str(root / "tf_icp"))[0]]
    assert sources != sorted(sources, key=_line_index)  # really reordered
    for src in sources:
        a, b = by_source["tf_input"][src], by_source["tf_icp"][src]
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.meta["latents"], b.meta["latents"])
    # Only text pieces count, so image codes or latents, the same shards get the same order.
    assert [doc.source for doc in read_indexed(str(root / "lm_icp"))[0]] == sources


def test_latents_of_documents_with_none_or_several_images_move_with_them(data, tmp_path):
    shapes = shapes_documents(40, SEED, 12)
    images = [seg for doc in shapes for seg in doc.segments if isinstance(seg, ImageSegment)]
    captions = [seg for doc in shapes for seg in doc.segments if isinstance(seg, TextSegment)]
    # Document i: its caption and i % 4 images (0 to 3), the images before the text when i % 3 == 0.
    docs = []
    for i, caption in enumerate(captions):
        pictures = [images[(i + j) % 40] for j in range(i % 4)]
        docs.append(Document([*pictures, caption] if i % 3 == 0 else [caption, *pictures]))
    d = {**data["shapes"], "shard": write_jsonl_shard(docs, str(tmp_path / "mixed.jsonl"))}
    flags = ("--latent-codec", "pixels", "--latent-patch-size", "3")
    back = {}
    for name, more in (("input", ()), ("icp", ("--order", "icp", "--icp-neighbors", "3"))):
        assert prepare(d, tmp_path / name, *flags, *more) == 0
        got, meta = read_indexed(str(tmp_path / name))
        attach_latents(got, read_latents(str(tmp_path / name), meta), str(tmp_path / name))
        back[name] = got
        assert meta["latents"]["count"] == sum(i % 4 for i in range(40))
    order = [_line_index(doc.source) for doc in back["icp"]]
    assert sorted(order) == list(range(40)) and order != list(range(40))
    for i, doc in zip(order, back["icp"]):
        ref = back["input"][i]
        assert doc.meta["latents"].shape[0] == i % 4
        np.testing.assert_array_equal(doc.tokens, ref.tokens)
        np.testing.assert_array_equal(doc.meta["latents"], ref.meta["latents"])


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--icp-neighbors", "5"],
            "--icp-neighbors is for --order icp (got --order input): add --order icp or drop it",
        ),
        (
            ["--order", "icp", "--icp-neighbors", "0"],
            "--icp-neighbors 0 must be >= 1 (nearest neighbours per document)",
        ),
    ],
)
def test_bad_icp_flags_are_one_line_before_any_work(data, flags, message, capsys, tmp_path):
    assert prepare(data["shapes"], tmp_path / "x", *flags) == 2
    err = capsys.readouterr().err
    assert err == f"megafusion data prepare: {message}\n"
    assert not list(tmp_path.iterdir())


def test_no_documents_names_the_input_not_the_temporary_copy(data, capsys, tmp_path):
    d = {**data["shapes"], "shard": str(tmp_path / "empty.jsonl")}
    (tmp_path / "empty.jsonl").write_text("")
    assert prepare(d, tmp_path / "x", "--order", "icp") == 2
    assert capsys.readouterr().err == (
        f"megafusion data prepare: --input {tmp_path / 'empty.jsonl'}: no documents in it: give shards with at "
        "least one document (a JSONL shard holds one JSON object per line)\n"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["empty.jsonl"]


def test_an_unknown_order_is_an_argument_error(data, capsys, tmp_path):
    assert prepare(data["shapes"], tmp_path / "x", "--order", "random") == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("megafusion data prepare: error: argument --order: invalid choice: 'random'"), err
    assert "input" in err and "icp" in err
