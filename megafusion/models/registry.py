"""``model.arch`` name -> :class:`~megafusion.models.spec.ModelFamily`.

A built-in family is a module defining ``FAMILY``, named here (and in
``megafusion.core.choices.MODEL_ARCHS``, which config validation reads); ``register_family``
adds one at run time (a plugin: ``MEGAFUSION_PLUGINS``).
"""

from __future__ import annotations

from megafusion.core import choices
from megafusion.core.registry import Registry

FAMILIES = Registry(
    key="model.arch",
    builtin={
        "dense": "megafusion.models.dense",
        "mot": "megafusion.models.mot",
    },
    attribute="FAMILY",
    register_hint="megafusion.models.registry.register_family",
)
assert tuple(FAMILIES.builtin) == choices.MODEL_ARCHS

register_family = FAMILIES.register
family_names = FAMILIES.names
get_family = FAMILIES.get
