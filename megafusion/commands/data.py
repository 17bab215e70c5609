"""``megafusion data prepare``: shards -> tokenized, indexed dataset on disk
(and ``megafusion data export-builtin``: a built-in set as a JSONL shard, to try it on;
``megafusion data index``: a run's sample index, built ahead of the run).

    megafusion data prepare --input SHARD_OR_DIR [--input ...] --tokenizer TOKENIZER \\
        --output PREFIX [--seq-length 64] [--image-size 16 --patch-size 2 --pixel-levels 4]
        [--image-codec pixel|vq|vqgan --vq-codebook FILE --vqgan-path DIR]
    # Transfusion (objective.name=transfusion): images as continuous latents
    megafusion data prepare --input ... --tokenizer TOKENIZER --output PREFIX \\
        --latent-codec pixels|kl [--vae-path DIR] [--latent-patch-size 2] [--image-size 16]
    # In-Context Pretraining order: related documents next to each other
    megafusion data prepare ... --order icp [--icp-neighbors 10]

``TOKENIZER`` is a SentencePiece ``.model`` or a Hugging Face ``tokenizer.json`` (or the
directory holding it; see ``megafusion.data.tokenizers.text``).
Reads the shards (``megafusion.data.formats.shards.read_shards``), tokenizes every document with the
text tokenizer plus the image codec (pixel patches by default; ``vq`` takes a codebook
from ``megafusion tokenizer fit-vq``, ``vqgan`` a local diffusers VQModel), and writes ``PREFIX.bin``,
``PREFIX.idx`` and ``PREFIX.meta.json`` (``megafusion.data.formats.indexed``). The meta records the tokenizer and codec
configs (the tokenizer by content hash, its file for messages) so a training run can check
that its model matches the data.

With ``--latent-codec`` the dataset is for Transfusion: the tokens are exactly those of
``encode_transfusion_document`` (an image = ``<boi>``, one placeholder per
``--latent-patch-size`` patch of its latent, ``<eoi>``) and the latents of all images go to
``PREFIX.latents.npy`` (``megafusion.data.formats.indexed_latents``), described in the meta.

``--seq-length N`` (default 64, the default ``model.seq_length``) is the length the data will be
trained at: one warning line tells how many documents do not fit in a packed row of ``N + 1``
tokens. Packing (``megafusion.data.packing``) never cuts a document, so a run at that length
would stop on the first of them; the data is written anyway (a longer ``model.seq_length`` can
train on it).

``--order icp`` writes the documents in the In-Context Pretraining order (Shi et al. 2023,
``megafusion.data.icp``): TF-IDF over each document's text pieces, its ``--icp-neighbors`` nearest
neighbours by cosine similarity, and the paper's greedy traversal of that graph, so that packing
fills a row with related documents. The dataset is first written in input order under a temporary
prefix beside ``PREFIX`` (twice the disk for a while), then rewritten in the new order one document
at a time (``megafusion.data.formats.indexed_reorder``), latents with their documents; the meta
records the order (``"order"``). One line reports the mean cosine similarity of adjacent documents
before and after. The default ``--order input`` keeps the input order and writes exactly what it
always did. (Attention never crosses documents in megafusion, so related neighbours share rows,
not attention; see ``megafusion.data.icp``.)
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid

from megafusion.commands.main import run
from megafusion.commands.parsing import add_config, add_output, command_parser, config_paths, subcommand
from megafusion.core.errors import DataError, UsageError
from megafusion.core.io import ensure_exists, ensure_writable_file_parent
from megafusion.data.icp import DEFAULT_NEIGHBORS, ORDER_NAMES

PROG = "megafusion data"
SUBCOMMANDS = ("prepare", "export-builtin", "index")
# model.seq_length's default: the length a dataset is trained at unless the run says otherwise.
DEFAULT_SEQ_LENGTH = 64
SHAPES_DEFAULT = 4000  # export-builtin --set shapes: documents generated unless --num-samples says
DIGITS_TOTAL = 1797  # scikit-learn's handwritten digits (load_digits)

PREPARE_EXAMPLES = (
    "megafusion data prepare --input shards/ --tokenizer my_spm.model --output data/my_set",
    "megafusion data prepare --input shards/ --tokenizer my_spm.model --output data/my_set --seq-length 1024",
    "megafusion data prepare --input shards/ --tokenizer my_spm.model --output data/my_set --image-codec vq "
    "--vq-codebook C.safetensors",
    "megafusion data prepare --input shards/ --tokenizer my_spm.model --output data/my_tf --latent-codec pixels "
    "--latent-patch-size 2 --image-size 16",
    "megafusion data prepare --input shards/ --tokenizer my_spm.model --output data/my_set --order icp "
    "--icp-neighbors 10",
)

PREPARE_DESCRIPTION = """\
Tokenize JSONL / WebDataset-tar shards of text and images into an indexed dataset
PREFIX.{bin,idx,meta.json} (data.source=indexed data.path=PREFIX): text with the tokenizer, images
with an image codec (pixel patches by default, a vq codebook, a diffusers VQModel), or, with
--latent-codec, as Transfusion latents in PREFIX.latents.npy."""

PREPARE_NOTES = """\
Train on the result with data.source=indexed data.path=PREFIX data.tokenizer=TOKENIZER (and the
same image settings). Documents are packed whole into rows of model.seq_length + 1 tokens; a
warning counts those longer than --seq-length allows."""


EXPORT_EXAMPLES = (
    "megafusion data export-builtin --set shapes --num-samples 2000 --output shards/shapes.jsonl",
    "megafusion data export-builtin --set digits --output shards/digits.jsonl",
)

EXPORT_DESCRIPTION = """\
Write a built-in set (data.builtin: generated captioned shapes, or scikit-learn's handwritten digits
with a caption each) as a JSONL shard with its images as PNG files beside it: data to try `megafusion
tokenizer train`, `megafusion data prepare` and data.blend on without a download."""


INDEX_EXAMPLES = (
    "megafusion data index --config run.yaml",
    "megafusion data index --config examples/configs/tiny_mixed.yaml data.source=indexed data.path=data/my_set "
    "data.tokenizer=my_spm.model",
)

INDEX_DESCRIPTION = """\
Build the sample index of a run's indexed data (data.path or every dataset of data.blend) in this one
process, as the run's first rank would: the full check of the files, the held-out split, the packed
rows and the epoch orders, cached under data.index_cache (default PREFIX.index/). Run it once before a
large multi-node job: the job then starts at once instead of holding every rank at a barrier (10
minutes at most) while its first rank builds the index."""


def _parser() -> argparse.ArgumentParser:
    parser = command_parser(
        PROG, "Prepare pretokenized datasets (see megafusion data prepare --help).", PREPARE_EXAMPLES[:1]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    prep = subcommand(
        sub, "prepare", "tokenize shards into an indexed dataset", PREPARE_DESCRIPTION, PREPARE_EXAMPLES, PREPARE_NOTES
    )
    export = subcommand(
        sub, "export-builtin", "write a built-in set as a JSONL shard", EXPORT_DESCRIPTION, EXPORT_EXAMPLES
    )
    export.add_argument("--set", required=True, choices=("shapes", "digits"), help="which built-in set")
    export.add_argument(
        "--num-samples",
        type=int,
        metavar="N",
        help=f"documents to write: shapes generates N (default {SHAPES_DEFAULT}); digits writes the first N of its "
        f"{DIGITS_TOTAL} (default all)",
    )
    export.add_argument("--image-size", type=int, default=16, help="image side in pixels (default 16)")
    export.add_argument("--seed", type=int, default=0, help="shapes: generator seed (default 0)")
    add_output(export, "the shard to write (images go to <stem>_images/ beside it)", metavar="FILE.jsonl")
    index = subcommand(sub, "index", "build a run's sample index ahead of the run", INDEX_DESCRIPTION, INDEX_EXAMPLES)
    add_config(index)
    parser.index_parser = index  # parsed on its own: overrides may sit between the flags
    prep.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="SHARD_OR_DIR",
        help="a shard file or a directory of shards (repeatable; read in the given order)",
    )
    prep.add_argument(
        "--tokenizer",
        required=True,
        metavar="TOKENIZER",
        help="SentencePiece .model, or Hugging Face tokenizer.json (or the directory holding it)",
    )
    add_output(prep, "output prefix: writes PREFIX.bin, PREFIX.idx, PREFIX.meta.json", metavar="PREFIX")
    prep.add_argument(
        "--seq-length",
        type=int,
        default=DEFAULT_SEQ_LENGTH,
        metavar="N",
        help=f"the model.seq_length the data will be trained at: warn about documents longer than a row "
        f"(default {DEFAULT_SEQ_LENGTH}, model.seq_length's default)",
    )
    prep.add_argument("--image-size", type=int, default=16, help="images are resized to this size (default 16)")
    # The discrete-code flags default to None so that a clash with --latent-codec can be told apart
    # from an untouched default (codec_from_args fills in the defaults).
    prep.add_argument("--patch-size", type=int, help="pixel codec patch size (default 2)")
    prep.add_argument("--pixel-levels", type=int, help="pixel codec levels per channel (default 4)")
    prep.add_argument("--image-codec", choices=("pixel", "vq", "vqgan"), help="image tokenizer (default pixel)")
    prep.add_argument("--vq-codebook", metavar="FILE", help="--image-codec vq: codebook from `tokenizer fit-vq`")
    prep.add_argument("--vqgan-path", metavar="DIR", help="--image-codec vqgan: diffusers VQModel directory")
    prep.add_argument(
        "--latent-codec",
        choices=("pixels", "kl"),
        help="Transfusion: store images as latents (objective.latent_codec) instead of codes",
    )
    prep.add_argument(
        "--vae-path", metavar="DIR", help="--latent-codec kl: diffusers AutoencoderKL directory (objective.vae_path)"
    )
    prep.add_argument(
        "--latent-patch-size",
        type=int,
        help="--latent-codec: latent patch per placeholder token (objective.latent_patch_size, default 2)",
    )
    prep.add_argument(
        "--order",
        choices=ORDER_NAMES,
        default="input",
        help="document order written: input (as read, the default) or icp (In-Context Pretraining: "
        "related documents next to each other, so a packed row holds related documents)",
    )
    prep.add_argument(
        "--icp-neighbors",
        type=int,
        metavar="K",
        help=f"--order icp: nearest neighbours per document in the document graph (default {DEFAULT_NEIGHBORS}); "
        "more neighbours mean fewer restarts of the traversal but less similar steps",
    )
    return parser


_CODE_FLAGS = (
    ("--image-codec", "image_codec"),
    ("--patch-size", "patch_size"),
    ("--pixel-levels", "pixel_levels"),
    ("--vq-codebook", "vq_codebook"),
    ("--vqgan-path", "vqgan_path"),
)


def latent_codec_from_args(args):
    """--latent-codec: the Transfusion PlaceholderCodec (a flag of the other setting is a DataError)."""
    from megafusion.data.codecs.registry import build_latent_codec
    from megafusion.data.transfusion_data import PlaceholderCodec

    clash = [flag for flag, attr in _CODE_FLAGS if getattr(args, attr) is not None]
    if clash:
        raise DataError(
            f"--latent-codec stores images as latents, so {', '.join(clash)} (image codes) do not "
            "apply: drop them, or drop --latent-codec to prepare image codes for objective.name=lm"
        )
    if args.latent_codec == "kl" and not args.vae_path:
        raise DataError(
            "--latent-codec kl needs --vae-path DIR (a diffusers AutoencoderKL saved locally, the "
            "objective.vae_path of the runs that will read the data)"
        )
    if args.latent_codec != "kl" and args.vae_path:
        raise DataError(f"--vae-path is only for --latent-codec kl (got --latent-codec {args.latent_codec}): drop it")
    params = {"path": args.vae_path} if args.latent_codec == "kl" else {}
    latent = build_latent_codec(args.latent_codec, image_size=args.image_size, **params)
    return PlaceholderCodec(latent, 2 if args.latent_patch_size is None else args.latent_patch_size)


def codec_from_args(args):
    """The image codec the flags describe (a missing file or flag is a DataError naming it)."""
    from megafusion.data.codecs.registry import build_codec

    if getattr(args, "latent_codec", None):
        return latent_codec_from_args(args)
    for flag, attr in (("--vae-path", "vae_path"), ("--latent-patch-size", "latent_patch_size")):
        if getattr(args, attr, None) is not None:
            raise DataError(f"{flag} is for Transfusion datasets: add --latent-codec pixels|kl, or drop {flag}")
    if args.image_codec == "vq":
        if not args.vq_codebook:
            raise DataError("--image-codec vq needs --vq-codebook FILE (fit one with `megafusion tokenizer fit-vq`)")
        return build_codec("vq", codebook=args.vq_codebook)
    if args.image_codec == "vqgan":
        if not args.vqgan_path:
            raise DataError("--image-codec vqgan needs --vqgan-path DIR (a diffusers VQModel saved locally)")
        return build_codec("vqgan", path=args.vqgan_path, image_size=args.image_size)
    patch_size = 2 if args.patch_size is None else args.patch_size
    levels = 4 if args.pixel_levels is None else args.pixel_levels
    return build_codec("pixel", image_size=args.image_size, patch_size=patch_size, levels=levels)


def dataset_meta(tok, codec, extra: dict) -> dict:
    """What a dataset's meta records of the tokenizer ``tok`` and image ``codec`` that made it (+ ``extra``)."""
    return {
        "tokenizer": tok.config(),
        # Only for messages (a run with another tokenizer is told which file made the data); the
        # check itself compares the content hash in "tokenizer".
        "tokenizer_file": os.path.abspath(tok.path),
        "codec": codec.config(),
        "vocab_size": int(tok.vocab_size),
        "pad_id": int(tok.pad_id),
        "bos_id": int(tok.bos_id),
        "eos_id": int(tok.eos_id),
        "boi_id": int(tok.boi_id),
        "eoi_id": int(tok.eoi_id),
        **extra,
    }


def prepare(
    inputs: list[str],
    tokenizer_path: str,
    output: str,
    codec,
    seq_length: int | None = None,
    order: str = "input",
    neighbors: int = DEFAULT_NEIGHBORS,
) -> dict:
    """Tokenize ``inputs`` with ``codec`` into the dataset at ``output``; returns ``write_indexed``'s stats.

    A :class:`~megafusion.data.transfusion_data.PlaceholderCodec` makes a Transfusion dataset:
    the stats then also hold ``"latents"`` (images written to ``PREFIX.latents.npy``). With
    ``seq_length``, they also hold ``"too_long"``: ``{"documents": n, "longest": tokens}`` of the
    documents longer than a packed row of ``seq_length + 1`` tokens (see :func:`_tally_long`).
    ``order="icp"`` writes the documents in the In-Context Pretraining order with ``neighbors``
    nearest neighbours (module doc); the stats then also hold ``"order"``, the
    :class:`~megafusion.data.icp.IcpOrder`.
    """
    from megafusion.data.formats.indexed import write_indexed
    from megafusion.data.formats.indexed_latents import LatentWriter
    from megafusion.data.formats.shards import read_shards, shard_files
    from megafusion.data.tokenizers.joint import MultimodalTokenizer
    from megafusion.data.transfusion_data import PlaceholderCodec, encode_transfusion_document

    if order not in ORDER_NAMES:
        raise UsageError(f"--order {order!r} is not one of {', '.join(ORDER_NAMES)}")
    # Resolve (and check) every input before anything is written.
    files = shard_files(list(inputs))
    tok = MultimodalTokenizer.from_files(tokenizer_path, codec)
    meta = dataset_meta(tok, codec, {"inputs": files, "created_by": "megafusion data prepare"})
    too_long = {"documents": 0, "longest": 0}
    transfusion = isinstance(codec, PlaceholderCodec)

    def documents():
        """The shards' documents, in order; none at all is a DataError naming the inputs (not the output)."""
        count = 0
        for doc in read_shards(files):
            count += 1
            yield doc
        if not count:
            given = " --input ".join(inputs)
            what = "" if list(inputs) == files else f" ({len(files)} shard{'s' * (len(files) > 1)}: {', '.join(files)})"
            raise DataError(
                f"--input {given}: no documents in it{what}: give shards with at least one document (a JSONL shard "
                "holds one JSON object per line)"
            )

    def write_input_order(prefix: str, observe=None) -> dict:
        """The documents, as read, to ``prefix``; ``observe(doc)`` sees each one on its way."""
        if not transfusion:
            docs = (tok.encode_document(doc) for doc in documents())
            return write_indexed(prefix, _observe(_tally_long(docs, seq_length, too_long), observe), meta)
        latents = LatentWriter(prefix, codec)

        def transfusion_docs():
            for doc in documents():
                encoded = encode_transfusion_document(tok, doc)
                # The latents live in their own file; the indexed files get tokens and modalities only.
                latents.add(encoded.meta.pop("latents"), encoded.source)
                yield encoded

        docs = _observe(_tally_long(transfusion_docs(), seq_length, too_long), observe)
        stats = write_indexed(prefix, docs, meta, sidecar=latents)
        stats["latents"] = {"count": latents.count, "shape": list(latents.shape)}
        return stats

    if order == "input":
        stats = write_input_order(output)
    else:
        stats = _prepare_icp(output, write_input_order, tok, meta, neighbors, codec if transfusion else None)
    if seq_length is not None:
        stats["too_long"] = too_long
    return stats


def _prepare_icp(output: str, write_input_order, tok, meta: dict, neighbors: int, latent_codec) -> dict:
    """``--order icp``: input order to a temporary prefix (collecting each document's bag of
    pieces on the way), the ICP order of the bags, then the rewrite to ``output``."""
    from megafusion.data.formats.indexed_reorder import remove_dataset, write_reordered
    from megafusion.data.icp import BagOfPieces, icp_order

    # Pieces every document has say nothing about what it is about (see megafusion.data.icp).
    bag = BagOfPieces(exclude=(tok.pad_id, tok.bos_id, tok.eos_id, tok.boi_id, tok.eoi_id))

    # Beside the output (same file system, so the rewrite needs no copy across devices).
    tmp = f"{output}.tmp-icp-input-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        try:
            write_input_order(tmp, bag.add)
        except DataError as err:
            # Name the output the user gave, not the temporary prefix (as --order input would).
            raise DataError(str(err).replace(tmp, output)) from None
        result = icp_order(bag.matrix(tok.vocab_size), neighbors)
        stats = write_reordered(tmp, output, result.order, {**meta, "order": result.meta()}, latent_codec)
    finally:
        remove_dataset(tmp)
    stats["order"] = result
    return stats


def _observe(docs, observe):
    """Pass ``docs`` through, showing each to ``observe`` (None: nothing to show)."""
    for doc in docs:
        if observe is not None:
            observe(doc)
        yield doc


def _tally_long(docs, seq_length: int | None, tally: dict):
    """Pass ``docs`` through, counting in ``tally`` those that do not fit in a packed row.

    The criterion is packing's own (``megafusion.data.packing.pack_documents``): a row holds
    ``model.seq_length + 1`` tokens and a longer document is refused, never cut. The tokens
    counted are the ones written, i.e. exactly what training will pack.
    """
    for doc in docs:
        n = len(doc.tokens)
        if seq_length is not None and n > seq_length + 1:
            tally["documents"] += 1
            tally["longest"] = max(tally["longest"], n)
        yield doc


def long_documents_warning(too_long: dict, documents: int, seq_length: int) -> str | None:
    """The one warning line about documents a run at ``seq_length`` cannot pack (None: all fit)."""
    if not too_long["documents"]:
        return None
    n, longest = too_long["documents"], too_long["longest"]
    return (
        f"{PROG} prepare: warning: {n} of {documents} documents are longer than --seq-length {seq_length} "
        f"allows ({seq_length + 1} tokens per packed row; longest {longest}): a run at model.seq_length="
        f"{seq_length} stops on the first of them before training, as packing never splits, truncates or "
        f"skips a document; options: train with model.seq_length={longest - 1} or more, split the documents "
        "in the shards, or drop them"
    )


def export_builtin(args) -> int:
    """``megafusion data export-builtin``: a built-in set as a JSONL shard."""
    from megafusion.data.builtin.digits import digits_documents
    from megafusion.data.builtin.shapes import shapes_documents
    from megafusion.data.formats.shards import write_jsonl_shard

    n = args.num_samples
    if n is not None and n < 1:
        raise UsageError(f"--num-samples {n} must be >= 1")
    if n is not None and args.set == "digits" and n > DIGITS_TOTAL:
        raise UsageError(f"--num-samples {n}: the digits set has {DIGITS_TOTAL} documents; give at most that")
    ensure_writable_file_parent(args.output, "--output")
    if args.set == "shapes":
        docs = shapes_documents(SHAPES_DEFAULT if n is None else n, args.seed, args.image_size)
        what = f"{len(docs)} shapes documents (seed {args.seed})"
    else:
        docs = digits_documents(args.image_size)
        what = f"{len(docs)} digits documents" if n is None else f"the first {n} of the {len(docs)} digits documents"
        docs = docs[:n]
    path = write_jsonl_shard(docs, args.output)
    print(f"wrote {what} to {path} (images in {os.path.splitext(path)[0]}_images/)")
    return 0


def build_index(argv: list[str]) -> int:
    """``megafusion data index``: the run's sample index, built here (see INDEX_DESCRIPTION)."""
    import time

    from megafusion.config import load_config, validate

    args = _parser().index_parser.parse_intermixed_args(argv)
    if not args.config:
        raise UsageError("--config FILE is required: the run whose data to index")
    cfg = load_config(config_paths(args.config), args.overrides)
    p = cfg.parallel
    validate(cfg, world_size=max(1, p.tp * p.pp * p.cp))
    if cfg.data.source != "indexed":
        raise UsageError(f"data.source={cfg.data.source} has no sample index: it is for data.source=indexed")
    from megafusion.data.paths import check_data_paths

    check_data_paths(cfg)  # before torch is imported
    from megafusion.data.sample_index import default_cache
    from megafusion.data.sources import blend_entries, build_data

    start = time.perf_counter()
    data = build_data(cfg)
    for line in data.describe().splitlines():
        print(line)
    where = ", ".join(cfg.data.index_cache or default_cache(path) for path, _, _ in blend_entries(cfg))
    print(f"sample index ready in {time.perf_counter() - start:.1f} s: {where}")
    return 0


def prepare_command(argv: list[str]) -> int:
    """``argv`` is what follows ``megafusion data`` (e.g. ``["prepare", "--input", ...]``)."""
    if argv and argv[0] == "index":
        return build_index(argv[1:])  # section.key=value overrides may sit between the flags
    args = _parser().parse_args(argv)
    if args.command == "export-builtin":
        return export_builtin(args)
    if args.seq_length < 1:
        raise UsageError(f"--seq-length {args.seq_length} must be >= 1 (the model.seq_length of the runs)")
    if args.icp_neighbors is not None and args.order != "icp":
        raise UsageError(f"--icp-neighbors is for --order icp (got --order {args.order}): add --order icp or drop it")
    neighbors = DEFAULT_NEIGHBORS if args.icp_neighbors is None else args.icp_neighbors
    if neighbors < 1:
        raise UsageError(f"--icp-neighbors {neighbors} must be >= 1 (nearest neighbours per document)")
    # Before any shard is read: an output that cannot be written fails now, not after tokenizing;
    # then the inputs, before torch is imported.
    ensure_writable_file_parent(args.output, "--output")
    for path in args.input:
        ensure_exists(path, "--input", "a shard file (*.jsonl, *.tar) or a directory of them")
    ensure_exists(args.tokenizer, "--tokenizer", "a SentencePiece .model, or a tokenizer.json or its directory")
    for flag, path, kind, expected in (
        ("--vq-codebook", args.vq_codebook, "file", "a codebook file from `megafusion tokenizer fit-vq`"),
        ("--vqgan-path", args.vqgan_path, "dir", "a diffusers VQModel directory saved locally"),
        ("--vae-path", args.vae_path, "dir", "a diffusers AutoencoderKL directory saved locally"),
    ):
        if path:
            ensure_exists(path, flag, expected, kind=kind)
    stats = prepare(
        args.input, args.tokenizer, args.output, codec_from_args(args), args.seq_length, args.order, neighbors
    )
    total = sum(stats["tokens"].values())
    per = ", ".join(f"{name} {count}" for name, count in stats["tokens"].items())
    print(f"prepared {stats['documents']} documents, {total} tokens ({per})")
    if "latents" in stats:
        shape = "x".join(map(str, stats["latents"]["shape"]))
        print(f"stored {stats['latents']['count']} image latents of shape {shape} (for objective.name=transfusion)")
    if "order" in stats:
        icp = stats["order"]
        paths = f"{icp.paths} path{'s' if icp.paths != 1 else ''}"
        print(
            f"order icp: mean cosine similarity of adjacent documents {icp.input_cosine:.3f} in input order, "
            f"{icp.icp_cosine:.3f} as written (TF-IDF of text pieces; {paths} through the "
            f"{icp.neighbors}-nearest-neighbour graph)"
        )
    print("wrote " + ", ".join(stats["files"]))
    warning = long_documents_warning(stats["too_long"], stats["documents"], args.seq_length)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Errors name the subcommand (`megafusion data prepare: ...`), as argparse's own do.
    prog = f"{PROG} {argv[0]}" if argv and argv[0] in SUBCOMMANDS else PROG
    return run(prepare_command, argv, prog)


if __name__ == "__main__":
    sys.exit(main())
