"""The "pixel" image codec: discrete image tokens that need no training and no weights.

``PixelPatchCodec`` ("pixel"): the image is resized to
``image_size`` (nearest index), each ``patch_size`` square becomes its mean colour, each channel
is quantised to ``levels`` evenly spaced values in 0..255 and the code is
``r * L * L + g * L + b``. Codes are in raster order (row by row, left to right). It is lossy
but exactly invertible on images that are already patch-constant with quantised colours, which
is what makes it a good, checkable codec for the built-in data sets.
"""

from __future__ import annotations

import numpy as np

from megafusion.core.errors import DataError
from megafusion.data.codecs.images import check_codes, check_rgb_image, check_sizes, resize_nearest


class PixelPatchCodec:
    """Mean colour per patch, quantised per channel to ``levels`` levels (see module docstring)."""

    name = "pixel"

    def __init__(self, image_size: int, patch_size: int, levels: int):
        if isinstance(levels, bool) or not isinstance(levels, (int, np.integer)):
            raise DataError(f"pixel codec: levels must be an integer, got {levels!r}")
        check_sizes(image_size, patch_size, "pixel codec")
        # 2 levels is the least that carries information; above 256 levels the 8-bit values
        # repeat and codes would stop being unique.
        if not 2 <= levels <= 256:
            raise DataError(f"pixel codec: levels must be in 2..256, got {levels}")
        self.image_size = int(image_size)
        self.patch_size = int(patch_size)
        self.levels = int(levels)
        self.grid = self.image_size // self.patch_size
        self.vocab_size = self.levels**3
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
        return {"name": self.name, "image_size": self.image_size, "patch_size": self.patch_size, "levels": self.levels}

    def __repr__(self) -> str:
        return f"PixelPatchCodec(image_size={self.image_size}, patch_size={self.patch_size}, levels={self.levels})"
