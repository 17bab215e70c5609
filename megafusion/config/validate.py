"""Validation of a loaded `Config` against the number of processes.

`validate` collects every problem it finds and raises one ConfigError listing
them all, so a user fixes a config in one round instead of one error at a time.
Each problem names the offending keys, their values and a concrete fix.
"""

from megafusion.core.choices import (
    ATTENTION_BACKENDS,
    BUILTIN_SETS,
    DATA_SOURCES,
    EXPERT_ARCHS,
    IMAGE_CODECS,
    LATENT_CODECS,
    MOE_DISPATCHERS,
    OPS_BACKENDS,
    PARAMS_DTYPES,
    RECOMPUTE_MODES,
    STOP_SIGNALS,
)
from megafusion.core.modality import MODALITY_NAMES
from megafusion.core.numbers import divisors as _divisors
from megafusion.core.registries import FAMILIES, OBJECTIVES

from .schema import (
    DICT_FORMS,
    MOT_PARTS,
    SECTIONS,
    UNET_CHANNELS,
    Config,
    ConfigError,
    MoEConfig,
    field_types,
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


def _braces(xs) -> str:
    return "{" + ", ".join(str(x) for x in xs) + "}"


def _near(value: int, step: int) -> str:
    """The multiples of `step` nearest to `value`, as 'a or b'."""
    lo = (value // step) * step
    hi = lo + step
    return f"{lo} or {hi}" if lo >= step else str(hi)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _type_problems(cfg: Config) -> list[str]:
    """Fields whose Python type does not match the schema (e.g. set by hand)."""
    problems = []
    for section, cls in SECTIONS.items():
        obj = getattr(cfg, section)
        for name, tp in field_types(cls).items():
            v = getattr(obj, name)
            base, optional = split_optional(tp)
            if v is None and optional:
                continue
            ok = {
                bool: isinstance(v, bool),
                int: _is_int(v),
                float: isinstance(v, (int, float)) and not isinstance(v, bool),
                str: isinstance(v, str),
                dict: isinstance(v, dict),
            }.get(base, True)
            if not ok:
                key = f"{section}.{name}"
                fix = f"write it as {DICT_FORMS[key]}" if key in DICT_FORMS else f"set it to a {base.__name__} value"
                expected = f"{base.__name__}{' or null' if optional else ''}"
                problems.append(f"{key}={v!r} is a {type(v).__name__}, expected {expected}: {fix}")
    return problems


def _range_problems(cfg: Config, world_size: int, known_archs: tuple, known_objectives: tuple) -> list[str]:
    p, m, t, d, lg = cfg.parallel, cfg.model, cfg.train, cfg.data, cfg.logging
    problems = []

    def at_least(key: str, v, low: int) -> None:
        if v < low:
            problems.append(f"{key}={v} must be >= {low}: set {key} to {low} or more")

    if world_size < 1:
        problems.append(f"world size {world_size} ({WORLD}) must be >= 1")
    for key, v in [
        ("parallel.tp", p.tp),
        ("parallel.pp", p.pp),
        ("parallel.ep", p.ep),
        ("parallel.cp", p.cp),
        ("model.num_layers", m.num_layers),
        ("model.hidden_size", m.hidden_size),
        ("model.num_attention_heads", m.num_attention_heads),
        ("train.steps", t.steps),
        ("train.micro_batch_size", t.micro_batch_size),
        ("train.global_batch_size", t.global_batch_size),
        ("data.docs_per_sequence", d.docs_per_sequence),
        ("logging.log_interval", lg.log_interval),
    ]:
        at_least(key, v, 1)
    for key, v in [
        ("parallel.vpp", p.vpp),
        ("model.num_query_groups", m.num_query_groups),
        ("model.ffn_hidden_size", m.ffn_hidden_size),
    ]:
        if v is not None and v < 1:
            problems.append(f"{key}={v} must be >= 1 or null: set {key}=null to use the default")
    at_least("model.seq_length", m.seq_length, 2)
    if m.vocab_size is not None:
        at_least("model.vocab_size", m.vocab_size, 2)
    at_least("train.warmup_steps", t.warmup_steps, 0)

    for key, v in [
        ("train.lr", t.lr),
        ("train.adam_eps", t.adam_eps),
        ("model.norm_eps", m.norm_eps),
        ("model.init_std", m.init_std),
        ("model.rope_theta", m.rope_theta),
    ]:
        if not v > 0:
            problems.append(f"{key}={v} must be > 0: set {key} to a positive number")
    for key, v in [
        ("train.min_lr", t.min_lr),
        ("train.weight_decay", t.weight_decay),
        ("train.clip_grad", t.clip_grad),
        ("model.z_loss_weight", m.z_loss_weight),
    ]:
        if not v >= 0:
            problems.append(f"{key}={v} must be >= 0: set {key} to 0 or a positive number")
    if t.lr > 0 and t.min_lr > t.lr:
        problems.append(f"train.min_lr={t.min_lr} is larger than train.lr={t.lr}: set train.min_lr <= train.lr")
    for key, v in [("train.adam_beta1", t.adam_beta1), ("train.adam_beta2", t.adam_beta2)]:
        if not 0 <= v < 1:
            problems.append(f"{key}={v} must be in [0, 1): e.g. {key}=0.9")

    for key, v, allowed in [
        ("model.params_dtype", m.params_dtype, PARAMS_DTYPES),
        ("model.attention_backend", m.attention_backend, ATTENTION_BACKENDS),
        ("ops.backend", cfg.ops.backend, OPS_BACKENDS),
        ("model.norm_placement", m.norm_placement, ("pre", "post")),
        ("data.source", d.source, DATA_SOURCES),
        ("data.image_codec", d.image_codec, IMAGE_CODECS),
        ("model.arch", m.arch, tuple(known_archs)),
        ("train.on_nan", t.on_nan, ("stop", "skip")),
        ("train.recompute", t.recompute, RECOMPUTE_MODES),
    ]:
        if v not in allowed:
            problems.append(f"{key}={v!r} is not one of {', '.join(allowed)}: set {key} to one of them")

    c, ev = cfg.checkpoint, cfg.eval
    for key, v, low in [
        ("checkpoint.interval", c.interval, 0),
        ("checkpoint.keep_last", c.keep_last, 1),
        ("eval.interval", ev.interval, 0),
        ("eval.batches", ev.batches, 1),
        ("data.num_samples", d.num_samples, 1),
        ("data.text_vocab_size", d.text_vocab_size, 16),
        ("data.image_size", d.image_size, 1),
        ("data.patch_size", d.patch_size, 1),
        ("data.pixel_levels", d.pixel_levels, 2),
        ("data.vq_codebook_size", d.vq_codebook_size, 2),
        ("train.nan_skip_limit", t.nan_skip_limit, 1),
    ]:
        at_least(key, v, low)
    if c.load_step is not None:
        at_least("checkpoint.load_step", c.load_step, 1)
    if not c.space_margin >= 0:
        problems.append(
            f"checkpoint.space_margin={c.space_margin} must be >= 0 (the free space a save asks for beyond the "
            f"checkpoint's size, as a fraction of it): e.g. 0.1"
        )
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
    problems += _rope_scaling_problems(m.rope_scaling)
    if _has_experts(m.arch, known_archs):
        problems += _moe_problems(cfg.moe)
    elif m.arch in known_archs:
        problems += _moe_without_experts(cfg, known_archs)
    untie = [x.strip() for x in m.untie.split(",") if x.strip()]
    bad_parts = [x for x in untie if x not in (*MOT_PARTS, "all")]
    if bad_parts:
        problems.append(
            f"model.untie={m.untie!r} names unknown parts {bad_parts}: use a comma-separated subset "
            f"of {', '.join(MOT_PARTS)}, or all (an empty string unties nothing)"
        )
    if m.freeze_text:
        if m.arch != "mot" or set(m.untied_parts()) != set(MOT_PARTS):
            problems.append(
                f"model.freeze_text=true (LMFusion) needs model.arch=mot and model.untie=all (got arch="
                f"{m.arch!r}, untie={m.untie!r}): a part shared by text and image cannot be frozen "
                f"for text and trained for images"
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
    o = cfg.objective
    for key, v, allowed in [
        ("objective.name", o.name, tuple(known_objectives)),
        ("objective.noise_schedule", o.noise_schedule, ("cosine", "linear")),
        ("objective.prediction", o.prediction, ("epsilon", "v_prediction", "sample", "flow")),
        ("objective.latent_codec", o.latent_codec, LATENT_CODECS),
        ("objective.patchify", o.patchify, ("linear", "unet")),
        ("objective.image_positions", o.image_positions, ("none", "sincos2d")),
    ]:
        if v not in allowed:
            problems.append(f"{key}={v!r} is not one of {', '.join(allowed)}: set {key} to one of them")
    if o.name == "transfusion":
        at_least("objective.train_timesteps", o.train_timesteps, 2)
        at_least("objective.latent_patch_size", o.latent_patch_size, 1)
        if o.diffusion_weight < 0:
            problems.append(f"objective.diffusion_weight={o.diffusion_weight} must be >= 0: e.g. 5.0 (Transfusion)")
        if d.source == "synthetic":
            problems.append(
                "objective.name=transfusion needs images, and data.source=synthetic has none: set "
                "data.source=builtin, or data.source=indexed with a dataset from `megafusion data "
                "prepare ... --latent-codec pixels|kl`"
            )
        if not 0 <= o.caption_dropout < 1:
            problems.append(f"objective.caption_dropout={o.caption_dropout} must be in [0, 1): e.g. 0.1")
        if not -1 <= o.uncaptioned_max_t < o.train_timesteps:
            problems.append(
                f"objective.uncaptioned_max_t={o.uncaptioned_max_t} must be -1 (no cap) or a timestep "
                f"below objective.train_timesteps={o.train_timesteps}, e.g. {o.train_timesteps // 2}"
            )
        if o.latent_codec == "kl" and not o.vae_path:
            problems.append(
                "objective.latent_codec=kl needs objective.vae_path: the directory of a diffusers "
                "AutoencoderKL saved with save_pretrained"
            )
        factor = 2 ** (len(UNET_CHANNELS) - 1)  # the U-Net's downsampling inside each patch
        if o.patchify == "unet" and o.latent_patch_size >= 1 and o.latent_patch_size % factor:
            problems.append(
                f"objective.latent_patch_size={o.latent_patch_size} must be a multiple of {factor} with "
                f"objective.patchify=unet (its U-Net halves the latent {len(UNET_CHANNELS) - 1} time(s) "
                f"inside each patch): set it to {_near(o.latent_patch_size, factor)}, or use "
                f"objective.patchify=linear"
            )
        if o.image_positions != "none" and o.patchify != "linear":
            problems.append(
                f"objective.image_positions={o.image_positions} is added by the linear patch embedding: use it "
                f"with objective.patchify=linear, or set objective.image_positions=none (the U-Net's "
                f"convolutions see the 2D layout)"
            )
        if o.latent_codec == "pixels" and d.image_size % max(o.latent_patch_size, 1):
            problems.append(
                f"objective.latent_patch_size={o.latent_patch_size} does not divide data.image_size="
                f"{d.image_size} (pixel latents are the image): choose a divisor of {d.image_size}"
            )
    if lg.peak_tflops is not None and not lg.peak_tflops > 0:
        problems.append(
            f"logging.peak_tflops={lg.peak_tflops} must be > 0 or null: give the device's "
            f"dense bf16 peak in TFLOP/s, e.g. logging.peak_tflops=989"
        )
    if not 0 <= d.val_fraction < 1:
        problems.append(f"data.val_fraction={d.val_fraction} must be in [0, 1): e.g. data.val_fraction=0.05")
    # vqgan ignores patch_size: its latent grid comes from the model.
    if d.image_codec != "vqgan" and d.image_size >= 1 and d.patch_size >= 1 and d.image_size % d.patch_size:
        problems.append(
            f"data.image_size={d.image_size} is not divisible by data.patch_size={d.patch_size}: "
            f"set data.image_size to {_near(d.image_size, d.patch_size)}"
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
    if m.seq_length >= 2 and d.docs_per_sequence > m.seq_length // 2:
        problems.append(
            f"data.docs_per_sequence={d.docs_per_sequence} exceeds model.seq_length // 2 = "
            f"{m.seq_length // 2} (each packed document needs at least 2 tokens): set "
            f"data.docs_per_sequence to at most {m.seq_length // 2} or raise model.seq_length"
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
            f"choose parallel.tp in {_braces(_divisors(heads))} or change the head count"
        )
    if m.num_query_groups is not None:
        groups = m.num_query_groups
        if heads % groups:
            problems.append(
                f"model.num_query_groups={groups} does not divide model.num_attention_heads={heads}: "
                f"choose model.num_query_groups in {_braces(_divisors(heads))}"
            )
        elif groups % tp:
            fits = [g for g in _divisors(heads) if g % tp == 0]
            alt = f"model.num_query_groups in {_braces(fits)} or " if fits else ""
            problems.append(
                f"model.num_query_groups={groups} (key/value heads) is not divisible by parallel.tp={tp}"
                f" (each tensor-parallel rank needs whole kv heads): choose {alt}"
                f"parallel.tp in {_braces(_divisors(groups))}"
            )
    if m.hidden_size % heads:
        problems.append(
            f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads={heads}: "
            f"set model.hidden_size to {_near(m.hidden_size, heads)}, or change the head count"
        )
    ffn = m.effective_ffn_hidden_size()
    if ffn % tp:
        what = (
            f"model.ffn_hidden_size={ffn}"
            if m.ffn_hidden_size is not None
            else f"model.ffn_hidden_size (default 4 x model.hidden_size = {ffn})"
        )
        problems.append(f"{what} is not divisible by parallel.tp={tp}: set model.ffn_hidden_size to {_near(ffn, tp)}")
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
            f"{_near(m.seq_length, tp)} or parallel.sp=false"
        )
    return problems


def _has_experts(arch: str, known_archs: tuple) -> bool:
    """Whether model.arch's FFN is routed experts (what the moe section configures). A built-in
    family says so in EXPERT_ARCHS (validation imports no model); a registered one (a plugin) is
    asked: ``experts(cfg)`` of a family without experts is its default, which returns None."""
    if arch in FAMILIES.builtin:
        return arch in EXPERT_ARCHS
    if arch not in known_archs or arch not in FAMILIES.names():
        return False
    return FAMILIES.get(arch).experts(Config()) is not None


def _moe_without_experts(cfg: Config, known_archs: tuple) -> list[str]:
    """``moe.*`` keys set away from their defaults on a model without experts, which ignores them."""
    defaults = MoEConfig()
    changed = [
        f"moe.{f}={getattr(cfg.moe, f)!r}"
        for f in field_types(MoEConfig)
        if getattr(cfg.moe, f) != getattr(defaults, f)
    ]
    if not changed:
        return []
    with_experts = [a for a in known_archs if _has_experts(a, known_archs)]
    return [
        f"{', '.join(changed)} {'is' if len(changed) == 1 else 'are'} set, but model.arch={cfg.model.arch} has no "
        f"experts and ignores the moe section: remove {'it' if len(changed) == 1 else 'them'}, or use a model "
        f"with experts (model.arch={'/'.join(with_experts) or 'moma'})"
    ]


def _moe_problems(moe) -> list[str]:
    """The ``moe`` section (model.arch=moma): groups, expert counts, capacities, dispatcher."""
    example = "e.g. moe.experts={text: 4, image: 4} (MoMa 4t4i) or moe.experts={mixed: 8}"
    keys = set(moe.experts)
    if not keys or not (keys == {"mixed"} or keys == set(MODALITY_NAMES)):
        return [
            f"moe.experts={moe.experts!r} must name every modality ({', '.join(MODALITY_NAMES)}) with its "
            f"expert count, or only 'mixed' (one modality-blind group): {example}"
        ]
    problems = []
    bad = {k: v for k, v in moe.experts.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
    if bad:
        problems.append(f"moe.experts: {bad} must be whole numbers >= 1 (experts in the group): {example}")
    if moe.capacity is not None:
        if set(moe.capacity) != keys:
            problems.append(
                f"moe.capacity={moe.capacity!r} must name the groups of moe.experts ({', '.join(sorted(keys))}), "
                f"or be null (each group's capacity 1 / its expert count)"
            )
        for name, c in moe.capacity.items():
            if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c <= 1:
                problems.append(
                    f"moe.capacity.{name}={c!r} must be in (0, 1] (the fraction of the group's tokens each "
                    f"expert takes; 1 = every token): e.g. moe.capacity={{{name}: 0.25}}"
                )
    if not moe.router_noise >= 0:
        problems.append(f"moe.router_noise={moe.router_noise} must be >= 0 (0 = no noise)")
    if moe.dispatcher not in MOE_DISPATCHERS:
        problems.append(f"moe.dispatcher={moe.dispatcher!r}: choose one of {', '.join(MOE_DISPATCHERS)}")
    return problems


def _expert_layout_problems(cfg: Config) -> list[str]:
    p, experts = cfg.parallel, cfg.moe.experts
    problems = []
    total = sum(v for v in experts.values() if isinstance(v, int))
    if total and total % p.ep:
        problems.append(
            f"moe.experts={experts!r} holds {total} experts, not divisible by parallel.ep={p.ep} (every "
            f"expert-parallel rank holds the same number of experts): choose parallel.ep in "
            f"{_braces(_divisors(total))} or change moe.experts"
        )
    if p.tp > 1 and not p.sp:
        problems.append(
            f"model.arch={cfg.model.arch} with parallel.tp={p.tp} needs parallel.sp=true (megatron-core's "
            f"MoE layer refuses tensor parallelism without sequence parallelism in training)"
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
    if p.cp != 1:
        problems.append(f"parallel.cp={p.cp}: context parallelism is reserved, not implemented yet: set parallel.cp=1")
    if p.ep > 1 and m.arch not in EXPERT_ARCHS:
        problems.append(
            f"parallel.ep={p.ep}: expert parallelism needs a model with experts (model.arch="
            f"{'/'.join(EXPERT_ARCHS)}), not model.arch={m.arch}: set parallel.ep=1"
        )
    if m.arch in EXPERT_ARCHS:
        problems += _expert_layout_problems(cfg)
    chunks = p.pp * vpp
    if m.num_layers % chunks:
        problems.append(
            f"model.num_layers={m.num_layers} is not divisible by parallel.pp x parallel.vpp = "
            f"{p.pp} x {vpp} = {chunks} (parallel.vpp={p.vpp if p.vpp is not None else 'null'}; every model "
            f"chunk needs the same number of layers): set model.num_layers to {_near(m.num_layers, chunks)}, "
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
            f"(e.g. {_near(world_size, mp)}) or lower parallel.tp / parallel.pp"
        )
        return problems  # dp is undefined, so the batch checks below cannot run
    if world_size < 1:
        return problems
    dp = world_size // mp
    if p.ep > 1 and m.arch in EXPERT_ARCHS and (p.tp * dp * p.cp) % p.ep:
        # megatron-core carves expert parallelism out of the tensor-, context- and data-parallel
        # ranks of a pipeline stage (experts are whole: no expert tensor parallelism).
        problems.append(
            f"parallel.ep={p.ep} does not divide parallel.tp x dp x parallel.cp = {p.tp} x {dp} x {p.cp}: "
            f"choose parallel.ep in {_braces(_divisors(p.tp * dp * p.cp))}"
        )
    step = t.micro_batch_size * dp
    dp_how = (
        f"dp = world size {world_size} / (parallel.tp x parallel.pp x parallel.cp = {p.tp} x {p.pp} x {p.cp}) = {dp}"
    )
    if t.global_batch_size % step:
        problems.append(
            f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size x dp = "
            f"{t.micro_batch_size} x {dp} = {step}, where {dp_how}: set train.global_batch_size to "
            f"{_near(t.global_batch_size, step)} (a multiple of {step}) or change train.micro_batch_size"
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
                f"({dp_how}): set train.global_batch_size to {_near(t.global_batch_size, step * p.pp)}"
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
