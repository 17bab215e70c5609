"""Branch-Train-MiX's merge (arXiv 2403.07816): :func:`btx_merge` (``megafusion convert btx-merge``;
its command line: :mod:`megafusion.commands.convert`).

BTX trains copies of one seed model on separate data domains (the *branches*: plain runs with
``checkpoint.init_from=SEED``), then merges them into one mixture-of-experts model that is
fine-tuned on every domain (``model.arch=btx``, token-choice top-2 routing). The merge, per layer:

- **experts**: expert ``j`` is branch ``j``'s FFN (``mlp.linear_fc1/2``), in ``--branch`` order;
  with ``--keep-seed-expert`` the seed's FFN is one more expert (the last), as in the paper (its
  "generalist" expert). From a dense seed the experts form one modality-blind group
  (``btx.experts={mixed: K}``); from a MoT whose FFN is untied, each modality's FFN copies form
  that modality's group (``{text: K, image: K}``: expert ``j`` of the text group is branch ``j``'s
  text FFN). Experts are numbered as :class:`~megafusion.layers.expert_groups.ExpertGroups`
  interleaves them (``mlp.experts.<e>.``).
- **everything else** (attention, norms, embedding, output layer, an objective's own modules) is
  the element-wise mean of the branches' tensors, computed in fp32
  (``torch.stack(...).float().mean(0)``) and cast to the stored dtype, so bf16 branches are not
  averaged in bf16 (mergoo's running fp16 mean is the pitfall this avoids). Without
  ``--keep-seed-expert`` the mean is over the branches only; with it the seed joins the mean too
  (it is one of the merged models, as its FFN is one of the experts). A MoT seed's untied
  attention and norms stay untied: each modality copy is averaged on its own.
- **routers** (``mlp.router.weight``, not in any branch) keep the initialisation a fresh model
  gets (:mod:`megafusion.models.init`: N(0, ``model.init_std``), keyed by the parameter's name
  and ``train.seed``), as ``convert upcycle`` does: a zero router would score every expert alike.
- **LMFusion** (``model.freeze_text``): the frozen text weights (every ``.text.`` copy, the
  embedding, the output layer) cannot differ between branches of one seed; each is checked to be
  bit-identical across the seed and every branch and copied, never averaged. The trained new-row
  deltas are averaged. When ``model.arch=btx`` cannot keep the text half frozen (its family says
  through ``freezes_text``), the merged model is an ordinary one: the averaged deltas are added
  into the embedding / output rows they belong to (fp32, then cast) and ``model.freeze_text`` is off.

Every target tensor is written exactly once, and every source tensor finds a place (a leftover
would be a module the merged model silently drops): both are checked. Before any weight is
loaded, the inputs are checked and refused with one line naming the checkpoint and the key: a
branch without ``lineage`` or descending from another seed
(:mod:`megafusion.checkpoint.lineage`: averaging only means something within one seed's basin), a
model key (architecture, widths, vocabulary size) or data key (tokenizer, image codec) that
differs from the seed's.

The merge runs in one process (TP = PP = 1) from checkpoints saved in any layout (each is loaded
with ``checkpoint.load_weights``, which reshards). Every branch is held in memory at once (the
mean is one ``torch.stack``): about (branches + 1) x the model's size. The output is a
weights-only checkpoint (step 0) that loads into any TP / PP / EP layout with
``checkpoint.init_from``; its ``origin`` records the seed's identity and every branch's path,
step and identity.
"""

from __future__ import annotations

import copy
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from megafusion import checkpoint as ck
from megafusion.core.errors import ConfigError

TARGET_ARCH = "btx"  # the family the merged model trains in
SECTION = "btx"  # its config section (experts, topk, aux_loss_coeff, ...)
SOURCES = ("dense", "mot")  # the seed families whose FFNs become experts
TARGET_UNTIED = ("attention", "norms")  # what model.untie means to the target (its FFN is the experts)
DATA_KEYS = ("tokenizer", "codec", "vocab_size")  # the data description that must agree (not the sources)
FFN_PARTS = ("linear_fc1", "linear_fc2")

_EXPERT = re.compile(r"^(decoder\.layers\.\d+\.mlp\.)experts\.(\d+)\.(.+)$")
_ROUTER = re.compile(r"^decoder\.layers\.\d+\.mlp\.router\.")
_FFN = re.compile(r"^decoder\.layers\.\d+\.mlp\.")


@dataclass
class Source:
    """One checkpoint of the merge: the seed or a branch."""

    role: str  # "--seed" or "--branch 2": how messages name it
    path: Path  # its step directory
    manifest: dict
    identity: str  # lineage.identity of its files

    def names(self) -> str:
        return f"{self.role} {self.path}"


def read_source(role: str, ckpt) -> Source:
    path = ck.resolve_checkpoint(ckpt)
    manifest = ck.read_manifest(path)
    return Source(role, path, manifest, ck.identity(path, manifest))


def check_sources(seed: Source, branches: list[Source]) -> None:
    """Refuse branches that are not of this seed, or whose model or tokenizer differs from it."""
    if not branches:
        raise ConfigError("btx-merge needs at least one --branch")
    arch = seed.manifest.get("model", {}).get("arch")
    if arch not in SOURCES:
        raise ck.CheckpointError(
            f"{seed.names()} holds a model.arch={arch!r} model; btx-merge merges branches of "
            f"{' or '.join(SOURCES)} seeds (their FFNs become the experts)"
        )
    for branch in branches:
        lineage = ck.recorded_lineage(branch.manifest)
        if lineage is None:
            raise ck.CheckpointError(
                f"{branch.names()} records no lineage (it was not trained with checkpoint.init_from, or before "
                f"lineage existed): BTX averages branches of one seed; train it with checkpoint.init_from={seed.path}"
            )
        if lineage.get("seed") != seed.identity:
            raise ck.CheckpointError(
                f"{branch.names()}: lineage.seed {str(lineage.get('seed'))[:12]} (from {lineage.get('seed_path')}) is "
                f"not {seed.names()} ({seed.identity[:12]}): give the seed its branches started from"
            )
    ours = seed.manifest.get("model", {})
    for branch in branches:
        theirs = branch.manifest.get("model", {})
        for key in (*ours, *(k for k in theirs if k not in ours)):
            if ours.get(key) != theirs.get(key):
                raise ck.CheckpointError(
                    f"{branch.names()}: model key {key} is {theirs.get(key)!r}, the seed's is {ours.get(key)!r} "
                    f"({seed.path}): branches must keep the seed's architecture"
                )
    reference = next((s for s in (seed, *branches) if s.manifest.get("data") is not None), None)
    for source in (seed, *branches) if reference else ():
        data = source.manifest.get("data")
        for key in DATA_KEYS if data is not None else ():
            if data.get(key) != reference.manifest["data"].get(key):
                raise ck.CheckpointError(
                    f"{source.names()}: data {key} is {data.get(key)!r}, {reference.names()} has "
                    f"{reference.manifest['data'].get(key)!r}: merged branches must share the tokenizer and vocabulary"
                )


def expert_groups(seed_cfg, count: int) -> dict:
    """``btx.experts``: one modality-blind group of ``count`` experts, or one group per modality
    when the seed (a MoT) has an FFN per modality."""
    from megafusion.core.modality import MODALITY_NAMES
    from megafusion.layers.expert_groups import MIXED

    if seed_cfg.model.arch == "mot" and "ffn" in seed_cfg.model.untied_parts():
        return dict.fromkeys(MODALITY_NAMES, count)
    return {MIXED: count}


def btx_config(seed_cfg, experts: dict):
    """The merged model's config: the seed run's, with ``model.arch=btx``, the seed's attention and
    norm untying and the experts (validated as a run would); LMFusion's freezing is kept only if the
    target family can freeze a text half."""
    from megafusion.config import apply_overrides, validate
    from megafusion.core.registries import FAMILIES

    m = seed_cfg.model
    if TARGET_ARCH not in FAMILIES.names():
        raise ConfigError(f"model.arch={TARGET_ARCH} is not a model family of this build: it cannot be merged into")
    untie = ",".join(p for p in m.untied_parts() if p in TARGET_UNTIED) if m.arch == "mot" else ""
    spelled = "{" + ", ".join(f"{k}: {v}" for k, v in experts.items()) + "}"
    cfg = apply_overrides(
        copy.deepcopy(seed_cfg), [f"model.arch={TARGET_ARCH}", f"model.untie={untie}", f"{SECTION}.experts={spelled}"]
    )
    if m.freeze_text and not FAMILIES.options(TARGET_ARCH).freezes_text(cfg):
        cfg.model.freeze_text = False
        cfg.model.frozen_vocab_rows = None
    validate(cfg, 1)
    return cfg


@dataclass(frozen=True)
class Take:
    """How one target tensor is filled: ``how`` is ``expert`` (source ``index``'s tensor ``name``),
    ``average`` (the mean of ``name`` over the averaged sources), ``copy`` (a frozen tensor, equal in
    every source), or ``fold`` (``copy`` of ``name`` plus the mean of delta ``delta`` on rows ``first:``)."""

    how: str
    name: str
    index: int = -1
    delta: str = ""
    first: int = 0
    frozen: bool = False  # an expert copied from LMFusion's frozen text FFN: checked equal in every source


def merge_plan(target_names, source_names, groups, frozen=lambda name: False, fold: dict | None = None) -> dict:
    """``{target name: Take or None}`` (None: a router, freshly initialised), checking that every
    target has a source and every source tensor a target. ``groups``: the target's ExpertGroups;
    expert ``j`` of a group takes source ``j``'s FFN of that group's modality (``mixed``: the one
    FFN). ``frozen(name)``: LMFusion's frozen text weights (copied). ``fold``: ``{target: (delta,
    first)}``, LMFusion deltas added into rows ``first:`` of a target that has no delta of its own."""
    from megafusion.layers.expert_groups import MIXED

    source_names, fold = set(source_names), fold or {}
    plan, used = {}, set()
    for name in target_names:
        if _ROUTER.match(name):
            plan[name] = None
            continue
        expert = _EXPERT.match(name)
        if expert:
            prefix, number, rest = expert.groups()
            group, j = groups.expert_name(int(number)).split(".")
            want = f"{prefix}{rest}" if group == MIXED else f"{prefix}{group}.{rest}"
            take = Take("expert", want, index=int(j), frozen=frozen(want))
        elif name in fold:
            take = Take("fold", name, delta=fold[name][0], first=fold[name][1])
            used.add(take.delta)
        else:
            take = Take("copy" if frozen(name) else "average", name)
        if take.name not in source_names:
            raise ck.CheckpointError(
                f"the branches have no tensor for the merged model's {name} (looked for {take.name})"
            )
        plan[name] = take
        used.add(take.name)
    left = sorted(source_names - used)
    if left:
        raise ck.CheckpointError(
            f"the merged model has no place for these branch tensors: {', '.join(left[:6])}"
            + (" ..." if len(left) > 6 else "")
        )
    return plan


def merge_tensors(targets: dict, sources: list[dict], averaged: list[int], plan: dict, labels: list[str]) -> None:
    """Fill ``targets`` (``{name: parameter}``) from ``sources`` (one ``{name: tensor}`` per source)
    by ``plan``; ``averaged``: the source indices a mean runs over (and a frozen tensor is checked
    across, with the rest); ``labels[i]`` names source ``i`` in errors. Each target is written once."""
    import torch

    def mean(name):
        return torch.stack([sources[i][name] for i in averaged]).float().mean(0)

    written = set()
    with torch.no_grad():
        for name, take in plan.items():
            if take is None:
                continue
            if take.how == "average":
                value = mean(take.name)
            else:  # expert, copy, fold
                ref = take.index if take.how == "expert" else averaged[0]
                value = sources[ref][take.name]
            if take.frozen or take.how in ("copy", "fold"):  # a frozen tensor: the same in every source
                for i in range(len(sources)):
                    if not torch.equal(sources[i][take.name], value):
                        raise ck.CheckpointError(
                            f"{labels[i]}: frozen text weight {take.name} (model.freeze_text) differs from "
                            f"{labels[ref]}'s: LMFusion branches of one seed must leave it untouched"
                        )
                if take.how == "fold":
                    value = value.to(torch.float32, copy=True)
                    value[take.first :] += mean(take.delta)
            param = targets[name]
            if tuple(value.shape) != tuple(param.shape):
                raise ck.CheckpointError(
                    f"{name}: the branches' tensor is {tuple(value.shape)}, the merged model's {tuple(param.shape)}"
                )
            param.copy_(value.to(param.dtype))
            written.add(name)
    assert written == {n for n, t in plan.items() if t is not None}  # every target once (the plan's keys are unique)


def lmfusion_folds(seed_cfg, cfg, target_names) -> dict:
    """``{target: (delta, first)}`` when LMFusion's deltas must be added into the merged model's rows."""
    from megafusion.models.lmfusion import INPUT_ROWS, OUTPUT_ROWS
    from megafusion.models.param_layout import EMBEDDING, OUTPUT_LAYER

    if not seed_cfg.model.freeze_text or cfg.model.freeze_text:
        return {}
    if seed_cfg.model.tie_embeddings:
        raise ck.CheckpointError(
            "an LMFusion seed with model.tie_embeddings=true: its input and output deltas cannot both be added "
            f"into one tied embedding of a model.arch={TARGET_ARCH} model that does not freeze text"
        )
    first = seed_cfg.model.frozen_vocab_rows
    folds = {EMBEDDING: (f"{INPUT_ROWS}.weight", first), OUTPUT_LAYER: (f"{OUTPUT_ROWS}.weight", first)}
    return {k: v for k, v in folds.items() if k in target_names}


def train_overrides(cfg, origin: dict) -> list[str]:
    """The overrides (shell-quoted) a run needs to load the merged model: the keys ``check_compatible``
    compares (``model.freeze_text=false`` after LMFusion branches whose deltas were added into the rows)."""
    experts = "{" + ", ".join(f"{k}: {v}" for k, v in getattr(cfg, SECTION).experts.items()) + "}"
    out = [f"model.arch={TARGET_ARCH}", f"model.untie={cfg.model.untie}", f"{SECTION}.experts={experts}"]
    if origin.get("lmfusion_folded"):
        out.append("model.freeze_text=false")
    return [shlex.quote(o) for o in out]


def btx_merge(seed: str, branches: list[str], out: str, keep_seed_expert: bool = False):
    """Merge (in this process, TP = PP = 1); returns the merged model's config and the ``origin``
    written with its weights."""
    from megafusion.inference.load import checkpoint_config, model_from_checkpoint
    from megafusion.layers.expert_groups import ExpertGroups
    from megafusion.models.lmfusion import is_frozen
    from megafusion.models.param_layout import global_param_names
    from megafusion.models.transformer_config import build_transformer_config
    from megafusion.objectives.build import build_model_chunks
    from megafusion.runtime import shutdown

    seed_source = read_source("--seed", seed)
    branch_sources = [read_source(f"--branch {i + 1}", b) for i, b in enumerate(branches)]
    # Every check before a process group exists or a weight is loaded.
    check_sources(seed_source, branch_sources)
    seed_run = checkpoint_config(seed_source.path)
    seed_cfg = seed_run.cfg
    # Sources: the branches in --branch order, then the seed (an expert and averaged only with --keep-seed-expert).
    merged = [*branch_sources, *([seed_source] if keep_seed_expert else [])]
    cfg = btx_config(seed_cfg, expert_groups(seed_cfg, len(merged)))
    groups = ExpertGroups.from_config(SimpleNamespace(experts=getattr(cfg, SECTION).experts, capacity=None))
    loaded = model_from_checkpoint(seed_run)
    try:
        runtime, model = loaded.runtime, loaded.chunks
        held: dict[Path, dict] = {}

        def snapshot(path: Path) -> dict:
            if path not in held:  # one branch given twice is loaded once
                if held:  # the seed is loaded already; load_weights verifies each file's checksum
                    ck.load_weights(path, model)
                held[path] = {n: p.detach().to("cpu", copy=True) for n, p in global_param_names(model[0]).items()}
            return held[path]

        tensors = [snapshot(seed_source.path)]  # the seed: always loaded (frozen weights are checked against it)
        tensors = [snapshot(s.path) for s in merged] + tensors
        labels = [s.names() for s in merged] + [seed_source.names()]
        chunks = build_model_chunks(cfg, build_transformer_config(cfg, runtime.device), runtime, loaded.latent_shape)
        ours = global_param_names(chunks[0])
        frozen = is_frozen if seed_cfg.model.freeze_text else (lambda name: False)
        folds = lmfusion_folds(seed_cfg, cfg, ours)
        plan = merge_plan(ours, tensors[0], groups, frozen, folds)
        merge_tensors(ours, tensors, list(range(len(merged))), plan, labels)
        held.clear()  # the sources' copies: not needed for the save
        tensors.clear()

        def described(source: Source) -> dict:
            return {"path": str(source.path), "step": source.manifest.get("step"), "identity": source.identity}

        origin = {
            "converted_from": str(seed_source.path),
            "conversion": "btx-merge",
            "source_arch": seed_cfg.model.arch,
            "seed": described(seed_source),
            "branches": [described(b) for b in branch_sources],
            "keep_seed_expert": bool(keep_seed_expert),
            "experts": dict(getattr(cfg, SECTION).experts),
            **({"lmfusion_folded": True} if folds else {}),  # LMFusion's deltas added into the rows
        }
        ck.save_weights(out, chunks, cfg, seed_source.manifest.get("data"), origin)
    finally:
        shutdown()
    return cfg, origin
