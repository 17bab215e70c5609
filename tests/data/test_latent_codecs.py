"""Continuous image codecs: exact pixel round trip, and a real (tiny, random) diffusers AutoencoderKL."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from megafusion.core.errors import DataError
from megafusion.data.codecs.diffusers_local import weights_identity
from megafusion.data.codecs.registry import build_latent_codec
from tests.helpers import save_tiny_vae


def test_pixel_latents_round_trip_and_scale():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    codec = build_latent_codec("pixels", image_size=8)
    latent = codec.encode(image)
    assert latent.shape == (3, 8, 8) and latent.dtype == np.float32
    assert latent.min() >= -1 and latent.max() <= 1
    np.testing.assert_allclose(latent[:, 2, 5], image[2, 5] / 127.5 - 1, atol=1e-6)  # channel-first
    np.testing.assert_array_equal(codec.decode(latent), image)
    assert build_latent_codec(**codec.config()).latent_shape == (3, 8, 8)
    with pytest.raises(DataError, match=r"\(3, 8, 8\)"):
        codec.decode(np.zeros((3, 4, 4)))


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae")
    return path, save_tiny_vae(path)


def test_kl_codec_is_the_vae_posterior_mean_times_scaling_factor(tiny_vae):
    path, vae = tiny_vae
    codec = build_latent_codec("kl", path=str(path), image_size=16)
    assert codec.latent_shape == (4, 8, 8)  # 2 blocks: one 2x downsampling
    image = np.random.default_rng(1).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    x = torch.from_numpy(image.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        want = vae.encode(x).latent_dist.mean[0] * 0.5
    np.testing.assert_allclose(codec.encode(image), want.numpy(), atol=1e-6)
    decoded = codec.decode(codec.encode(image))
    assert decoded.shape == (16, 16, 3) and decoded.dtype == np.uint8
    # Recorded by content: a copy of the directory is the same VAE, other weights are not.
    copy = path.parent / "copy_of_vae"
    shutil.copytree(path, copy)
    assert build_latent_codec("kl", path=str(copy), image_size=16).config() == codec.config()
    assert codec.config()["weights"].startswith("blake2b:") and "path" not in codec.config()
    other = type(vae).from_pretrained(path)  # not the fixture's model: other tests use it
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    other.save_pretrained(copy)
    assert weights_identity(copy, "objective.vae_path") != codec.weights
    with pytest.raises(DataError, match=r"objective\.vae_path=.*holds no saved weights"):
        weights_identity(path.parent, "objective.vae_path")


def test_kl_codec_names_a_bad_directory(tmp_path):
    with pytest.raises(DataError, match="AutoencoderKL.save_pretrained"):
        build_latent_codec("kl", path=str(tmp_path / "missing"), image_size=16)
    (tmp_path / "config.json").write_text('{"_class_name": "VQModel"}')
    with pytest.raises(DataError, match="not a AutoencoderKL|not an AutoencoderKL|holds a VQModel"):
        build_latent_codec("kl", path=str(tmp_path), image_size=16)
    with pytest.raises(DataError, match="known codecs: kl, pixels"):
        build_latent_codec("vae", image_size=16)
