"""PixelPatchCodec against hand-computed codes and a brute-force per-patch reference; the registry."""

from __future__ import annotations

import numpy as np
import pytest

from megafusion.core.errors import DataError
from megafusion.data.codecs.images import resize_nearest
from megafusion.data.codecs.pixel import PixelPatchCodec
from megafusion.data.codecs.registry import build_codec


def reference_encode(pixels: np.ndarray, image_size: int, patch: int, levels: int) -> np.ndarray:
    """Loops only: nearest-index resize, per-patch mean, nearest level (ties go up)."""
    h, w = pixels.shape[:2]
    resized = np.zeros((image_size, image_size, 3), dtype=np.float64)
    for i in range(image_size):
        for j in range(image_size):
            resized[i, j] = pixels[(i * h) // image_size, (j * w) // image_size]
    level_values = [k * 255.0 / (levels - 1) for k in range(levels)]
    codes = []
    for pi in range(image_size // patch):
        for pj in range(image_size // patch):
            block = resized[pi * patch : (pi + 1) * patch, pj * patch : (pj + 1) * patch]
            q = []
            for c in range(3):
                mean = sum(block[a, b, c] for a in range(patch) for b in range(patch)) / (patch * patch)
                q.append(min(range(levels), key=lambda k: (abs(mean - level_values[k]), -k)))
            codes.append(q[0] * levels * levels + q[1] * levels + q[2])
    return np.array(codes, dtype=np.int64)


def test_hand_computed_layout():
    codec = PixelPatchCodec(image_size=4, patch_size=2, levels=3)  # levels 0, 128, 255
    assert (codec.vocab_size, codec.tokens_per_image, codec.name) == (27, 4, "pixel")
    img = np.zeros((4, 4, 3), dtype=np.uint8)
    img[:2, :2] = (255, 0, 0)  # (2, 0, 0) -> 18
    img[:2, 2:] = (0, 128, 255)  # (0, 1, 2) -> 5
    img[2:, :2] = (128, 128, 128)  # (1, 1, 1) -> 13
    img[2:, 2:] = (0, 0, 0)  # -> 0
    codes = codec.encode(img)
    assert codes.dtype == np.int64
    assert codes.tolist() == [18, 5, 13, 0]
    assert np.array_equal(codec.decode(codes), img)


def test_patch_mean_and_rounding():
    codec = PixelPatchCodec(image_size=2, patch_size=2, levels=3)
    img = np.zeros((2, 2, 3), dtype=np.uint8)
    img[0, :, 0] = 255  # red mean 127.5 -> exactly level 1 (127.5 * 2 / 255 = 1.0)
    img[0, 0, 1] = 252  # green mean 63 -> 0.494 -> level 0
    img[0, 0, 2], img[0, 1, 2] = 255, 1  # blue mean 64 -> 0.502 -> level 1
    assert codec.encode(img).tolist() == [1 * 9 + 0 * 3 + 1]


@pytest.mark.parametrize(
    "shape,image_size,patch,levels",
    [
        ((16, 16), 16, 4, 4),
        ((7, 13), 8, 2, 5),
        ((40, 24), 12, 3, 2),
        ((5, 5), 10, 5, 6),
        ((32, 32), 16, 1, 3),
    ],
)
def test_encode_matches_brute_force(shape, image_size, patch, levels):
    rng = np.random.default_rng(sum(shape) + levels)
    codec = PixelPatchCodec(image_size, patch, levels)
    for _ in range(3):
        img = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
        assert np.array_equal(codec.encode(img), reference_encode(img, image_size, patch, levels))


@pytest.mark.parametrize("image_size,patch,levels", [(16, 2, 4), (8, 8, 7), (12, 3, 256)])
def test_round_trip_exact_on_patch_constant_quantised_images(image_size, patch, levels):
    codec = PixelPatchCodec(image_size, patch, levels)
    rng = np.random.default_rng(levels)
    codes = rng.integers(0, codec.vocab_size, size=codec.tokens_per_image)
    img = codec.decode(codes)
    assert img.shape == (image_size, image_size, 3) and img.dtype == np.uint8
    # Patch-constant: every pixel equals its patch's top-left pixel.
    assert np.array_equal(img, np.repeat(np.repeat(img[::patch, ::patch], patch, 0), patch, 1))
    assert np.array_equal(codec.encode(img), codes)
    assert np.array_equal(codec.decode(codec.encode(img)), img)


def test_level_values_span_0_to_255():
    assert PixelPatchCodec(4, 2, 2).level_values.tolist() == [0, 255]
    assert PixelPatchCodec(4, 2, 4).level_values.tolist() == [0, 85, 170, 255]
    assert PixelPatchCodec(4, 2, 256).level_values.tolist() == list(range(256))


def test_resize_nearest():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    assert np.array_equal(resize_nearest(img, 4, 6), np.repeat(np.repeat(img, 2, 0), 2, 1))
    assert np.array_equal(resize_nearest(np.arange(10)[:, None], 5, 1)[:, 0], [0, 2, 4, 6, 8])


def test_config_and_registry():
    codec = PixelPatchCodec(16, 4, 5)
    cfg = codec.config()
    assert cfg == {"name": "pixel", "image_size": 16, "patch_size": 4, "levels": 5}
    params = {k: v for k, v in cfg.items() if k != "name"}
    again = build_codec(cfg["name"], **params)
    assert again.config() == cfg
    with pytest.raises(DataError, match="known codecs: pixel, vq, vqgan"):
        build_codec("vqvae", image_size=16)
    with pytest.raises(DataError, match="image_size, patch_size, levels"):
        build_codec("pixel", image_size=16, patch=4, levels=5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"image_size": 10, "patch_size": 4, "levels": 4}, "multiple of patch_size"),
        ({"image_size": 8, "patch_size": 4, "levels": 1}, "levels must be in 2..256"),
        ({"image_size": 8, "patch_size": 4, "levels": 257}, "levels must be in 2..256"),
        ({"image_size": 8.0, "patch_size": 4, "levels": 4}, "image_size must be an integer"),
    ],
)
def test_bad_codec_parameters(kwargs, match):
    with pytest.raises(DataError, match=match):
        PixelPatchCodec(**kwargs)


@pytest.mark.parametrize(
    "pixels,match",
    [
        (np.zeros((8, 8, 3), dtype=np.float32), "dtype float32"),
        (np.zeros((8, 8), dtype=np.uint8), r"shape \(8, 8\)"),
        (np.zeros((8, 8, 4), dtype=np.uint8), r"shape \(8, 8, 4\)"),
        (np.zeros((0, 8, 3), dtype=np.uint8), r"shape \(0, 8, 3\)"),
        ([[[0, 0, 0]]], "numpy array"),
    ],
)
def test_bad_images_name_the_source(pixels, match):
    codec = PixelPatchCodec(8, 4, 4)
    with pytest.raises(DataError, match=match) as err:
        codec.encode(pixels, source="cats/0001.png")
    assert "cats/0001.png" in str(err.value)


def test_bad_codes():
    codec = PixelPatchCodec(8, 4, 4)
    with pytest.raises(DataError, match="codes must be in"):
        codec.decode(np.array([0, 1, 2, 64]))
    with pytest.raises(DataError, match="needs 4 integer codes"):
        codec.decode(np.array([0, 1, 2]))
