"""Name -> object tables that config values select from (model families, objectives).

Built-in entries are named as modules, imported on first use (their ``attribute``), so that
listing the names (config validation, ``--dry-run``) imports neither torch nor megatron-core;
``register`` adds an object at run time (a plugin, see ``MEGAFUSION_PLUGINS``), which is then
used exactly like a built-in one. ``options(name)`` gives an entry's config keys and checks
(:mod:`megafusion.core.options`) from a torch-free companion module.
"""

from __future__ import annotations

import importlib

from megafusion.core.errors import ConfigError
from megafusion.core.options import NO_OPTIONS, Options
from megafusion.core.plugins import load_plugins


class Registry:
    def __init__(
        self,
        key: str,
        builtin: dict[str, str],
        attribute: str,
        register_hint: str,
        options: dict[str, str] | None = None,
    ):
        self.key, self.builtin, self.attribute, self.register_hint = key, dict(builtin), attribute, register_hint
        self.option_modules = dict(options or {})  # name -> torch-free module defining OPTIONS
        self._registered: dict = {}
        self._builtin_objects: dict = {}
        self._builtin_options: dict = {}

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
        if name not in self._builtin_objects:  # imported once (the planner asks thousands of times)
            self._builtin_objects[name] = getattr(importlib.import_module(self.builtin[name]), self.attribute)
        return self._builtin_objects[name]

    def options(self, name: str) -> Options:
        """The config keys and checks of entry ``name`` (:class:`~megafusion.core.options.Options`),
        without importing torch for a built-in one; an unknown name has none."""
        load_plugins()
        if name in self._registered:
            return getattr(self._registered[name], "options", NO_OPTIONS)
        if name in self.option_modules:
            if name not in self._builtin_options:
                self._builtin_options[name] = importlib.import_module(self.option_modules[name]).OPTIONS
            return self._builtin_options[name]
        return NO_OPTIONS
