"""Validation of a loaded `Config` against the number of processes.

`validate` collects every problem it finds and raises one ConfigError listing
them all, so a user fixes a config in one round instead of one error at a time.
Each problem names the offending keys, their values and a concrete fix.
"""

import copy
import functools

from megafusion.core.choices import (
    ATTENTION_BACKENDS,
    BUILTIN_SETS,
    DATA_ORDERS,
    DATA_SOURCES,
    DOCUMENT_ATTENTION,
    IMAGE_CODECS,
    OPS_BACKENDS,
    PARAMS_DTYPES,
    RECOMPUTE_MODES,
    STOP_SIGNALS,
    TOKEN_POSITIONS,
    TRAINABLE,
)
from megafusion.core.registries import EXTENSIONS, FAMILIES, OBJECTIVES, known_options

from .checks import at_least, braces, divisors, is_int, near, one_of
from .domains import domain_problems
from .schema import (
    CORE_SECTIONS,
    MOT_PARTS,
    Config,
    ConfigError,
    alternatives,
    dict_forms,
    field_types,
    section_classes,
    split_optional,
)


def _blend_problems(d) -> list[str]:
    """data.path / data.blend: one of them for source=indexed, well-formed blend entries."""
    if d.source != "indexed":
        return [f"data.blend is for data.source=indexed (got {d.source}): drop data.blend"] if d.blend else []
    if d.blend and d.path:
        return ["data.path and data.blend are both set: give one dataset in data.path, or several in data.blend"]
    if not d.blend:
        return (
            []
            if d.path
            else [
                "data.source=indexed needs data.path (the output prefix given to `megafusion data prepare`) or "
                "data.blend ([{path: PREFIX, weight: W}, ...])"
            ]
        )
    problems = []
    for i, entry in enumerate(d.blend):
        where = f"data.blend[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}={entry!r} must be a mapping {{path: PREFIX, weight: W}}")
            continue
        extra = sorted(set(entry) - {"path", "weight", "name"})
        if extra:
            problems.append(f"{where} has unknown keys {extra}: each entry holds path, weight and optionally name")
        if not isinstance(entry.get("path"), str) or not entry.get("path"):
            problems.append(f"{where} needs path: the prefix given to `megafusion data prepare`")
        w = entry.get("weight")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0:
            problems.append(
                f"{where}.weight={w!r} must be a number > 0 (its share of the tokens, relative to the others)"
            )
    return problems


ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
WORLD = "the number of processes torchrun starts, --nproc-per-node x --nnodes"


_TYPE_OK = {
    bool: lambda v: isinstance(v, bool),
    int: is_int,
    float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
    dict: lambda v: isinstance(v, dict),
}


@functools.cache
def _declared(cls: type) -> tuple:
    """(name, the types it may take, allows None) of each field (the planner validates thousands of configs)."""
    return tuple((name, alternatives(tp), split_optional(tp)[1]) for name, tp in field_types(cls).items())


def _type_problems(cfg: Config) -> list[str]:
    """Fields whose Python type does not match the schema (e.g. set by hand)."""
    problems = []
    for section, cls in section_classes().items():
        obj = getattr(cfg, section)
        for name, bases, optional in _declared(cls):
            v = getattr(obj, name)
            if v is None and optional:
                continue
            if not any(_TYPE_OK.get(base, lambda v: True)(v) for base in bases):
                key = f"{section}.{name}"
                forms = dict_forms()
                names = " or ".join(base.__name__ for base in bases)
                fix = f"write it as {forms[key]}" if key in forms else f"set it to a {names} value"
                expected = f"{names}{' or null' if optional else ''}"
                problems.append(f"{key}={v!r} is a {type(v).__name__}, expected {expected}: {fix}")
    return problems


def _range_problems(cfg: Config, world_size: int, known_archs: tuple, known_objectives: tuple) -> list[str]:
    """Every section's own value checks (the core sections here, a family's or an objective's from
    its options), before the checks that combine sections with the world size."""
    problems = [f"world size {world_size} ({WORLD}) must be >= 1"] if world_size < 1 else []
    return (
        problems
        + _parallel_problems(cfg.parallel)
        + _model_problems(cfg, known_archs)
        + _train_problems(cfg.train)
        + _data_problems(cfg)
        + one_of("objective.name", cfg.objective.name, tuple(known_objectives))
        + _checkpoint_problems(cfg.checkpoint)
        + _eval_and_logging_problems(cfg.eval, cfg.logging)
        + _owned_problems(cfg, known_archs, known_objectives)
        + _trainable_problems(cfg, known_archs)
    )


def _trainable_problems(cfg: Config, known_archs: tuple) -> list[str]:
    """``train.trainable``: ``aux_routers`` needs a model that has them, and nothing else frozen."""
    t, m = cfg.train, cfg.model
    problems = one_of("train.trainable", t.trainable, TRAINABLE)
    if t.trainable == "aux_routers":
        extensions = any(EXTENSIONS.options(name).aux_routers(cfg) for name in EXTENSIONS.names())
        if m.arch in known_archs and not FAMILIES.options(m.arch).aux_routers(cfg) and not extensions:
            problems.append(
                f"train.trainable=aux_routers trains the auxiliary routers alone, but model.arch={m.arch} with "
                f"these settings has none: turn them on (MoMa: moe.aux_router=true; Mixture-of-Depths: "
                f"mod.aux_router=true) or set train.trainable=all"
            )
        if m.freeze_text:
            problems.append("train.trainable=aux_routers with model.freeze_text=true: choose one (both freeze weights)")
        if t.recompute == "full":
            problems.append(
                "train.trainable=aux_routers with train.recompute=full: a recomputed frozen layer passes no gradient "
                "to its auxiliary router; use train.recompute=selective or none"
            )
    return problems


def _parallel_problems(p) -> list[str]:
    problems = []
    for key in ("tp", "pp", "ep", "cp"):
        problems += at_least(f"parallel.{key}", getattr(p, key), 1)
    if p.vpp is not None and p.vpp < 1:
        problems.append(f"parallel.vpp={p.vpp} must be >= 1 or null: set parallel.vpp=null to use the default")
    return problems


def _model_problems(cfg: Config, known_archs: tuple) -> list[str]:
    m, d = cfg.model, cfg.data
    problems = []
    for key in ("num_layers", "hidden_size", "num_attention_heads"):
        problems += at_least(f"model.{key}", getattr(m, key), 1)
    for key in ("num_query_groups", "ffn_hidden_size"):
        v = getattr(m, key)
        if v is not None and v < 1:
            problems.append(f"model.{key}={v} must be >= 1 or null: set model.{key}=null to use the default")
    problems += at_least("model.seq_length", m.seq_length, 2)
    if m.vocab_size is not None:
        problems += at_least("model.vocab_size", m.vocab_size, 2)
    for key in ("norm_eps", "init_std", "rope_theta"):
        v = getattr(m, key)
        if not v > 0:
            problems.append(f"model.{key}={v} must be > 0: set model.{key} to a positive number")
    if not m.z_loss_weight >= 0:
        problems.append(
            f"model.z_loss_weight={m.z_loss_weight} must be >= 0: set model.z_loss_weight to 0 or a positive number"
        )
    for key, allowed in [
        ("params_dtype", PARAMS_DTYPES),
        ("attention_backend", ATTENTION_BACKENDS),
        ("norm_placement", ("pre", "post")),
        ("arch", tuple(known_archs)),
    ]:
        problems += one_of(f"model.{key}", getattr(m, key), allowed)
    problems += _rope_scaling_problems(m.rope_scaling)
    untie = [x.strip() for x in m.untie.split(",") if x.strip()]
    bad_parts = [x for x in untie if x not in (*MOT_PARTS, "all")]
    if bad_parts:
        problems.append(
            f"model.untie={m.untie!r} names unknown parts {bad_parts}: use a comma-separated subset "
            f"of {', '.join(MOT_PARTS)}, or all (an empty string unties nothing)"
        )
    if m.freeze_text:
        if m.arch not in known_archs or not FAMILIES.options(m.arch).freezes_text(cfg):
            able = "/".join(a for a in known_archs if FAMILIES.options(a).freezes_text(_every_part_untied(cfg, a)))
            problems.append(
                f"model.freeze_text=true (LMFusion) needs every part of a layer to have a text and an image copy "
                f"(model.arch={able or '(none known)'} with model.untie=all; got arch={m.arch!r}, untie={m.untie!r}): "
                f"a part shared by text and image cannot be frozen for text and trained for images"
            )
        if m.frozen_vocab_rows is None and d.source == "synthetic":
            problems.append(
                "model.freeze_text=true with data.source=synthetic needs model.frozen_vocab_rows (no "
                "tokenizer says which ids are text): e.g. model.frozen_vocab_rows=200"
            )
        if m.frozen_vocab_rows is not None and not 0 < m.frozen_vocab_rows <= (m.vocab_size or m.frozen_vocab_rows):
            problems.append(
                f"model.frozen_vocab_rows={m.frozen_vocab_rows} must be in [1, model.vocab_size="
                f"{m.vocab_size}]: set it to the text vocabulary's size, or null to take the text "
                f"tokenizer's"
            )
    return problems


def _every_part_untied(cfg: Config, arch: str) -> Config:
    """``cfg`` with model.arch=arch and every part untied: the setting LMFusion asks a family about."""
    probe = copy.deepcopy(cfg)
    probe.model.arch, probe.model.untie = arch, "all"
    return probe


def _train_problems(t) -> list[str]:
    problems = []
    for key in ("steps", "micro_batch_size", "global_batch_size"):
        problems += at_least(f"train.{key}", getattr(t, key), 1)
    problems += at_least("train.warmup_steps", t.warmup_steps, 0)
    problems += at_least("train.nan_skip_limit", t.nan_skip_limit, 1)
    for key in ("lr", "adam_eps"):
        v = getattr(t, key)
        if not v > 0:
            problems.append(f"train.{key}={v} must be > 0: set train.{key} to a positive number")
    for key in ("min_lr", "weight_decay", "clip_grad"):
        v = getattr(t, key)
        if not v >= 0:
            problems.append(f"train.{key}={v} must be >= 0: set train.{key} to 0 or a positive number")
    if t.lr > 0 and t.min_lr > t.lr:
        problems.append(f"train.min_lr={t.min_lr} is larger than train.lr={t.lr}: set train.min_lr <= train.lr")
    for key in ("adam_beta1", "adam_beta2"):
        v = getattr(t, key)
        if not 0 <= v < 1:
            problems.append(f"train.{key}={v} must be in [0, 1): e.g. train.{key}=0.9")
    problems += one_of("train.on_nan", t.on_nan, ("stop", "skip"))
    problems += one_of("train.recompute", t.recompute, RECOMPUTE_MODES)
    if not t.spike_factor >= 0 or 0 < t.spike_factor <= 1:
        problems.append(
            f"train.spike_factor={t.spike_factor} must be > 1 (a multiple of the running mean loss) or 0 (off)"
        )
    if not t.stop_deadline_s > 0:
        problems.append(f"train.stop_deadline_s={t.stop_deadline_s} must be > 0 seconds: e.g. 100")
    bad_signals = [n for n in t.stop_signals.split(",") if n.strip() and n.strip() not in STOP_SIGNALS]
    if bad_signals:
        problems.append(
            f"train.stop_signals={t.stop_signals!r} names {bad_signals}: use a comma-separated subset of "
            f"{', '.join(STOP_SIGNALS)} (or an empty string: no signal handling)"
        )
    return problems


def _data_problems(cfg: Config) -> list[str]:
    d, m = cfg.data, cfg.model
    problems = at_least("data.docs_per_sequence", d.docs_per_sequence, 1)
    for key, low in [
        ("num_samples", 1),
        ("text_vocab_size", 16),
        ("image_size", 1),
        ("patch_size", 1),
        ("pixel_levels", 2),
        ("vq_codebook_size", 2),
        ("icp_neighbors", 1),
    ]:
        problems += at_least(f"data.{key}", getattr(d, key), low)
    problems += one_of("data.source", d.source, DATA_SOURCES)
    problems += one_of("data.image_codec", d.image_codec, IMAGE_CODECS)
    problems += one_of("data.attention", d.attention, DOCUMENT_ATTENTION)
    problems += one_of("data.positions", d.positions, TOKEN_POSITIONS)
    problems += one_of("data.order", d.order, DATA_ORDERS)
    if d.order != "input" and d.source != "builtin":
        how = (
            "an indexed dataset is packed in the order it was written: prepare it with `megafusion data prepare "
            "--order icp`"
            if d.source == "indexed"
            else "synthetic rows have no documents to order"
        )
        problems.append(f"data.order={d.order} is for data.source=builtin ({how}): set data.order=input")
    problems += one_of("ops.backend", cfg.ops.backend, OPS_BACKENDS)
    if not 0 <= d.val_fraction < 1:
        problems.append(f"data.val_fraction={d.val_fraction} must be in [0, 1): e.g. data.val_fraction=0.05")
    # vqgan ignores patch_size: its latent grid comes from the model.
    if d.image_codec != "vqgan" and d.image_size >= 1 and d.patch_size >= 1 and d.image_size % d.patch_size:
        problems.append(
            f"data.image_size={d.image_size} is not divisible by data.patch_size={d.patch_size}: "
            f"set data.image_size to {near(d.image_size, d.patch_size)}"
        )
    if d.source == "builtin":
        sets = [x.strip() for x in d.builtin.split(",") if x.strip()]
        bad = [x for x in sets if x not in BUILTIN_SETS]
        if bad or not sets:
            problems.append(
                f"data.builtin={d.builtin!r} names unknown sets {bad or '(none)'}: use a comma-separated "
                f"subset of {', '.join(BUILTIN_SETS)}, e.g. data.builtin=shapes,digits"
            )
    if d.image_codec == "vqgan" and not d.vqgan_path:
        problems.append(
            "data.image_codec=vqgan needs data.vqgan_path: a local directory holding a diffusers "
            "VQModel (as written by VQModel.save_pretrained)"
        )
    problems += _blend_problems(d)
    problems += domain_problems(d)
    if m.seq_length >= 2 and d.docs_per_sequence > m.seq_length // 2:
        problems.append(
            f"data.docs_per_sequence={d.docs_per_sequence} exceeds model.seq_length // 2 = "
            f"{m.seq_length // 2} (each packed document needs at least 2 tokens): set "
            f"data.docs_per_sequence to at most {m.seq_length // 2} or raise model.seq_length"
        )
    return problems


def _checkpoint_problems(c) -> list[str]:
    problems = at_least("checkpoint.interval", c.interval, 0) + at_least("checkpoint.keep_last", c.keep_last, 1)
    if c.load_step is not None:
        problems += at_least("checkpoint.load_step", c.load_step, 1)
    if not c.space_margin >= 0:
        problems.append(
            f"checkpoint.space_margin={c.space_margin} must be >= 0 (the free space a save asks for beyond the "
            f"checkpoint's size, as a fraction of it): e.g. 0.1"
        )
    return problems


def _eval_and_logging_problems(ev, lg) -> list[str]:
    problems = at_least("eval.interval", ev.interval, 0) + at_least("eval.batches", ev.batches, 1)
    problems += at_least("logging.log_interval", lg.log_interval, 1)
    if lg.peak_tflops is not None and not lg.peak_tflops > 0:
        problems.append(
            f"logging.peak_tflops={lg.peak_tflops} must be > 0 or null: give the device's "
            f"dense bf16 peak in TFLOP/s, e.g. logging.peak_tflops=989"
        )
    return problems


def _owned_problems(cfg: Config, known_archs: tuple, known_objectives: tuple) -> list[str]:
    """The selected family's and objective's own checks, every layer extension's, and any section
    owned only by entries that are not selected, set away from its defaults (it would be ignored)."""
    selected = {"model.arch": cfg.model.arch, "objective.name": cfg.objective.name}
    known = {"model.arch": tuple(known_archs), "objective.name": tuple(known_objectives)}
    problems = []
    owners: dict[str, list[tuple[str, str]]] = {}
    for key, name, options in known_options():
        if key == EXTENSIONS.key:  # an extension checks itself (nothing while its section leaves it off)
            problems += options.problems(cfg)
            continue
        if name not in known[key]:
            continue
        if name == selected[key]:
            problems += options.problems(cfg)
        for section in options.sections:
            if section not in CORE_SECTIONS:
                owners.setdefault(section, []).append((key, name))
    for section, entries in owners.items():
        if any(selected[key] == name for key, name in entries):
            continue
        current, default = getattr(cfg, section), type(getattr(cfg, section))()
        changed = [
            f"{section}.{f}={getattr(current, f)!r}"
            for f in field_types(type(current))
            if getattr(current, f) != getattr(default, f)
        ]
        if changed:
            one = len(changed) == 1
            key = entries[0][0]
            users = "/".join(name for _, name in entries)
            problems.append(
                f"{', '.join(changed)} {'is' if one else 'are'} set, but {key}={selected[key]} ignores the {section} "
                f"section: remove {'it' if one else 'them'}, or use {key}={users}"
            )
    return problems


def _rope_scaling_problems(scaling: dict | None) -> list[str]:
    """``model.rope_scaling``: null, or exactly the four Llama-3 values with usable magnitudes."""
    if scaling is None:
        return []
    example = (
        "e.g. model.rope_scaling={factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, "
        "original_max_position_embeddings: 8192} (Llama 3.1), or null for plain RoPE"
    )
    missing = [k for k in ROPE_SCALING_KEYS if k not in scaling]
    unknown = [k for k in scaling if k not in ROPE_SCALING_KEYS]
    if missing or unknown:
        what = "; ".join(
            x for x in (f"missing {missing}" if missing else "", f"unknown {unknown}" if unknown else "") if x
        )
        return [
            f"model.rope_scaling holds Llama-3 RoPE scaling, exactly the keys {', '.join(ROPE_SCALING_KEYS)} "
            f"({what}): {example}"
        ]
    bad = [k for k, v in scaling.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0]
    if bad:
        named = ", ".join(f"{k}={scaling[k]!r}" for k in bad)
        return [f"model.rope_scaling: {named} must be positive numbers: {example}"]
    if not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        # The smoothing between the two wavelength bands divides by their difference.
        return [
            f"model.rope_scaling: high_freq_factor={scaling['high_freq_factor']} must be larger than "
            f"low_freq_factor={scaling['low_freq_factor']}: {example}"
        ]
    return []


def _model_shape_problems(cfg: Config) -> list[str]:
    """Head/width/vocab divisibility, assuming all values are positive."""
    p, m = cfg.parallel, cfg.model
    tp, heads = p.tp, m.num_attention_heads
    problems = []
    if heads % tp:
        problems.append(
            f"model.num_attention_heads={heads} is not divisible by parallel.tp={tp}: "
            f"choose parallel.tp in {braces(divisors(heads))} or change the head count"
        )
    if m.num_query_groups is not None:
        groups = m.num_query_groups
        if heads % groups:
            problems.append(
                f"model.num_query_groups={groups} does not divide model.num_attention_heads={heads}: "
                f"choose model.num_query_groups in {braces(divisors(heads))}"
            )
        elif groups % tp:
            fits = [g for g in divisors(heads) if g % tp == 0]
            alt = f"model.num_query_groups in {braces(fits)} or " if fits else ""
            problems.append(
                f"model.num_query_groups={groups} (key/value heads) is not divisible by parallel.tp={tp}"
                f" (each tensor-parallel rank needs whole kv heads): choose {alt}"
                f"parallel.tp in {braces(divisors(groups))}"
            )
    if m.hidden_size % heads:
        problems.append(
            f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads={heads}: "
            f"set model.hidden_size to {near(m.hidden_size, heads)}, or change the head count"
        )
    ffn = m.effective_ffn_hidden_size()
    if ffn % tp:
        what = (
            f"model.ffn_hidden_size={ffn}"
            if m.ffn_hidden_size is not None
            else f"model.ffn_hidden_size (default 4 x model.hidden_size = {ffn})"
        )
        problems.append(f"{what} is not divisible by parallel.tp={tp}: set model.ffn_hidden_size to {near(ffn, tp)}")
    if m.vocab_size is not None and m.vocab_size % tp:
        nxt = -(-m.vocab_size // tp) * tp
        problems.append(
            f"model.vocab_size={m.vocab_size} is not divisible by parallel.tp={tp} (megafusion does not "
            f"pad the vocabulary): set model.vocab_size={nxt} (the next multiple of {tp}) or change parallel.tp"
        )
    if p.sp and m.seq_length % tp:
        problems.append(
            f"parallel.sp=true splits the sequence across tensor-parallel ranks, but model.seq_length="
            f"{m.seq_length} is not divisible by parallel.tp={tp}: set model.seq_length to "
            f"{near(m.seq_length, tp)} or parallel.sp=false"
        )
    return problems


def _context_parallel_problems(cfg: Config) -> list[str]:
    """``parallel.cp`` > 1: rows cut into 2 x cp chunks (each split again over TP under SP), and
    megafusion's own attention (Transformer Engine's CP takes no document or image masks)."""
    p, m = cfg.parallel, cfg.model
    problems = []
    unit = 2 * p.cp * (p.tp if p.sp else 1)
    if m.seq_length % unit:
        what = f"2 x parallel.cp x parallel.tp = 2 x {p.cp} x {p.tp}" if p.sp else f"2 x parallel.cp = 2 x {p.cp}"
        sp = " and sequence parallelism each rank's share into tp slices" if p.sp else ""
        problems.append(
            f"model.seq_length={m.seq_length} is not divisible by {what} = {unit}: context parallelism cuts "
            f"each row into 2 x cp equal chunks{sp}; "
            f"choose a multiple of {unit}"
        )
    if m.attention_backend == "te":
        problems.append(
            "parallel.cp>1 with model.attention_backend=te: Transformer Engine's context parallelism "
            "takes causal or no masks only (no documents, no image spans): set model.attention_backend=sdpa or flex"
        )
    return problems


def _layout_problems(cfg: Config, world_size: int) -> list[str]:
    """Process-grid, pipeline and batch checks, assuming all values are positive."""
    p, m, t = cfg.parallel, cfg.model, cfg.train
    vpp = p.vpp_size()
    problems = []
    if p.sp and p.tp == 1:
        problems.append(
            "parallel.sp=true (sequence parallel) needs parallel.tp>1: set parallel.tp=2 or more, or parallel.sp=false"
        )
    if p.cp > 1:
        problems += _context_parallel_problems(cfg)
    experts = FAMILIES.options(m.arch).experts(cfg)
    if p.ep > 1 and experts is None:
        with_experts = [a for a in FAMILIES.names() if FAMILIES.options(a).experts(cfg) is not None]
        problems.append(
            f"parallel.ep={p.ep}: expert parallelism needs a model with experts (model.arch="
            f"{'/'.join(with_experts)}), not model.arch={m.arch}: set parallel.ep=1"
        )
    chunks = p.pp * vpp
    if m.num_layers % chunks:
        problems.append(
            f"model.num_layers={m.num_layers} is not divisible by parallel.pp x parallel.vpp = "
            f"{p.pp} x {vpp} = {chunks} (parallel.vpp={p.vpp if p.vpp is not None else 'null'}; every model "
            f"chunk needs the same number of layers): set model.num_layers to {near(m.num_layers, chunks)}, "
            f"or change parallel.pp / parallel.vpp"
        )
    if vpp > 1 and p.pp == 1:
        problems.append(
            f"parallel.vpp={p.vpp} (interleaved virtual pipeline) needs parallel.pp>1, got parallel.pp=1: "
            f"set parallel.pp=2 or more, or parallel.vpp=null"
        )

    mp = p.tp * p.pp * p.cp
    if world_size >= 1 and world_size % mp:
        problems.append(
            f"world size {world_size} ({WORLD}) is not divisible by parallel.tp x parallel.pp x parallel.cp = "
            f"{p.tp} x {p.pp} x {p.cp} = {mp}: start a multiple of {mp} processes "
            f"(e.g. {near(world_size, mp)}) or lower parallel.tp / parallel.pp"
        )
        return problems  # dp is undefined, so the batch checks below cannot run
    if world_size < 1:
        return problems
    dp = world_size // mp
    if p.ep > 1 and experts is not None and (p.tp * dp * p.cp) % p.ep:
        # megatron-core carves expert parallelism out of the tensor-, context- and data-parallel
        # ranks of a pipeline stage (experts are whole: no expert tensor parallelism).
        problems.append(
            f"parallel.ep={p.ep} does not divide parallel.tp x dp x parallel.cp = {p.tp} x {dp} x {p.cp}: "
            f"choose parallel.ep in {braces(divisors(p.tp * dp * p.cp))}"
        )
    step = t.micro_batch_size * dp
    dp_how = (
        f"dp = world size {world_size} / (parallel.tp x parallel.pp x parallel.cp = {p.tp} x {p.pp} x {p.cp}) = {dp}"
    )
    if t.global_batch_size % step:
        problems.append(
            f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size x dp = "
            f"{t.micro_batch_size} x {dp} = {step}, where {dp_how}: set train.global_batch_size to "
            f"{near(t.global_batch_size, step)} (a multiple of {step}) or change train.micro_batch_size"
        )
    elif vpp > 1 and p.pp > 1:
        # megatron-core's interleaved schedule (microbatch_group_size_per_vp_stage
        # defaults to pp) rejects a microbatch count that is not a multiple of pp.
        n_micro = t.global_batch_size // step
        if n_micro % p.pp:
            problems.append(
                f"with parallel.vpp={p.vpp}, megatron-core's interleaved schedule needs the number of "
                f"microbatches per data-parallel rank, train.global_batch_size / (train.micro_batch_size x dp)"
                f" = {t.global_batch_size} / {step} = {n_micro}, to be divisible by parallel.pp={p.pp} "
                f"({dp_how}): set train.global_batch_size to {near(t.global_batch_size, step * p.pp)}"
                f" (a multiple of {step * p.pp})"
            )
    return problems


def validate(
    cfg: Config, world_size: int, known_archs: tuple | None = None, known_objectives: tuple | None = None
) -> None:
    """Raise ConfigError listing every problem of `cfg` for `world_size` processes.

    `known_archs` / `known_objectives`: the model.arch / objective.name values accepted (default:
    the registries' names, megafusion.core.registries, with any that plugins registered). The
    raised error carries the individual messages in its `problems` attribute.
    """
    problems = _type_problems(cfg)
    if not problems:
        problems = _range_problems(
            cfg, world_size, known_archs or FAMILIES.names(), known_objectives or OBJECTIVES.names()
        )
        # Divisibility checks divide by these; skip them until they are positive.
        p, m = cfg.parallel, cfg.model
        positive = [
            p.tp,
            p.pp,
            p.cp,
            p.ep,
            p.vpp_size(),
            m.num_layers,
            m.hidden_size,
            m.num_attention_heads,
            m.effective_num_query_groups(),
            m.effective_ffn_hidden_size(),
            m.vocab_size or 2,
            m.seq_length,
            cfg.train.micro_batch_size,
            cfg.train.global_batch_size,
        ]
        if all(v >= 1 for v in positive):
            problems += _model_shape_problems(cfg) + _layout_problems(cfg, world_size)
    if problems:
        n = len(problems)
        err = ConfigError(
            f"invalid configuration for world size {world_size} ({n} problem{'s' if n > 1 else ''}):\n"
            + "\n".join(f"  - {msg}" for msg in problems)
        )
        err.problems = problems
        raise err
