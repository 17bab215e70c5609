"""Learned image codecs for the "Chameleon setting": images as discrete codes in the shared vocabulary.

- ``VQPatchCodec`` ("vq"): a patch vector-quantiser. The image is resized (nearest index) to
  ``image_size``, cut into ``patch_size`` squares in raster order, each flattened (row, column,
  channel) to ``p * p * 3`` floats in [0, 1]; its code is the nearest codebook row (squared L2,
  ties -> lowest index). The codebook is a ``.safetensors`` file (tensor ``codebook``
  ``[K, p*p*3]`` float32, metadata ``image_size`` / ``patch_size``) written by
  ``fit_vq_codebook`` (k-means over the patches of a set of images).
- ``builtin_vq_codebook``: the codebook fitted on the built-in images, fitted once and cached
  under ``data.cache_dir`` (like the built-in SentencePiece model).
- ``VQGANCodec`` ("vqgan"): a pretrained VQ autoencoder (``diffusers.VQModel``) from a local
  directory; codes are its quantiser's indices over the latent grid.

Both are named in ``megafusion.data.codecs.registry``. torch, diffusers, scikit-learn
and safetensors are imported on first use only.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable

import numpy as np

from megafusion.core.errors import DataError
from megafusion.data.codecs.diffusers_local import load_local_model
from megafusion.data.codecs.images import check_codes, check_rgb_image, check_sizes, resize_nearest

CODEBOOK_FORMAT = "megafusion.vq_codebook"
# Bump when fitting changes: cached built-in codebooks are keyed on it.
FIT_VERSION = 1
# Distinct patches k-means sees at most (a seeded sample beyond that), to bound its memory.
MAX_FIT_PATCHES = 200_000
# Elements of the [patches, K, p*p*3] difference block computed at once by encode.
_ENCODE_BLOCK = 1 << 22


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def image_patches(pixels: np.ndarray, image_size: int, patch_size: int, source: str = "") -> np.ndarray:
    """uint8 ``[grid * grid, p * p * 3]``: the patches of the resized image in raster order."""
    check_rgb_image(pixels, source)
    g, p = image_size // patch_size, patch_size
    img = resize_nearest(pixels, image_size, image_size)
    return img.reshape(g, p, g, p, 3).transpose(0, 2, 1, 3, 4).reshape(g * g, p * p * 3)


def _safetensors_bytes(codebook: np.ndarray, metadata: dict[str, str]) -> bytes:
    """The safetensors file, written by hand: the library orders metadata keys differently in
    every process, so its bytes (and the sha256 recorded with datasets) would not be stable."""
    data = np.ascontiguousarray(codebook, dtype="<f4").tobytes()
    header = {
        "__metadata__": dict(sorted(metadata.items())),
        "codebook": {"dtype": "F32", "shape": list(codebook.shape), "data_offsets": [0, len(data)]},
    }
    raw = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the format pads the header with spaces to 8-byte alignment
    return struct.pack("<Q", len(raw)) + raw + data


def save_vq_codebook(codebook: np.ndarray, image_size: int, patch_size: int, out_path: str) -> str:
    """Write ``codebook`` (``[K, patch_size**2 * 3]`` values in [0, 1]) atomically; return the path."""
    from megafusion.core.io import atomic_write

    check_sizes(image_size, patch_size, f"vq codebook {out_path}")
    codebook = np.asarray(codebook, dtype=np.float32)
    dim = patch_size * patch_size * 3
    if codebook.ndim != 2 or codebook.shape[1] != dim or codebook.shape[0] < 2:
        raise DataError(
            f"vq codebook {out_path}: expected a [K >= 2, {dim}] array for patch_size {patch_size}, "
            f"got shape {tuple(codebook.shape)}"
        )
    meta = {"format": CODEBOOK_FORMAT, "image_size": str(int(image_size)), "patch_size": str(int(patch_size))}
    atomic_write(out_path, _safetensors_bytes(codebook, meta))
    return str(out_path)


class VQPatchCodec:
    """Nearest codebook row per patch (see module docstring)."""

    name = "vq"

    def __init__(self, codebook: str, sha256: str | None = None):
        path = os.path.abspath(os.fspath(codebook))
        refit = (
            "re-fit it with `megafusion tokenizer fit-vq` (or set data.vq_codebook=null to fit one on "
            "the built-in images)"
        )
        if not os.path.isfile(path):
            raise DataError(f"vq codec: codebook file {path} not found; check data.vq_codebook, or {refit}")
        actual = _sha256_file(path)
        if sha256 is not None and actual != sha256:
            raise DataError(
                f"vq codec: codebook file {path} has sha256 {actual}, but the data / checkpoint was "
                f"made with {sha256}: the file changed since. Put the original file back, or {refit} "
                "and re-prepare the data (the codes of the old data mean nothing under a new codebook)"
            )
        from safetensors import safe_open

        try:
            with safe_open(path, framework="np") as handle:
                meta = handle.metadata() or {}
                table = handle.get_tensor("codebook")
            image_size, patch_size = int(meta["image_size"]), int(meta["patch_size"])
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types and KeyError
            raise DataError(
                f"vq codec: {path} is not a megafusion vq codebook ({type(exc).__name__}: {exc}); "
                f"the file is corrupt or of another kind: {refit}"
            ) from None
        check_sizes(image_size, patch_size, f"vq codec {path}")
        dim = patch_size * patch_size * 3
        if table.ndim != 2 or table.shape[1] != dim or table.shape[0] < 2 or not np.isfinite(table).all():
            raise DataError(
                f"vq codec: {path} holds a codebook of shape {tuple(table.shape)}, expected finite "
                f"[K >= 2, {dim}] for patch_size {patch_size}: {refit}"
            )
        self.path, self.sha256 = path, actual
        self.image_size, self.patch_size = image_size, patch_size
        self.grid = image_size // patch_size
        self.codebook = np.asarray(table, dtype=np.float32)
        self._table64 = self.codebook.astype(np.float64)
        self.vocab_size = int(table.shape[0])
        self.tokens_per_image = self.grid * self.grid

    def nearest(self, vectors: np.ndarray) -> np.ndarray:
        """Index of the nearest codebook row of each float64 row vector (ties -> lowest index).

        Plain differences rather than ``|x|^2 - 2 x.c + |c|^2``: the expansion cancels badly and
        turns exact ties (common on flat-colour patches) into rounding noise."""
        step = max(1, _ENCODE_BLOCK // self._table64.size)
        out = [
            ((vectors[i : i + step, None, :] - self._table64[None]) ** 2).sum(-1).argmin(-1)
            for i in range(0, len(vectors), step)
        ]
        return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)

    def encode(self, pixels: np.ndarray, *, source: str = "") -> np.ndarray:
        patches = image_patches(pixels, self.image_size, self.patch_size, source)
        return self.nearest(patches.astype(np.float64) / 255.0)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        codes = check_codes(codes, self)
        g, p = self.grid, self.patch_size
        values = np.clip(np.round(self.codebook[codes].astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
        return values.reshape(g, g, p, p, 3).transpose(0, 2, 1, 3, 4).reshape(g * p, g * p, 3)

    def config(self) -> dict:
        return {"name": self.name, "codebook": self.path, "sha256": self.sha256}

    def __repr__(self) -> str:
        return (
            f"VQPatchCodec(codebook={self.path!r}, K={self.vocab_size}, image_size={self.image_size}, "
            f"patch_size={self.patch_size})"
        )


def fit_vq_codebook(
    images: Iterable[np.ndarray],
    image_size: int,
    patch_size: int,
    codebook_size: int,
    seed: int,
    out_path: str,
    *,
    max_patches: int = MAX_FIT_PATCHES,
) -> VQPatchCodec:
    """k-means (scikit-learn, one init, ``random_state=seed``) over all patches of ``images``.

    Deterministic: the same images, sizes and seed give a byte-identical file. k-means runs on
    the distinct patches weighted by their counts (the same objective as on all patches, far
    fewer points) with one thread, because multi-threaded k-means sums in a timing-dependent order.
    """
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    check_sizes(image_size, patch_size, f"vq codebook fit for {out_path}")
    if isinstance(codebook_size, bool) or not isinstance(codebook_size, (int, np.integer)) or codebook_size < 2:
        raise DataError(f"vq codebook fit for {out_path}: codebook_size must be an integer >= 2, got {codebook_size!r}")
    parts = [image_patches(img, image_size, patch_size, f"vq codebook fit image {k}") for k, img in enumerate(images)]
    if not parts:
        raise DataError(f"vq codebook fit for {out_path}: no images to fit on; give shards or data sets with images")
    patches, counts = np.unique(np.concatenate(parts), axis=0, return_counts=True)
    if len(patches) < codebook_size:
        raise DataError(
            f"vq codebook fit for {out_path}: the {len(parts)} images hold only {len(patches)} distinct "
            f"{patch_size}x{patch_size} patches, fewer than the {codebook_size} codebook entries asked "
            f"for: set the codebook size (data.vq_codebook_size / --codebook-size) to at most "
            f"{len(patches)}, or fit on more varied images or a larger patch_size"
        )
    if len(patches) > max_patches:
        keep = np.sort(np.random.default_rng(seed).choice(len(patches), max_patches, replace=False))
        patches, counts = patches[keep], counts[keep]
    kmeans = KMeans(
        n_clusters=int(codebook_size), init="k-means++", n_init=1, random_state=int(seed), algorithm="lloyd"
    )
    with threadpool_limits(limits=1):
        kmeans.fit(patches.astype(np.float64) / 255.0, sample_weight=counts.astype(np.float64))
    save_vq_codebook(kmeans.cluster_centers_, image_size, patch_size, out_path)
    return VQPatchCodec(out_path)


def builtin_vq_codebook(
    cache_dir: str, images: list[np.ndarray], image_size: int, patch_size: int, codebook_size: int, seed: int
) -> VQPatchCodec:
    """The codebook fitted on ``images`` with these settings, fitted on first use into ``cache_dir``.

    Keyed on a hash of the images and settings; concurrent fits write the same bytes and rename
    them into place atomically, so any winner is correct.
    """
    digest = hashlib.sha256(f"v{FIT_VERSION}:{image_size}:{patch_size}:{codebook_size}:{seed}:{len(images)}\0".encode())
    for img in images:
        img = np.ascontiguousarray(img)
        digest.update(f"{img.shape}:{img.dtype}:".encode())  # shape prefix: equal bytes, other images
        digest.update(img.tobytes())
    path = os.path.join(cache_dir, f"vq-codebook-{digest.hexdigest()[:20]}.safetensors")
    if os.path.exists(path):
        return VQPatchCodec(path)
    return fit_vq_codebook(images, image_size, patch_size, codebook_size, seed, path)


class VQGANCodec:
    """A pretrained ``diffusers.VQModel`` from a local directory (never downloads)."""

    name = "vqgan"

    def __init__(self, path: str, image_size: int):
        import torch

        path, model = load_local_model(path, "VQModel", "vqgan codec", "data.vqgan_path")
        factor = 2 ** (len(model.config.block_out_channels) - 1)  # every encoder block but the last halves
        if (
            isinstance(image_size, bool)
            or not isinstance(image_size, (int, np.integer))
            or image_size < factor
            or image_size % factor
        ):
            raise DataError(
                f"vqgan codec: image_size={image_size!r} must be a positive multiple of {factor} (the "
                f"model in {path} downsamples by {factor}); set data.image_size accordingly"
            )
        self.torch = torch
        self.model = model
        self.path, self.image_size = path, int(image_size)
        self.vocab_size = int(model.config.num_vq_embeddings)
        # The latent grid, read off one encoded dummy image rather than re-deriving the conv arithmetic.
        grid = self._latents(np.zeros((self.image_size, self.image_size, 3), np.uint8)).shape[-2:]
        self.grid = int(grid[0])
        self.tokens_per_image = int(grid[0] * grid[1])
        self.latent_shape = (1, int(grid[0]), int(grid[1]), int(model.quantize.vq_embed_dim))

    def _latents(self, pixels: np.ndarray):
        """Pre-quantisation latents ``[1, D, h, w]`` of the resized image scaled to [-1, 1]."""
        img = resize_nearest(pixels, self.image_size, self.image_size).astype(np.float32) / 127.5 - 1.0
        x = self.torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None]
        with self.torch.no_grad():
            return self.model.encode(x).latents

    def encode(self, pixels: np.ndarray, *, source: str = "") -> np.ndarray:
        check_rgb_image(pixels, source)
        with self.torch.no_grad():
            _, _, (_, _, indices) = self.model.quantize(self._latents(pixels))
        # The quantiser flattens (batch, row, column): raster order.
        return indices.reshape(-1).cpu().numpy().astype(np.int64)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        codes = check_codes(codes, self)
        indices = self.torch.from_numpy(codes.astype(np.int64))
        with self.torch.no_grad():
            if self.model.config.lookup_from_codebook:  # decode then looks the indices up itself
                out = self.model.decode(indices, force_not_quantize=True, shape=self.latent_shape).sample
            else:
                z_q = self.model.quantize.get_codebook_entry(indices, self.latent_shape)
                out = self.model.decode(z_q, force_not_quantize=True).sample
        img = (out[0].permute(1, 2, 0).cpu().numpy().astype(np.float64) + 1.0) * 127.5
        return np.clip(np.round(img), 0, 255).astype(np.uint8)

    def config(self) -> dict:
        return {"name": self.name, "path": self.path, "image_size": self.image_size}

    def __repr__(self) -> str:
        return f"VQGANCodec(path={self.path!r}, image_size={self.image_size}, K={self.vocab_size})"
