"""``objective.name`` -> :class:`~megafusion.objectives.spec.Objective`.

Built-in objectives are named here as modules (imported on first use); each defines
``OBJECTIVE``. ``register_objective`` adds one at run time (a plugin: ``MEGAFUSION_PLUGINS``).
"""

from __future__ import annotations

import importlib

from megafusion.core import choices
from megafusion.core.errors import ConfigError
from megafusion.core.plugins import load_plugins

_BUILTIN = {
    "lm": "megafusion.objectives.lm",
    "transfusion": "megafusion.objectives.transfusion",
}
assert tuple(_BUILTIN) == choices.OBJECTIVES
_REGISTERED: dict = {}


def register_objective(objective) -> None:
    """Make ``objective`` (an Objective) trainable as ``objective.name=<objective.name>``."""
    if objective.name in _BUILTIN:
        raise ValueError(f"objective {objective.name!r} is built in; give yours another name")
    _REGISTERED[objective.name] = objective


def objective_names() -> tuple[str, ...]:
    load_plugins()
    return (*_BUILTIN, *(n for n in _REGISTERED if n not in _BUILTIN))


def get_objective(name: str):
    load_plugins()
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in _BUILTIN:
        raise ConfigError(f"objective.name={name!r} is unknown: choose one of {', '.join(objective_names())} "
                          f"(or register yours: megafusion.objectives.registry.register_objective)")
    return importlib.import_module(_BUILTIN[name]).OBJECTIVE
