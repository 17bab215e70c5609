"""A MoMa checkpoint upcycled from a MoT or dense one: :func:`upcycle` (``megafusion convert upcycle``;
its command line: :mod:`megafusion.commands.convert`).

MoMa's upcycling (arXiv 2407.21770): every expert of a modality group starts as a copy of that
modality's FFN, the routers start fresh, and training goes on as a new run. Concretely, for the
global expert ``e`` of layer ``L`` (``mlp.experts.<e>.linear_fc1/2.weight``, ``e`` from
:class:`~megafusion.layers.expert_groups.ExpertGroups`' interleaved numbering):

- from a MoT with an untied FFN: the FFN of the expert's modality (``mlp.<modality>.linear_fc1/2``);
  a modality-blind group (``moe.experts={mixed: N}``) copies the *text* FFN (the text path is the
  one a MoT shares with its language model; the image FFN is then left out);
- from a dense model, or a MoT whose FFN is tied: the one FFN (``mlp.linear_fc1/2``).

Attention and norms keep the source's untying (``model.untie``; from a dense model: ``all``, every
modality copy starting as the dense module, as ``convert dense-to-mot`` does); they, the embedding,
the output layer and an objective's own modules (Transfusion's) are copied unchanged. The routers
(``mlp.router.weight``) are not in the source: they keep the seed-based initialisation a fresh
MoMa gets (:mod:`megafusion.models.init`, N(0, init_std) keyed by name and ``train.seed``), not
zeros: a zero router scores every token alike, so all experts of a group would take the same
tokens and, being copies, stay identical (only ``moe.router_noise`` would ever separate them).

The result is a weights-only checkpoint (no optimizer, step 0); train from it with
``model.arch=moma``, the same ``moe.experts`` / ``moe.capacity`` / ``model.untie`` and
``checkpoint.init_from=DIR``: a new run, so the optimizer and the LR schedule (warmup included)
start afresh, as in the paper. Its ``origin`` records where the source run's data stream stopped
(``consumed_samples``) and whether the upcycled run continues it (``--keep-data-order``:
``keep_data_order``; then the run ``checkpoint.init_from`` starts reads from that sample on,
:func:`megafusion.checkpoint.data_position`; otherwise from sample 0).

With one expert per modality, capacity 1 (every expert takes all of its modality's tokens) and
the routers' gates held at 1 (``ExpertChoiceRouter.gate = "one"``), an upcycled MoT computes
exactly the MoT's logits; with sigmoid gates and fewer tokens per expert it starts nearby.

The conversion runs in one process (TP = PP = 1) from a checkpoint saved in any layout; the
output loads into any TP / PP / EP layout (megatron-core dist_checkpointing reshards at load).
"""

from __future__ import annotations

import copy
import re
import shlex

from megafusion import checkpoint as ck
from megafusion.core.errors import ConfigError
from megafusion.core.modality import MODALITY_NAMES

SOURCES = ("dense", "mot")  # the families upcycle converts
MIXED_SOURCE = "text"  # the MoT FFN a modality-blind expert group copies
MOMA_UNTIED = ("attention", "norms")  # what model.untie means to MoMa (its FFN is the experts)

_EXPERT = re.compile(r"^(decoder\.layers\.\d+\.mlp\.)experts\.(\d+)\.(.+)$")
_ROUTER = re.compile(r"^decoder\.layers\.\d+\.mlp\.router\.")
_MODALITY_FFN = re.compile(r"^decoder\.layers\.\d+\.mlp\.(" + "|".join(MODALITY_NAMES) + r")\.")


def source_name(name: str, groups, source: set[str] | dict) -> str | None:
    """The source parameter that MoMa parameter ``name`` (global name) starts as; None for a router."""
    from megafusion.layers.expert_groups import MIXED
    from megafusion.models.init import tied_name

    if _ROUTER.match(name):
        return None
    expert = _EXPERT.match(name)
    if expert:
        prefix, number, rest = expert.groups()
        group = groups.expert_name(int(number)).split(".")[0]
        modality = MIXED_SOURCE if group == MIXED else group
        candidates = (f"{prefix}{modality}.{rest}", f"{prefix}{rest}")  # a MoT's untied FFN, else the one FFN
    else:
        candidates = (name, tied_name(name))  # the same module, else the tied one each modality copies
    for candidate in candidates:
        if candidate in source:
            return candidate
    raise ck.CheckpointError(f"the source checkpoint has no tensor for MoMa's {name} (looked for {candidates})")


def parameter_map(moma_names, source_names, groups) -> dict[str, str | None]:
    """``{MoMa name: source name or None}``, checking that every source tensor finds a place (an
    unused one would be a module the upcycled model silently drops)."""
    mapping = {name: source_name(name, groups, source_names) for name in moma_names}
    used = set(mapping.values())
    dropped = []
    for name in source_names:
        ffn = _MODALITY_FFN.match(name)
        # A MoT FFN of a modality without a group of its own (a modality-blind MoMa) has no expert.
        if name in used or (ffn and ffn.group(1) not in groups.names):
            continue
        dropped.append(name)
    if dropped:
        raise ck.CheckpointError(
            f"MoMa has no place for these source tensors: {', '.join(sorted(dropped)[:6])}"
            f"{' ...' if len(dropped) > 6 else ''}"
        )
    return mapping


def moma_config(source_cfg, experts: str | None, capacity: str | None, untie: str | None):
    """The upcycled model's config: the source run's, with ``model.arch=moma`` and the given ``moe``
    settings (spelled as the config overrides spell them, validated here as a run would)."""
    from megafusion.config import apply_overrides, validate

    m = source_cfg.model
    if untie is None:
        untie = m.untie if m.arch == "mot" else "all"
    overrides = ["model.arch=moma", f"model.untie={untie}"]
    if experts is not None:
        overrides.append(f"moe.experts={experts}")
    if capacity is not None:
        overrides.append(f"moe.capacity={capacity}")
    cfg = apply_overrides(copy.deepcopy(source_cfg), overrides)
    validate(cfg, 1)
    if m.arch == "mot":
        merged = sorted({p for p in m.untied_parts() if p in MOMA_UNTIED} - set(cfg.model.untied_parts()))
        if merged:
            raise ConfigError(
                f"--untie {untie!r} ties {', '.join(merged)}, which the MoT unties: its text and image copies "
                f"cannot be merged into one; keep {', '.join(merged)} in --untie (default: the MoT's model.untie)"
            )
    return cfg


def train_overrides(cfg) -> list[str]:
    """The overrides (shell-quoted) a run needs to load this model: the keys ``check_compatible`` compares."""

    def spelled(value: dict) -> str:
        return "{" + ", ".join(f"{k}: {'null' if v is None else v}" for k, v in value.items()) + "}"

    out = ["model.arch=moma", f"model.untie={cfg.model.untie}", f"moe.experts={spelled(cfg.moe.experts)}"]
    if cfg.moe.capacity is not None:
        out.append(f"moe.capacity={spelled(cfg.moe.capacity)}")
    return [shlex.quote(o) for o in out]


def upcycle(
    src: str,
    out: str,
    experts: str | None = None,
    capacity: str | None = None,
    untie: str | None = None,
    keep_data_order: bool = False,
):
    """Convert (in this process, TP = PP = 1); returns the MoMa config and the ``origin`` written with the weights.

    ``experts`` / ``capacity``: the ``moe.experts`` / ``moe.capacity`` values (default: the ``moe``
    section's defaults, 4t4i at capacity 1/4: a dense or MoT run cannot set it); ``untie``:
    ``model.untie`` (default: the MoT's, or ``all`` from a dense model)."""
    import torch

    from megafusion.inference.load import checkpoint_config, model_from_checkpoint
    from megafusion.layers.expert_groups import ExpertGroups
    from megafusion.models.param_layout import global_param_names
    from megafusion.models.transformer_config import build_transformer_config
    from megafusion.objectives.build import build_model_chunks
    from megafusion.runtime import shutdown

    source = checkpoint_config(src)
    arch = source.cfg.model.arch
    if arch not in SOURCES:
        already = " (it is MoMa already)" if arch == "moma" else ""
        raise ck.CheckpointError(
            f"{source.path} holds a model.arch={arch!r} model{already}; upcycle converts "
            f"{' and '.join(SOURCES)} checkpoints only"
        )
    if source.cfg.model.freeze_text:
        raise ck.CheckpointError(
            f"{source.path} is an LMFusion checkpoint (model.freeze_text=true: its new vocabulary rows are "
            f"deltas on frozen ones); upcycle converts dense and MoT checkpoints only"
        )
    # Every flag is checked before the model is loaded.
    cfg = moma_config(source.cfg, experts, capacity, untie)
    groups = ExpertGroups.from_config(cfg.moe)
    loaded = model_from_checkpoint(source)
    try:
        runtime = loaded.runtime
        chunks = build_model_chunks(cfg, build_transformer_config(cfg, runtime.device), runtime, loaded.latent_shape)
        theirs = global_param_names(loaded.chunks[0])
        ours = global_param_names(chunks[0])
        mapping = parameter_map(ours, theirs, groups)
        with torch.no_grad():
            for name, param in ours.items():
                if mapping[name] is not None:  # a router keeps its fresh initialisation
                    param.copy_(theirs[mapping[name]])
        origin = {
            "converted_from": str(source.path),
            "conversion": "upcycle",
            "source_arch": arch,
            "step": source.manifest.get("step"),
            # Where the source run's data stream stopped, and whether the upcycled run continues it.
            "consumed_samples": source.manifest.get("consumed_samples", 0),
            "keep_data_order": bool(keep_data_order),
        }
        ck.save_weights(out, chunks, cfg, source.manifest.get("data"), origin)
    finally:
        shutdown()
    return cfg, origin
