"""``megafusion data prepare``: shards -> tokenized, indexed dataset on disk
(and ``megafusion data export-builtin``: a built-in set as a JSONL shard, to try it on;
``megafusion data index``: a run's sample index, built ahead of the run). The argument parsing
and printing only; the work: :mod:`megafusion.data.prepare` (with :mod:`megafusion.data.icp_rewrite`
for ``--order icp``), :mod:`megafusion.data.builtin.export`, :mod:`megafusion.data.index_build`.

    megafusion data prepare --input SHARD_OR_DIR [--input ...] --tokenizer TOKENIZER \\
        --output PREFIX [--seq-length 64] [--image-size 16 --patch-size 2 --pixel-levels 4]
        [--image-codec pixel|vq|vqgan --vq-codebook FILE --vqgan-path DIR]
    # Transfusion (objective.name=transfusion): images as continuous latents
    megafusion data prepare --input ... --tokenizer TOKENIZER --output PREFIX \\
        --latent-codec pixels|kl [--vae-path DIR] [--latent-patch-size 2] [--image-size 16]
    # In-Context Pretraining order: related documents next to each other
    megafusion data prepare ... --order icp [--icp-neighbors 10]

``TOKENIZER`` is a SentencePiece ``.model`` or a Hugging Face ``tokenizer.json`` (or the
directory holding it; see ``megafusion.data.tokenizers.text``). The image flags make the codec
(pixel patches by default; ``vq`` takes a codebook from ``megafusion tokenizer fit-vq``,
``vqgan`` a local diffusers VQModel; ``--latent-codec``: Transfusion latents, one placeholder per
``--latent-patch-size`` patch).

``--seq-length N`` (default 64, the default ``model.seq_length``) is the length the data will be
trained at: one warning line tells how many documents do not fit in a packed row of ``N + 1``
tokens (packing never cuts a document; the data is written anyway). ``--order icp`` prints one
line with the mean cosine similarity of adjacent documents before and after the reordering.
"""

from __future__ import annotations

import argparse
import os
import sys

from megafusion.commands.main import run
from megafusion.commands.parsing import add_config, add_output, command_parser, config_paths, subcommand
from megafusion.core.errors import DataError, UsageError
from megafusion.core.io import ensure_exists, ensure_writable_file_parent
from megafusion.data.builtin.export import DIGITS_TOTAL, SETS, SHAPES_DEFAULT
from megafusion.data.icp import DEFAULT_NEIGHBORS, ORDER_NAMES

PROG = "megafusion data"
SUBCOMMANDS = ("prepare", "export-builtin", "index")
# model.seq_length's default: the length a dataset is trained at unless the run says otherwise.
DEFAULT_SEQ_LENGTH = 64

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
    export.add_argument("--set", required=True, choices=SETS, help="which built-in set")
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
    from megafusion.data.builtin.export import export_builtin as export

    done = export(args.set, args.output, args.num_samples, args.image_size, args.seed)
    if args.set == "shapes":
        what = f"{done.documents} shapes documents (seed {args.seed})"
    elif args.num_samples is None:
        what = f"{done.documents} digits documents"
    else:
        what = f"the first {done.documents} of the {done.available} digits documents"
    print(f"wrote {what} to {done.path} (images in {os.path.splitext(done.path)[0]}_images/)")
    return 0


def build_index(argv: list[str]) -> int:
    """``megafusion data index``: the run's sample index, built here (see INDEX_DESCRIPTION)."""
    from megafusion.config import load_config, validate

    args = _parser().index_parser.parse_intermixed_args(argv)
    if not args.config:
        raise UsageError("--config FILE is required: the run whose data to index")
    cfg = load_config(config_paths(args.config), args.overrides)
    p = cfg.parallel
    validate(cfg, world_size=max(1, p.tp * p.pp * p.cp))  # one data-parallel replica: the data is the same
    from megafusion.data.index_build import build_run_index

    built = build_run_index(cfg)
    for line in built.describe.splitlines():
        print(line)
    print(f"sample index ready in {built.seconds:.1f} s: {', '.join(built.caches)}")
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
    from megafusion.data.prepare import prepare

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
