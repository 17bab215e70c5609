"""Transfusion from prepared data: `data prepare --latent-codec` + data.source=indexed equals the built-in path.

The reference is the built-in source (``encode_transfusion_document`` on the generated shapes),
which shares no code with the latent file; the same documents go through a JSONL shard,
``megafusion data prepare`` and ``read_indexed`` + ``PREFIX.latents.npy``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from megafusion.commands.data import main as data_main
from megafusion.config import load_config
from megafusion.core.errors import DataError
from megafusion.data.builtin.shapes import shapes_documents
from megafusion.data.codecs.latent import PixelLatentCodec
from megafusion.data.formats.indexed import read_indexed
from megafusion.data.formats.indexed_latents import attach_latents, latents_path, read_latents
from megafusion.data.formats.shards import read_shards, write_jsonl_shard
from megafusion.data.sources import build_data
from megafusion.data.tokenizers.joint import MultimodalTokenizer, train_sentencepiece
from megafusion.data.transfusion_data import PlaceholderCodec, encode_transfusion_document
from megafusion.data.types import Document, ImageSegment, TextSegment
from tests.helpers import assert_same_training, run_train, save_tiny_vae

CONFIG = "tests/configs/transfusion_small.yaml"  # shapes, 200 samples, seed 3, 12 px, latent patches of 3
NUM, SEED, SIZE, PATCH = 200, 3, 12, 3


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The config's built-in documents as a shard, a tokenizer, and the Transfusion dataset of them."""
    root = tmp_path_factory.mktemp("tf_indexed")
    docs = shapes_documents(NUM, SEED, SIZE)
    shard = write_jsonl_shard(docs, str(root / "shards" / "shapes.jsonl"))
    texts = [seg.text for d in docs for seg in d.segments if isinstance(seg, TextSegment)]
    model = train_sentencepiece(texts, 128, str(root / "sp"))
    prefix = str(root / "ds")
    assert (
        data_main(
            [
                "prepare",
                "--input",
                shard,
                "--tokenizer",
                model,
                "--output",
                prefix,
                "--latent-codec",
                "pixels",
                "--latent-patch-size",
                str(PATCH),
                "--image-size",
                str(SIZE),
            ]
        )
        == 0
    )
    return {"root": root, "shard": shard, "model": model, "prefix": prefix}


def config(p, *overrides):
    return load_config(CONFIG, [f"data.tokenizer={p['model']}", f"data.cache_dir={p['root'] / 'cache'}", *overrides])


def indexed_config(p, *overrides, prefix=None):
    return config(p, "data.source=indexed", f"data.path={prefix or p['prefix']}", *overrides)


def prepare(p, output, *flags, shard=None):
    return data_main(
        ["prepare", "--input", shard or p["shard"], "--tokenizer", p["model"], "--output", str(output), *flags]
    )


def test_indexed_microbatches_equal_the_builtin_ones(prepared):
    builtin, indexed = build_data(config(prepared)), build_data(indexed_config(prepared))
    assert indexed.vocab_size == builtin.vocab_size
    assert indexed.meta["codec"] == builtin.meta["codec"] and indexed.meta["tokenizer"] == builtin.meta["tokenizer"]
    assert indexed.meta["source"] == f"indexed:{prepared['prefix']}"
    for split in ("train", "val"):
        ref, got = getattr(builtin, split), getattr(indexed, split)
        assert got.num_rows == ref.num_rows > 0
        for first in (0, 5, got.num_rows - 1, 3 * got.num_rows + 2):  # later epochs reshuffle
            want, batch = ref.microbatch(first, 4), got.microbatch(first, 4)
            assert sorted(batch) == sorted(want) and batch["latents"].shape[0] > 0
            for key in want:
                assert torch.equal(batch[key], want[key]), f"{split} sample {first}: {key} differs"
            assert batch["image_ids"].max() >= 0 and batch["latents"].dtype == torch.float32


def test_documents_with_several_or_no_images_keep_their_latents_in_order(prepared, tmp_path):
    images = [seg for d in shapes_documents(3, 0, SIZE) for seg in d.segments if isinstance(seg, ImageSegment)]
    docs = [
        Document([TextSegment("two pictures."), images[0], images[1]], source="two"),
        Document([TextSegment("no picture at all.")], source="none"),
        Document([images[2], TextSegment("one picture first.")], source="first"),
    ]
    shard = write_jsonl_shard(docs, str(tmp_path / "mixed.jsonl"))
    prefix = tmp_path / "mixed"
    assert (
        prepare(
            prepared, prefix, "--latent-codec", "pixels", "--latent-patch-size", "3", "--image-size", "12", shard=shard
        )
        == 0
    )
    back, meta = read_indexed(str(prefix))
    attach_latents(back, read_latents(str(prefix), meta), str(prefix))
    tok = MultimodalTokenizer.from_files(prepared["model"], PlaceholderCodec(PixelLatentCodec(SIZE), PATCH))
    want = [encode_transfusion_document(tok, d) for d in read_shards([shard])]
    assert [d.meta["latents"].shape[0] for d in back] == [2, 0, 1]
    for a, b in zip(want, back):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.modalities, b.modalities)
        np.testing.assert_array_equal(a.meta["latents"], b.meta["latents"])
    assert meta["latents"]["count"] == 3 and meta["latents"]["shape"] == [3, SIZE, SIZE]
    assert meta["latents"]["codec"] == {"name": "pixels", "image_size": SIZE} and meta["latents"]["patch_size"] == 3


def copy_dataset(prefix: str, dest: str) -> str:
    for ext in (".bin", ".idx", ".meta.json", ".latents.npy"):
        shutil.copyfile(prefix + ext, dest + ext)
    return dest


def test_a_damaged_latent_file_is_refused_with_the_fix(prepared, tmp_path):
    prefix = copy_dataset(prepared["prefix"], str(tmp_path / "ds"))
    path = latents_path(prefix)
    cfg = indexed_config(prepared, prefix=prefix)
    data = bytearray(open(path, "rb").read())
    data[-5] ^= 0x40  # one flipped bit in the last latent
    open(path, "wb").write(bytes(data))
    with pytest.raises(
        DataError,
        match=r"ds\.latents\.npy: contents do not match the checksum.*re-run "
        r"`megafusion data prepare",
    ):
        build_data(cfg)
    open(path, "wb").write(bytes(data[:-100]))
    with pytest.raises(
        DataError,
        match=r"ds\.latents\.npy is \d+ bytes but .*ds\.meta\.json says \d+: the file is "
        r"truncated.*re-run `megafusion data prepare",
    ):
        build_data(cfg)
    os.remove(path)
    with pytest.raises(DataError, match=r"ds\.latents\.npy is missing.*re-run"):
        build_data(cfg)


def test_latent_settings_must_match_the_dataset(prepared, tmp_path):
    with pytest.raises(
        DataError,
        match=r"objective\.latent_patch_size=4 but the dataset was prepared with "
        r"--latent-patch-size 3.*re-run `megafusion data prepare",
    ):
        build_data(indexed_config(prepared, "objective.latent_patch_size=4"))
    with pytest.raises(
        DataError,
        match=r"objective\.latent_codec='kl' but the dataset was prepared with "
        r"--latent-codec 'pixels'",
    ):
        build_data(indexed_config(prepared, "objective.latent_codec=kl", f"objective.vae_path={tmp_path}"))
    with pytest.raises(DataError, match=r"data\.image_size=6 but the dataset was prepared with --image-size 12"):
        build_data(indexed_config(prepared, "data.image_size=6"))
    # The tokens of a Transfusion dataset are placeholders: objective=lm must not train on them.
    with pytest.raises(DataError, match=r"holds image latents.*objective\.name=lm: set objective\.name=transfusion"):
        build_data(indexed_config(prepared, "objective.name=lm"))
    # An LM dataset (image codes, no latents) is no Transfusion dataset.
    lm = tmp_path / "lm"
    assert prepare(prepared, lm, "--image-size", "12") == 0
    with pytest.raises(
        DataError,
        match=r"lm\.meta\.json: the dataset has no image latents.*--latent-codec.*"
        r"objective\.name=lm",
    ):
        build_data(indexed_config(prepared, prefix=str(lm)))
    assert build_data(indexed_config(prepared, "objective.name=lm", prefix=str(lm))).train.num_rows > 0


def test_prepare_flags_and_a_failed_prepare_keeps_the_old_dataset(prepared, tmp_path, capsys):
    prefix = copy_dataset(prepared["prefix"], str(tmp_path / "ds"))
    base = ["--latent-codec", "pixels", "--latent-patch-size", "3", "--image-size", "12"]
    for flags, message in [
        ([*base, "--image-codec", "vq"], "--image-codec (image codes) do not apply"),
        ([*base, "--patch-size", "2"], "--patch-size (image codes) do not apply"),
        (["--latent-codec", "kl"], "--latent-codec kl needs --vae-path"),
        ([*base, "--vae-path", str(tmp_path)], "--vae-path is only for --latent-codec kl"),
        (["--latent-patch-size", "3"], "--latent-patch-size is for Transfusion datasets"),
        (["--latent-codec", "pixels", "--latent-patch-size", "5"], "patch size that divides"),
    ]:
        assert prepare(prepared, prefix, *flags) == 2, flags
        assert message in capsys.readouterr().err
    # A shard whose last line is broken fails the prepare half-way (after 200 latents were streamed).
    shards = tmp_path / "shards"
    shutil.copytree(os.path.dirname(prepared["shard"]), shards)
    with open(shards / "shapes.jsonl", "a") as f:
        f.write('{"segments": [{"image": "missing.png"}]}\n')
    assert prepare(prepared, prefix, *base, shard=str(shards / "shapes.jsonl")) == 2
    assert "shapes.jsonl:201" in capsys.readouterr().err
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f], "temporary files were left behind"
    assert build_data(indexed_config(prepared, prefix=prefix)).train.num_rows > 0  # the old dataset still reads


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae")
    save_tiny_vae(path)
    return str(path)


def test_kl_latents_come_from_the_vae_and_its_path_must_match(prepared, tiny_vae, tmp_path):
    from megafusion.data.codecs.registry import build_latent_codec

    docs = shapes_documents(8, SEED, 16)
    shard = write_jsonl_shard(docs, str(tmp_path / "kl.jsonl"))
    prefix = str(tmp_path / "kl")
    assert (
        prepare(
            prepared,
            prefix,
            "--latent-codec",
            "kl",
            "--vae-path",
            tiny_vae,
            "--latent-patch-size",
            "2",
            "--image-size",
            "16",
            shard=shard,
        )
        == 0
    )
    kl = [
        "objective.latent_codec=kl",
        f"objective.vae_path={tiny_vae}",
        "objective.latent_patch_size=2",
        "data.image_size=16",
        "data.val_fraction=0",
    ]
    bundle = build_data(indexed_config(prepared, *kl, prefix=prefix))
    codec = build_latent_codec("kl", path=tiny_vae, image_size=16)
    back, meta = read_indexed(prefix)
    latents = read_latents(prefix, meta)
    want = np.stack([codec.encode(seg.pixels) for d in docs for seg in d.segments if hasattr(seg, "pixels")])
    np.testing.assert_allclose(latents, want, atol=1e-6)
    assert latents.shape == (8, 4, 8, 8) and bundle.tokenizer.codec.latent_codec.latent_shape == (4, 8, 8)
    # The VAE is known by its weights, not its directory: a copy elsewhere reads the same data ...
    copy = tmp_path / "copied_vae"
    shutil.copytree(tiny_vae, copy)
    moved = build_data(indexed_config(prepared, *kl, f"objective.vae_path={copy}", prefix=prefix))
    assert moved.tokenizer.config() == bundle.tokenizer.config()
    # ... and other weights (one parameter nudged) are refused, naming both.
    from diffusers import AutoencoderKL

    other = tmp_path / "other_vae"
    vae = AutoencoderKL.from_pretrained(tiny_vae)
    with torch.no_grad():
        next(vae.parameters()).add_(1e-3)
    vae.save_pretrained(other)
    with pytest.raises(
        DataError,
        match=rf"objective\.vae_path={other} holds weights='blake2b:\w+' but the dataset "
        rf"was prepared with a VAE of weights '{codec.weights}'",
    ):
        build_data(indexed_config(prepared, *kl, f"objective.vae_path={other}", prefix=prefix))
    # A VAE recorded by its path only (a format of development builds, never released) is refused.
    meta_path = Path(prefix + ".meta.json")
    meta = json.loads(meta_path.read_text())
    by_path = {"name": "kl", "path": tiny_vae, "image_size": 16}
    meta["latents"]["codec"] = meta["tokenizer"]["codec"]["latent"] = meta["codec"]["latent"] = by_path
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(
        DataError,
        match=r"holds weights='blake2b:\w+' but the dataset was prepared with a VAE of "
        r"weights None.*re-run `megafusion data prepare",
    ):
        build_data(indexed_config(prepared, *kl, prefix=prefix))
    with pytest.raises(DataError, match="different tokenizer"):
        bundle.tokenizer.check_compatible(meta["tokenizer"], "a checkpoint")


def test_training_from_the_indexed_dataset_equals_training_on_the_builtin_set(prepared, tmp_path):
    common = [f"data.tokenizer={prepared['model']}", f"data.cache_dir={prepared['root'] / 'cache'}", "train.steps=3"]
    builtin = run_train(tmp_path, 1, CONFIG, common, "builtin")
    indexed = run_train(
        tmp_path, 1, CONFIG, [*common, "data.source=indexed", f"data.path={prepared['prefix']}"], "indexed"
    )
    assert f"indexed:{prepared['prefix']}" in indexed[2] and "diffusion" in indexed[2]
    # Same microbatches, same model, one process: the same numbers, not merely close ones.
    assert_same_training(builtin[:2], indexed[:2], "indexed vs builtin", 0.0)
