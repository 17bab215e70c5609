"""The image latents of a Transfusion indexed dataset: ``PREFIX.latents.npy`` beside ``PREFIX.bin``.

A Transfusion dataset (``megafusion data prepare --latent-codec ...``) stores its token stream
(placeholders for image patches, see :mod:`megafusion.data.transfusion_data`) in the indexed
files of :mod:`megafusion.data.formats.indexed`, and the latent of every image in one float32 ``.npy``
array ``[images, C, h, w]`` in document, then image order: document ``d``'s images are the next
``k`` latents, ``k`` = its number of image-token runs.

- ``LatentWriter``: the ``sidecar`` of ``write_indexed``. It streams latents to a temporary raw
  file (a dataset's latents need not fit in memory), turns it into the ``.npy`` when the
  documents are done, and returns the meta entry ``"latents"``: latent codec config, patch
  size, shape, dtype, count, byte size and blake2b checksum. The ``.npy`` is renamed into place
  before the new meta is written, so a dataset with a meta has its whole latent file.
- ``read_latents``: the array, after checking the file against that meta entry (missing,
  truncated, corrupt or swapped files are a ``DataError`` naming the file and the fix).
- ``attach_latents``: puts each document's latents in ``TokenizedDocument.meta["latents"]``,
  where ``encode_transfusion_document`` puts them on the built-in path (with ``read_latents``:
  the in-memory reading of tools and tests; training memory-maps the file,
  :mod:`megafusion.data.formats.indexed_reader`).
"""

from __future__ import annotations

import os
import shutil
import uuid

import numpy as np

from megafusion.core.errors import DataError
from megafusion.core.io import file_digest
from megafusion.core.modality import Modality
from megafusion.data.formats.indexed import _rerun_hint
from megafusion.data.types import TokenizedDocument

META_KEY = "latents"  # the key of the dataset meta that marks (and describes) a Transfusion dataset
LATENT_DTYPE = np.dtype("<f4")  # what encode_transfusion_document produces, little-endian on disk
LATENT_OPTIONS = "--latent-codec ..."  # what `data prepare` is given to write a latents file
_NEED = ("codec", "patch_size", "shape", "dtype", "count", "bytes", "blake2b")


def latents_path(prefix: str) -> str:
    return prefix + ".latents.npy"


class LatentWriter:
    """Streams the latents of a dataset being written (``write_indexed``'s ``sidecar``).

    ``codec`` is the :class:`~megafusion.data.transfusion_data.PlaceholderCodec` the documents
    are encoded with: its latent codec and patch size go into the meta.
    """

    def __init__(self, prefix: str, codec):
        self.path = latents_path(prefix)
        self.paths = [self.path]
        self.codec = codec
        self.shape = tuple(int(x) for x in codec.latent_codec.latent_shape)
        self.count = 0
        tag = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._tmp_raw, self._tmp_npy = self.path + tag + ".raw", self.path + tag
        self._raw = None  # opened on the first add: a write that fails early leaves no file behind

    def add(self, latents: np.ndarray, source: str = "") -> None:
        """Append one document's latents ``[images, C, h, w]`` (images in document order)."""
        latents = np.asarray(latents)
        if latents.ndim != 4 or tuple(latents.shape[1:]) != self.shape:
            raise DataError(
                f"{source or 'document'}: latents of shape {latents.shape}, but the latent codec "
                f"gives [images, {', '.join(map(str, self.shape))}] (a codec bug)"
            )
        if self._raw is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._raw = open(self._tmp_raw, "wb")
        self._raw.write(np.ascontiguousarray(latents, dtype=LATENT_DTYPE).tobytes())
        self.count += int(latents.shape[0])

    def finish(self) -> dict:
        """Write the ``.npy`` (header + the streamed bytes) under its temporary name; the meta entry."""
        if self._raw is not None:
            self._raw.close()
        header = {
            "descr": np.lib.format.dtype_to_descr(LATENT_DTYPE),
            "fortran_order": False,
            "shape": (self.count, *self.shape),
        }
        with open(self._tmp_npy, "wb") as out:
            np.lib.format.write_array_header_1_0(out, header)
            if self._raw is not None:
                with open(self._tmp_raw, "rb") as raw:
                    shutil.copyfileobj(raw, out, 1 << 22)
            out.flush()
            os.fsync(out.fileno())
        if os.path.exists(self._tmp_raw):
            os.remove(self._tmp_raw)
        return {
            META_KEY: {
                "file": os.path.basename(self.path),
                "codec": self.codec.latent_codec.config(),
                "patch_size": int(self.codec.patch_size),
                "shape": list(self.shape),
                "dtype": LATENT_DTYPE.name,
                "count": self.count,
                "bytes": os.path.getsize(self._tmp_npy),
                "blake2b": file_digest(self._tmp_npy),
            }
        }

    def commit(self) -> None:
        os.replace(self._tmp_npy, self.path)

    def abort(self) -> None:
        if self._raw is not None:
            self._raw.close()
        for path in (self._tmp_raw, self._tmp_npy):
            if os.path.exists(path):
                os.remove(path)


def latent_info(prefix: str, meta: dict) -> dict:
    """The meta's ``"latents"`` entry, checked for completeness (DataError naming the meta)."""
    where = prefix + ".meta.json"
    info = meta.get(META_KEY)
    if not isinstance(info, dict):
        raise DataError(
            f"{where}: the dataset has no image latents (it was prepared for objective.name=lm, "
            f"with image codes), so objective.name=transfusion cannot read it: {_rerun_hint(prefix, LATENT_OPTIONS)}, "
            "or train on it with objective.name=lm"
        )
    missing = [k for k in _NEED if k not in info]
    if missing:
        raise DataError(
            f"{where}: the 'latents' entry lacks {missing}; the file is corrupt, {_rerun_hint(prefix, LATENT_OPTIONS)}"
        )
    return info


def check_latent_file(prefix: str, meta: dict, checksum: bool = True) -> dict:
    """The latent file against the meta's entry: present, of the recorded size and (with
    ``checksum``) blake2b; returns the entry. Every mismatch is a DataError naming the file."""
    info = latent_info(prefix, meta)
    path, where = latents_path(prefix), prefix + ".meta.json"
    if not os.path.exists(path):
        raise DataError(
            f"{path} is missing (a Transfusion dataset at {prefix} needs .bin, .idx, .latents.npy "
            f"and .meta.json); {_rerun_hint(prefix, LATENT_OPTIONS)}"
        )
    size = os.path.getsize(path)
    if size != info["bytes"]:
        raise DataError(
            f"{path} is {size} bytes but {where} says {info['bytes']}: the file is truncated or was "
            f"replaced after the meta was written; {_rerun_hint(prefix, LATENT_OPTIONS)}"
        )
    if checksum and file_digest(path) != info["blake2b"]:
        raise DataError(
            f"{path}: contents do not match the checksum in {where}: the file is corrupt or was "
            f"replaced after the meta was written; {_rerun_hint(prefix, LATENT_OPTIONS)}"
        )
    return info


def read_latents(prefix: str, meta: dict) -> np.ndarray:
    """All latents ``[count, C, h, w]`` (float32, in memory), checked against the meta first."""
    info = check_latent_file(prefix, meta)
    path, where = latents_path(prefix), prefix + ".meta.json"
    try:
        latents = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable .npy array ({err}); {_rerun_hint(prefix, LATENT_OPTIONS)}") from None
    want = (int(info["count"]), *(int(x) for x in info["shape"]))
    if latents.shape != want or latents.dtype != np.dtype(info["dtype"]):
        raise DataError(
            f"{path}: holds {latents.dtype} {latents.shape}, but {where} says {info['dtype']} {want}; "
            f"{_rerun_hint(prefix, LATENT_OPTIONS)}"
        )
    return latents.astype(np.float32, copy=False)


def _images_in(doc: TokenizedDocument) -> int:
    """Images of a document = runs of image tokens (each image is ``<boi>``, its patches, ``<eoi>``)."""
    image = np.asarray(doc.modalities) == Modality.IMAGE
    return int(np.count_nonzero(image[1:] & ~image[:-1]) + (1 if image.size and image[0] else 0))


def attach_latents(docs: list[TokenizedDocument], latents: np.ndarray, prefix: str) -> None:
    """Give every document its slice of ``latents`` (``doc.meta["latents"]``), in order."""
    counts = [_images_in(doc) for doc in docs]
    if sum(counts) != latents.shape[0]:
        raise DataError(
            f"{latents_path(prefix)}: {latents.shape[0]} latents, but the documents of {prefix}.bin "
            f"hold {sum(counts)} images; the files do not belong together, {_rerun_hint(prefix, LATENT_OPTIONS)}"
        )
    start = 0
    for doc, k in zip(docs, counts):
        doc.meta["latents"] = latents[start : start + k]
        start += k


__all__ = [
    "LatentWriter",
    "latents_path",
    "latent_info",
    "check_latent_file",
    "read_latents",
    "attach_latents",
    "META_KEY",
]
