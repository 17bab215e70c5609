"""``model.arch`` name -> :class:`~megafusion.models.spec.ModelFamily`.

Built-in families are named here as modules, imported on first use, so that listing the names
(config validation, ``--dry-run``) imports neither torch nor megatron-core. Each module defines
``FAMILY``. ``register_family`` adds one at run time (a plugin: see ``MEGAFUSION_PLUGINS``).
"""

from __future__ import annotations

import importlib

from megafusion.core import choices
from megafusion.core.errors import ConfigError
from megafusion.core.plugins import load_plugins

_BUILTIN = {
    "dense": "megafusion.models.dense",
    "mot": "megafusion.models.mot",
}
assert tuple(_BUILTIN) == choices.MODEL_ARCHS
_REGISTERED: dict = {}  # name -> ModelFamily added by register_family


def register_family(family) -> None:
    """Make ``family`` (a ModelFamily) buildable as ``model.arch=<family.name>``."""
    if family.name in _BUILTIN:
        raise ValueError(f"model family {family.name!r} is built in; give yours another name")
    _REGISTERED[family.name] = family


def family_names() -> tuple[str, ...]:
    load_plugins()
    return (*_BUILTIN, *(n for n in _REGISTERED if n not in _BUILTIN))


def get_family(name: str):
    """The ModelFamily of ``model.arch=name``."""
    load_plugins()
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in _BUILTIN:
        raise ConfigError(f"model.arch={name!r} is unknown: choose one of {', '.join(family_names())} "
                          f"(or register yours: megafusion.models.registry.register_family)")
    return importlib.import_module(_BUILTIN[name]).FAMILY
