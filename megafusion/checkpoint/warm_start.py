"""``checkpoint.init_from``: a new run that starts from another run's model weights.

``plan_warm_start`` takes the differences between the checkpoint's model keys and the run's
that a warm start can bridge, each decided by who owns it: another model family (the run's
family's ``warm_starts`` rule, e.g. dense -> MoT), a grown vocabulary (megatron-core's embedding
and output sharded tensors allow a shape mismatch: rows past the checkpoint's load as zero), the
modules a new objective adds (``Objective.extra_modules``, e.g. a language model into Transfusion),
LMFusion's new-token deltas and auxiliary routers added to a trained model (manifest key
``aux_routers``, e.g. MoMa's ``moe.aux_router``, or an extension's ``aux_router`` key, e.g.
Mixture-of-Depths' ``mod.aux_router``: they start from their initialisation). Anything
else stays a difference that ``check_compatible`` refuses. ``WarmStart`` is the result; ``io.load_weights`` applies it.
"""

from __future__ import annotations

from dataclasses import dataclass

from megafusion.models.lmfusion import INPUT_ROWS, OUTPUT_ROWS
from megafusion.models.registry import get_family
from megafusion.models.spec import WarmStartRule
from megafusion.objectives.registry import get_objective

AUX_ROUTER_PART = "aux_router"  # the submodule name of an auxiliary router (megafusion.layers.aux_router)


@dataclass
class WarmStart:
    """How the run's model is filled from a checkpoint that differs in ways a warm start allows."""

    rule: WarmStartRule | None = None  # another family's checkpoint: which key each tensor reads, what fills the rest
    vocab: tuple[int, int] | None = None  # (checkpoint rows, run rows): a grown vocabulary, new rows zero
    new_modules: tuple[str, ...] = ()  # module names the checkpoint lacks: they keep their initialisation
    new_parts: tuple[str, ...] = ()  # submodule names (any depth) the checkpoint lacks: initialised too

    def checkpoint_key(self, local: str, key: str) -> str | None:
        """The checkpoint key that tensor ``local`` (chunk-local name, global ``key``) loads from,
        or None when the checkpoint does not hold it."""
        if local.split(".")[0] in self.new_modules or any(f".{p}." in f".{local}" for p in self.new_parts):
            return None
        return self.rule.checkpoint_key(key) if self.rule else key

    def describe(self) -> str:
        parts = []
        if self.rule:
            parts.append(self.rule.describe)
        if self.vocab:
            parts.append(f"vocabulary grown from {self.vocab[0]} to {self.vocab[1]} rows (new rows start at zero)")
        if self.new_modules or self.new_parts:
            parts.append(f"new (initialised, not loaded): {', '.join((*self.new_modules, *self.new_parts))}")
        return "; ".join(parts)


def plan_warm_start(cfg, ours: dict, theirs: dict, diffs: dict[str, tuple]) -> WarmStart:
    """Take the differences a warm start can bridge out of ``diffs`` (key -> (checkpoint, run))."""
    warm, new = WarmStart(), []
    arch = diffs.get("arch")
    if arch and arch[0] in get_family(arch[1]).warm_starts:
        warm.rule = get_family(arch[1]).warm_starts[arch[0]]
        del diffs["arch"]
        for key in warm.rule.ignores:
            diffs.pop(key, None)
    vocab = diffs.get("vocab_size")
    if vocab and isinstance(vocab[0], int) and vocab[0] < vocab[1]:
        warm.vocab = vocab
        del diffs["vocab_size"]
    if "objective" in diffs and "objective" not in theirs:
        # The checkpoint's objective added no modules (a language model): the run's are new.
        new += get_objective(cfg.objective.name).extra_modules
        del diffs["objective"]
    if "freeze_text" in diffs and "freeze_text" not in theirs:
        new += (INPUT_ROWS, OUTPUT_ROWS)  # into LMFusion: the new-row deltas start at zero
        del diffs["freeze_text"]
        diffs.pop("frozen_vocab_rows", None)
    if diffs.get("aux_routers") == (None, True):
        # Auxiliary routers added to a trained model (their second stage): they start initialised.
        warm.new_parts = (AUX_ROUTER_PART,)
        del diffs["aux_routers"]
    for key, (before, now) in list(diffs.items()):
        # A layer extension's auxiliary routers added (its keys gain ``aux_router: true``; its
        # routers are submodules named ``<extension>_aux_router``, e.g. ``mod_aux_router``): they
        # start initialised; any other router the checkpoint holds still loads.
        if isinstance(before, dict) and isinstance(now, dict) and now.get("aux_router") is True:
            if "aux_router" not in before and before == {k: v for k, v in now.items() if k != "aux_router"}:
                warm.new_parts = (*warm.new_parts, f"{key}_{AUX_ROUTER_PART}")
                del diffs[key]
    warm.new_modules = tuple(new)
    return warm
