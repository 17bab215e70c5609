"""Indexed datasets on disk: exact round trips, and every broken file is a DataError naming it."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from megafusion.core.errors import DataError
from megafusion.core.modality import Modality
from megafusion.data.formats.indexed import dataset_paths, read_indexed, read_meta, write_indexed
from megafusion.data.types import TokenizedDocument


def random_docs(rng: np.random.Generator, n: int, vocab_size: int) -> list[TokenizedDocument]:
    """Documents made of 1..6 runs of random modality and length (adjacent runs may repeat a
    modality, which the writer must merge transparently)."""
    docs = []
    for i in range(n):
        runs = int(rng.integers(1, 7))
        lens = rng.integers(1, 12, size=runs)
        mods = np.concatenate([np.full(k, rng.integers(0, len(Modality)), dtype=np.uint8) for k in lens])
        toks = rng.integers(0, vocab_size, size=mods.size).astype(np.int64)
        docs.append(TokenizedDocument(tokens=toks, modalities=mods, source=f"shard{i % 3}.jsonl:{i + 1}"))
    return docs


def write(tmp_path, docs, vocab_size=1000, name="ds"):
    prefix = str(tmp_path / name)
    stats = write_indexed(prefix, docs, {"vocab_size": vocab_size, "tokenizer": {"kind": "test"}})
    return prefix, stats


@pytest.mark.parametrize("vocab_size", [300, 70_000])  # uint16 and int32 token files
def test_round_trip_is_exact(tmp_path, vocab_size):
    rng = np.random.default_rng(0)
    docs = random_docs(rng, 57, vocab_size)
    if vocab_size > 65_535:  # make sure ids beyond uint16 really occur
        docs[0].tokens[0] = vocab_size - 1
    prefix, stats = write(tmp_path, docs, vocab_size)
    back, meta = read_indexed(prefix)
    assert len(back) == len(docs)
    for a, b in zip(docs, back):
        assert b.tokens.dtype == np.int64 and b.modalities.dtype == np.uint8
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.modalities, b.modalities)
        assert a.source == b.source
    all_mods = np.concatenate([d.modalities for d in docs])
    expect = {m.name.lower(): int((all_mods == m).sum()) for m in Modality}
    assert stats["tokens"] == expect and meta["tokens"] == expect
    assert stats["documents"] == meta["documents"] == len(docs)
    assert meta["tokenizer"] == {"kind": "test"} and meta["vocab_size"] == vocab_size
    assert meta["token_dtype"] == ("uint16" if vocab_size < 65_500 else "int32")
    assert set(stats["files"]) == set(dataset_paths(prefix).values())


def test_one_megatron_item_per_modality_run(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    doc = TokenizedDocument(tokens=np.arange(9), modalities=np.array([0, 0, 1, 1, 1, 0, 1, 1, 0], np.uint8))
    prefix, stats = write(tmp_path, [doc, TokenizedDocument(np.array([5]), np.array([1], np.uint8))])
    ds = IndexedDataset(prefix, multimodal=True)
    assert stats["items"] == len(ds) == 6
    assert list(ds.index.sequence_lengths) == [2, 3, 1, 2, 1, 1]
    assert list(ds.index.sequence_modes) == [0, 1, 0, 1, 0, 1]
    assert list(ds.document_indices) == [0, 5, 6]
    del ds


def test_sources_round_trip(tmp_path):
    sources = [
        "a.jsonl:1",
        "a.jsonl:2",
        "a.jsonl:3",
        "b.jsonl:1",
        "",
        "x007",
        "x8",
        "builtin:shapes:0",
        "builtin:shapes:1",
        "a.jsonl:3",
        "no number",
        "9",
    ]
    docs = [TokenizedDocument(np.array([i]), np.array([0], np.uint8), source=s) for i, s in enumerate(sources)]
    prefix, _ = write(tmp_path, docs)
    back, meta = read_indexed(prefix)
    assert [d.source for d in back] == sources
    assert len(meta["document_sources"]) < len(sources)  # consecutive lines collapse


def test_writer_checks_documents(tmp_path):
    bad = TokenizedDocument(np.array([1, 1000]), np.array([0, 0], np.uint8), source="s.jsonl:4")
    with pytest.raises(DataError, match=r"s\.jsonl:4.*vocab_size is 1000"):
        write(tmp_path, [bad])
    assert not any(os.path.exists(p) for p in dataset_paths(str(tmp_path / "ds")).values())
    with pytest.raises(DataError, match=r"s\.jsonl:5.*no tokens"):
        write(tmp_path, [TokenizedDocument(np.zeros(0, np.int64), np.zeros(0, np.uint8), source="s.jsonl:5")])
    with pytest.raises(DataError, match="modality"):
        write(tmp_path, [TokenizedDocument(np.array([1]), np.array([7], np.uint8), source="s.jsonl:6")])
    with pytest.raises(DataError, match="no documents"):
        write(tmp_path, [])
    with pytest.raises(ValueError, match="reserved|filled in"):
        write_indexed(str(tmp_path / "m"), [], {"vocab_size": 10, "documents": 3})


def test_failed_rewrite_keeps_old_dataset(tmp_path):
    rng = np.random.default_rng(1)
    old = random_docs(rng, 5, 100)
    prefix, _ = write(tmp_path, old, vocab_size=100)

    def docs_then_boom():
        yield from random_docs(rng, 3, 100)
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_indexed(prefix, docs_then_boom(), {"vocab_size": 100})
    bad = TokenizedDocument(np.array([1, 100]), np.array([0, 0], np.uint8), source="s.jsonl:9")
    with pytest.raises(DataError, match=r"s\.jsonl:9"):
        write_indexed(prefix, [*old, bad], {"vocab_size": 100})
    back, _ = read_indexed(prefix)
    assert [d.tokens.tolist() for d in back] == [d.tokens.tolist() for d in old]
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx", "ds.meta.json"]  # no temp files left


def test_rewrite_replaces_dataset(tmp_path):
    rng = np.random.default_rng(3)
    prefix, _ = write(tmp_path, random_docs(rng, 5, 100), vocab_size=100)
    new = random_docs(rng, 9, 70_000)
    write(tmp_path, new, vocab_size=70_000)
    back, meta = read_indexed(prefix)
    assert [d.tokens.tolist() for d in back] == [d.tokens.tolist() for d in new]
    assert meta["documents"] == 9 and meta["token_dtype"] == "int32"


@pytest.fixture
def dataset(tmp_path):
    prefix, _ = write(tmp_path, random_docs(np.random.default_rng(2), 20, 500), vocab_size=500)
    return prefix


def test_missing_meta(dataset):
    os.remove(dataset + ".meta.json")
    with pytest.raises(DataError, match=r"ds\.meta\.json is missing"):
        read_indexed(dataset)


def test_missing_idx(dataset):
    os.remove(dataset + ".idx")
    with pytest.raises(DataError, match=r"ds\.idx is missing"):
        read_indexed(dataset)


def test_missing_bin(dataset):
    os.remove(dataset + ".bin")
    with pytest.raises(DataError, match=r"ds\.bin is missing"):
        read_indexed(dataset)


def test_truncated_bin(dataset):
    path = dataset + ".bin"
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) - 6])
    with pytest.raises(DataError, match=r"ds\.bin is \d+ bytes.*truncated"):
        read_indexed(dataset)


def test_truncated_idx(dataset):
    path = dataset + ".idx"
    data = open(path, "rb").read()
    open(path, "wb").write(data[:40])
    with pytest.raises(DataError, match=r"ds\.idx is 40 bytes"):
        read_indexed(dataset)


def drop_checksums(prefix):
    """Remove the checksums from the meta, to reach the structural checks behind them."""
    meta = json.load(open(prefix + ".meta.json"))
    del meta["files"]["bin_blake2b"], meta["files"]["idx_blake2b"]
    json.dump(meta, open(prefix + ".meta.json", "w"))


def overwrite(path, at, value: bytes):
    data = bytearray(open(path, "rb").read())
    data[at : at + len(value)] = value
    open(path, "wb").write(bytes(data))


def test_corrupt_idx_same_size(dataset):
    overwrite(dataset + ".idx", 0, b"NOTANIDX!")
    with pytest.raises(DataError, match=r"ds\.idx: contents do not match the checksum"):
        read_indexed(dataset)
    drop_checksums(dataset)
    with pytest.raises(DataError, match=r"ds\.idx: not a megatron index file"):
        read_indexed(dataset)
    # Scrambled item lengths / counts (header intact) are caught by structural checks, naming the .idx.
    overwrite(dataset + ".idx", 0, b"MMIDIDX\x00\x00")
    overwrite(dataset + ".idx", 34, (10**6).to_bytes(4, "little"))
    with pytest.raises(DataError, match=r"ds\.idx: corrupt index: item byte offsets"):
        read_indexed(dataset)
    overwrite(dataset + ".idx", 18, (10**6).to_bytes(8, "little"))
    with pytest.raises(DataError, match=r"ds\.idx: corrupt index: 1000000 items"):
        read_indexed(dataset)


def test_corrupt_bin_same_size(dataset):
    overwrite(dataset + ".bin", 0, (60_000).to_bytes(2, "little"))  # uint16 file, vocab 500
    with pytest.raises(DataError, match=r"ds\.bin: contents do not match the checksum"):
        read_indexed(dataset)
    drop_checksums(dataset)
    with pytest.raises(DataError, match=r"ds\.bin: token ids outside"):
        read_indexed(dataset)


@pytest.mark.parametrize(
    "content", ["{not json", "[1, 2]", json.dumps({"format": "megafusion.indexed", "format_version": 99})]
)
def test_unreadable_meta(dataset, content):
    open(dataset + ".meta.json", "w").write(content)
    with pytest.raises(DataError, match=r"ds\.meta\.json"):
        read_meta(dataset)


# ---------------------------------------------------------------------------------------------
# `megafusion data prepare` end to end (real shards, a real sentencepiece model)


def make_shard(tmp_path):
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    rng = np.random.default_rng(4)
    for k in range(2):
        Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{k}.png")
    lines = [
        {"segments": [{"text": "a red circle on a white field."}, {"image": "imgs/0.png"}]},
        {"segments": [{"image": "imgs/1.png"}, {"text": "two blue squares."}, {"image": "imgs/0.png"}]},
        {"segments": [{"text": "just some words about shapes and colours."}]},
    ]
    shard = tmp_path / "shard.jsonl"
    shard.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return shard, lines


def test_cli_prepare(tmp_path, capsys):
    from megafusion.commands.data import main
    from megafusion.data.codecs.registry import build_codec
    from megafusion.data.formats.shards import read_shards
    from megafusion.data.tokenizers.joint import MultimodalTokenizer, train_sentencepiece

    shard, lines = make_shard(tmp_path)
    texts = [seg["text"] for line in lines for seg in line["segments"] if "text" in seg]
    sp_model = train_sentencepiece(texts * 5, 40, str(tmp_path / "sp"))
    out = str(tmp_path / "out" / "data")
    args = [
        "prepare",
        "--input",
        str(tmp_path),
        "--tokenizer",
        sp_model,
        "--output",
        out,
        "--image-size",
        "8",
        "--patch-size",
        "2",
        "--pixel-levels",
        "3",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "3 documents" in printed and "data.meta.json" in printed

    docs, meta = read_indexed(out)
    codec = build_codec("pixel", image_size=8, patch_size=2, levels=3)
    tok = MultimodalTokenizer.from_files(sp_model, codec)
    expect = [tok.encode_document(d) for d in read_shards([str(shard)])]
    assert len(docs) == 3
    for i, (a, b) in enumerate(zip(expect, docs)):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.modalities, b.modalities)
        assert a.source == b.source and b.source.endswith(f"shard.jsonl:{i + 1}")
    assert meta["vocab_size"] == tok.vocab_size and meta["pad_id"] == tok.pad_id
    assert meta["tokenizer"] == tok.config() and meta["codec"] == codec.config()
    assert meta["tokens"]["image"] == 3 * codec.tokens_per_image

    # A broken shard line: exit status 2, the message names file and line, the dataset survives.
    with open(shard, "a") as f:
        f.write('{"segments": [{"image": "imgs/missing.png"}]}\n')
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("megafusion data prepare: ") and "shard.jsonl:4" in err
    assert len(read_indexed(out)[0]) == 3
    assert main(["prepare", "--input", str(tmp_path / "nope"), "--tokenizer", sp_model, "--output", out]) == 2
    assert "nope" in capsys.readouterr().err


def test_cli_prepare_with_a_vq_codebook_fitted_on_the_shards(tmp_path, capsys):
    """The Chameleon path for real data: fit-vq on the shards, prepare with it, codes match the codec."""
    from megafusion.commands.data import main
    from megafusion.commands.tokenizer import main as tokenizer_main
    from megafusion.data.codecs.registry import build_codec
    from megafusion.data.formats.shards import read_shards
    from megafusion.data.tokenizers.joint import MultimodalTokenizer, train_sentencepiece

    shard, lines = make_shard(tmp_path)
    texts = [seg["text"] for line in lines for seg in line["segments"] if "text" in seg]
    sp_model = train_sentencepiece(texts * 5, 40, str(tmp_path / "sp"))
    codebook = str(tmp_path / "codebook.safetensors")
    assert (
        tokenizer_main(
            [
                "fit-vq",
                "--input",
                str(shard),
                "--image-size",
                "8",
                "--patch-size",
                "2",
                "--codebook-size",
                "8",
                "--out",
                codebook,
            ]
        )
        == 0
    )
    out = str(tmp_path / "vq" / "data")
    base = ["prepare", "--input", str(shard), "--tokenizer", sp_model, "--output", out, "--image-size", "8"]
    assert main([*base, "--image-codec", "vq"]) == 2
    assert "--vq-codebook" in capsys.readouterr().err
    assert main([*base, "--image-codec", "vq", "--vq-codebook", codebook]) == 0
    docs, meta = read_indexed(out)
    codec = build_codec(**meta["codec"])
    assert codec.name == "vq" and codec.vocab_size == 8
    tok = MultimodalTokenizer.from_files(sp_model, codec)
    for a, b in zip((tok.encode_document(d) for d in read_shards([str(shard)])), docs):
        np.testing.assert_array_equal(a.tokens, b.tokens)


def test_an_empty_input_shard_is_named_not_the_output(tmp_path, capsys):
    from megafusion.commands.data import main
    from megafusion.data.tokenizers.joint import train_sentencepiece

    sp_model = train_sentencepiece(["a red circle", "two blue squares"] * 20, 30, str(tmp_path / "sp"))
    (tmp_path / "empty.jsonl").write_text("")
    out = str(tmp_path / "out" / "ds")
    argv = ["prepare", "--input", str(tmp_path / "empty.jsonl"), "--tokenizer", sp_model, "--output", out]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        f"megafusion data prepare: --input {tmp_path / 'empty.jsonl'}: no documents in it: give shards with at least "
        "one document (a JSONL shard holds one JSON object per line)\n"
    )
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "a.jsonl").write_text("\n")
    assert main([*argv[:2], str(tmp_path / "shards"), *argv[3:], "--order", "icp"]) == 2
    err = capsys.readouterr().err
    assert f"--input {tmp_path / 'shards'}: no documents in it (1 shard: {tmp_path / 'shards' / 'a.jsonl'}): " in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing left behind


def test_a_mistyped_data_path_or_blend_path_is_said_not_to_exist(tmp_path):
    from megafusion.config import load_config
    from megafusion.data.sources import build_data

    write(tmp_path, random_docs(np.random.default_rng(0), 3, 1000), name="digits")
    write(tmp_path, random_docs(np.random.default_rng(1), 3, 1000), name="shapes")
    base = ["data.source=indexed", "data.tokenizer=unused.model"]

    def message(*overrides):
        with pytest.raises(DataError) as err:
            build_data(load_config(None, [*base, *overrides]))
        return str(err.value)

    typo = tmp_path / "digts"
    assert message(f"data.path={typo}") == (
        f"data.path={typo}: no dataset there ({typo}.meta.json does not exist; did you mean {tmp_path / 'digits'}?): "
        "give the --output prefix of `megafusion data prepare`"
    )
    blend = f"data.blend=[{{path: {tmp_path / 'shapes'}, weight: 1}}, {{path: {tmp_path / 'zebra'}, weight: 1}}]"
    assert message(blend).startswith(
        f"data.blend[1].path={tmp_path / 'zebra'}: no dataset there ({tmp_path / 'zebra'}.meta.json does not exist; "
        f"the datasets in {tmp_path}/ are digits, shapes): "
    )
    assert f"the directory {tmp_path / 'nowhere'}/ does not exist" in message(f"data.path={tmp_path / 'nowhere' / 'x'}")
    # A dataset with some of its files is not a typo: the reader says which file is missing.
    os.remove(tmp_path / "digits.meta.json")
    assert "was never completely written" in message(f"data.path={tmp_path / 'digits'}")
