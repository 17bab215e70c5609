"""``objective.name`` -> :class:`~megafusion.objectives.spec.Objective`.

A built-in objective is a module defining ``OBJECTIVE``, named here (and in
``megafusion.core.choices.OBJECTIVES``, which config validation reads); ``register_objective``
adds one at run time (a plugin: ``MEGAFUSION_PLUGINS``).
"""

from __future__ import annotations

from megafusion.core import choices
from megafusion.core.registry import Registry

OBJECTIVES = Registry(
    key="objective.name",
    builtin={
        "lm": "megafusion.objectives.lm",
        "transfusion": "megafusion.objectives.transfusion",
    },
    attribute="OBJECTIVE",
    register_hint="megafusion.objectives.registry.register_objective",
)
assert tuple(OBJECTIVES.builtin) == choices.OBJECTIVES

register_objective = OBJECTIVES.register
objective_names = OBJECTIVES.names
get_objective = OBJECTIVES.get
