"""Hugging Face ``tokenizer.json`` text tokenizers: ids kept exactly, megafusion's tokens appended,
bos / eos from the tokenizer's config or its special tokens, built-in and prepared data with
them, and refusal of data made with another tokenizer.

The tokenizers are trained here on a few sentences (no download): byte-level BPE as in
Llama-3, with the special tokens added after training so that they sit at the end of the
vocabulary like Llama-3's ``<|begin_of_text|>`` (128000).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

tokenizers = pytest.importorskip("tokenizers")

from megafusion.commands.data import main as data_main  # noqa: E402
from megafusion.config import load_config  # noqa: E402
from megafusion.core.errors import DataError  # noqa: E402
from megafusion.core.modality import Modality  # noqa: E402
from megafusion.data.codecs.pixel import PixelPatchCodec  # noqa: E402
from megafusion.data.formats.shards import write_jsonl_shard  # noqa: E402
from megafusion.data.sources import build_data  # noqa: E402
from megafusion.data.tokenizers.joint import MultimodalTokenizer, train_sentencepiece  # noqa: E402
from megafusion.data.tokenizers.text import SentencePieceText, load_text_tokenizer  # noqa: E402
from megafusion.data.types import Document, ImageSegment, TextSegment  # noqa: E402

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
# Not in the training text: unseen words, accents, CJK, emoji (byte-level BPE spells them in bytes).
HARD = "Zebras in Zürich: 漢字 and 🙂 — a purple hexagon!"
LLAMA3 = ("<|begin_of_text|>", "<|end_of_text|>")


def train_hf(path: Path, specials=LLAMA3, texts=TEXTS, vocab_size=300, template_bos: bool = True) -> Path:
    """A byte-level BPE tokenizer.json; ``specials`` are added after training (ids at the end).

    ``template_bos``: a post-processor that prepends the first special token, as Llama-3's does
    (megafusion must not take it: it adds bos itself).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        ),
    )
    tok.add_special_tokens(list(specials))
    if template_bos and specials:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{specials[0]} $A", special_tokens=[(specials[0], tok.token_to_id(specials[0]))]
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def hf_json(tmp_path_factory) -> Path:
    return train_hf(tmp_path_factory.mktemp("hf") / "tokenizer.json")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A save_pretrained-style directory: bos / eos named by tokenizer_config.json (AddedToken dict form
    for bos, as older checkpoints write it), not by a known pair."""
    folder = tmp_path_factory.mktemp("hf_dir")
    train_hf(folder / "tokenizer.json", specials=("[START]", "[STOP]", "[PAD]"), template_bos=False)
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": {"__type": "AddedToken", "content": "[START]", "special": True},
                "eos_token": "[STOP]",
                "pad_token": "[PAD]",
                "tokenizer_class": "PreTrainedTokenizerFast",
            }
        )
    )
    return folder


@pytest.fixture(scope="module")
def codec() -> PixelPatchCodec:
    return PixelPatchCodec(image_size=8, patch_size=2, levels=4)


def raw(path: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def test_text_ids_are_the_tokenizers_own(hf_json, codec):
    tok, ref = MultimodalTokenizer.from_files(str(hf_json), codec), raw(hf_json)
    for text in [*TEXTS, HARD, "", "  two  spaces ", "line\nbreak"]:
        ids = tok.encode_text(text)
        assert ids == ref.encode(text, add_special_tokens=False).ids
        assert tok.decode_text(ids) == text  # byte-level BPE: exact round trip
    assert ref.encode("a red circle").ids[0] == tok.bos_id  # the template adds bos; encode_text does not
    assert tok.encode_text("a red circle")[0] != tok.bos_id
    # Special tokens written in the text are matched as the tokenizer matches them.
    assert tok.encode_text("<|end_of_text|>") == [tok.eos_id]


def test_transformers_gives_the_same_ids(hf_json, hf_dir, codec):
    transformers = pytest.importorskip("transformers")
    for path in (hf_json, hf_dir / "tokenizer.json"):
        fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
        tok = MultimodalTokenizer.from_files(str(path), codec)
        for text in [*TEXTS, HARD]:
            assert tok.encode_text(text) == fast.encode(text, add_special_tokens=False)
            assert tok.decode_text(tok.encode_text(text)) == fast.decode(fast.encode(text, add_special_tokens=False))
    loaded = transformers.AutoTokenizer.from_pretrained(str(hf_dir))  # the directory as transformers reads it
    tok = MultimodalTokenizer.from_files(str(hf_dir), codec)
    assert (tok.bos_id, tok.eos_id) == (loaded.bos_token_id, loaded.eos_token_id)
    assert tok.encode_text(HARD) == loaded.encode(HARD, add_special_tokens=False)


def test_appended_tokens_follow_the_hf_vocabulary(hf_json, codec):
    ref = raw(hf_json)
    n = ref.get_vocab_size(with_added_tokens=True)
    tok = MultimodalTokenizer.from_files(str(hf_json), codec)
    assert tok.text_vocab_size == n
    assert (tok.bos_id, tok.eos_id) == (ref.token_to_id(LLAMA3[0]), ref.token_to_id(LLAMA3[1])) == (n - 2, n - 1)
    assert tok.pad_id == tok.eos_id  # documented choice: no new id for padding
    assert (tok.boi_id, tok.eoi_id, tok.image_offset) == (n, n + 1, n + 2)
    assert tok.vocab_size == n + 2 + codec.vocab_size
    # Every original id keeps its token; none of megafusion's ids is one of them.
    vocab = ref.get_vocab(with_added_tokens=True)
    assert sorted(vocab.values()) == list(range(n))
    assert tok.boi_id not in vocab.values() and ref.id_to_token(tok.boi_id) is None

    img = np.random.default_rng(0).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    doc = Document([TextSegment("a red circle."), ImageSegment(img), TextSegment(HARD)], source="t:0")
    out = tok.encode_document(doc)
    t1, t2 = ref.encode("a red circle.", add_special_tokens=False).ids, ref.encode(HARD, add_special_tokens=False).ids
    assert out.tokens.tolist() == [n - 2, *t1, n, *(codec.encode(img) + n + 2), n + 1, *t2, n - 1]
    assert (out.modalities == Modality.IMAGE).sum() == codec.tokens_per_image
    back = tok.decode(out.tokens)
    assert [type(s) for s in back] == [TextSegment, ImageSegment, TextSegment]
    assert (back[0].text, back[2].text) == ("a red circle.", HARD)


def test_directory_with_tokenizer_config(hf_dir, codec):
    ref = raw(hf_dir / "tokenizer.json")
    tok = MultimodalTokenizer.from_files(str(hf_dir), codec)
    assert tok.path == str(hf_dir / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id) == (ref.token_to_id("[START]"), ref.token_to_id("[STOP]"))
    assert tok.text_vocab_size == ref.get_vocab_size(with_added_tokens=True) == tok.boi_id
    # The same tokenizer.json under another name (no config beside it, not *.json): found by content,
    # and without the config its bos / eos cannot be told.
    bare = hf_dir.parent / "bare_copy" / "tok"
    bare.parent.mkdir(exist_ok=True)
    bare.write_bytes((hf_dir / "tokenizer.json").read_bytes())
    with pytest.raises(DataError, match="cannot tell its bos token"):
        MultimodalTokenizer.from_files(str(bare), codec)


def test_config_identifies_by_content_hash(hf_json, hf_dir, codec, tmp_path):
    tok = MultimodalTokenizer.from_files(str(hf_json), codec)
    cfg = tok.config()
    assert cfg["hf_tokenizer_sha256"] == hashlib.sha256(hf_json.read_bytes()).hexdigest()
    assert (cfg["bos_id"], cfg["eos_id"], cfg["pad_id"], cfg["n_text"]) == (
        tok.bos_id,
        tok.eos_id,
        tok.pad_id,
        tok.text_vocab_size,
    )
    moved = tmp_path / "elsewhere" / "tokenizer.json"  # same bytes, other place: the same tokenizer
    moved.parent.mkdir()
    moved.write_bytes(hf_json.read_bytes())
    tok.check_compatible(MultimodalTokenizer.from_files(str(moved), codec).config(), "x")
    other = MultimodalTokenizer.from_files(str(hf_dir), codec)
    with pytest.raises(DataError, match="ckpt: made with a different tokenizer.*hf_tokenizer_sha256"):
        tok.check_compatible(other.config(), "ckpt")
    sp = MultimodalTokenizer.from_files(train_sentencepiece(TEXTS, 80, str(tmp_path / "sp")), codec)
    with pytest.raises(DataError, match="sentencepiece_sha256: '[0-9a-f]+' there, None here"):
        tok.check_compatible(sp.config(), "data.meta.json")


def test_missing_bos_eos_is_refused(tmp_path, codec):
    none = train_hf(tmp_path / "none" / "tokenizer.json", specials=("<|sep|>",), template_bos=False)
    with pytest.raises(DataError) as err:
        MultimodalTokenizer.from_files(str(none), codec)
    msg = str(err.value)
    assert str(none) in msg and "cannot tell its bos token" in msg and "<|begin_of_text|> / <|end_of_text|>" in msg
    assert str(none.parent / "tokenizer_config.json") in msg and '"bos_token"' in msg and "<|sep|>" in msg

    # A config naming bos only: eos is still missing, and named.
    (none.parent / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|sep|>", "eos_token": None}))
    with pytest.raises(DataError, match="cannot tell its eos token"):
        MultimodalTokenizer.from_files(str(none.parent), codec)
    # A config naming a token the tokenizer does not have.
    (none.parent / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "<|sep|>"}))
    with pytest.raises(DataError, match=r"tokenizer_config\.json: bos_token '<s>' is not in the vocabulary"):
        MultimodalTokenizer.from_files(str(none.parent), codec)
    (none.parent / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(DataError, match=r"tokenizer_config\.json: cannot read it as JSON"):
        MultimodalTokenizer.from_files(str(none.parent), codec)
    # With both named, it loads (bos = eos is allowed, as GPT-2 style tokenizers have it).
    (none.parent / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|sep|>", "eos_token": "<|sep|>"}))
    tok = MultimodalTokenizer.from_files(str(none.parent), codec)
    assert tok.bos_id == tok.eos_id == raw(none).token_to_id("<|sep|>")

    # <s> / </s> as ordinary special tokens are found without a config.
    pair = train_hf(tmp_path / "pair" / "tokenizer.json", specials=("<unk>", "<s>", "</s>"))
    tok = MultimodalTokenizer.from_files(str(pair), codec)
    assert (tok.bos_id, tok.eos_id) == (raw(pair).token_to_id("<s>"), raw(pair).token_to_id("</s>"))


def test_bad_paths(tmp_path, codec):
    with pytest.raises(DataError, match="a directory without tokenizer.json") as err:
        MultimodalTokenizer.from_files(str(tmp_path), codec)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(DataError, match="cannot read the Hugging Face tokenizer") as err:
        MultimodalTokenizer.from_files(str(tmp_path / "missing" / "tokenizer.json"), codec)
    assert str(tmp_path / "missing" / "tokenizer.json") in str(err.value)
    broken = tmp_path / "broken.json"
    broken.write_text('{"version": "1.0", "model": 3}')
    with pytest.raises(DataError, match=r"broken\.json: not a valid Hugging Face tokenizer\.json"):
        MultimodalTokenizer.from_files(str(broken), codec)
    with pytest.raises(DataError, match="SentencePiece .model.*Hugging Face tokenizer.json"):
        MultimodalTokenizer.from_files(str(tmp_path / "nope.model"), codec)


def test_backend_dispatch(hf_json, tmp_path):
    from megafusion.data.tokenizers.hf import HuggingFaceText

    assert isinstance(load_text_tokenizer(hf_json), HuggingFaceText)
    assert isinstance(load_text_tokenizer(hf_json.parent), HuggingFaceText)
    sp = load_text_tokenizer(train_sentencepiece(TEXTS, 80, str(tmp_path / "sp")))
    assert isinstance(sp, SentencePieceText) and (sp.pad_id, sp.bos_id, sp.eos_id) == (0, 2, 3)


# --- data builds ---------------------------------------------------------------------------------


def builtin_cfg(tmp_path, tokenizer, *overrides):
    return load_config(
        None,
        [
            "data.source=builtin",
            "data.builtin=shapes",
            "data.num_samples=24",
            "data.image_size=12",
            "data.patch_size=2",
            f"data.tokenizer={tokenizer}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "model.seq_length=128",
            *overrides,
        ],
    )


def shapes_hf(root: Path) -> Path:
    """A tokenizer trained on the built-in captions (any text would do: byte-level BPE covers all)."""
    from megafusion.data.builtin.shapes import shapes_documents

    texts = [s.text for d in shapes_documents(24, 1234, 12) for s in d.segments if isinstance(s, TextSegment)]
    return train_hf(root / "shapes_tok" / "tokenizer.json", texts=texts, vocab_size=320)


@pytest.mark.parametrize("objective", ["lm", "transfusion"])
def test_builtin_data_with_hf_tokenizer(tmp_path, objective):
    path = shapes_hf(tmp_path)
    extra = (
        ["objective.name=transfusion", "objective.latent_codec=pixels", "objective.latent_patch_size=2"]
        if objective == "transfusion"
        else []
    )
    bundle = build_data(builtin_cfg(tmp_path, path.parent, *extra))
    tok, ref = bundle.tokenizer, raw(path)
    n = ref.get_vocab_size(with_added_tokens=True)
    assert (tok.bos_id, tok.eos_id, tok.boi_id) == (ref.token_to_id(LLAMA3[0]), ref.token_to_id(LLAMA3[1]), n)
    assert bundle.meta["tokenizer"]["hf_tokenizer_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert bundle.vocab_size % 128 == 0 and bundle.vocab_size >= tok.vocab_size
    assert not list((tmp_path / "cache").glob("tokenizer-*"))  # no SentencePiece model trained
    rows = bundle.train.rows
    starts = rows.tokens[(rows.positions == 0) & (rows.document_ids >= 0)]
    assert len(starts) > 10 and (starts == tok.bos_id).all()
    # The text of every document is the tokenizer's own ids of its caption.
    first = rows.tokens[0][rows.document_ids[0] == 0]
    text = first[(first < n) & (first != tok.bos_id) & (first != tok.eos_id)]
    caption = tok.decode_text(text.tolist())
    assert ref.encode(caption, add_special_tokens=False).ids == text.tolist()
    batch = bundle.train.microbatch(0, 2)
    assert int(batch["tokens"].max()) < tok.vocab_size
    if objective == "transfusion":
        assert (batch["modality_ids"] == Modality.IMAGE).any() and "latents" in batch


def test_prepared_data_with_hf_tokenizer_and_refused_with_another(tmp_path, capsys, hf_dir):
    from megafusion.data.builtin.shapes import shapes_documents
    from megafusion.data.formats.indexed import read_indexed

    path = shapes_hf(tmp_path)
    shard = write_jsonl_shard(shapes_documents(24, 1234, 12), str(tmp_path / "shards" / "s.jsonl"))
    prefix = str(tmp_path / "ds")
    assert (
        data_main(
            [
                "prepare",
                "--input",
                shard,
                "--tokenizer",
                str(path),
                "--output",
                prefix,
                "--image-size",
                "12",
                "--patch-size",
                "2",
            ]
        )
        == 0
    )
    docs, meta = read_indexed(prefix)
    assert meta["tokenizer_file"] == os.path.abspath(path)
    assert meta["bos_id"] == raw(path).token_to_id(LLAMA3[0]) and all(d.tokens[0] == meta["bos_id"] for d in docs)

    indexed = ["data.source=indexed", f"data.path={prefix}"]
    bundle = build_data(builtin_cfg(tmp_path, path, *indexed))  # the same tokenizer: accepted
    assert bundle.tokenizer.config() == meta["tokenizer"]
    built = build_data(builtin_cfg(tmp_path, path))  # the built-in path gives the same documents
    every = np.arange(built.train.num_rows)
    assert np.array_equal(built.train.rows.take(every).tokens, bundle.train.rows.take(every).tokens)

    with pytest.raises(DataError) as err:  # another Hugging Face tokenizer
        build_data(builtin_cfg(tmp_path, hf_dir, *indexed))
    msg = str(err.value)
    assert f"{prefix}.meta.json: made with a different tokenizer ({os.path.abspath(path)})" in msg
    assert str(hf_dir / "tokenizer.json") in msg and "hf_tokenizer_sha256" in msg
    sp = train_sentencepiece(TEXTS, 80, str(tmp_path / "sp"))
    with pytest.raises(DataError, match=r"sentencepiece_sha256: None there, '[0-9a-f]+' here") as err:
        build_data(builtin_cfg(tmp_path, sp, *indexed))  # a SentencePiece model
    assert sp in str(err.value) and os.path.abspath(path) in str(err.value)
    with pytest.raises(DataError, match=f"data.tokenizer is required.*{os.path.abspath(path)}"):
        build_data(load_config(None, [*indexed, "model.seq_length=128"]))


def test_saved_truncation_and_padding_are_ignored(hf_json, tmp_path, codec):
    """A tokenizer.json may be saved with truncation / padding on; text must still be encoded whole."""
    tok = raw(hf_json)
    tok.enable_truncation(max_length=3)
    tok.enable_padding(length=64, pad_id=0)
    saved = tmp_path / "tokenizer.json"
    tok.save(str(saved))
    as_saved = raw(saved).encode(HARD, add_special_tokens=False).ids
    assert len(as_saved) == 64 and as_saved[3:] == [0] * 61  # cut to 3, then padded
    ids = MultimodalTokenizer.from_files(str(saved), codec).encode_text(HARD)
    assert ids == raw(hf_json).encode(HARD, add_special_tokens=False).ids and 3 < len(ids) < 64
