"""``megafusion data prepare``: shards -> tokenized, indexed dataset on disk.

    megafusion data prepare --input SHARD_OR_DIR [--input ...] --tokenizer TOKENIZER \\
        --output PREFIX [--image-size 16 --patch-size 2 --pixel-levels 4]
        [--image-codec pixel|vq|vqgan --vq-codebook FILE --vqgan-path DIR]
    # Transfusion (objective.name=transfusion): images as continuous latents
    megafusion data prepare --input ... --tokenizer TOKENIZER --output PREFIX \\
        --latent-codec pixels|kl [--vae-path DIR] [--latent-patch-size 2] [--image-size 16]

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
"""

from __future__ import annotations

import argparse
import os
import sys

from megafusion.commands.main import run
from megafusion.core.errors import DataError

USAGE = "megafusion data prepare --input SHARD_OR_DIR [--input ...] --tokenizer TOKENIZER --output PREFIX"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megafusion data", description="Prepare pretokenized datasets.")
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser(
        "prepare",
        help="tokenize shards into an indexed dataset",
        description="Tokenize text+image shards into PREFIX.{bin,idx,meta.json}.",
    )
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
    prep.add_argument("--output", required=True, metavar="PREFIX", help="output prefix (PREFIX.bin, ...)")
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


def prepare(inputs: list[str], tokenizer_path: str, output: str, codec) -> dict:
    """Tokenize ``inputs`` with ``codec`` into the dataset at ``output``; returns ``write_indexed``'s stats.

    A :class:`~megafusion.data.transfusion_data.PlaceholderCodec` makes a Transfusion dataset:
    the stats then also hold ``"latents"`` (images written to ``PREFIX.latents.npy``).
    """
    from megafusion.data.formats.indexed import write_indexed
    from megafusion.data.formats.indexed_latents import LatentWriter
    from megafusion.data.formats.shards import read_shards, shard_files
    from megafusion.data.tokenizers.joint import MultimodalTokenizer
    from megafusion.data.transfusion_data import PlaceholderCodec, encode_transfusion_document

    # Resolve (and check) every input before anything is written.
    files = shard_files(list(inputs))
    tok = MultimodalTokenizer.from_files(tokenizer_path, codec)
    meta = {
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
        "inputs": files,
        "created_by": "megafusion data prepare",
    }
    if not isinstance(codec, PlaceholderCodec):
        return write_indexed(output, (tok.encode_document(doc) for doc in read_shards(files)), meta)

    latents = LatentWriter(output, codec)

    def transfusion_docs():
        for doc in read_shards(files):
            encoded = encode_transfusion_document(tok, doc)
            # The latents live in their own file; the indexed files get tokens and modalities only.
            latents.add(encoded.meta.pop("latents"), encoded.source)
            yield encoded

    stats = write_indexed(output, transfusion_docs(), meta, sidecar=latents)
    stats["latents"] = {"count": latents.count, "shape": list(latents.shape)}
    return stats


def prepare_command(argv: list[str]) -> int:
    """``argv`` is what follows ``megafusion data`` (e.g. ``["prepare", "--input", ...]``)."""
    args = _parser().parse_args(argv)
    stats = prepare(args.input, args.tokenizer, args.output, codec_from_args(args))
    total = sum(stats["tokens"].values())
    per = ", ".join(f"{name} {count}" for name, count in stats["tokens"].items())
    print(f"prepared {stats['documents']} documents, {total} tokens ({per})")
    if "latents" in stats:
        shape = "x".join(map(str, stats["latents"]["shape"]))
        print(f"stored {stats['latents']['count']} image latents of shape {shape} (for objective.name=transfusion)")
    print("wrote " + ", ".join(stats["files"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    # Errors read "megafusion: <message>" (not "megafusion data: "): tests/data/test_indexed.py asserts that prefix.
    return run(prepare_command, argv, "megafusion")


if __name__ == "__main__":
    sys.exit(main())
