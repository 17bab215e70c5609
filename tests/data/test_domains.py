"""data.domains (Branch-Train-MiX's per-domain branches) and the arithmetic built-in set: what trains
is the selected domains' documents only, while the tokenizer, codec, vocabulary and held-out split are
those of all the data; every domain's held-out loss is reported; bad selections are refused by key."""

from __future__ import annotations

import re

import numpy as np
import pytest

from megafusion.config.loader import config_from_dict, load_config
from megafusion.config.validate import validate
from megafusion.core.errors import ConfigError
from megafusion.core.modality import PAD_DOCUMENT_ID, Modality
from megafusion.data.builtin.arithmetic import arithmetic_documents, number_words
from megafusion.data.types import ImageSegment, TextSegment

SETS = "shapes,digits,arithmetic"


def _cfg(cache, *extra):
    cfg = load_config(
        None,
        [
            "data.source=builtin",
            f"data.builtin={SETS}",
            "data.num_samples=60",
            "data.patch_size=4",  # 16 image tokens: a document fits a row of 65
            "data.val_fraction=0.1",
            f"data.cache_dir={cache}",
            "model.seq_length=64",
            *extra,
        ],
    )
    validate(cfg, 1)
    return cfg


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("domains_cache")


@pytest.fixture(scope="module")
def bundles(cache):
    from megafusion.data.sources import build_data

    selections = {"null": [], "shapes": ["data.domains=shapes"], "digits": ["data.domains=digits"]}
    selections["arithmetic"] = ["data.domains=arithmetic"]
    selections["all"] = [f"data.domains={SETS}"]
    selections["weighted"] = ["data.domains={arithmetic: 1, digits: 3}"]
    return {name: build_data(_cfg(cache, *extra)) for name, extra in selections.items()}


def _documents(rows) -> list[np.ndarray]:
    """Every document (its tokens) of packed ``rows``, row by row."""
    out = []
    for tokens, ids in zip(rows.tokens, rows.document_ids):
        out += [tokens[ids == d] for d in np.unique(ids[ids != PAD_DOCUMENT_ID])]
    return out


def _texts(tokenizer, doc: np.ndarray) -> str:
    return " ".join(s.text for s in tokenizer.decode(doc) if isinstance(s, TextSegment))


# --- the arithmetic set ------------------------------------------------------------------------

WORDS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve "
        "thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
    )
}
WORDS.update(
    {w: 10 * i for i, w in enumerate("_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()) if i > 1}
)


def _value(words: str) -> int:
    """An independent reader of number words."""
    total = 0
    for part in words.replace(" and ", " ").split():
        if part == "hundred":
            total *= 100
        else:
            total += sum(WORDS[p] for p in part.split("-"))
    return total


def test_arithmetic_statements_are_true_distinct_deterministic_and_prefix_stable():
    docs = arithmetic_documents(400, seed=3)
    texts = [d.segments[0].text for d in docs]
    assert all(len(d.segments) == 1 and isinstance(d.segments[0], TextSegment) for d in docs)  # text only
    assert len(set(texts)) == 400
    assert texts == [d.segments[0].text for d in arithmetic_documents(400, seed=3)]
    assert texts[:50] == [d.segments[0].text for d in arithmetic_documents(50, seed=3)]
    assert texts != [d.segments[0].text for d in arithmetic_documents(400, seed=4)]
    ops = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}
    pattern = re.compile(r"^(?:what is )?(.+?) (plus|minus|times) (.+?)(?: makes| is| equals|\? it is) (.+)\.$")
    seen_ops = set()
    for text in texts:
        a, op, b, c = pattern.match(text).groups()
        assert ops[op](_value(a), _value(b)) == _value(c) >= 0, text
        seen_ops.add(op)
    assert seen_ops == set(ops)
    assert [number_words(n) for n in (0, 13, 40, 42, 100, 144, 198)] == [
        "zero",
        "thirteen",
        "forty",
        "forty-two",
        "one hundred",
        "one hundred and forty-four",
        "one hundred and ninety-eight",
    ]


# --- what trains -------------------------------------------------------------------------------


def test_a_selection_trains_only_its_domains_documents(bundles):
    tok = bundles["null"].tokenizer
    # arithmetic: text only, every document a statement in number words
    rows = bundles["arithmetic"].train.rows
    assert (rows.modalities == int(Modality.TEXT)).all()
    docs = _documents(rows)
    assert docs and all(re.search(r" (plus|minus|times) ", _texts(tok, d)) for d in docs)
    batch = bundles["arithmetic"].train.microbatch(0, 8)
    assert int(batch["modality_counts"][int(Modality.IMAGE)]) == 0
    # digits: every document a captioned digit, one image each
    docs = _documents(bundles["digits"].train.rows)
    assert all("handwritten digit" in _texts(tok, d) for d in docs)
    assert all(sum(isinstance(s, ImageSegment) for s in tok.decode(d)) == 1 for d in docs)
    # shapes: no digit, no statement
    texts = [_texts(tok, d) for d in _documents(bundles["shapes"].train.rows)]
    assert all("handwritten" not in t and " plus " not in t for t in texts)
    # Each selection is exactly its set's training side of the split of all the data.
    every = {tuple(d) for d in _documents(bundles["null"].train.rows)}
    parts = [{tuple(d) for d in _documents(bundles[n].train.rows)} for n in ("shapes", "digits", "arithmetic")]
    assert set().union(*parts) == every and sum(map(len, parts)) == len(every)


def test_selecting_every_domain_is_the_run_without_domains(bundles):
    a, b = bundles["null"].train, bundles["all"].train
    for first in (0, 5, 3 * a.num_rows - 2):  # across epochs
        x, y = a.microbatch(first, 4), b.microbatch(first, 4)
        assert set(y) == set(x) | {"dataset_tokens"}
        assert all(np.array_equal(x[k], y[k]) for k in x)
        assert int(y["dataset_tokens"].sum()) == int((x["document_ids"] >= 0).sum())


def test_weights_give_a_blend_of_the_domains_at_token_shares(bundles):
    train = bundles["weighted"].train
    assert train.names == ["arithmetic", "digits"] and np.allclose(train.token_shares, [0.25, 0.75])
    served = sum(train.microbatch(first, 500)["dataset_tokens"].numpy() for first in range(0, 10_000, 500))
    assert abs(served[0] / served.sum() - 0.25) < 0.01


def test_tokenizer_vocabulary_and_codec_do_not_depend_on_the_selection(bundles, cache):
    metas = {name: b.meta for name, b in bundles.items()}
    assert all(m == metas["null"] for m in metas.values())
    assert {b.tokenizer.path for b in bundles.values()} == {bundles["null"].tokenizer.path}
    # A fitted vq codebook too: a text-only branch has the image codes of all the images.
    from megafusion.data.sources import build_data

    vq = [build_data(_cfg(cache, "data.image_codec=vq", *x)).meta for x in ([], ["data.domains=arithmetic"])]
    assert vq[0] == vq[1] and vq[0]["codec"]["name"] == "vq"


def test_held_out_split_is_the_same_for_every_selection(bundles):
    reference = bundles["null"].val_domains
    assert list(reference) == ["shapes", "digits", "arithmetic"]
    for bundle in bundles.values():
        for name, source in bundle.val_domains.items():
            assert np.array_equal(source.rows.tokens, reference[name].rows.tokens)
            assert np.array_equal(source.microbatch(0, 3)["tokens"], reference[name].microbatch(0, 3)["tokens"])
    # The domains' held-out documents are the run's held-out documents, split by domain.
    held = sorted(tuple(d) for d in _documents(bundles["null"].val.rows))
    per_domain = sorted(tuple(d) for s in reference.values() for d in _documents(s.rows))
    assert held == per_domain
    trained = {tuple(d) for d in _documents(bundles["null"].train.rows)}
    assert not trained & set(held)


def test_data_without_domains_is_built_as_before(bundles, cache):
    """data.domains=null: the rows of main's build_data (split_documents over every document, packed
    together, seeds train.seed / + 1), re-made here from the parts."""
    from megafusion.data.loader import MicrobatchSource, split_documents
    from megafusion.data.packing import pack_documents
    from megafusion.data.sources import _builtin_documents

    cfg, bundle = _cfg(cache), bundles["null"]
    tokenized = [bundle.tokenizer.encode_document(d) for d in _builtin_documents(cfg)]
    train, val = split_documents(tokenized, 0.1, cfg.train.seed)
    old = {
        "train": MicrobatchSource(pack_documents(train, 64, bundle.tokenizer.pad_id), cfg.train.seed),
        "val": MicrobatchSource(pack_documents(val, 64, bundle.tokenizer.pad_id), cfg.train.seed + 1),
    }
    for name, source in old.items():
        x, y = source.microbatch(7, 5), getattr(bundle, name).microbatch(7, 5)
        assert set(x) == set(y) and all(np.array_equal(x[k], y[k]) for k in x)


# --- configuration -----------------------------------------------------------------------------


def test_the_two_forms_load_from_the_command_line_and_yaml():
    assert load_config(None, ["data.domains=shapes,digits"]).data.domains == "shapes,digits"
    assert load_config(None, ["data.domains={shapes: 1, digits: 2.5}"]).data.domains == {"shapes": 1, "digits": 2.5}
    assert config_from_dict({"data": {"domains": {"digits": 2}}}).data.domains == {"digits": 2}
    assert load_config(None, ["data.domains=null"]).data.domains is None
    with pytest.raises(ConfigError, match=r"data.domains: cannot use \[.*expected str or dict or null"):
        config_from_dict({"data": {"domains": ["shapes"]}})


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data.domains=shapes,letters"], r"data.domains names \['letters'\], not domains of this run.*data.builtin"),
        (
            ["data.domains=arithmetic"],
            r"data.domains names \['arithmetic'\].*\(here shapes, digits\); add it to data.builtin",
        ),
        (["data.source=synthetic", "data.domains=shapes"], r"data.domains is for data.source=builtin .* not synthetic"),
        (["data.domains={shapes: 0, digits: 1}"], r"data.domains.shapes=0 must be a number > 0"),
        (["data.domains={shapes: -1}"], r"data.domains.shapes=-1 must be a number > 0"),
        (["data.domains={shapes: lots}"], r"data.domains.shapes='lots' must be a number > 0"),
        (["data.domains= , "], r"data.domains=' , ' names no domain"),
        (
            ["data.builtin=shapes,letters"],
            r"data.builtin='shapes,letters' names unknown sets.*shapes, digits, arithmetic",
        ),
        (
            [
                "data.source=indexed",
                "data.blend=[{path: d/a, weight: 1}, {path: d/b, weight: 1, name: bee}]",
                "data.domains={a: 1, b: 2}",
            ],
            r"data.domains names \['b'\].*data.blend \(here a, bee\)",
        ),
    ],
)
def test_bad_selections_are_refused_naming_the_key(overrides, expected):
    cfg = load_config(None, ["data.source=builtin", *overrides])
    with pytest.raises(ConfigError, match=expected):
        validate(cfg, 1)


def test_good_selections_pass_validation():
    for extra in (["data.domains=digits"], [f"data.builtin={SETS}", "data.domains={arithmetic: 2, shapes: 1}"]):
        validate(load_config(None, ["data.source=builtin", *extra]), 1)
    blend = "data.blend=[{path: d/a, weight: 1}, {path: d/b, weight: 1, name: bee}]"
    validate(load_config(None, ["data.source=indexed", blend, "data.domains=bee"]), 1)


# --- indexed data: the domains are the datasets of data.blend ---------------------------------


@pytest.fixture(scope="module")
def blend_dir(tmp_path_factory):
    """Two prepared datasets, shapes (captioned images) and sums (text only), one tokenizer."""
    from megafusion.data.builtin.shapes import shapes_documents
    from megafusion.data.codecs.registry import build_codec
    from megafusion.data.formats.shards import write_jsonl_shard
    from megafusion.data.prepare import prepare
    from megafusion.data.tokenizers.joint import builtin_tokenizer

    root = tmp_path_factory.mktemp("domains_blend")
    sets = {"shapes": shapes_documents(40, 0, 16), "sums": arithmetic_documents(80, 0)}
    texts = [s.text for docs in sets.values() for d in docs for s in d.segments if isinstance(s, TextSegment)]
    spm = builtin_tokenizer(str(root / "cache"), texts, 96)
    codec = build_codec("pixel", image_size=16, patch_size=4, levels=4)
    for name, docs in sets.items():
        prepare([write_jsonl_shard(docs, str(root / f"{name}.jsonl"))], spm, str(root / name), codec)
    return root, spm


def _indexed(blend_dir, *extra):
    from megafusion.data.sources import build_data

    root, spm = blend_dir
    blend = f"data.blend=[{{path: {root / 'shapes'}, weight: 0.7}}, {{path: {root / 'sums'}, weight: 0.3}}]"
    cfg = load_config(
        None,
        ["data.source=indexed", blend, f"data.tokenizer={spm}", "model.seq_length=64", "data.val_fraction=0.1", *extra],
    )
    validate(cfg, 1)
    return build_data(cfg)


def test_indexed_domains_select_and_reweight_blend_entries(blend_dir):
    null = _indexed(blend_dir)
    sums = _indexed(blend_dir, "data.domains=sums")
    listed = _indexed(blend_dir, "data.domains=sums,shapes")
    weighted = _indexed(blend_dir, "data.domains={shapes: 1, sums: 3}")
    batch = sums.train.microbatch(0, 16)
    assert int(batch["modality_counts"][int(Modality.IMAGE)]) == 0 and sums.train.names == ["sums"]
    assert np.allclose(listed.train.token_shares, [0.3, 0.7])  # the blend's weights, in the given order
    assert np.allclose(weighted.train.token_shares, [0.25, 0.75]) and weighted.train.share_group == "domain"
    assert null.train.share_group == "blend"
    for bundle in (sums, listed, weighted):
        assert bundle.meta == null.meta and list(bundle.val_domains) == ["shapes", "sums"]
        for name, source in bundle.val_domains.items():
            assert np.array_equal(source.microbatch(0, 4)["tokens"], null.val_domains[name].microbatch(0, 4)["tokens"])
        assert np.array_equal(bundle.val.microbatch(0, 6)["tokens"], null.val.microbatch(0, 6)["tokens"])
    # A selected dataset serves the rows of the blend's own source for it, sample for sample.
    own = null.train.sources[1].microbatch(3, 5)
    assert np.array_equal(sums.train.microbatch(3, 5)["tokens"], own["tokens"])
