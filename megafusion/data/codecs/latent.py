"""Continuous image codecs for the Transfusion objective: an image <-> a latent ``[C, h, w]``.

Where the discrete codecs of :mod:`megafusion.data.codecs.pixel` give the Chameleon setting its
image *tokens*, these give diffusion its *latents* (noise is added to the latent, then it is
cut into patches by :mod:`megafusion.layers.patchify`):

- ``PixelLatentCodec`` ("pixels"): the image itself, resized to ``image_size`` (nearest index)
  and scaled to [-1, 1] as ``[3, image_size, image_size]``: no weights, exactly invertible on
  images of that size; what the small built-in images use.
- ``KLLatentCodec`` ("kl"): a pretrained diffusers ``AutoencoderKL`` from a local directory
  (Transfusion: 8x downsampling, 8 channels). The latent is the posterior *mean* times the
  VAE's ``scaling_factor`` (deterministic, so prepared data and checkpoints agree); decode
  divides it back out.

``codec.config()`` is what datasets and checkpoints record and compare: for "kl" the VAE's
content (``weights_identity``), not its directory, so a moved or copied VAE still matches.
"""

from __future__ import annotations

import numpy as np

from megafusion.core.errors import DataError
from megafusion.data.codecs.diffusers_local import load_local_model, weights_identity
from megafusion.data.codecs.images import check_rgb_image, resize_nearest


def _to_unit(pixels: np.ndarray, image_size: int, source: str) -> np.ndarray:
    """uint8 ``[H, W, 3]`` -> float32 ``[3, S, S]`` in [-1, 1]."""
    check_rgb_image(pixels, source)
    img = resize_nearest(pixels, image_size, image_size).astype(np.float32) / 127.5 - 1.0
    return np.ascontiguousarray(img.transpose(2, 0, 1))


def _to_pixels(unit: np.ndarray) -> np.ndarray:
    """float ``[3, S, S]`` in [-1, 1] -> uint8 ``[S, S, 3]`` (values outside are clipped)."""
    img = np.clip(np.round((np.asarray(unit, dtype=np.float64) + 1.0) * 127.5), 0, 255)
    return img.astype(np.uint8).transpose(1, 2, 0)


def _check_latent(latent, codec) -> np.ndarray:
    latent = np.asarray(latent)
    if latent.shape != codec.latent_shape:
        raise DataError(
            f"{codec.name} latent codec: decode needs a latent of shape {codec.latent_shape}, got {latent.shape}"
        )
    return latent


class PixelLatentCodec:
    name = "pixels"

    def __init__(self, image_size: int):
        if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
            raise DataError(f"pixels latent codec: image_size must be a positive integer, got {image_size!r}")
        self.image_size = int(image_size)
        self.latent_shape = (3, self.image_size, self.image_size)

    def encode(self, pixels: np.ndarray, *, source: str = "") -> np.ndarray:
        return _to_unit(pixels, self.image_size, source)

    def decode(self, latent: np.ndarray) -> np.ndarray:
        return _to_pixels(_check_latent(latent, self))

    def config(self) -> dict:
        return {"name": self.name, "image_size": self.image_size}


class KLLatentCodec:
    name = "kl"

    def __init__(self, path: str, image_size: int):
        import torch

        self.torch = torch
        self.path, self.model = load_local_model(path, "AutoencoderKL", "kl latent codec", "objective.vae_path")
        self.weights = weights_identity(self.path, "objective.vae_path")
        self.image_size = int(image_size)
        self.scaling_factor = float(self.model.config.scaling_factor)
        # The latent shape, read off one encoded blank image rather than re-deriving the convolutions.
        self.latent_shape = tuple(self.encode(np.zeros((self.image_size, self.image_size, 3), np.uint8)).shape)

    def encode(self, pixels: np.ndarray, *, source: str = "") -> np.ndarray:
        x = self.torch.from_numpy(_to_unit(pixels, self.image_size, source))[None]
        with self.torch.no_grad():
            latent = self.model.encode(x).latent_dist.mean * self.scaling_factor
        return latent[0].float().numpy()

    def decode(self, latent: np.ndarray) -> np.ndarray:
        z = self.torch.from_numpy(np.ascontiguousarray(_check_latent(latent, self), dtype=np.float32))[None]
        with self.torch.no_grad():
            image = self.model.decode(z / self.scaling_factor).sample
        return _to_pixels(image[0].numpy())

    def config(self) -> dict:
        return {"name": self.name, "weights": self.weights, "image_size": self.image_size}
