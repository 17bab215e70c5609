"""``megafusion tokenizer ...``: train the text part and fit the image part of the joint tokenizer.

    megafusion tokenizer train --input SHARD_OR_DIR [--input ...] --vocab-size N --output PREFIX

reads the text segments of the shards (images are checked to exist but not decoded), trains
(see ``megafusion.data.tokenizers.joint.train_sentencepiece``) and prints the model path.

    megafusion tokenizer fit-vq (--input SHARD_OR_DIR [--input ...] | --builtin shapes,digits) \\
        --image-size 16 --patch-size 2 --codebook-size 256 --seed 0 --output CODEBOOK.safetensors

fits a k-means patch codebook (``megafusion.data.codecs.vq.fit_vq_codebook``) on the images of
the shards or of the built-in sets, writes it and prints its path; use it as
``data.image_codec=vq data.vq_codebook=CODEBOOK.safetensors``.
``main`` takes the arguments after ``tokenizer`` (so ``argv[0]`` is ``train`` or ``fit-vq``).
"""

from __future__ import annotations

import argparse
import sys

from megafusion.commands.main import run
from megafusion.commands.parsing import add_output, command_parser, subcommand
from megafusion.core.errors import DataError
from megafusion.core.io import ensure_exists, ensure_writable_file_parent

PROG = "megafusion tokenizer"
SUBCOMMANDS = ("train", "fit-vq")

TRAIN_EXAMPLES = (
    "megafusion tokenizer train --input shards/ --vocab-size 8000 --output my_spm",
    "megafusion tokenizer train --input shards/a.jsonl --input shards/b.tar --vocab-size 8000 --output my_spm "
    "--byte-fallback",
)
FIT_VQ_EXAMPLES = (
    "megafusion tokenizer fit-vq --builtin shapes,digits --output codebook.safetensors",
    "megafusion tokenizer fit-vq --input shards/ --image-size 16 --patch-size 2 --codebook-size 256 "
    "--output codebook.safetensors",
)


def _parser() -> argparse.ArgumentParser:
    parser = command_parser(
        PROG,
        "The joint tokenizer's parts: a SentencePiece text model, a k-means image patch codebook.",
        (TRAIN_EXAMPLES[0], FIT_VQ_EXAMPLES[0]),
    )
    commands = parser.add_subparsers(dest="command", required=True)
    train = subcommand(
        commands,
        "train",
        "train a SentencePiece model on the text of shards",
        "Train a SentencePiece model on the text segments of shards (images are checked to exist, not\n"
        "decoded) and print its path; use it as data.tokenizer=PREFIX.model or data prepare --tokenizer.",
        TRAIN_EXAMPLES,
    )
    train.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="SHARD_OR_DIR",
        help="a *.jsonl / *.tar shard or a directory of them (repeatable)",
    )
    train.add_argument(
        "--vocab-size",
        type=int,
        required=True,
        metavar="N",
        help="wanted number of text pieces (the real size may be smaller on a small corpus)",
    )
    add_output(train, "writes PREFIX.model", metavar="PREFIX")
    train.add_argument(
        "--character-coverage", type=float, default=1.0, help="fraction of characters to cover (default 1.0: all)"
    )
    train.add_argument(
        "--byte-fallback",
        action="store_true",
        help="spell unseen characters as bytes instead of <unk> (needs vocab >= ~260)",
    )
    fit = subcommand(
        commands,
        "fit-vq",
        "fit a k-means image patch codebook (the vq image codec)",
        "Fit a k-means codebook of image patches on the images of shards or of built-in sets, write it\n"
        "and print its path; use it as data.image_codec=vq data.vq_codebook=PATH, or data prepare\n"
        "--image-codec vq --vq-codebook PATH.",
        FIT_VQ_EXAMPLES,
    )
    images = fit.add_mutually_exclusive_group(required=True)
    images.add_argument(
        "--input",
        action="append",
        metavar="SHARD_OR_DIR",
        help="a *.jsonl / *.tar shard or a directory of them (repeatable): fit on their images",
    )
    images.add_argument("--builtin", metavar="SETS", help="fit on built-in sets instead, e.g. shapes,digits")
    fit.add_argument(
        "--num-samples",
        type=int,
        default=4000,
        metavar="N",
        help="--builtin: generated shapes samples (default 4000; digits are all 1797)",
    )
    fit.add_argument("--image-size", type=int, default=16, help="images are resized to this square (default 16)")
    fit.add_argument("--patch-size", type=int, default=2, help="one code per patch of this size (default 2)")
    fit.add_argument("--codebook-size", type=int, default=256, metavar="K", help="codebook entries (default 256)")
    fit.add_argument(
        "--seed",
        type=int,
        default=0,
        help="k-means seed, and the shapes seed for --builtin (use train.seed to match a run)",
    )
    add_output(fit, "the codebook file to write (.safetensors)", "--out", metavar="PATH")
    return parser


def _builtin_images(sets: str, num_samples: int, seed: int, image_size: int) -> list:
    from megafusion.data.builtin.digits import digit_images
    from megafusion.data.builtin.shapes import shapes_documents

    names = [x.strip() for x in sets.split(",") if x.strip()]
    bad = [x for x in names if x not in ("shapes", "digits")]
    if bad or not names:
        raise DataError(
            f"--builtin {sets!r} names unknown sets {bad or '(none)'}: use a comma-separated subset of shapes, digits"
        )
    images = []
    if "shapes" in names:
        images += [
            seg.pixels
            for doc in shapes_documents(num_samples, seed, image_size)
            for seg in doc.segments
            if hasattr(seg, "pixels")
        ]
    if "digits" in names:
        images += list(digit_images(image_size)[0])
    return images


def _fit_vq(args) -> int:
    from megafusion.data.codecs.vq import fit_vq_codebook

    if args.input:
        from megafusion.data.formats.shards import read_shards

        images = (seg.pixels for doc in read_shards(args.input) for seg in doc.segments if hasattr(seg, "pixels"))
    else:
        images = _builtin_images(args.builtin, args.num_samples, args.seed, args.image_size)
    codec = fit_vq_codebook(images, args.image_size, args.patch_size, args.codebook_size, args.seed, args.output)
    print(
        f"vq codebook: {codec.vocab_size} codes, {codec.tokens_per_image} per image, sha256 {codec.sha256}",
        file=sys.stderr,
    )
    print(codec.path)
    return 0


def tokenizer_command(argv: list[str]) -> int:
    """``argv`` is what follows ``megafusion tokenizer`` (e.g. ``["train", "--input", ...]``)."""
    args = _parser().parse_args(argv)
    # Before any shard is read or k-means run: an output that cannot be written fails now.
    ensure_writable_file_parent(args.output, "--output")
    for path in args.input or ():
        ensure_exists(path, "--input", "a shard file (*.jsonl, *.tar) or a directory of them")
    if args.command == "fit-vq":
        return _fit_vq(args)
    # Imported here so that `--help` stays fast.
    import sentencepiece as spm

    from megafusion.data.formats.shards import shard_texts
    from megafusion.data.tokenizers.joint import train_sentencepiece

    path = train_sentencepiece(
        shard_texts(args.input),
        args.vocab_size,
        args.output,
        character_coverage=args.character_coverage,
        byte_fallback=args.byte_fallback,
    )
    size = spm.SentencePieceProcessor(model_file=path).get_piece_size()
    if size < args.vocab_size:
        print(f"note: the corpus gave {size} pieces, fewer than --vocab-size {args.vocab_size}", file=sys.stderr)
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Errors name the subcommand (`megafusion tokenizer train: ...`), as argparse's own do.
    prog = f"{PROG} {argv[0]}" if argv and argv[0] in SUBCOMMANDS else PROG
    return run(tokenizer_command, argv, prog)


if __name__ == "__main__":
    sys.exit(main())
