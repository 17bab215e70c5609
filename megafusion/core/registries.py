"""The two tables a run's config selects from: ``model.arch`` -> model family and
``objective.name`` -> objective.

Built-in entries are named by module path (each module defines ``FAMILY`` / ``OBJECTIVE``); so
config validation lists the names, plugins included, without importing torch or a model.
:mod:`megafusion.models.registry` and :mod:`megafusion.objectives.registry` hand out the objects.
"""

from __future__ import annotations

from megafusion.core.registry import Registry

FAMILIES = Registry(
    key="model.arch",
    builtin={
        "dense": "megafusion.models.dense",
        "mot": "megafusion.models.mot",
        "moma": "megafusion.models.moma",
    },
    attribute="FAMILY",
    register_hint="megafusion.models.registry.register_family",
)

OBJECTIVES = Registry(
    key="objective.name",
    builtin={
        "lm": "megafusion.objectives.lm",
        "transfusion": "megafusion.objectives.transfusion",
    },
    attribute="OBJECTIVE",
    register_hint="megafusion.objectives.registry.register_objective",
)
