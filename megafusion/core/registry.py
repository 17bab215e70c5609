"""Name -> object tables that config values select from (model families, objectives).

Built-in entries are named as modules, imported on first use (their ``attribute``), so that
listing the names (config validation, ``--dry-run``) imports neither torch nor megatron-core;
``register`` adds an object at run time (a plugin, see ``MEGAFUSION_PLUGINS``), which is then
used exactly like a built-in one.
"""

from __future__ import annotations

import importlib

from megafusion.core.errors import ConfigError
from megafusion.core.plugins import load_plugins


class Registry:
    def __init__(self, key: str, builtin: dict[str, str], attribute: str, register_hint: str):
        self.key, self.builtin, self.attribute, self.register_hint = key, dict(builtin), attribute, register_hint
        self._registered: dict = {}

    def register(self, obj) -> None:
        """Make ``obj`` (with a ``name``) selectable as ``<key>=<obj.name>``."""
        if obj.name in self.builtin:
            raise ValueError(f"{self.key}={obj.name!r} is built in; give yours another name")
        self._registered[obj.name] = obj

    def names(self) -> tuple[str, ...]:
        load_plugins()
        return (*self.builtin, *(n for n in self._registered if n not in self.builtin))

    def get(self, name: str):
        load_plugins()
        if name in self._registered:
            return self._registered[name]
        if name not in self.builtin:
            raise ConfigError(
                f"{self.key}={name!r} is unknown: choose one of {', '.join(self.names())} "
                f"(or register yours: {self.register_hint})"
            )
        return getattr(importlib.import_module(self.builtin[name]), self.attribute)
