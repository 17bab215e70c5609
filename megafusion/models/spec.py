"""What a model family is to the rest of megafusion: ``ModelFamily``.

A family (``model.arch``) is one module under ``megafusion/models/`` that defines ``FAMILY``, a
``ModelFamily``, and one line in :mod:`megafusion.models.registry`. Everything else asks the
family instead of branching on its name:

- ``layer_spec(cfg)``: megatron-core's ``ModuleSpec`` of one transformer layer (the block, the
  embedding and the output layer are megatron's ``GPTModel``; see :mod:`megafusion.models.build`);
- ``routed``: whether its layers read the per-token modality routing
  (:mod:`megafusion.layers.routing`), which the forward step, generation and the logits tool then
  set around every model call;
- ``copies(cfg, part)``: how many copies of a layer part (``attention``, ``ffn``, ``norms``) the
  model holds, what parameter and FLOPs accounting need to know beyond the dense formulas
  (:mod:`megafusion.accounting`; a token meets one copy of each part, unless the FFN is experts);
- ``experts(cfg)``: the FFN's expert groups (a
  :class:`~megafusion.layers.expert_groups.ExpertGroups`) when it is routed experts, else None:
  accounting then counts the router and each expert on the tokens it takes, not one FFN per token;
- ``transformer_config(cfg)``: settings of megatron-core's ``TransformerConfig`` beyond the shared
  ones (:mod:`megafusion.models.transformer_config`; MoMa: the experts and the dispatcher);
- ``manifest_keys(cfg)``: model settings beyond the shared shapes that make its checkpoint
  tensors mean something else (MoT: which parts are untied); a resume compares them;
- ``warm_starts``: checkpoint families it can start from with ``checkpoint.init_from`` and how
  (a :class:`WarmStartRule`: which checkpoint tensor each local tensor reads, and what fills the
  tensors the checkpoint does not have).

- ``options``: its config keys and their checks (:class:`~megafusion.core.options.Options`; a
  built-in family's live in a torch-free companion module, e.g. :mod:`megafusion.models.moma_options`,
  so that validation imports no model).

A family registered from outside the package (``register_family``, e.g. in a module named in
``MEGAFUSION_PLUGINS``) is used exactly like the built-in ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from megafusion.core.options import NO_OPTIONS, Options


def _one_copy(cfg, part: str) -> int:
    return 1


def _no_experts(cfg) -> None:
    return None


def _no_keys(cfg) -> dict:
    return {}


def _no_settings(cfg) -> dict:
    return {}


@dataclass(frozen=True)
class WarmStartRule:
    """How a checkpoint of another family fills this family's model (``checkpoint.init_from``).

    ``checkpoint_key(key)``: the checkpoint's global key that this model's tensor ``key`` reads,
    or None when the checkpoint has no such tensor (it is then filled by ``fill`` after the
    load); ``fill(module)``: fills those tensors from the loaded ones (no disk round trip, the
    same TP shards); ``ignores``: manifest model keys the bridge makes irrelevant (compared
    otherwise); ``describe``: what the run log says about it.
    """

    checkpoint_key: Callable[[str], str | None]
    fill: Callable[[object], None] | None = None
    ignores: tuple[str, ...] = ()
    describe: str = ""


@dataclass(frozen=True)
class ModelFamily:
    name: str
    layer_spec: Callable  # (cfg) -> megatron ModuleSpec of one layer
    routed: bool = False
    copies: Callable[[object, str], int] = _one_copy
    experts: Callable[[object], object | None] = _no_experts  # (cfg) -> ExpertGroups | None
    manifest_keys: Callable[[object], dict] = _no_keys
    transformer_config: Callable[[object], dict] = _no_settings
    warm_starts: Mapping[str, WarmStartRule] = field(default_factory=dict)
    options: Options = NO_OPTIONS
    description: str = ""
