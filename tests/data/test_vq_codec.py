"""Learned image codecs: the k-means patch codec ("vq") against brute-force references, the
pretrained-VQGAN codec ("vqgan") on a tiny random diffusers VQModel, their configs and data paths."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from megafusion.commands.tokenizer import main as tokenizer_cli
from megafusion.config import ConfigError, load_config, validate
from megafusion.core.errors import DataError
from megafusion.core.modality import Modality
from megafusion.data.builtin.shapes import shapes_documents
from megafusion.data.codecs.registry import build_codec
from megafusion.data.codecs.vq import VQGANCodec, VQPatchCodec, fit_vq_codebook, save_vq_codebook
from megafusion.data.formats.shards import write_jsonl_shard
from megafusion.data.sources import build_data
from megafusion.data.tokenizers.joint import MultimodalTokenizer, train_sentencepiece
from megafusion.data.types import Document, ImageSegment, TextSegment

SIZE, PATCH, K = 16, 2, 32


def images_of(docs) -> list[np.ndarray]:
    return [s.pixels for d in docs for s in d.segments if isinstance(s, ImageSegment)]


@pytest.fixture(scope="module")
def shape_images() -> list[np.ndarray]:
    return images_of(shapes_documents(60, seed=0, image_size=SIZE))


@pytest.fixture(scope="module")
def fitted(shape_images, tmp_path_factory) -> VQPatchCodec:
    out = tmp_path_factory.mktemp("vq") / "cb.safetensors"
    return fit_vq_codebook(shape_images, SIZE, PATCH, K, seed=0, out_path=str(out))


def reference_codes(pixels: np.ndarray, codebook: np.ndarray, image_size: int, patch: int) -> np.ndarray:
    """Loops only: nearest-index resize, raster-order patches flattened (row, column, channel),
    float64 squared distance to every codebook row, lowest index on ties."""
    h, w = pixels.shape[:2]
    table = codebook.astype(np.float64)
    codes = []
    for pi in range(image_size // patch):
        for pj in range(image_size // patch):
            vec = []
            for a in range(patch):
                for b in range(patch):
                    i, j = pi * patch + a, pj * patch + b
                    vec += [pixels[(i * h) // image_size, (j * w) // image_size, c] / 255.0 for c in range(3)]
            dists = [sum((x - y) ** 2 for x, y in zip(vec, row)) for row in table]
            codes.append(min(range(len(table)), key=lambda k: (dists[k], k)))
    return np.array(codes, dtype=np.int64)


def mean_sq_error(codec, images) -> float:
    return float(np.mean([np.mean((codec.decode(codec.encode(x)).astype(np.float64) - x) ** 2) for x in images]))


# ---------------------------------------------------------------- vq: fitting and codes


def test_fit_is_deterministic(shape_images, fitted, tmp_path):
    again = fit_vq_codebook(shape_images, SIZE, PATCH, K, seed=0, out_path=str(tmp_path / "again.safetensors"))
    other = fit_vq_codebook(shape_images, SIZE, PATCH, K, seed=1, out_path=str(tmp_path / "other.safetensors"))
    assert open(fitted.path, "rb").read() == open(again.path, "rb").read()
    assert again.sha256 == fitted.sha256 != other.sha256
    assert (fitted.vocab_size, fitted.tokens_per_image, fitted.name) == (K, (SIZE // PATCH) ** 2, "vq")
    assert fitted.codebook.shape == (K, PATCH * PATCH * 3) and fitted.codebook.dtype == np.float32
    # The config rebuilds the same codec (this is how indexed datasets and checkpoints rebuild it).
    rebuilt = build_codec(**fitted.config())
    assert rebuilt.config() == fitted.config() and np.array_equal(rebuilt.codebook, fitted.codebook)


def test_codes_match_brute_force(fitted, shape_images):
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 256, size=(13, 21, 3), dtype=np.uint8)  # resized to 16x16 first
    for img in [*shape_images[:3], noisy]:
        codes = fitted.encode(img)
        assert codes.dtype == np.int64 and codes.shape == (fitted.tokens_per_image,)
        assert codes.min() >= 0 and codes.max() < K
        assert np.array_equal(codes, reference_codes(img, fitted.codebook, SIZE, PATCH))
        out = fitted.decode(codes)
        assert out.dtype == np.uint8 and out.shape == (SIZE, SIZE, 3)


def test_kmeans_beats_a_codebook_of_random_patches(fitted, shape_images, tmp_path):
    patches = np.unique(
        np.concatenate([img.reshape(8, 2, 8, 2, 3).transpose(0, 2, 1, 3, 4).reshape(64, 12) for img in shape_images]),
        axis=0,
    )
    pick = np.random.default_rng(0).choice(len(patches), K, replace=False)
    random_path = save_vq_codebook(patches[pick] / 255.0, SIZE, PATCH, str(tmp_path / "rand.safetensors"))
    random_codec = VQPatchCodec(random_path)
    fitted_err, random_err = mean_sq_error(fitted, shape_images), mean_sq_error(random_codec, shape_images)
    assert fitted_err < 0.8 * random_err, (fitted_err, random_err)


def test_image_made_of_codebook_rows_round_trips_exactly(tmp_path):
    rng = np.random.default_rng(3)
    rows = np.unique(rng.integers(0, 256, size=(40, 12), dtype=np.uint8), axis=0)[:K]
    codec = VQPatchCodec(save_vq_codebook(rows / 255.0, 8, 2, str(tmp_path / "exact.safetensors")))
    codes = rng.integers(0, K, size=codec.tokens_per_image)
    image = rows[codes].reshape(4, 4, 2, 2, 3).transpose(0, 2, 1, 3, 4).reshape(8, 8, 3)
    assert np.array_equal(codec.encode(image), codes)
    assert np.array_equal(codec.decode(codes), image)


def test_too_few_distinct_patches(tmp_path):
    black, white = np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 255, np.uint8)
    with pytest.raises(DataError, match="only 2 distinct 2x2 patches.*at most 2"):
        fit_vq_codebook([black, white], 8, 2, 4, seed=0, out_path=str(tmp_path / "cb.safetensors"))
    assert not (tmp_path / "cb.safetensors").exists()


def test_codebook_file_errors(fitted, tmp_path):
    with pytest.raises(DataError, match=f"{fitted.path}.*sha256.*re-prepare the data"):
        VQPatchCodec(fitted.path, sha256="0" * 64)
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(DataError, match=f"{missing} not found.*fit-vq"):
        VQPatchCodec(str(missing))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(DataError, match=f"{corrupt} is not a megafusion vq codebook"):
        VQPatchCodec(str(corrupt))
    with pytest.raises(DataError, match="decode needs 64 integer codes"):
        fitted.decode(np.zeros(3, np.int64))
    with pytest.raises(DataError, match=r"codes must be in \[0, 32\)"):
        fitted.decode(np.full(64, K))
    with pytest.raises(DataError, match="known codecs: pixel, vq, vqgan"):
        build_codec("vqvae")


def test_tokenizer_round_trip_with_vq(fitted, shape_images, tmp_path):
    texts = ["a red circle at the top left.", "a blue square in the center."]
    tok = MultimodalTokenizer.from_files(train_sentencepiece(texts, 60, str(tmp_path / "sp")), fitted)
    assert tok.vocab_size == tok.text_vocab_size + 2 + K
    doc = Document(
        [TextSegment(texts[0]), ImageSegment(shape_images[0]), TextSegment(texts[1]), ImageSegment(shape_images[1])]
    )
    encoded = tok.encode_document(doc)
    assert (encoded.modalities == Modality.IMAGE).sum() == 2 * fitted.tokens_per_image
    back = tok.decode(encoded.tokens)
    assert [type(s) for s in back] == [type(s) for s in doc.segments]
    assert back[0].text == texts[0] and back[2].text == texts[1]
    for got, img in ((back[1], shape_images[0]), (back[3], shape_images[1])):
        assert np.array_equal(got.pixels, fitted.decode(fitted.encode(img)))


def test_cli_fit_vq(tmp_path, capsys):
    docs = shapes_documents(30, seed=0, image_size=SIZE)
    write_jsonl_shard(docs, str(tmp_path / "shards" / "a.jsonl"))
    out = tmp_path / "cli.safetensors"
    args = [
        "fit-vq",
        "--image-size",
        str(SIZE),
        "--patch-size",
        str(PATCH),
        "--codebook-size",
        "16",
        "--seed",
        "0",
        "--out",
        str(out),
    ]
    assert tokenizer_cli([*args, "--input", str(tmp_path / "shards")]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    direct = fit_vq_codebook(images_of(docs), SIZE, PATCH, 16, 0, str(tmp_path / "direct.safetensors"))
    assert out.read_bytes() == open(direct.path, "rb").read()  # PNG shards keep the pixels exact
    builtin = ["--builtin", "shapes", "--num-samples", "30"]
    assert tokenizer_cli([*args[:-1], str(tmp_path / "b.safetensors"), *builtin]) == 0
    assert (tmp_path / "b.safetensors").read_bytes() == out.read_bytes()  # the same 30 images (seed 0)
    assert tokenizer_cli([*args[:6], "999", *args[7:], *builtin]) == 2
    assert "at most" in capsys.readouterr().err
    assert tokenizer_cli(["fit-vq", "--out", str(out)]) == 2  # neither --input nor --builtin: usage error


# ---------------------------------------------------------------- vqgan


@pytest.fixture(scope="module")
def vqgan_dir(tmp_path_factory) -> str:
    from diffusers import VQModel

    torch.manual_seed(0)
    model = VQModel(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        num_vq_embeddings=32,
        norm_num_groups=4,
        sample_size=16,
        layers_per_block=1,
    )
    # The default init (uniform +-1/32) puts every latent nearest the same few rows; spread it.
    model.quantize.embedding.weight.data.normal_()
    path = tmp_path_factory.mktemp("vqgan") / "model"
    model.save_pretrained(str(path))
    return str(path)


def test_vqgan_codes_are_nearest_codebook_rows(vqgan_dir, shape_images):
    codec = VQGANCodec(vqgan_dir, image_size=SIZE)
    assert (codec.name, codec.vocab_size, codec.tokens_per_image) == ("vqgan", 32, (SIZE // 2) ** 2)
    model, table = codec.model, codec.model.quantize.embedding.weight.detach().double()
    seen = set()
    for img in shape_images[:4]:
        x = torch.from_numpy(img.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
        with torch.no_grad():
            latents = model.quant_conv(model.encoder(x)).double()  # [1, D, 8, 8]
        flat = latents[0].permute(1, 2, 0).reshape(-1, latents.shape[1])  # raster order
        expected = ((flat[:, None, :] - table[None]) ** 2).sum(-1).argmin(-1).numpy()
        codes = codec.encode(img)
        assert codes.dtype == np.int64 and np.array_equal(codes, expected)
        seen |= set(codes.tolist())
        out = codec.decode(codes)
        assert out.dtype == np.uint8 and out.shape == (SIZE, SIZE, 3)
    assert len(seen) > 4  # the check above is not about one constant code
    rebuilt = build_codec(**codec.config())
    assert rebuilt.config() == {"name": "vqgan", "path": vqgan_dir, "image_size": SIZE}
    assert np.array_equal(rebuilt.encode(shape_images[0]), codec.encode(shape_images[0]))


def test_vqgan_errors(vqgan_dir, tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'missing'} is not a directory.*VQModel"):
        VQGANCodec(str(tmp_path / "missing"), 16)
    other = tmp_path / "kl"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(DataError, match=f"{other} holds a AutoencoderKL, not a VQModel"):
        VQGANCodec(str(other), 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="config.json cannot be read"):
        VQGANCodec(str(tmp_path / "empty"), 16)
    with pytest.raises(DataError, match="image_size=15 must be a positive multiple of 2"):
        VQGANCodec(vqgan_dir, 15)


# ---------------------------------------------------------------- config and data paths


def problems(*overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        validate(load_config(None, list(overrides)), 1)
    return str(info.value)


def test_config_validation():
    validate(load_config(None, ["data.image_codec=vq"]), 1)
    validate(load_config(None, ["data.image_codec=vqgan", "data.vqgan_path=/x", "data.image_size=15"]), 1)
    assert "data.image_codec='vqvae' is not one of pixel, vq, vqgan" in problems("data.image_codec=vqvae")
    assert "data.image_codec=vqgan needs data.vqgan_path" in problems("data.image_codec=vqgan")
    assert "data.vq_codebook_size=1 must be >= 2" in problems("data.image_codec=vq", "data.vq_codebook_size=1")
    assert "data.image_size=15 is not divisible by data.patch_size=2" in problems(
        "data.image_codec=vq", "data.image_size=15"
    )


def builtin_cfg(tmp_path, *overrides: str):
    return load_config(
        None,
        [
            "data.source=builtin",
            "data.builtin=shapes",
            "data.num_samples=40",
            f"data.image_size={SIZE}",
            f"data.patch_size={PATCH}",
            "data.text_vocab_size=64",
            f"data.cache_dir={tmp_path / 'cache'}",
            "model.seq_length=128",
            *overrides,
        ],
    )


def test_build_data_with_vq(tmp_path):
    cfg = builtin_cfg(tmp_path, "data.image_codec=vq", "data.vq_codebook_size=24")
    bundle = build_data(cfg)
    tok, codec = bundle.tokenizer, bundle.tokenizer.codec
    assert isinstance(codec, VQPatchCodec) and codec.vocab_size == 24
    assert codec.path.startswith(str(tmp_path / "cache"))  # fitted on first use and cached
    assert tok.vocab_size == tok.text_vocab_size + 2 + 24 <= bundle.vocab_size
    assert bundle.meta["codec"] == codec.config() and bundle.meta["tokenizer"]["codec"] == codec.config()
    batch = bundle.train.microbatch(0, 4)
    image = batch["tokens"][batch["modality_ids"] == Modality.IMAGE]
    assert image.numel() > 0 and image.min() >= tok.image_offset and image.max() < tok.image_offset + 24
    # The second build reuses the cached codebook; a given codebook file is used as it is.
    assert build_data(cfg).tokenizer.codec.config() == codec.config()
    given = build_data(builtin_cfg(tmp_path, "data.image_codec=vq", f"data.vq_codebook={codec.path}"))
    assert given.tokenizer.codec.config() == codec.config()
    with pytest.raises(DataError, match="fitted for image_size=16 patch_size=2, but data.image_size=24"):
        build_data(builtin_cfg(tmp_path, "data.image_codec=vq", f"data.vq_codebook={codec.path}", "data.image_size=24"))
    with pytest.raises(DataError, match=r"data.vq_codebook_size / --codebook-size\) to at most"):
        build_data(builtin_cfg(tmp_path, "data.image_codec=vq"))  # 256 > the distinct patches of 40 shapes


def test_indexed_data_rebuilds_vq_codec(tmp_path, fitted, shape_images):
    from megafusion.data.formats.indexed import write_indexed

    docs = shapes_documents(30, seed=0, image_size=SIZE)
    model = train_sentencepiece(
        [s.text for d in docs for s in d.segments if isinstance(s, TextSegment)], 64, str(tmp_path / "sp")
    )
    tok = MultimodalTokenizer.from_files(model, fitted)
    write_indexed(
        str(tmp_path / "ds"),
        (tok.encode_document(d) for d in docs),
        {"tokenizer": tok.config(), "codec": fitted.config(), "vocab_size": tok.vocab_size},
    )
    cfg = load_config(
        None, ["data.source=indexed", f"data.path={tmp_path / 'ds'}", f"data.tokenizer={model}", "model.seq_length=128"]
    )
    bundle = build_data(cfg)
    assert isinstance(bundle.tokenizer.codec, VQPatchCodec) and bundle.meta["codec"] == fitted.config()


def test_build_data_with_vqgan(tmp_path, vqgan_dir):
    bundle = build_data(
        builtin_cfg(
            tmp_path,
            "data.image_codec=vqgan",
            f"data.vqgan_path={vqgan_dir}",
            "data.num_samples=12",
            "data.val_fraction=0",
        )
    )
    tok = bundle.tokenizer
    assert isinstance(tok.codec, VQGANCodec) and tok.vocab_size == tok.text_vocab_size + 2 + 32
    assert bundle.meta["codec"] == {"name": "vqgan", "path": vqgan_dir, "image_size": SIZE}
