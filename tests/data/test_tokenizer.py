"""SentencePiece training (determinism, special ids, errors), the joint text + image vocabulary,
encode / decode round trips, the built-in tokenizer cache and ``megafusion tokenizer train``."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from megafusion.commands.tokenizer import main as tokenizer_cli
from megafusion.core.errors import DataError
from megafusion.core.modality import Modality
from megafusion.data.builtin.shapes import shapes_documents
from megafusion.data.codecs.pixel import PixelPatchCodec
from megafusion.data.formats.shards import write_jsonl_shard
from megafusion.data.tokenizers.joint import MultimodalTokenizer, builtin_tokenizer, train_sentencepiece
from megafusion.data.types import Document, ImageSegment, TextSegment

ROOT = Path(__file__).resolve().parents[2]
TEXTS = [
    "a red circle at the top left.",
    "a blue square in the center.",
    "there is a green triangle at the bottom.",
    "an image of a yellow circle in the right.",
    "a handwritten digit seven.",
    "a handwritten digit three.",
    "the quick brown fox jumps over the lazy dog.",
    "Pack my box with five dozen liquor jugs!",
]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return train_sentencepiece(TEXTS, 120, str(tmp_path_factory.mktemp("sp") / "text"))


@pytest.fixture(scope="module")
def codec() -> PixelPatchCodec:
    return PixelPatchCodec(image_size=8, patch_size=2, levels=4)


@pytest.fixture(scope="module")
def tok(model_path, codec) -> MultimodalTokenizer:
    return MultimodalTokenizer.from_files(model_path, codec)


def test_training_is_deterministic(tmp_path, model_path):
    again = train_sentencepiece(list(TEXTS), 120, str(tmp_path / "other" / "name"))
    assert again == str(tmp_path / "other" / "name.model")
    assert Path(again).read_bytes() == Path(model_path).read_bytes()
    different = train_sentencepiece(TEXTS[:-1], 120, str(tmp_path / "different"))
    assert Path(different).read_bytes() != Path(model_path).read_bytes()


def test_special_ids(model_path):
    sp = spm.SentencePieceProcessor(model_file=model_path)
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2, 3)
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]


def test_small_corpus_gives_smaller_vocab_not_error(tmp_path):
    path = train_sentencepiece(["tiny corpus", "tiny"], 5000, str(tmp_path / "small"))
    n = spm.SentencePieceProcessor(model_file=path).get_piece_size()
    assert 4 < n < 5000


def test_training_errors(tmp_path):
    with pytest.raises(DataError, match="raise --vocab-size"):
        train_sentencepiece(["abcdefghijklmnopqrstuvwxyz"], 10, str(tmp_path / "x"))
    with pytest.raises(DataError, match="no text to train on"):
        train_sentencepiece(["", "  \n "], 100, str(tmp_path / "y"))
    with pytest.raises(DataError, match="vocab_size must be"):
        train_sentencepiece(TEXTS, 2, str(tmp_path / "z"))
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_joint_vocabulary_layout(tok, codec, model_path):
    n_text = spm.SentencePieceProcessor(model_file=model_path).get_piece_size()
    assert tok.text_vocab_size == n_text
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    assert (tok.boi_id, tok.eoi_id, tok.image_offset) == (n_text, n_text + 1, n_text + 2)
    assert tok.vocab_size == n_text + 2 + 64 == n_text + 2 + codec.vocab_size
    cfg = tok.config()
    assert cfg["sentencepiece_sha256"] == hashlib.sha256(Path(model_path).read_bytes()).hexdigest()
    assert cfg["n_text"] == n_text and cfg["codec"] == codec.config()


def test_encode_document_layout(tok, codec, model_path):
    sp = spm.SentencePieceProcessor(model_file=model_path)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(20, 13, 3), dtype=np.uint8)
    doc = Document([TextSegment("a red circle."), ImageSegment(img), TextSegment("the lazy dog")], source="t:0")
    out = tok.encode_document(doc)
    t1, t2, codes = sp.encode("a red circle."), sp.encode("the lazy dog"), codec.encode(img)
    n = sp.get_piece_size()
    expected = [2, *t1, n, *(codes + n + 2), n + 1, *t2, 3]
    assert out.tokens.dtype == np.int64 and out.modalities.dtype == np.uint8
    assert out.tokens.tolist() == expected
    assert out.modalities.tolist() == [0] * (1 + len(t1) + 1) + [1] * 16 + [0] * (1 + len(t2) + 1)
    assert out.source == "t:0"
    assert (out.modalities == Modality.IMAGE).sum() == codec.tokens_per_image


def test_round_trip_text_and_images(tok, codec):
    rng = np.random.default_rng(1)
    exact = codec.decode(rng.integers(0, codec.vocab_size, size=codec.tokens_per_image))  # codec-exact image
    noisy = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    doc = Document(
        [
            ImageSegment(exact),
            TextSegment("a blue square in the center."),
            ImageSegment(noisy),
            ImageSegment(exact),
            TextSegment("Pack my box with five dozen liquor jugs!"),
        ]
    )
    segments = tok.decode(tok.encode_document(doc).tokens)
    assert [type(s) for s in segments] == [type(s) for s in doc.segments]
    assert segments[1].text == "a blue square in the center."
    assert segments[4].text == "Pack my box with five dozen liquor jugs!"
    assert np.array_equal(segments[0].pixels, exact) and np.array_equal(segments[3].pixels, exact)
    assert np.array_equal(segments[2].pixels, codec.decode(codec.encode(noisy)))


def test_shapes_documents_round_trip(tmp_path):
    codec = PixelPatchCodec(16, 1, 4)
    docs = shapes_documents(30, seed=0, image_size=16)
    texts = [s.text for d in docs for s in d.segments if isinstance(s, TextSegment)]
    tok = MultimodalTokenizer.from_files(train_sentencepiece(texts, 100, str(tmp_path / "shapes")), codec)
    for doc in docs:
        back = tok.decode(tok.encode_document(doc).tokens)
        for a, b in zip(doc.segments, back, strict=True):
            if isinstance(a, TextSegment):
                assert a.text == b.text
            else:
                assert np.array_equal(codec.decode(codec.encode(a.pixels)), b.pixels)


def test_decode_errors(tok):
    img = np.zeros((8, 8, 3), dtype=np.uint8)
    tokens = tok.encode_document(Document([TextSegment("a red circle."), ImageSegment(img)])).tokens
    boi = int(np.flatnonzero(tokens == tok.boi_id)[0])
    with pytest.raises(DataError, match=f"position {boi} is truncated: 10 of 16"):
        tok.decode(tokens[: boi + 11])
    with pytest.raises(DataError, match="no <eoi>"):
        tok.decode(tokens[: boi + 17])
    with pytest.raises(DataError, match="truncated: 5 of 16 image tokens before a text token"):
        tok.decode(np.concatenate([tokens[: boi + 6], tokens[-1:]]))
    with pytest.raises(DataError, match="without a <boi>"):
        tok.decode([tok.bos_id, tok.eoi_id])
    with pytest.raises(DataError, match="outside any <boi>"):
        tok.decode([tok.bos_id, tok.image_offset + 3])
    with pytest.raises(DataError, match="must be in"):
        tok.decode([tok.vocab_size])


def test_encode_errors_name_the_document(tok):
    bad = Document([ImageSegment(np.zeros((8, 8), dtype=np.uint8), source="cats/1.png")], source="s.jsonl:4")
    with pytest.raises(DataError, match=r"s\.jsonl:4 segment 0 \(image cats/1\.png\).*shape \(8, 8\)"):
        tok.encode_document(bad)
    with pytest.raises(DataError, match="s.jsonl:5 segment 1: text must be a string"):
        tok.encode_document(Document([TextSegment("ok"), TextSegment(3)], source="s.jsonl:5"))
    with pytest.raises(DataError, match="has no segments"):
        tok.encode_document(Document([], source="s.jsonl:6"))


def test_bad_model_files(tmp_path, codec):
    missing = tmp_path / "nope.model"
    with pytest.raises(DataError, match="megafusion tokenizer train") as err:
        MultimodalTokenizer.from_files(str(missing), codec)
    assert str(missing) in str(err.value)
    corrupt = tmp_path / "corrupt.model"
    corrupt.write_bytes(b"\x00\x01 definitely not a protobuf \xff" * 10)
    with pytest.raises(DataError, match="not a valid SentencePiece model") as err:
        MultimodalTokenizer.from_files(str(corrupt), codec)
    assert str(corrupt) in str(err.value)


def test_check_compatible(tok, model_path):
    tok.check_compatible(tok.config(), "ckpt")
    other = MultimodalTokenizer.from_files(model_path, PixelPatchCodec(8, 2, 5))
    with pytest.raises(DataError, match="ckpt/iter_10: made with a different tokenizer.*codec"):
        tok.check_compatible(other.config(), "ckpt/iter_10")


def test_builtin_tokenizer_cache(tmp_path):
    first = builtin_tokenizer(str(tmp_path), TEXTS, 90)
    stamp = os.stat(first).st_mtime_ns
    assert Path(first).name.startswith("tokenizer-") and first.endswith(".model")
    assert builtin_tokenizer(str(tmp_path), list(TEXTS), 90) == first
    assert os.stat(first).st_mtime_ns == stamp  # reused, not retrained
    assert builtin_tokenizer(str(tmp_path), TEXTS, 91) != first
    assert builtin_tokenizer(str(tmp_path), TEXTS[:-1], 90) != first
    assert sorted(p.name.split(".")[-1] for p in tmp_path.iterdir()) == ["model"] * 3  # no temp files left


def test_builtin_tokenizer_concurrent_processes(tmp_path):
    code = (
        "import sys; from megafusion.data.tokenizers.joint import builtin_tokenizer; "
        f"print(builtin_tokenizer(sys.argv[1], {TEXTS!r} * 50, 150))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    paths = {o[0].strip() for o in outs}
    assert len(paths) == 1
    (path,) = paths
    assert spm.SentencePieceProcessor(model_file=path).get_piece_size() > 4
    assert [p.name for p in tmp_path.iterdir()] == [Path(path).name]


def test_cli_train(tmp_path, capsys):
    docs = shapes_documents(20, seed=0, image_size=12)
    write_jsonl_shard(docs[:10], str(tmp_path / "shards" / "a.jsonl"))
    write_jsonl_shard(docs[10:], str(tmp_path / "shards" / "b.jsonl"))
    prefix = str(tmp_path / "out" / "tok")
    assert tokenizer_cli(["train", "--input", str(tmp_path / "shards"), "--vocab-size", "80", "--output", prefix]) == 0
    assert capsys.readouterr().out.strip() == prefix + ".model"
    texts = [s.text for d in docs for s in d.segments if isinstance(s, TextSegment)]
    direct = train_sentencepiece(texts, 80, str(tmp_path / "direct"))
    assert Path(prefix + ".model").read_bytes() == Path(direct).read_bytes()


def test_cli_reports_bad_shards(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"segments": [{"text": "fine"}]}\n{"segments": [{"txt": "oops"}]}\n')
    assert tokenizer_cli(["train", "--input", str(bad), "--vocab-size", "50", "--output", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2" in err and "neither" in err
    assert not (tmp_path / "t.model").exists()
    assert tokenizer_cli(["train", "--vocab-size", "50"]) == 2  # argparse usage error: a status, no exit
