"""What a model family or an objective adds to the run configuration: :class:`Options`.

A registry entry (a ``model.arch`` family, an ``objective.name``) may own config keys and checks.
They live in a torch-free companion module (``megafusion/models/moma_options.py``, ...) named in
:mod:`megafusion.core.registries`, or in the ``options`` of a registered plugin's object, so that
loading and validating a config imports no model:

- ``sections``: section name -> dataclass of its keys. A new name is a new YAML section (MoMa's
  ``moe``); a name the config already has gains these keys (Transfusion's keys in ``objective``).
  Every known entry's keys are loadable whichever entry a run selects, so a config or a checkpoint
  written for one entry still loads while another is selected;
- ``problems(cfg)``: one line per problem of the selected entry's settings (the key, its value, a
  fix), listed by ``validate`` with every other problem;
- ``dict_forms``: how to write each of its dict-valued keys (for a value of another type);
- ``experts(cfg)``: how many experts ``parallel.ep`` splits (None: the entry has no experts, and
  ``parallel.ep`` must stay 1);
- ``freezes_text(cfg)``: whether every part of a layer has a text and an image copy, which
  ``model.freeze_text`` (LMFusion) needs;
- ``active(cfg)``: for a layer extension (``core/registries.EXTENSIONS``, e.g. Mixture-of-Depths),
  whether its section switches it on; its ``problems`` run for every config (they check nothing
  while it is off), and its section is never "ignored";
- ``aux_routers(cfg)``: whether the entry's layers hold auxiliary routers
  (:mod:`megafusion.layers.aux_router`), which ``train.trainable=aux_routers`` trains alone and
  causal routing needs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field


def _no_problems(cfg) -> list[str]:
    return []


def _no_experts(cfg) -> None:
    return None


def _no(cfg) -> bool:
    return False


@dataclass(frozen=True)
class Options:
    sections: Mapping[str, type] = field(default_factory=dict)
    problems: Callable[[object], list[str]] = _no_problems
    dict_forms: Mapping[str, str] = field(default_factory=dict)
    experts: Callable[[object], int | None] = _no_experts
    freezes_text: Callable[[object], bool] = _no
    active: Callable[[object], bool] = _no
    aux_routers: Callable[[object], bool] = _no


NO_OPTIONS = Options()
