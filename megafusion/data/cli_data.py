"""``megafusion data prepare``: shards -> tokenized, indexed dataset on disk.

    megafusion data prepare --input SHARD_OR_DIR [--input ...] --tokenizer SP_MODEL \\
        --output PREFIX [--image-size 16 --patch-size 2 --pixel-levels 4]
        [--image-codec pixel|vq|vqgan --vq-codebook FILE --vqgan-path DIR]

Reads the shards (``megafusion.data.shards.read_shards``), tokenizes every document with the
sentencepiece model plus the image codec (pixel patches by default; ``vq`` takes a codebook
from ``megafusion tokenizer fit-vq``, ``vqgan`` a local diffusers VQModel), and writes ``PREFIX.bin``, ``PREFIX.idx`` and
``PREFIX.meta.json`` (``megafusion.data.indexed``). The meta records the tokenizer and codec
configs so a training run can check that its model matches the data.
"""

from __future__ import annotations

import argparse
import sys

from megafusion.data.types import DataError

USAGE = "megafusion data prepare --input SHARD_OR_DIR [--input ...] --tokenizer SP_MODEL --output PREFIX"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megafusion data", description="Prepare pretokenized datasets.")
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="tokenize shards into an indexed dataset",
                          description="Tokenize text+image shards into PREFIX.{bin,idx,meta.json}.")
    prep.add_argument("--input", action="append", required=True, metavar="SHARD_OR_DIR",
                      help="a shard file or a directory of shards (repeatable; read in the given order)")
    prep.add_argument("--tokenizer", required=True, metavar="SP_MODEL", help="sentencepiece .model file")
    prep.add_argument("--output", required=True, metavar="PREFIX", help="output prefix (PREFIX.bin, ...)")
    prep.add_argument("--image-size", type=int, default=16, help="pixel codec image size (default 16)")
    prep.add_argument("--patch-size", type=int, default=2, help="pixel codec patch size (default 2)")
    prep.add_argument("--pixel-levels", type=int, default=4, help="pixel codec levels per channel (default 4)")
    prep.add_argument("--image-codec", choices=("pixel", "vq", "vqgan"), default="pixel",
                      help="image tokenizer (default pixel)")
    prep.add_argument("--vq-codebook", metavar="FILE", help="--image-codec vq: codebook from `tokenizer fit-vq`")
    prep.add_argument("--vqgan-path", metavar="DIR", help="--image-codec vqgan: diffusers VQModel directory")
    return parser


def codec_from_args(args):
    """The image codec the flags describe (a missing file or flag is a DataError naming it)."""
    from megafusion.data.codecs import build_codec

    if args.image_codec == "vq":
        if not args.vq_codebook:
            raise DataError("--image-codec vq needs --vq-codebook FILE (fit one with `megafusion tokenizer fit-vq`)")
        return build_codec("vq", codebook=args.vq_codebook)
    if args.image_codec == "vqgan":
        if not args.vqgan_path:
            raise DataError("--image-codec vqgan needs --vqgan-path DIR (a diffusers VQModel saved locally)")
        return build_codec("vqgan", path=args.vqgan_path, image_size=args.image_size)
    return build_codec("pixel", image_size=args.image_size, patch_size=args.patch_size, levels=args.pixel_levels)


def prepare(inputs: list[str], tokenizer_path: str, output: str, codec) -> dict:
    """Tokenize ``inputs`` with ``codec`` into the dataset at ``output``; returns ``write_indexed``'s stats."""
    from megafusion.data.indexed import write_indexed
    from megafusion.data.shards import read_shards, shard_files
    from megafusion.data.tokenizer import MultimodalTokenizer

    # Resolve (and check) every input before anything is written.
    files = shard_files(list(inputs))
    tok = MultimodalTokenizer.from_files(tokenizer_path, codec)
    meta = {
        "tokenizer": tok.config(),
        "codec": codec.config(),
        "vocab_size": int(tok.vocab_size),
        "pad_id": int(tok.pad_id),
        "bos_id": int(tok.bos_id),
        "eos_id": int(tok.eos_id),
        "boi_id": int(tok.boi_id),
        "eoi_id": int(tok.eoi_id),
        "inputs": files,
        "created_by": "megafusion data prepare",
    }
    docs = (tok.encode_document(doc) for doc in read_shards(files))
    return write_indexed(output, docs, meta)


def main(argv: list[str] | None = None) -> int:
    """``argv`` is what follows ``megafusion data`` (e.g. ``["prepare", "--input", ...]``)."""
    try:
        args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exit_:  # argparse has printed usage / help; return its status instead
        return int(exit_.code or 0)
    try:
        stats = prepare(args.input, args.tokenizer, args.output, codec_from_args(args))
    except DataError as err:
        print(f"megafusion: {err}", file=sys.stderr)
        return 2
    total = sum(stats["tokens"].values())
    per = ", ".join(f"{name} {count}" for name, count in stats["tokens"].items())
    print(f"prepared {stats['documents']} documents, {total} tokens ({per})")
    print("wrote " + ", ".join(stats["files"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
