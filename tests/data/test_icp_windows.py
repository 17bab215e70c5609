"""ICP windows on built-in data (``data.order``) and the in-context probe set (``data.builtin=facts``).

Measured on the rows a run trains on, with a TF-IDF embedding of every document made here from the
rows' own tokens (megafusion.data.icp's bag of text pieces): in ICP order the documents of a row are
far more similar to each other than in a seeded random order, while the rows a run reads one after
the other (sample i and i + 1) are no more similar than random rows (the loader's per-epoch
permutation shuffles the windows); rows next to each other in the packing itself are similar (the
walk goes on across a row's end), which is why that shuffle matters. The probe: a facts document's
group partner precedes it in its row for most documents in ICP order and almost none in random
order, in the training and the held-out rows alike; every order holds out the same documents, and a
group whole.
"""

from __future__ import annotations

import numpy as np
import pytest

from megafusion.config.loader import load_config
from megafusion.config.validate import validate
from megafusion.core.errors import ConfigError
from megafusion.core.modality import PAD_DOCUMENT_ID
from megafusion.data.builtin.facts import COLOURS, TEMPLATES, fact_groups, fact_span, facts_documents
from megafusion.data.icp import BagOfPieces, tfidf_embedding
from megafusion.data.loader import held_documents
from megafusion.data.types import TokenizedDocument

SAMPLES = 1500  # facts and arithmetic documents each


def _cfg(cache, order, *extra):
    cfg = load_config(
        None,
        [
            "data.source=builtin",
            "data.builtin=facts,arithmetic",
            f"data.num_samples={SAMPLES}",
            "data.text_vocab_size=256",
            "data.val_fraction=0.1",
            f"data.order={order}",
            f"data.cache_dir={cache}",
            "model.seq_length=128",
            *extra,
        ],
    )
    validate(cfg, 1)
    return cfg


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("icp_windows_cache")


@pytest.fixture(scope="module")
def bundles(cache):
    from megafusion.data.sources import build_data

    return {order: build_data(_cfg(cache, order)) for order in ("input", "random", "icp")}


def row_documents(rows) -> list[list[tuple]]:
    """Each row's documents, as tuples of token ids."""
    out = []
    for tokens, ids in zip(rows.tokens, rows.document_ids):
        out.append([tuple(tokens[ids == d].tolist()) for d in np.unique(ids[ids != PAD_DOCUMENT_ID])])
    return out


class Embedding:
    """Unit TF-IDF vectors of documents (bags of text pieces, special ids left out)."""

    def __init__(self, tokenizer, documents):
        self.index = {doc: i for i, doc in enumerate(dict.fromkeys(documents))}
        bag = BagOfPieces(exclude=(tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id))
        for doc in self.index:
            bag.add(TokenizedDocument(np.array(doc), np.zeros(len(doc), np.uint8)))
        self.emb = tfidf_embedding(bag.matrix(tokenizer.vocab_size)).toarray()

    def sums(self, rows):
        """Per row: the sum of its documents' vectors, and their number."""
        return [(self.emb[[self.index[d] for d in docs]].sum(0), len(docs)) for docs in rows]

    @staticmethod
    def within(sums) -> float:
        """Mean cosine similarity of two documents of one row (all pairs of a row, all rows)."""
        pairs = [((s @ s - m) / 2, m * (m - 1) / 2) for s, m in sums if m > 1]  # |e| = 1
        return float(sum(p for p, _ in pairs) / sum(n for _, n in pairs))

    @staticmethod
    def between(a, b) -> float:
        """Mean cosine similarity of a document of row a[i] and one of row b[i], over i."""
        return float(np.mean([(sa @ sb) / (ma * mb) for (sa, ma), (sb, mb) in zip(a, b)]))


def partner_before(rows, group_of) -> tuple[float, int]:
    """Share of facts documents (``group_of``: tokens -> group) whose group has a document
    earlier in the same row, and how many facts documents there are."""
    hits = total = 0
    for docs in rows:
        seen = set()
        for doc in docs:
            group = group_of.get(doc)
            if group is not None:
                total += 1
                hits += group in seen
                seen.add(group)
    return hits / total, total


def test_facts_groups_state_one_fact_the_later_document_cannot_know():
    docs = fact_groups(3000, 7)
    assert docs == fact_groups(3000, 7) and len(docs) == 3000
    by_name: dict[str, set] = {}
    for text, name, colour in docs:
        by_name.setdefault(name, set()).add((text, colour))
        # The name before the colour, the colour last: a later document repeats what an earlier said.
        assert text.endswith(f" {colour}.") and text.index(name) < text.rindex(colour)
    sizes = [len(v) for v in by_name.values()]
    assert all(len({c for _, c in v}) == 1 for v in by_name.values())  # one colour per group
    assert set(sizes) <= {1, 2, 3} and sizes.count(1) <= 1  # the last group may lose a document
    # A group's documents are phrased differently (no duplicate to be held out apart).
    assert all(len({t for t, _ in v}) == len(v) for v in by_name.values())
    # The colour is drawn independently of the name and phrasing: about uniform over COLOURS in
    # every phrasing (nothing in a document but an earlier one of its group tells its colour).
    for template in TEMPLATES:
        colours = [c for t, n, c in docs if t == template.format(name=n, colour=c)]
        counts = np.array([colours.count(c) for c in COLOURS])
        assert counts.min() > 0.4 * counts.mean(), (template, counts)
    # The input order is a shuffle: a group's documents are seldom next to each other.
    names = [n for _, n, _ in docs]
    assert np.mean([a == b for a, b in zip(names, names[1:])]) < 0.02
    assert {d.group for d in facts_documents(40, 7)} == {f"facts:{n}" for _, n, _ in fact_groups(40, 7)}


def test_fact_span_is_the_colour(tmp_path):
    from megafusion.data.tokenizers.joint import train_sentencepiece
    from megafusion.data.tokenizers.text import load_text_tokenizer

    texts = [t for t, _, _ in fact_groups(600, 1)]
    tok = load_text_tokenizer(train_sentencepiece(texts, 200, str(tmp_path / "sp")))
    for text, _, colour in fact_groups(60, 2):
        ids = tok.encode(text)
        start, end = fact_span(tok.encode, text)
        assert tok.decode(ids[start:end]).strip().rstrip(".") == colour, text
        assert tok.decode(ids[:start]).strip() == text.rsplit(" ", 1)[0]


def test_a_group_is_held_out_whole_and_ungrouped_documents_as_before():
    rng = np.random.default_rng(0)
    docs = [TokenizedDocument(rng.integers(0, 50, 6), np.zeros(6, np.uint8)) for _ in range(400)]
    groups = [f"g{i // 3}" if i < 300 else "" for i in range(400)]  # groups of 3, then 100 alone
    held = held_documents(docs, 0.1, 5, groups)
    for g in range(100):
        assert len(set(held[3 * g : 3 * g + 3].tolist())) == 1
    assert 40 <= held.sum() <= 42  # whole groups: at most a group more than round(400 * 0.1)
    assert 0 < held[300:].sum() < held.sum()  # grouped and ungrouped documents compete alike
    # Where documents arrive does not matter, and without groups the split is the content one.
    flipped = held_documents(docs[::-1], 0.1, 5, groups[::-1])[::-1]
    np.testing.assert_array_equal(flipped, held)
    plain = held_documents(docs, 0.1, 5)
    np.testing.assert_array_equal(plain, held_documents(docs, 0.1, 5, [""] * 400))
    assert plain.sum() == 40
    # Completing a group never leaves training empty.
    assert held_documents(docs[:2], 0.5, 5, ["g", "g"]).sum() == 1


def test_icp_windows_share_rows_and_neighbouring_rows_are_unrelated(bundles, capsys):
    tok = bundles["icp"].tokenizer
    group_of = {}
    for text, name, _ in fact_groups(SAMPLES, 1234):
        group_of[(tok.bos_id, *tok.encode_text(text), tok.eos_id)] = name
    rows = {o: {s: row_documents(getattr(b, s).rows) for s in ("train", "val")} for o, b in bundles.items()}
    everything = [d for r in rows.values() for split in r.values() for docs in split for d in docs]
    emb = Embedding(tok, everything)

    # Every order holds out the same documents (comparable evaluations), a facts group whole.
    held = {o: {d for docs in r["val"] for d in docs} for o, r in rows.items()}
    assert held["input"] == held["random"] == held["icp"]
    train_groups = {group_of[d] for docs in rows["icp"]["train"] for d in docs if d in group_of}
    assert not train_groups & {group_of[d] for d in held["icp"] if d in group_of}

    report = {}
    for order in ("random", "icp"):
        src = bundles[order].train
        sums = emb.sums(rows[order]["train"])
        consumed = src.rows_of(np.arange(3 * src.num_rows))  # three epochs of samples, in the run's order
        report[order] = {
            "within": round(emb.within(sums), 4),
            "next sample": round(emb.between([sums[r] for r in consumed[:-1]], [sums[r] for r in consumed[1:]]), 4),
            "next packed": round(emb.between(sums[:-1], sums[1:]), 4),
            "val within": round(emb.within(emb.sums(rows[order]["val"])), 4),
            "partner": partner_before(rows[order]["train"], group_of),
            "val partner": partner_before(rows[order]["val"], group_of),
        }
    with capsys.disabled():
        print(f"\nICP windows (mean cosine similarity, share of facts documents with a partner before): {report}")
    icp, rnd = report["icp"], report["random"]
    assert icp["within"] > 2.5 * rnd["within"] and icp["val within"] > 2 * rnd["val within"]
    # The rows a run reads one after the other: as unrelated as random rows are.
    assert abs(icp["next sample"] - rnd["within"]) < 0.25 * rnd["within"]
    assert icp["next packed"] > 1.5 * icp["next sample"]  # unshuffled, neighbours would be related
    assert icp["partner"][0] > 0.45 and icp["val partner"][0] > 0.45 and icp["val partner"][1] >= 100
    assert rnd["partner"][0] < 0.02 and rnd["val partner"][0] < 0.05

    assert bundles["icp"].meta["order"]["name"] == "icp" and "order" not in bundles["input"].meta
    line = bundles["icp"].describe().splitlines()[-1]
    assert line.startswith("order   icp, 10 neighbours: mean cosine similarity of adjacent documents"), line


def test_the_icp_order_is_cached_and_the_same_when_read_back(bundles, cache):
    from megafusion.data.sources import build_data

    assert len(list(cache.glob("icp-order-*.npz"))) == 2  # the training and the held-out split
    again = build_data(_cfg(cache, "icp"))
    np.testing.assert_array_equal(again.train.rows.tokens, bundles["icp"].train.rows.tokens)
    np.testing.assert_array_equal(again.val.rows.tokens, bundles["icp"].val.rows.tokens)
    assert again.meta["order"] == bundles["icp"].meta["order"]


def test_order_is_for_builtin_data(tmp_path):
    for source, why in (("indexed", "megafusion data prepare --order icp"), ("synthetic", "no documents")):
        cfg = load_config(None, [f"data.source={source}", "data.path=x", "data.order=icp"])
        with pytest.raises(ConfigError, match=f"data.order=icp is for data.source=builtin .*{why}"):
            validate(cfg, 1)
    with pytest.raises(ConfigError, match="data.order"):
        validate(load_config(None, ["data.source=builtin", "data.order=shuffled"]), 1)
