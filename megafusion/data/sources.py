"""From ``cfg.data`` to the train / validation sample sources a run draws microbatches from.

``build_data(cfg)`` is the one entry point the training loop, ``megafusion flops`` and the
evaluation use. Three sources:

- ``synthetic``: arithmetic token streams (no tokenizer; all tokens are text);
- ``builtin``: the generated captioned shapes and scikit-learn's handwritten digits, with a
  SentencePiece model trained on their captions on first use (cached in
  ``data.cache_dir``) unless ``data.tokenizer`` names a text tokenizer (a SentencePiece
  ``.model``, or a Hugging Face ``tokenizer.json`` or its directory), and the image codec named by
  ``data.image_codec`` (pixel patches; a k-means patch codebook, fitted on the built-in images
  and cached the same way unless ``data.vq_codebook`` names one; or a local pretrained VQGAN);
- ``indexed``: a dataset written by ``megafusion data prepare`` (its ``.meta.json`` says which
  tokenizer and codec made it), or several at fixed token shares (``data.blend``,
  :mod:`megafusion.data.blend`). With ``objective.name=transfusion`` it must have been prepared
  with ``--latent-codec`` and the objective's latent settings (``PREFIX.latents.npy`` holds its
  image latents, see :mod:`megafusion.data.formats.indexed_latents`). Indexed data is streamed:
  never loaded, its rows made per microbatch from a cached sample index
  (:mod:`megafusion.data.streaming`, :mod:`megafusion.data.sample_index`).

Documents are split into train / validation by content hash (a ``Document.group`` whole), each
split put in ``data.order`` (built-in sets: input, random, or In-Context Pretraining's;
:mod:`megafusion.data.order`), packed whole into rows of
``model.seq_length + 1`` tokens, and served by ``MicrobatchSource`` (sample i of the run is a
pure function of i and the seed, so the loader's state is the consumed-sample count). The
built-in sets are generated in memory and take the same split and packing in memory.
The model's vocabulary is the tokenizer's, padded to a multiple of 128 so that every
power-of-two tensor-parallel size divides it and checkpoints move between layouts.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from megafusion.config.domains import blend_names
from megafusion.core.errors import DataError
from megafusion.core.modality import NUM_MODALITIES
from megafusion.data.builtin.synthetic import synthetic_microbatch
from megafusion.data.codecs.diffusers_local import weights_identity
from megafusion.data.paths import check_data_paths

VOCAB_MULTIPLE = 128
SYNTHETIC_VOCAB = 256


class SyntheticSource:
    """Synthetic packed documents in the microbatch format of :mod:`megafusion.data.types`."""

    def __init__(self, seed: int, seq_length: int, vocab_size: int, docs_per_sequence: int):
        self.seed, self.seq_length, self.vocab_size, self.docs = seed, seq_length, vocab_size, docs_per_sequence

    def microbatch(self, first_sample: int, size: int) -> dict[str, torch.Tensor]:
        batch = synthetic_microbatch(first_sample, size, self.seed, self.seq_length, self.vocab_size, self.docs)
        text = torch.zeros_like(batch["tokens"])  # every synthetic token is text
        batch.update(
            modality_ids=text,
            label_modality_ids=text.clone(),
            modality_counts=torch.tensor([text.numel()] + [0] * (NUM_MODALITIES - 1)),
        )
        return batch

    def describe(self) -> str:
        return f"synthetic: {self.docs} document(s) per row of {self.seq_length} tokens, vocab {self.vocab_size}"


@dataclass
class DataBundle:
    train: object  # .microbatch(first_sample, size) -> dict
    val: object | None
    vocab_size: int  # the model's (padded) vocabulary
    meta: dict = field(default_factory=dict)  # what made the tokens: stored with checkpoints
    tokenizer: object | None = None
    # Each domain's held-out documents alone ({name: source}; data.domains, docs/data.md "Domains"):
    # every set of data.builtin / dataset of data.blend that has some. Empty for synthetic data.
    val_domains: dict = field(default_factory=dict)

    def set_model_vocabulary(self, model_cfg) -> None:
        """The data decides the model's vocabulary: ``vocab_size`` and, for LMFusion
        (``freeze_text``), the frozen rows (the text tokenizer's ids) unless set explicitly."""
        model_cfg.vocab_size = self.vocab_size
        if model_cfg.freeze_text and model_cfg.frozen_vocab_rows is None and self.tokenizer is not None:
            model_cfg.frozen_vocab_rows = self.tokenizer.text_vocab_size
        if model_cfg.freeze_text and not 0 < (model_cfg.frozen_vocab_rows or 0) <= self.vocab_size:
            raise DataError(
                f"model.frozen_vocab_rows={model_cfg.frozen_vocab_rows} does not fit the data's vocabulary "
                f"of {self.vocab_size} rows: set it to the text vocabulary's size (at most "
                f"{self.vocab_size}), or null to take the text tokenizer's"
            )

    def describe(self) -> str:
        lines = [f"train   {self.train.describe()}"]
        if self.val is not None:
            lines.append(f"val     {self.val.describe()}")
        if getattr(self.train, "share_group", None) == "domain":  # data.domains: validation is per domain
            lines += [f"val     domain {name}: {source.describe()}" for name, source in self.val_domains.items()]
        order = self.meta.get("order") or {}
        if order.get("name") == "icp":  # what the walk did to each split (megafusion.data.order)
            done = [
                f"{split} {c['input']:.3f} -> {c['icp']:.3f} ({order[split]['paths']} paths)"
                for split in ("train", "val")
                if split in order
                for c in [order[split]["adjacent_cosine"]]
            ]
            lines.append(
                f"order   icp, {order['neighbors']} neighbours: mean cosine similarity of adjacent documents, "
                f"input order -> ICP order: {', '.join(done)}"
            )
        elif order:
            lines.append(f"order   {order['name']}")
        return "\n".join(lines)


def padded_vocab(tokenizer_vocab: int, requested: int | None, tp: int) -> int:
    """The tokenizer's vocabulary rounded up to a multiple of 128, or the configured size."""
    if requested is None:
        return -(-tokenizer_vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    if requested < tokenizer_vocab:
        raise DataError(
            f"model.vocab_size={requested} is smaller than the tokenizer's {tokenizer_vocab} ids: "
            f"set model.vocab_size=null (derived from the data) or >= {tokenizer_vocab}"
        )
    if requested % tp:
        raise DataError(f"model.vocab_size={requested} is not divisible by parallel.tp={tp}: set model.vocab_size=null")
    return requested


def _builtin_sets(cfg) -> list[tuple[str, list]]:
    """(set name, its documents) of each set named in ``data.builtin``, in order."""
    from megafusion.data.builtin.arithmetic import arithmetic_documents
    from megafusion.data.builtin.digits import digits_documents
    from megafusion.data.builtin.facts import facts_documents
    from megafusion.data.builtin.shapes import shapes_documents

    d = cfg.data
    sets = []
    for name in (x.strip() for x in d.builtin.split(",") if x.strip()):
        if name == "shapes":
            sets.append((name, shapes_documents(d.num_samples, cfg.train.seed, d.image_size)))
        elif name == "digits":
            sets.append((name, digits_documents(d.image_size)))
        elif name == "arithmetic":
            sets.append((name, arithmetic_documents(d.num_samples, cfg.train.seed)))
        elif name == "facts":
            sets.append((name, facts_documents(d.num_samples, cfg.train.seed)))
    return sets


def _builtin_documents(cfg):
    """Every document of ``data.builtin``'s sets (what the tokenizer and codec are made from,
    whatever ``data.domains`` trains)."""
    return [doc for _, docs in _builtin_sets(cfg) for doc in docs]


def _tokenizer(
    cfg,
    texts: Callable[[], list[str]] | None,
    is_first_rank: bool,
    barrier: Callable[[], None],
    prepared_with: str | None = None,
):
    """The text tokenizer's path: configured (a SentencePiece model or a Hugging Face tokenizer.json /
    directory), or a SentencePiece model trained once (by the first rank) on ``texts`` and cached."""
    from megafusion.data.tokenizers.joint import builtin_tokenizer

    if cfg.data.tokenizer:
        return cfg.data.tokenizer
    if texts is None:
        known = f" ({prepared_with})" if prepared_with else ""
        raise DataError(
            f"data.tokenizer is required for data.source=indexed: the text tokenizer the dataset was "
            f"prepared with{known}, a SentencePiece .model or a Hugging Face tokenizer.json"
        )
    corpus = texts()
    if is_first_rank:
        builtin_tokenizer(cfg.data.cache_dir, corpus, cfg.data.text_vocab_size)
    barrier()  # the others reuse the cached file instead of training it again
    return builtin_tokenizer(cfg.data.cache_dir, corpus, cfg.data.text_vocab_size)


def _builtin_codec(cfg, documents, is_first_rank: bool, barrier: Callable[[], None]):
    """The ``data.image_codec`` codec for the built-in images (a vq codebook is fitted by the first rank)."""
    from megafusion.data.codecs.registry import build_codec
    from megafusion.data.codecs.vq import builtin_vq_codebook
    from megafusion.data.types import ImageSegment

    d = cfg.data
    if d.image_codec == "pixel":
        return build_codec("pixel", image_size=d.image_size, patch_size=d.patch_size, levels=d.pixel_levels)
    if d.image_codec == "vqgan":
        return build_codec("vqgan", path=d.vqgan_path, image_size=d.image_size)
    if d.vq_codebook:
        codec = build_codec("vq", codebook=d.vq_codebook)
        # A codebook for other sizes would silently resize the images and cut other patches.
        if (codec.image_size, codec.patch_size) != (d.image_size, d.patch_size):
            raise DataError(
                f"data.vq_codebook={d.vq_codebook} was fitted for image_size={codec.image_size} "
                f"patch_size={codec.patch_size}, but data.image_size={d.image_size} data.patch_size="
                f"{d.patch_size}: set them to match, or fit a codebook for these sizes "
                f"(`megafusion tokenizer fit-vq`, or data.vq_codebook=null)"
            )
        return codec
    images = [seg.pixels for doc in documents for seg in doc.segments if isinstance(seg, ImageSegment)]
    fit = lambda: builtin_vq_codebook(
        d.cache_dir,
        images,
        d.image_size,
        d.patch_size,  # noqa: E731
        d.vq_codebook_size,
        cfg.train.seed,
    )
    if is_first_rank:
        fit()
    barrier()  # the others load the cached codebook instead of fitting it again
    return fit()


def _builtin_tokenizer(cfg, documents, transfusion: bool, is_first_rank: bool, barrier: Callable[[], None]):
    """(codec, MultimodalTokenizer) of the built-in ``documents``: the tokenizer trained on their
    captions (cached) unless data.tokenizer names one, the image codec (latent placeholders for
    Transfusion)."""
    from megafusion.data.tokenizers.joint import MultimodalTokenizer

    codec = _latent_placeholders(cfg) if transfusion else _builtin_codec(cfg, documents, is_first_rank, barrier)
    texts = lambda: [seg.text for doc in documents for seg in doc.segments if hasattr(seg, "text")]  # noqa: E731
    return codec, MultimodalTokenizer.from_files(_tokenizer(cfg, texts, is_first_rank, barrier), codec)


def data_vocabulary(cfg) -> tuple[int, str]:
    """(the model vocabulary a run of ``cfg`` takes from its data, where it comes from), as
    ``build_data(cfg)`` + ``set_model_vocabulary`` set it, without tokenizing, packing or
    indexing anything: the synthetic default, the built-in tokenizer (trained and cached on first
    use, as a run does), or the first dataset's ``.meta.json`` (a run checks that its tokenizer
    is the one recorded there)."""
    d, m = cfg.data, cfg.model
    if m.vocab_size is not None:
        return m.vocab_size, "model.vocab_size"
    if d.source == "synthetic":
        return SYNTHETIC_VOCAB, "data.source=synthetic"
    if d.source == "builtin":
        from megafusion.objectives.registry import get_objective

        transfusion = get_objective(cfg.objective.name).image_latents
        _, tokenizer = _builtin_tokenizer(cfg, _builtin_documents(cfg), transfusion, True, lambda: None)
        where = f"data.source=builtin: {tokenizer.vocab_size} ids of its tokenizer"
        return padded_vocab(tokenizer.vocab_size, None, 1), where
    from megafusion.data.formats.indexed import read_meta

    path, key = check_data_paths(cfg)[0]
    vocab = read_meta(path)["vocab_size"]
    return padded_vocab(vocab, None, 1), f"{key}={path}: {vocab} ids in its .meta.json"


def _latent_placeholders(cfg):
    """objective=transfusion: images become latents; the tokenizer only places their patches."""
    from megafusion.data.codecs.registry import build_latent_codec
    from megafusion.data.transfusion_data import PlaceholderCodec

    o = cfg.objective
    params = {"path": o.vae_path} if o.latent_codec == "kl" else {}
    return PlaceholderCodec(
        build_latent_codec(o.latent_codec, image_size=cfg.data.image_size, **params), o.latent_patch_size
    )


def _check_latent_settings(cfg, info: dict, path: str) -> None:
    """The run's latent settings are those the Transfusion dataset was prepared with (else a DataError)."""
    o, d = cfg.objective, cfg.data
    codec = info.get("codec") or {}
    pairs = [
        ("objective.latent_codec", "--latent-codec", o.latent_codec, codec.get("name")),
        ("objective.latent_patch_size", "--latent-patch-size", o.latent_patch_size, info.get("patch_size")),
        ("data.image_size", "--image-size", d.image_size, codec.get("image_size")),
    ]
    if o.latent_codec == codec.get("name") == "kl":
        # The VAE's content, not its directory: a copy elsewhere (another node, a moved run) matches.
        pairs.append(
            (
                f"objective.vae_path={os.path.abspath(o.vae_path)} holds weights",
                "a VAE of weights",
                weights_identity(o.vae_path, "objective.vae_path"),
                codec.get("weights"),
            )
        )
    diffs = [
        f"{key}={mine!r} but the dataset was prepared with {flag} {theirs!r}"
        for key, flag, mine, theirs in pairs
        if mine != theirs
    ]
    if diffs:
        raise DataError(
            f"{path}.meta.json: {'; '.join(diffs)}: set the config to the dataset's values, or "
            f"re-run `megafusion data prepare ... --output {path}` with the config's"
        )


def _open_indexed(cfg, path: str, transfusion: bool, is_first_rank: bool, barrier: Callable[[], None]):
    """(documents, codec, tokenizer) of the indexed dataset at ``path``, checked against the run."""
    from megafusion.data.codecs.registry import build_codec
    from megafusion.data.formats.indexed_latents import META_KEY, latent_info
    from megafusion.data.formats.indexed_reader import IndexedDocuments
    from megafusion.data.tokenizers.joint import MultimodalTokenizer

    documents = IndexedDocuments(path)
    meta = documents.meta
    if "name" not in meta.get("codec", {}):
        raise DataError(f"{path}.meta.json has no codec description: re-run `megafusion data prepare`")
    if transfusion:
        info = latent_info(path, meta)
        _check_latent_settings(cfg, info, path)  # before the VAE is loaded for nothing
        codec = _latent_placeholders(cfg)
        if list(codec.latent_codec.latent_shape) != info["shape"]:
            raise DataError(
                f"{path}.meta.json: its latents have shape {info['shape']} but objective.latent_codec="
                f"{cfg.objective.latent_codec} now gives {list(codec.latent_codec.latent_shape)} (the "
                f"VAE changed since the data was prepared): re-run `megafusion data prepare ... "
                f"--output {path}`"
            )
    elif META_KEY in meta:
        raise DataError(
            f"{path}.meta.json: the dataset holds image latents (prepared with --latent-codec "
            f"{meta[META_KEY].get('codec', {}).get('name')!r}) for objective.name=transfusion, but "
            f"objective.name={cfg.objective.name}: set objective.name=transfusion with the dataset's "
            f"latent settings, or re-run `megafusion data prepare` without --latent-codec for image codes"
        )
    else:
        codec = build_codec(**meta["codec"])
    prepared_with = meta.get("tokenizer_file")  # recorded by `data prepare` (absent in older datasets)
    tokenizer = MultimodalTokenizer.from_files(_tokenizer(cfg, None, is_first_rank, barrier, prepared_with), codec)
    tokenizer.check_compatible(meta["tokenizer"], f"{path}.meta.json", prepared_with)
    return documents, codec, tokenizer


def blend_entries(cfg) -> list[tuple[str, float, str]]:
    """``(path, weight, name)`` of every dataset of the run: ``data.blend``, or ``data.path`` alone."""
    d = cfg.data
    names = blend_names(d.blend, d.path)
    if not d.blend:
        return [(d.path, 1.0, names[0])]
    return [(str(entry["path"]), float(entry["weight"]), name) for entry, name in zip(d.blend, names)]


def _indexed_data(cfg, tp: int, transfusion: bool, is_first_rank: bool, barrier: Callable[[], None]) -> DataBundle:
    """The streamed sources of ``data.path`` or the blend of ``data.blend`` (one tokenizer for all)."""
    from megafusion.data.blend import BlendedSource
    from megafusion.data.domains import indexed_domain_train
    from megafusion.data.streaming import streamed_sources

    seed = cfg.train.seed
    trains, vals, names, weights = [], [], [], []
    first = None
    check_data_paths(cfg)  # every path first: a mistyped one is told before any is read
    for k, (path, weight, name) in enumerate(blend_entries(cfg)):
        documents, codec, tokenizer = _open_indexed(cfg, path, transfusion, is_first_rank, barrier)
        if first is None:
            first = (path, documents.meta, codec, tokenizer)
        else:
            _check_same_vocabulary(first, path, documents.meta)
        where = f"indexed:{path}"
        # Dataset k's rows are drawn with its own seeds (dataset 0: the single-dataset ones).
        train, val = streamed_sources(
            documents, cfg, tokenizer.pad_id, (seed + 2 * k, seed + 2 * k + 1), where, is_first_rank, barrier
        )
        trains.append(train)
        vals.append(val)
        names.append(name)
        weights.append(weight)
    _, _, codec, tokenizer = first
    vocab = padded_vocab(tokenizer.vocab_size, cfg.model.vocab_size, tp)
    meta = {"tokenizer": tokenizer.config(), "codec": codec.config(), "vocab_size": vocab}
    val_domains = {name: v for name, v in zip(names, vals) if v is not None}
    selected = indexed_domain_train(cfg, trains, weights, names)  # None without data.domains
    if not cfg.data.blend:
        meta["source"] = f"indexed:{cfg.data.path}"
        return DataBundle(selected or trains[0], vals[0], vocab, meta, tokenizer, val_domains)
    meta["source"] = "blend:" + ",".join(f"{p}={w:g}" for p, w, _ in blend_entries(cfg))
    train = selected or BlendedSource(trains, weights, names, "blend train")
    with_val = [k for k, v in enumerate(vals) if v is not None]
    val = (
        BlendedSource(
            [vals[k] for k in with_val], [weights[k] for k in with_val], [names[k] for k in with_val], "blend val"
        )
        if with_val
        else None
    )
    return DataBundle(train, val, vocab, meta, tokenizer, val_domains)


def _check_same_vocabulary(first, path: str, meta: dict) -> None:
    """Every dataset of a blend was made by the same tokenizer and image codec as the first."""
    first_path, first_meta = first[0], first[1]
    for key in ("tokenizer", "codec", "latents"):
        a, b = first_meta.get(key), meta.get(key)
        if key == "latents":  # the latent codec and patch size, not the file's size and checksum
            a, b = [{k: x.get(k) for k in ("codec", "patch_size", "shape")} if x else None for x in (a, b)]
        if a != b:
            raise DataError(
                f"data.blend: {path} was prepared with another {key} than {first_path} ({b!r} vs {a!r}): "
                "every dataset of a blend needs the same tokenizer and image settings; re-run "
                f"`megafusion data prepare ... --output {path}` with those of {first_path}"
            )


def build_data(cfg, tp: int = 1, is_first_rank: bool = True, barrier: Callable[[], None] = lambda: None) -> DataBundle:
    """Build the train / validation sources for ``cfg`` (the same on every rank)."""
    d, m, seed = cfg.data, cfg.model, cfg.train.seed
    if d.source == "synthetic":
        vocab = m.vocab_size or SYNTHETIC_VOCAB
        make = lambda s: SyntheticSource(s, m.seq_length, vocab, d.docs_per_sequence)  # noqa: E731
        return DataBundle(make(seed), make(seed + 1_000_000), vocab, {"source": "synthetic", "vocab_size": vocab})

    from megafusion.data.domains import builtin_domain_sources
    from megafusion.data.loader import MicrobatchSource, held_documents
    from megafusion.data.order import special_ids, split_order
    from megafusion.data.packing import pack_documents
    from megafusion.data.transfusion_data import encode_transfusion_document
    from megafusion.objectives.registry import get_objective

    transfusion = get_objective(cfg.objective.name).image_latents  # images as latents beside the tokens
    if d.source == "builtin":
        sets = _builtin_sets(cfg)
        documents = [doc for _, docs in sets for doc in docs]
        labels = [name for name, docs in sets for _ in docs]  # each document's domain
        codec, tokenizer = _builtin_tokenizer(cfg, documents, transfusion, is_first_rank, barrier)
        encode = (lambda doc: encode_transfusion_document(tokenizer, doc)) if transfusion else tokenizer.encode_document
        tokenized = [encode(doc) for doc in documents]
        where = f"builtin:{d.builtin}"
    else:  # indexed: streamed from disk
        return _indexed_data(cfg, tp, transfusion, is_first_rank, barrier)
    # Held out over every set together, by content (a group whole): the same documents whatever
    # data.domains trains and data.order packs.
    held = held_documents(tokenized, d.val_fraction, seed, [doc.group for doc in documents])
    # Each split in data.order, ordered on its own (megafusion.data.order: ICP windows).
    ids = special_ids(tokenizer)
    perm, order_meta = split_order(
        tokenized, held, d.order, seed, d.icp_neighbors, ids, tokenizer.vocab_size, d.cache_dir, is_first_rank, barrier
    )
    tokenized, labels, held = [tokenized[i] for i in perm], [labels[i] for i in perm], held[perm]
    train_docs = [doc for doc, h in zip(tokenized, held) if not h]
    val_docs = [doc for doc, h in zip(tokenized, held) if h]
    vocab = padded_vocab(tokenizer.vocab_size, m.vocab_size, tp)
    train = MicrobatchSource(pack_documents(train_docs, m.seq_length, tokenizer.pad_id), seed, f"{where} train")
    val = (
        MicrobatchSource(pack_documents(val_docs, m.seq_length, tokenizer.pad_id), seed + 1, f"{where} val")
        if val_docs
        else None
    )
    selected, val_domains = builtin_domain_sources(cfg, tokenized, labels, held, tokenizer.pad_id)
    meta = {"source": where, "vocab_size": vocab, "tokenizer": tokenizer.config(), "codec": codec.config()}
    if d.order != "input":  # what decides which documents share a row (runs before data.order: none)
        meta["order"] = order_meta
    return DataBundle(selected or train, val, vocab, meta, tokenizer, val_domains)
