"""Load a pretrained diffusers model from a local directory only (image tokenizers and VAEs).

Runs never download: a model is whatever ``save_pretrained`` wrote into a directory the user
names. Every failure is a ``DataError`` naming the directory, what was found and what is
expected, instead of a hub traceback. ``weights_identity`` names a saved model by its content,
not its directory, so data prepared with a VAE in one place is usable with a copy elsewhere.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

from megafusion.core.errors import DataError


def load_local_model(path, class_name: str, what: str, setting: str):
    """The diffusers ``class_name`` model saved in ``path``, frozen and in eval mode.

    ``what`` names the user of the model in messages (e.g. ``vqgan codec``) and ``setting`` the
    config key or flag that gives the path.
    """
    path = os.path.abspath(os.fspath(path))
    expected = (
        f"a local directory holding a diffusers {class_name} (config.json + weights, as written by "
        f"{class_name}.save_pretrained); set {setting} to it"
    )
    if not os.path.isdir(path):
        raise DataError(f"{what}: {path} is not a directory; expected {expected}")
    try:
        found = json.loads(Path(path, "config.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as exc:
        raise DataError(f"{what}: {path}/config.json cannot be read ({exc}); expected {expected}") from None
    if found != class_name:
        raise DataError(
            f"{what}: {path} holds a {found or 'model of unknown class'}, not a {class_name}; expected {expected}"
        )
    import diffusers

    try:
        model = getattr(diffusers, class_name).from_pretrained(path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - diffusers / hub raise many kinds for a broken directory
        raise DataError(
            f"{what}: cannot load the {class_name} in {path} ({type(exc).__name__}: {exc}); expected {expected}"
        ) from None
    return path, model.eval().requires_grad_(False)


WEIGHT_SUFFIXES = (".safetensors", ".bin")


def weights_identity(path, setting: str) -> str:
    """``blake2b:<hex>`` of a saved model's content: its weight files (name and bytes, in name
    order) and its config without diffusers' bookkeeping keys (``_class_name``, ``_diffusers_version``,
    ...). A copy of the directory has the same identity; other weights or settings do not.
    ``setting`` (config key or flag giving ``path``) is named when the directory is not a model."""
    path = os.path.abspath(os.fspath(path))
    names = sorted(n for n in os.listdir(path) if n.endswith(WEIGHT_SUFFIXES)) if os.path.isdir(path) else []
    if not names:
        raise DataError(
            f"{setting}={path} holds no saved weights (*.safetensors / *.bin); set it to the directory "
            f"the model's save_pretrained wrote"
        )
    try:
        config = json.loads(Path(path, "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{setting}={path}: config.json cannot be read ({exc})") from None
    settings = json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, sort_keys=True)
    # Hashed once per process and file state (a run checks the data, then loads the codec).
    stamps = tuple(
        (n, os.stat(os.path.join(path, n)).st_size, os.stat(os.path.join(path, n)).st_mtime_ns) for n in names
    )
    return _hash_weights(path, settings, stamps)


@functools.lru_cache(maxsize=8)
def _hash_weights(path: str, settings: str, stamps: tuple) -> str:
    h = hashlib.blake2b(settings.encode(), digest_size=16)
    for name, _, _ in stamps:
        h.update(name.encode() + b"\0")
        with open(os.path.join(path, name), "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return "blake2b:" + h.hexdigest()
