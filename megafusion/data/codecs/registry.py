"""Every image codec by name: discrete codes for the LM objective (``data.image_codec``) and
continuous latents for Transfusion (``objective.latent_codec``).

Entries are ``"module:class"`` strings, imported when built, so naming a codec costs no import
of torch, diffusers or scikit-learn. A new codec is one module plus one line here (and its name
in ``megafusion.core.choices``, which config validation reads).
"""

from __future__ import annotations

import importlib
import inspect

from megafusion.core import choices
from megafusion.core.errors import DataError
from megafusion.data.types import ImageCodec

IMAGE_CODECS = {
    "pixel": "megafusion.data.codecs.pixel:PixelPatchCodec",
    "vq": "megafusion.data.codecs.vq:VQPatchCodec",
    "vqgan": "megafusion.data.codecs.vq:VQGANCodec",
}
LATENT_CODECS = {
    "pixels": "megafusion.data.codecs.latent:PixelLatentCodec",
    "kl": "megafusion.data.codecs.latent:KLLatentCodec",
}
assert tuple(IMAGE_CODECS) == choices.IMAGE_CODECS and tuple(LATENT_CODECS) == choices.LATENT_CODECS


def _resolve(entry: str) -> type:
    module, name = entry.split(":")
    return getattr(importlib.import_module(module), name)


def _build(kind: str, table: dict[str, str], name: str, params: dict):
    if name not in table:
        raise DataError(f"unknown {kind} {name!r}; known codecs: {', '.join(sorted(table))}")
    cls = _resolve(table[name])
    try:
        return cls(**params)
    except TypeError as exc:
        # Wrong / missing parameter names: say which ones the codec takes.
        accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        raise DataError(
            f"{kind} {name!r}: bad parameters {sorted(params)} ({exc}); it takes {', '.join(accepted)}"
        ) from None


def build_codec(name: str, **params) -> ImageCodec:
    """The image codec called ``name`` built with ``params`` (e.g. ``codec.config()`` minus name)."""
    return _build("image codec", IMAGE_CODECS, name, params)


def build_latent_codec(name: str, **params):
    """The latent codec called ``name`` (Transfusion) built with ``params``."""
    return _build("latent image codec", LATENT_CODECS, name, params)
