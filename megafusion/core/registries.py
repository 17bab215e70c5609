"""The tables a run's config selects from: ``model.arch`` -> model family, ``objective.name`` ->
objective, and the layer extensions any family's layers may take (Mixture-of-Depths), each switched
on by its own section (``Options.active``).

Built-in entries are named by module path (each module defines ``FAMILY`` / ``OBJECTIVE``), and
so are their torch-free option companions (each defines ``OPTIONS``); so config loading and
validation list the names and read the options, plugins included, without importing torch or a
model.
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
        "btx": "megafusion.models.btx",
    },
    attribute="FAMILY",
    register_hint="megafusion.models.registry.register_family",
    options={
        "mot": "megafusion.models.mot_options",
        "moma": "megafusion.models.moma_options",
        "btx": "megafusion.models.btx_options",
    },
)

OBJECTIVES = Registry(
    key="objective.name",
    builtin={
        "lm": "megafusion.objectives.lm",
        "transfusion": "megafusion.objectives.transfusion",
    },
    attribute="OBJECTIVE",
    register_hint="megafusion.objectives.registry.register_objective",
    options={"lm": "megafusion.objectives.lm_options", "transfusion": "megafusion.objectives.transfusion_options"},
)


EXTENSIONS = Registry(
    key="extension",
    builtin={"mod": "megafusion.models.mod"},
    attribute="EXTENSION",
    register_hint="megafusion.models.registry.register_extension",
    options={"mod": "megafusion.models.mod_options"},
)


def known_options():
    """Every known family's, objective's and layer extension's :class:`~megafusion.core.options.Options`
    (plugins included), as (key, name, options), in registry order."""
    return [(r.key, name, r.options(name)) for r in (FAMILIES, OBJECTIVES, EXTENSIONS) for name in r.names()]
