"""Checks and resizing shared by the image codecs (discrete and latent)."""

from __future__ import annotations

import numpy as np

from megafusion.core.errors import DataError


def _where(source: str) -> str:
    return f"{source}: " if source else ""


def check_rgb_image(pixels, source: str = "") -> np.ndarray:
    """Return ``pixels`` if it is a uint8 ``[H, W, 3]`` array with H, W >= 1, else DataError."""
    if not isinstance(pixels, np.ndarray):
        raise DataError(
            f"{_where(source)}image must be a numpy array, got {type(pixels).__name__}; "
            "load images as uint8 [H, W, 3] RGB arrays"
        )
    if pixels.dtype != np.uint8:
        raise DataError(
            f"{_where(source)}image has dtype {pixels.dtype}, expected uint8; "
            "convert it (e.g. PIL .convert('RGB') then np.asarray) before encoding"
        )
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.shape[0] < 1 or pixels.shape[1] < 1:
        raise DataError(
            f"{_where(source)}image has shape {tuple(pixels.shape)}, expected [H, W, 3] RGB "
            "with H, W >= 1; convert grey / RGBA images to RGB first"
        )
    return pixels


def check_codes(codes, codec) -> np.ndarray:
    """``codes`` as an array if it is one image's worth of integer codes in ``codec``'s range, else DataError."""
    codes = np.asarray(codes)
    if codes.shape != (codec.tokens_per_image,) or not np.issubdtype(codes.dtype, np.integer):
        raise DataError(
            f"{codec.name} codec: decode needs {codec.tokens_per_image} integer codes, got "
            f"{codes.dtype} array of shape {tuple(codes.shape)}"
        )
    if codes.size and (codes.min() < 0 or codes.max() >= codec.vocab_size):
        raise DataError(
            f"{codec.name} codec: codes must be in [0, {codec.vocab_size}), got min {codes.min()} max {codes.max()}"
        )
    return codes


def resize_nearest(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-index resize of an ``[H, W, ...]`` array: output row i reads input row ``i*H//height``.

    For an integer upscale by k this is plain pixel repetition (row i reads ``i // k``).
    """
    rows = (np.arange(height) * pixels.shape[0]) // height
    cols = (np.arange(width) * pixels.shape[1]) // width
    return pixels[rows][:, cols]


def check_sizes(image_size, patch_size, where: str) -> None:
    """DataError naming ``where`` unless both are integers and ``patch_size`` divides ``image_size``."""
    for key, value in (("image_size", image_size), ("patch_size", patch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise DataError(f"{where}: {key} must be an integer, got {value!r}")
    if image_size < 1 or patch_size < 1 or image_size % patch_size:
        raise DataError(
            f"{where}: image_size ({image_size}) must be a positive multiple of patch_size "
            f"({patch_size}); pick e.g. image_size={max(patch_size, 1) * 8}"
        )
