"""Typed configuration dataclasses for megafusion.

One dataclass per YAML section (parallel, model, train, data, objective, checkpoint, eval,
logging, ops), gathered in `Config` with the sections and keys that model families and objectives
own (:mod:`megafusion.core.options`). Defaults describe a tiny dense model that runs on one CPU process.
This module is pure Python: it runs before any process group exists, so it must
not import torch or megatron.
"""

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass

from megafusion.core.choices import MOT_PARTS
from megafusion.core.errors import ConfigError  # noqa: F401  (re-exported by megafusion.config)
from megafusion.core.registries import known_options


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor parallel size
    pp: int = 1  # pipeline parallel size
    vpp: int | None = None  # virtual pipeline chunks per stage; None or 1 = off
    sp: bool = False  # sequence parallel (needs tp > 1)
    ep: int = 1  # expert parallel (model.arch=moma): experts split over this many data-parallel ranks
    # context parallel: each rank holds seq_length / cp positions of every row (docs/context_parallel.md)
    cp: int = 1
    distributed_optimizer: bool = False

    def vpp_size(self) -> int:
        """Virtual pipeline chunks per stage, with None meaning 1."""
        return 1 if self.vpp is None else self.vpp


@dataclass
class ModelConfig:
    arch: str = "dense"
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int | None = None  # kv heads; None = same as heads
    ffn_hidden_size: int | None = None  # None = 4 * hidden_size
    vocab_size: int | None = None  # null: 256 for synthetic data, else the tokenizer's (padded to 128)
    seq_length: int = 64
    qk_norm: bool = True
    z_loss_weight: float = 0.0
    rope_theta: float = 10000.0
    # null, or Llama-3 RoPE frequency scaling: {factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings} (Hugging Face's rope_type "llama3"; see models/rope.py).
    rope_scaling: dict | None = None
    norm_eps: float = 1e-5
    init_std: float = 0.02
    params_dtype: str = "auto"  # auto|fp32|bf16; auto = fp32 on CPU, bf16 on GPU
    attention_backend: str = "auto"  # auto|sdpa|flex|te
    # arch=mot: which parts get one copy per modality (comma-separated attention, ffn, norms,
    # or "all"); attention = Q/K/V and output projections, norms = every RMSNorm incl. QK-norm
    # and the final norm. Self-attention itself always stays global over the whole sequence.
    untie: str = "all"
    # pre: x + f(norm(x)) (Llama, megatron-core); post: x + norm(f(x)), the "norm reordering" of
    # Chameleon and of the MoT paper's algorithm.
    norm_placement: str = "pre"
    # true: the output layer reuses the input embedding's weight (megatron-core's
    # share_embeddings_and_output_weights; under PP the last stage keeps a synced copy).
    tie_embeddings: bool = False
    # arch=mot, untie=all: LMFusion. Every text copy, the embedding and the output layer stay frozen
    # (no gradients, no optimizer state); the image copies, Transfusion's image modules and the rows of
    # the tokens after the text vocabulary (<boi>, <eoi>, image ids, padding) train. Start it from a
    # pretrained model: checkpoint.init_from a dense (e.g. `convert hf-to-mf`) or MoT checkpoint.
    freeze_text: bool = False
    # freeze_text: embedding / output rows [0, N) that stay frozen; null = the data's text tokenizer
    # size (set by the run, like vocab_size). Rows >= N get a trainable delta (models/lmfusion.py).
    frozen_vocab_rows: int | None = None

    def untied_parts(self) -> tuple[str, ...]:
        """The parts of a MoT layer that are untied by modality, in canonical order."""
        names = [p.strip() for p in self.untie.split(",") if p.strip()]
        if "all" in names:
            return MOT_PARTS
        return tuple(p for p in MOT_PARTS if p in names)

    # The None defaults are resolved on demand rather than in __post_init__,
    # so that overriding hidden_size later still changes the derived values.
    def effective_num_query_groups(self) -> int:
        """Number of key/value heads (num_query_groups, or the head count)."""
        if self.num_query_groups is None:
            return self.num_attention_heads
        return self.num_query_groups

    def effective_ffn_hidden_size(self) -> int:
        """MLP inner width (ffn_hidden_size, or 4 * hidden_size)."""
        if self.ffn_hidden_size is None:
            return 4 * self.hidden_size
        return self.ffn_hidden_size


@dataclass
class TrainConfig:
    steps: int = 10
    micro_batch_size: int = 2
    global_batch_size: int = 8
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 0
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    seed: int = 1234
    # A non-finite loss or gradient norm: stop (nothing new is saved; the error names the step,
    # microbatch and modality) or skip (the step's update is dropped and logged as an event;
    # more than nan_skip_limit skipped steps in a row stop the run).
    on_nan: str = "stop"
    nan_skip_limit: int = 5
    spike_factor: float = 3.0  # log a loss-spike event when loss > factor x running mean; 0 = off
    # Signals that make every rank finish its step, save a checkpoint and exit with status 75
    # (SLURM: `--signal=B:USR1@120`, preemption sends SIGTERM). A second signal, or the deadline
    # (seconds after the first), forces the exit without saving.
    stop_signals: str = "SIGTERM,SIGUSR1"
    stop_deadline_s: float = 100.0
    # Activation recomputation: none | selective (core attention recomputed in the backward pass,
    # megatron's selective granularity) | full (each transformer layer keeps only its input and
    # runs its forward again in the backward pass). Losses and gradients are unchanged.
    recompute: str = "none"
    # What trains: all | aux_routers (only the auxiliary routers, e.g. MoMa's moe.aux_router, from
    # a trained model via checkpoint.init_from; every other weight frozen: no gradient, no
    # optimizer state). Jointly (all), the auxiliary routers learn on detached inputs and are left
    # out of the gradient norm, so the main model's update is the one without them.
    trainable: str = "all"


@dataclass
class DataConfig:
    # synthetic: arithmetic token streams (no tokenizer); builtin: the generated mixed-modal
    # sets named in `builtin`; indexed: a dataset written by `megafusion data prepare` at `path`.
    source: str = "synthetic"
    docs_per_sequence: int = 1  # synthetic only: packed documents per sequence
    # comma-separated built-in sets (source=builtin): shapes, digits, arithmetic (text only), facts
    # (text only: groups of documents repeating a made-up fact, the in-context probe)
    builtin: str = "shapes,digits"
    # source=builtin: documents generated by shapes, arithmetic and facts each (digits: all 1797)
    num_samples: int = 4000
    # source=builtin: the order documents fill rows in, each split on its own: input (as generated),
    # random (a seeded shuffle), icp (In-Context Pretraining: related documents share a row;
    # docs/data.md). Indexed data keeps the order `megafusion data prepare --order` wrote.
    order: str = "input"
    icp_neighbors: int = 10  # order=icp: nearest neighbours per document in the ICP graph
    path: str | None = None  # source=indexed: the prefix given to `megafusion data prepare`
    # source=indexed, several datasets at fixed token shares instead of `path`:
    # [{path: PREFIX, weight: W}, ...] (optional `name:` for the logs); weights need not sum to 1.
    blend: list | None = None
    # Which domains TRAIN (Branch-Train-MiX: one branch per domain). A domain is a set of
    # data.builtin or an entry of data.blend (by name). "shapes,digits": those, at their natural
    # shares (built-in: their documents packed together; blend: their blend weights); {shapes: 1,
    # digits: 2}: at these token weights. The tokenizer, codec and held-out split stay those of
    # every domain, and validation reports each domain's loss (val/domain/<name>/loss).
    # null: all of the data, as without domains.
    domains: str | dict | None = None
    # source=indexed: where the sample index (split, packed rows, epoch orders) is cached, built once
    # by the first rank; null = next to the data (PREFIX.index/)
    index_cache: str | None = None
    # SentencePiece .model, or Hugging Face tokenizer.json (or its directory: text ids kept, image
    # tokens appended); null = train a SentencePiece model on the built-in text
    tokenizer: str | None = None
    text_vocab_size: int = 384  # size of the SentencePiece model trained on first use
    image_size: int = 16  # images are resized to image_size x image_size pixels
    patch_size: int = 2  # pixel / vq codecs: one token per patch_size x patch_size patch
    pixel_levels: int = 4  # pixel-patch codec: quantisation levels per colour channel
    # source=builtin image codec (indexed data carries its own): pixel|vq|vqgan. vq = k-means patch
    # codebook (Chameleon-style discrete image tokens); vqgan = a pretrained diffusers VQModel.
    image_codec: str = "pixel"
    vq_codebook: str | None = None  # vq: codebook file; null = fit one on the built-in images (cached)
    vq_codebook_size: int = 128  # vq: codebook entries (image codes) when fitting one (the built-in
    # 16px images with 2px patches hold ~169 distinct patches: more entries than that cannot be fitted)
    vqgan_path: str | None = None  # vqgan: local directory of a diffusers VQModel (save_pretrained)
    val_fraction: float = 0.05  # documents held out for evaluation
    cache_dir: str = "runs/cache"  # where built-in tokenizers and packed data are cached
    # What a token attends across the documents packed in its row (megafusion/layers/masks.py):
    # isolated = only its own document; causal = every earlier token of the row (In-Context
    # Pretraining, arXiv 2310.10638: pair it with `megafusion data prepare --order icp`; over
    # randomly ordered documents it hurts, arXiv 2402.13991). Images stay bidirectional inside
    # their span either way, and padding is never a key.
    attention: str = "isolated"
    # Each token's RoPE position: row = its index in the packed row; document = its position
    # within its document (restarting at 0 for each document: the batch's position_ids).
    positions: str = "row"

    def packs_documents(self) -> bool:
        """Whether rows can hold several documents, i.e. attention needs the document mask."""
        return self.source != "synthetic" or self.docs_per_sequence > 1

    def cross_document(self) -> bool:
        """Whether a token attends the earlier documents of its row (``attention=causal``)."""
        return self.attention == "causal"


@dataclass
class ObjectiveConfig:
    # lm: next-token loss on every token (text pieces and discrete image codes: Chameleon);
    # transfusion: text keeps the next-token loss, images are continuous latents trained with a
    # diffusion loss in the same sequence. An objective's own keys join this section
    # (megafusion.core.options; Transfusion's: megafusion/objectives/transfusion_options.py).
    name: str = "lm"


@dataclass
class CheckpointConfig:
    dir: str | None = None  # null = <logging.out_dir>/checkpoints
    interval: int = 0  # save every N steps (0 = only at the end); the end is always saved
    keep_last: int = 2  # complete checkpoints kept on disk
    resume: bool = True  # continue from <dir>/latest when it exists
    save: bool = True  # false: never write checkpoints
    # Start a *new* run (step 0, fresh optimizer) from this checkpoint's model weights, e.g. a
    # dense checkpoint converted by `megafusion convert dense-to-mot`. Ignored when the run
    # resumes from checkpoint.dir.
    init_from: str | None = None
    # Resume from this step's checkpoint instead of the one `latest` names (e.g. when the newest
    # is damaged); a run that then saves moves `latest` on from there.
    load_step: int | None = None
    verify: bool = True  # check every file's checksum before loading a checkpoint
    # true (`megafusion train --overwrite`): start a new run in a logging.out_dir / checkpoint.dir
    # that holds another run (or this one), deleting its checkpoints and metrics first. A requeued
    # SLURM job (the same SLURM_JOB_ID) resumes instead of deleting what it saved itself.
    overwrite: bool = False
    # A save starts only when the disk holds the checkpoint's expected size (the last one's, else
    # an estimate from the parameters) x (1 + space_margin); 0: the size alone.
    space_margin: float = 0.1


@dataclass
class EvalConfig:
    interval: int = 0  # evaluate every N steps (0 = only at the end)
    batches: int = 2  # global batches of held-out data per evaluation


@dataclass
class LoggingConfig:
    log_interval: int = 1
    out_dir: str = "runs/default"
    wandb: bool = True  # Weights & Biases, offline unless WANDB_MODE says otherwise
    wandb_project: str = "megafusion"
    tensorboard: bool = False  # needs the tensorboard package
    progress: bool = True  # a progress bar when a terminal is attached
    peak_tflops: float | None = None  # per-GPU peak for MFU where the device is not in the table
    dump_losses: str | None = None  # JSON file for per-step losses
    dump_grads: str | None = None  # .pt file for first-step full gradients


@dataclass
class OpsConfig:
    # Grouped GEMMs of MoT's untied projections and of the experts: auto = megafusion's Triton
    # kernels on CUDA (if Triton is installed), else torch's grouped_mm where its fast path
    # exists, else the torch reference; triton | torch_grouped_mm | torch force one.
    backend: str = "auto"


# The sections every run has, in order; families and objectives add theirs (section_classes).
CORE_SECTIONS: dict[str, type] = {
    "parallel": ParallelConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "data": DataConfig,
    "objective": ObjectiveConfig,
    "checkpoint": CheckpointConfig,
    "eval": EvalConfig,
    "logging": LoggingConfig,
    "ops": OpsConfig,
}


def section_classes() -> dict[str, type]:
    """Section name -> dataclass of its keys: the core sections, each extended by the keys that
    known families and objectives add to it, then their new sections (MoMa's ``moe``)."""
    owned = tuple((section, cls) for _, _, options in known_options() for section, cls in options.sections.items())
    return _section_classes(owned)


@functools.cache
def _section_classes(owned: tuple) -> dict[str, type]:
    extra: dict[str, list[type]] = {}
    for section, cls in owned:
        if cls not in extra.setdefault(section, []):
            extra[section].append(cls)
    classes = dict(CORE_SECTIONS)
    for section, parts in extra.items():
        bases = ([classes[section]] if section in classes else []) + parts
        seen: dict[str, type] = {}
        for base in bases:
            for f in dataclasses.fields(base):
                # A key two owners inherit from one declaration is one key (caption_dropout).
                if f.name in seen and _declaring(seen[f.name], f.name) is not _declaring(base, f.name):
                    raise TypeError(
                        f"{section}.{f.name} is declared by both {seen[f.name].__name__} and {base.__name__}: "
                        f"rename one of them"
                    )
                seen[f.name] = base
        # One dataclass whose fields are every base's (methods of the core section kept), findable
        # by pickle under its own name in this module.
        if len(bases) > 1:
            name = "_".join([bases[0].__name__, *(b.__name__ for b in parts if b is not bases[0])])
            merged = dataclasses.make_dataclass(name, [], bases=tuple(bases[::-1]))
            merged.__module__ = __name__
            globals()[name] = merged
            classes[section] = merged
        else:
            classes[section] = bases[0]
    return classes


def _declaring(cls: type, key: str) -> type:
    """The class of ``cls``'s hierarchy that declares the field ``key``."""
    return next(c for c in cls.__mro__ if key in vars(c).get("__annotations__", {}))


def dict_forms() -> dict[str, str]:
    """How to write each dict-valued key that a family or objective owns (``moe.experts``)."""
    return {k: v for _, _, options in known_options() for k, v in options.dict_forms.items()}


class Config:
    """A run's configuration: one dataclass instance per section (``cfg.model.hidden_size``).

    The sections are :func:`section_classes`: the core ones and those of every known family and
    objective (plugins included), each at its defaults unless given.
    """

    def __init__(self, **sections):
        for name, cls in section_classes().items():
            setattr(self, name, sections.pop(name) if name in sections else cls())
        if sections:
            raise TypeError(f"Config has no section(s) {sorted(sections)}: sections are {', '.join(section_classes())}")

    def section_names(self) -> list[str]:
        return [name for name in vars(self) if not name.startswith("_")]

    def to_dict(self) -> dict:
        """Nested plain dict (section -> key -> value), e.g. for logging or YAML."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in self.section_names()}

    def __eq__(self, other) -> bool:
        return isinstance(other, Config) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return "Config(" + ", ".join(f"{n}={getattr(self, n)!r}" for n in self.section_names()) + ")"

    def data_parallel_size(self, world_size: int) -> int:
        """Data-parallel size: world_size // (tp * pp * cp).

        ep is not in the product: for dense models it consumes no ranks, and in
        megatron-core expert parallelism is carved out of the data-parallel
        ranks rather than multiplying the world size.
        """
        p = self.parallel
        return world_size // (p.tp * p.pp * p.cp)


def field_types(cls: type) -> dict[str, typing.Any]:
    """Declared type of each field of a section dataclass (annotations resolved)."""
    return dict(_field_types(cls))


@functools.cache
def _field_types(cls: type) -> dict[str, typing.Any]:
    # Resolving annotations is slow (the planner builds tens of thousands of configs): once per class.
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def alternatives(tp: typing.Any) -> tuple[type, ...]:
    """The types a field's value may take besides None: ``(X,)`` for ``X`` or ``X | None``,
    ``(str, dict)`` for ``str | dict | None`` (the first is what a command-line value is read as)."""
    if typing.get_origin(tp) not in (typing.Union, types.UnionType):
        return (tp,)
    return tuple(a for a in typing.get_args(tp) if a is not type(None))


def split_optional(tp: typing.Any) -> tuple[type, bool]:
    """(base type, allows None) for `X` or `X | None`."""
    args = typing.get_args(tp)
    if args and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False
