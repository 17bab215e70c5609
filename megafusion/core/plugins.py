"""Modules named in ``MEGAFUSION_PLUGINS`` (comma-separated), imported once before a registry
is read, so that a model family or an objective registered outside this package (a research
fork, a test) is known to every process of a run: torchrun's workers inherit the variable, and
so do the tools that later read the run's checkpoints. This is torchtitan's
``--experimental.custom_import`` as an environment variable."""

from __future__ import annotations

import importlib
import os

from megafusion.core.errors import ConfigError

ENV = "MEGAFUSION_PLUGINS"
_loaded: set[str] = set()
_done = ""  # the value of the variable whose modules are all imported (registries ask often)


def load_plugins() -> None:
    global _done
    value = os.environ.get(ENV, "")
    if value == _done:
        return
    for name in filter(None, (n.strip() for n in value.split(","))):
        if name in _loaded:
            continue
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ConfigError(
                f"{ENV}={os.environ[ENV]!r}: cannot import {name!r} ({err}): put it on PYTHONPATH "
                f"or remove it from {ENV}"
            ) from err
        _loaded.add(name)
    _done = value
