"""``objective.name`` -> :class:`~megafusion.objectives.spec.Objective`.

A built-in objective is a module defining ``OBJECTIVE``, named in ``megafusion.core.registries``
(which config validation reads); ``register_objective`` adds one at run time (a plugin:
``MEGAFUSION_PLUGINS``).
"""

from __future__ import annotations

from megafusion.core.registries import OBJECTIVES

register_objective = OBJECTIVES.register
objective_names = OBJECTIVES.names
get_objective = OBJECTIVES.get
