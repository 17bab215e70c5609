"""``model.arch`` name -> :class:`~megafusion.models.spec.ModelFamily`, the layer extensions
(:class:`~megafusion.models.spec.LayerExtension`), and what a run's layers are with both.

A built-in family is a module defining ``FAMILY``, named in ``megafusion.core.registries``
(which config validation reads); ``register_family`` adds one at run time (a plugin:
``MEGAFUSION_PLUGINS``); extensions likewise (``EXTENSION``, ``register_extension``). Model
assembly, accounting, the forward step, generation and checkpoints ask the functions below,
which apply the family and then every extension the config switches on.
"""

from __future__ import annotations

from megafusion.core.registries import EXTENSIONS, FAMILIES

register_family = FAMILIES.register
family_names = FAMILIES.names
get_family = FAMILIES.get
register_extension = EXTENSIONS.register
extension_names = EXTENSIONS.names
get_extension = EXTENSIONS.get


def active_extensions(cfg) -> list:
    """The layer extensions ``cfg`` switches on (their ``options.active``), in registry order."""
    return [get_extension(name) for name in extension_names() if EXTENSIONS.options(name).active(cfg)]


def extension_sections(cfg) -> tuple[str, ...]:
    """The config sections of the switched-on extensions (what a layer's cost may read)."""
    return tuple(s for name in extension_names() for s in EXTENSIONS.options(name).sections)


def layer_spec(cfg, layer: int):
    """megatron's ``ModuleSpec`` of global layer ``layer`` (1-based): the family's, then each extension's."""
    family = get_family(cfg.model.arch)
    spec = family.layer_spec(cfg, layer)
    for ext in active_extensions(cfg):
        spec = ext.wrap_spec(cfg, layer, spec, family)
    return spec


def layer_cost(cfg, layer: int):
    """The :class:`~megafusion.models.spec.LayerCost` of global layer ``layer``, extensions applied."""
    cost = get_family(cfg.model.arch).layer_cost(cfg, layer)
    for ext in active_extensions(cfg):
        cost = ext.wrap_cost(cfg, layer, cost)
    return cost


def routed(cfg) -> bool:
    """Whether the model's layers read the microbatch's routing (set it around every model call)."""
    return get_family(cfg.model.arch).routed or any(ext.routed(cfg) for ext in active_extensions(cfg))


def causal_routing(cfg) -> bool:
    """Whether a token's computation depends only on itself and earlier tokens."""
    return get_family(cfg.model.arch).routes_causally(cfg) and all(
        ext.causal_routing(cfg) for ext in active_extensions(cfg)
    )


def manifest_keys(cfg) -> dict:
    """The family's and the active extensions' manifest keys (``ext.<name>``: its keys)."""
    keys = dict(get_family(cfg.model.arch).manifest_keys(cfg))
    for ext in active_extensions(cfg):
        keys[ext.name] = ext.manifest_keys(cfg)
    return keys
