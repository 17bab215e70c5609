"""Image codecs: discrete image tokens for early fusion, and the codec registry.

``PixelPatchCodec`` ("pixel") needs no training and no weights: the image is resized to
``image_size`` (nearest index), each ``patch_size`` square becomes its mean colour, each channel
is quantised to ``levels`` evenly spaced values in 0..255 and the code is
``r * L * L + g * L + b``. Codes are in raster order (row by row, left to right). It is lossy
but exactly invertible on images that are already patch-constant with quantised colours, which
is what makes it a good, checkable codec for the built-in data sets.

``build_codec(name, **params)`` makes a codec by name from a config. The learned codecs
("vq", "vqgan") live in ``megafusion.data.vq_codec`` and add themselves to ``CODECS`` when it is
imported (at the bottom of this module).
"""

from __future__ import annotations

import inspect

import numpy as np

from megafusion.data.types import DataError, ImageCodec


def _where(source: str) -> str:
    return f"{source}: " if source else ""


def check_rgb_image(pixels, source: str = "") -> np.ndarray:
    """Return ``pixels`` if it is a uint8 ``[H, W, 3]`` array with H, W >= 1, else DataError."""
    if not isinstance(pixels, np.ndarray):
        raise DataError(f"{_where(source)}image must be a numpy array, got {type(pixels).__name__}; "
                        "load images as uint8 [H, W, 3] RGB arrays")
    if pixels.dtype != np.uint8:
        raise DataError(f"{_where(source)}image has dtype {pixels.dtype}, expected uint8; "
                        "convert it (e.g. PIL .convert('RGB') then np.asarray) before encoding")
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.shape[0] < 1 or pixels.shape[1] < 1:
        raise DataError(f"{_where(source)}image has shape {tuple(pixels.shape)}, expected [H, W, 3] RGB "
                        "with H, W >= 1; convert grey / RGBA images to RGB first")
    return pixels


def check_codes(codes, codec) -> np.ndarray:
    """``codes`` as an array if it is one image's worth of integer codes in ``codec``'s range, else DataError."""
    codes = np.asarray(codes)
    if codes.shape != (codec.tokens_per_image,) or not np.issubdtype(codes.dtype, np.integer):
        raise DataError(f"{codec.name} codec: decode needs {codec.tokens_per_image} integer codes, got "
                        f"{codes.dtype} array of shape {tuple(codes.shape)}")
    if codes.size and (codes.min() < 0 or codes.max() >= codec.vocab_size):
        raise DataError(f"{codec.name} codec: codes must be in [0, {codec.vocab_size}), got "
                        f"min {codes.min()} max {codes.max()}")
    return codes


def resize_nearest(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-index resize of an ``[H, W, ...]`` array: output row i reads input row ``i*H//height``.

    For an integer upscale by k this is plain pixel repetition (row i reads ``i // k``).
    """
    rows = (np.arange(height) * pixels.shape[0]) // height
    cols = (np.arange(width) * pixels.shape[1]) // width
    return pixels[rows][:, cols]


class PixelPatchCodec:
    """Mean colour per patch, quantised per channel to ``levels`` levels (see module docstring)."""

    name = "pixel"

    def __init__(self, image_size: int, patch_size: int, levels: int):
        for key, value in (("image_size", image_size), ("patch_size", patch_size), ("levels", levels)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise DataError(f"pixel codec: {key} must be an integer, got {value!r}")
        if image_size < 1 or patch_size < 1 or image_size % patch_size:
            raise DataError(f"pixel codec: image_size ({image_size}) must be a positive multiple of "
                            f"patch_size ({patch_size}); pick e.g. image_size={max(patch_size, 1) * 8}")
        # 2 levels is the least that carries information; above 256 levels the 8-bit values
        # repeat and codes would stop being unique.
        if not 2 <= levels <= 256:
            raise DataError(f"pixel codec: levels must be in 2..256, got {levels}")
        self.image_size = int(image_size)
        self.patch_size = int(patch_size)
        self.levels = int(levels)
        self.grid = self.image_size // self.patch_size
        self.vocab_size = self.levels ** 3
        self.tokens_per_image = self.grid * self.grid
        # The 8-bit value of each level: level k <-> round(k * 255 / (L - 1)).
        self.level_values = np.floor(np.arange(self.levels) * 255.0 / (self.levels - 1) + 0.5).astype(np.uint8)

    def quantise(self, values: np.ndarray) -> np.ndarray:
        """Float channel values in 0..255 -> nearest level index (halves round up)."""
        return np.clip(np.floor(values * (self.levels - 1) / 255.0 + 0.5), 0, self.levels - 1).astype(np.int64)

    def encode(self, pixels: np.ndarray, *, source: str = "") -> np.ndarray:
        check_rgb_image(pixels, source)
        img = resize_nearest(pixels, self.image_size, self.image_size).astype(np.float64)
        g, p = self.grid, self.patch_size
        # [g, p, g, p, 3] -> mean over the two in-patch axes -> [g, g, 3] in raster order.
        means = img.reshape(g, p, g, p, 3).mean(axis=(1, 3))
        q = self.quantise(means)
        L = self.levels
        codes = q[..., 0] * L * L + q[..., 1] * L + q[..., 2]
        return codes.reshape(-1).astype(np.int64)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        codes = check_codes(codes, self)
        L = self.levels
        q = np.stack([codes // (L * L), (codes // L) % L, codes % L], axis=-1)
        colours = self.level_values[q].reshape(self.grid, self.grid, 3)
        return np.repeat(np.repeat(colours, self.patch_size, axis=0), self.patch_size, axis=1)

    def config(self) -> dict:
        return {"name": self.name, "image_size": self.image_size, "patch_size": self.patch_size,
                "levels": self.levels}

    def __repr__(self) -> str:
        return f"PixelPatchCodec(image_size={self.image_size}, patch_size={self.patch_size}, levels={self.levels})"


CODECS = {"pixel": PixelPatchCodec}


def build_codec(name: str, **params) -> ImageCodec:
    """The codec called ``name`` built with ``params`` (e.g. the dict from ``codec.config()`` minus name)."""
    if name not in CODECS:
        raise DataError(f"unknown image codec {name!r}; known codecs: {', '.join(sorted(CODECS))}")
    try:
        return CODECS[name](**params)
    except TypeError as exc:
        # Wrong / missing parameter names: say which ones the codec takes.
        accepted = [p for p in inspect.signature(CODECS[name].__init__).parameters if p != "self"]
        raise DataError(f"image codec {name!r}: bad parameters {sorted(params)} ({exc}); "
                        f"it takes {', '.join(accepted)}") from None


# At the bottom: vq_codec imports this module's helpers, and registers "vq" / "vqgan" in CODECS.
# A plain `import` (not `from ... import`) also works when vq_codec is the module imported first.
import megafusion.data.vq_codec  # noqa: E402,F401
