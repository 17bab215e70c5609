"""What a model family is to the rest of megafusion: ``ModelFamily`` and the ``LayerCost`` of a layer.

A family (``model.arch``) is one module under ``megafusion/models/`` that defines ``FAMILY``, a
``ModelFamily``, and one line in :mod:`megafusion.core.registries`. Everything else asks the
family instead of branching on its name:

- ``layer_spec(cfg, layer)``: megatron-core's ``ModuleSpec`` of transformer layer ``layer`` (global,
  1-based: a heterogeneous stack gives different specs by depth; megatron's pipeline and
  virtual-pipeline placement decides which rank builds which layers). The block, the embedding and
  the output layer are megatron's ``GPTModel`` (:mod:`megafusion.models.build`);
- ``layer_cost(cfg, layer)``: what that layer holds and what a token costs in it, whatever its
  routing (a :class:`LayerCost`): parameter copies of each part, experts, router weights, FFN runs
  per token (nominal) and per microbatch (exact). Parameter and FLOPs accounting, the banner and
  the planner read only this (:mod:`megafusion.accounting`, :mod:`megafusion.planning`). It may
  read ``cfg.model`` and the family's own option sections (accounting remembers answers by them);
- ``routed``: whether its layers read the per-token modality routing
  (:mod:`megafusion.layers.routing`), which the forward step, generation and the logits tool then
  set around every model call;
- ``causal_routing``: whether a token's computation can depend only on itself and earlier tokens,
  a bool or ``(cfg) -> bool`` (:meth:`ModelFamily.routes_causally`): expert choice ranks each token
  against the whole microbatch, so MoMa routes causally only with auxiliary routers
  (``moe.aux_router``), under ``ModalityRouting.causal``. Generation, which sees one token at a
  time, refuses a config without it and routes causally otherwise; evaluation reports causal-routing
  losses beside the training routing's;
- ``transformer_config(cfg)``: settings of megatron-core's ``TransformerConfig`` beyond the shared
  ones (:mod:`megafusion.models.transformer_config`; MoMa: the experts and the dispatcher);
- ``manifest_keys(cfg)``: model settings beyond the shared shapes that make its checkpoint
  tensors mean something else (MoT: which parts are untied); a resume compares them;
- ``warm_starts``: checkpoint families it can start from with ``checkpoint.init_from`` and how
  (a :class:`WarmStartRule`: which checkpoint tensor each local tensor reads, and what fills the
  tensors the checkpoint does not have);
- ``conversions``: checkpoint families a ``megafusion convert`` command turns into this one, and
  the command (``{ckpt}`` is the checkpoint), which a refused resume or warm start suggests;
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

PARTS = ("attention", "ffn", "norms")  # the parts of a layer whose copies LayerCost counts


def _one_ffn(modality: int) -> int:
    return 1


@dataclass(frozen=True)
class LayerCost:
    """What one transformer layer holds and what a token costs in it, in the same terms for every
    routing of its FFN (none, by modality, expert choice, top-k token choice, an FFN a token may skip).

    - ``copies``: part (``attention``, ``ffn``, ``norms``) -> copies of its weights held (missing: 1;
      MoT: one per modality of each untied part; experts: the FFN's copies are the experts); a
      token meets one copy of attention and norms;
    - ``experts``: the FFN is this many routed experts (each a whole SwiGLU MLP, split over
      ``parallel.ep``), 0 when it is not;
    - ``router``: router weights (``E x h``), multiplied by every token (padding included);
    - ``aux_router``: auxiliary-router weights (:mod:`megafusion.layers.aux_router`: ``h x h/2`` then
      ``h/2 x outputs``, fp32), multiplied by every token (padding included); its input is
      detached, so in training its first matrix gets a weight gradient only (no input gradient);
    - ``ffn_per_token(modality)``: FFN runs a token of that modality costs at the nominal routing
      (1 for a plain FFN; expert choice: ``E_g x c_g``; top-k token choice: ``k``; a skipped FFN: 0);
    - ``ffn_runs(routable)``: the exact FFN runs of one microbatch per modality from its routable
      (non-padding) tokens per modality (ints, or Fractions where a modality-blind group's runs are
      shared by the modalities in proportion to their tokens); None: every token (padding
      included) runs the FFN once, as part of its own matmuls;
    - ``explain(routable)``: one line on what the routing did with such a microbatch (``flops``'s
      report); ``describe``: one line on the layer's routing (the run banner; "" for a plain layer);
    - ``block_fraction``: the fraction of tokens that run the layer's block (attention projections,
      norms, FFN, and the ``block_router`` part of ``router``); 1 but for a block a token may skip
      (Mixture-of-Depths: its capacity ``c``, exact for a microbatch when every row's ``c x n`` is
      whole and has no padding); ``ffn_per_token`` / ``ffn_runs`` then count per token that runs it;
    - ``block_router``: the part of ``router`` inside the block (MoMa's, under MoD), which only the
      tokens that run the block meet; the rest (MoD's own ``h`` weights) meets every token;
    - ``block_aux_router``: the part of ``aux_router`` inside the block (MoMa's, under MoD), which
      only the tokens that run the block meet; the rest (MoD's own) meets every token;
    - ``attention_fraction``: the fraction of the attended (query, key) pairs this layer computes
      (1; MoD: ``c^2`` at the nominal routing, picked queries over picked keys);
    - ``block_routable(rows)``: the routable tokens per modality that reach the block's routing, from
      a microbatch's routable tokens per row and modality (``rows[b][m]``); ``ffn_runs`` is given these.
      None: all of them (MoD: the picked ones, exact where the selection's counts are host ints).
    """

    copies: Mapping[str, int] = field(default_factory=dict)
    experts: int = 0
    router: int = 0
    aux_router: int = 0
    ffn_per_token: Callable[[int], float] = _one_ffn
    ffn_runs: Callable[[list[int]], list] | None = None
    explain: Callable[[list[int]], str] | None = None
    describe: str = ""
    block_fraction: float = 1
    block_router: int = 0
    block_aux_router: int = 0
    attention_fraction: float = 1
    block_routable: Callable[[list[list[int]]], list[int]] | None = None

    def copies_of(self, part: str) -> int:
        return self.copies.get(part, 1)


PLAIN_LAYER = LayerCost()  # one FFN per token, one copy of everything


def _plain_layer(cfg, layer: int) -> LayerCost:
    return PLAIN_LAYER


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
    layer_spec: Callable  # (cfg, layer) -> megatron ModuleSpec of global layer `layer` (1-based)
    layer_cost: Callable[[object, int], LayerCost] = _plain_layer
    routed: bool = False
    causal_routing: bool | Callable[[object], bool] = True
    manifest_keys: Callable[[object], dict] = _no_keys
    transformer_config: Callable[[object], dict] = _no_settings
    warm_starts: Mapping[str, WarmStartRule] = field(default_factory=dict)
    conversions: Mapping[str, str] = field(default_factory=dict)
    options: Options = NO_OPTIONS
    description: str = ""

    def routes_causally(self, cfg) -> bool:
        """Whether ``cfg``'s model can route every token from itself and earlier tokens only."""
        return bool(self.causal_routing(cfg) if callable(self.causal_routing) else self.causal_routing)


def _same_spec(cfg, layer: int, spec):
    return spec


def _same_cost(cfg, layer: int, cost: LayerCost) -> LayerCost:
    return cost


def _never(cfg) -> bool:
    return False


def _always(cfg) -> bool:
    return True


@dataclass(frozen=True)
class LayerExtension:
    """Something any family's layers may take (Mixture-of-Depths), switched on by its own config
    section (``options.active(cfg)``). A built-in one is a module under ``megafusion/models/``
    defining ``EXTENSION``, named in :data:`megafusion.core.registries.EXTENSIONS`; the rest of
    megafusion asks :mod:`megafusion.models.registry` (``layer_spec``, ``layer_cost``, ``routed``,
    ``causal_routing``, ``manifest_keys``), which applies every active extension, never its name.

    - ``wrap_spec(cfg, layer, spec, family)``: the ``ModuleSpec`` of global layer ``layer`` (1-based)
      given the family's (or an earlier extension's);
    - ``wrap_cost(cfg, layer, cost)``: that layer's :class:`LayerCost` given the family's;
    - ``routed(cfg)``: its layers read the microbatch's routing (:mod:`megafusion.layers.routing`);
    - ``causal_routing(cfg)``: a token's computation depends only on itself and earlier tokens;
    - ``manifest_keys(cfg)``: what a checkpoint records of it (compared on resume).
    """

    name: str
    wrap_spec: Callable = _same_spec
    wrap_cost: Callable = _same_cost
    routed: Callable[[object], bool] = _never
    causal_routing: Callable[[object], bool] = _always
    manifest_keys: Callable[[object], dict] = _no_keys
    options: Options = NO_OPTIONS
    description: str = ""
