"""``model.arch`` name -> :class:`~megafusion.models.spec.ModelFamily`.

A built-in family is a module defining ``FAMILY``, named in ``megafusion.core.registries``
(which config validation reads); ``register_family`` adds one at run time (a plugin:
``MEGAFUSION_PLUGINS``).
"""

from __future__ import annotations

from megafusion.core.registries import FAMILIES

register_family = FAMILIES.register
family_names = FAMILIES.names
get_family = FAMILIES.get
