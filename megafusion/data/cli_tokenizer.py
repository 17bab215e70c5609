"""``megafusion tokenizer ...``: train the SentencePiece text part of the joint tokenizer.

    megafusion tokenizer train --input SHARD_OR_DIR [--input ...] --vocab-size N --output PREFIX

reads the text segments of the shards (images are checked to exist but not decoded), trains
(see ``megafusion.data.tokenizer.train_sentencepiece``) and prints the model path.
``main`` takes the arguments after ``tokenizer`` (so ``argv[0]`` is ``train``).
"""

from __future__ import annotations

import argparse
import sys

from megafusion.data.types import DataError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megafusion tokenizer", description="SentencePiece tokenizer tools")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a SentencePiece model on the text of shards")
    train.add_argument("--input", action="append", required=True, metavar="SHARD_OR_DIR",
                       help="a *.jsonl / *.tar shard or a directory of them (repeatable)")
    train.add_argument("--vocab-size", type=int, required=True, metavar="N",
                       help="wanted number of text pieces (the real size may be smaller on a small corpus)")
    train.add_argument("--output", required=True, metavar="PREFIX", help="writes PREFIX.model")
    train.add_argument("--character-coverage", type=float, default=1.0,
                       help="fraction of characters to cover (default 1.0: all)")
    train.add_argument("--byte-fallback", action="store_true",
                       help="spell unseen characters as bytes instead of <unk> (needs vocab >= ~260)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``argv`` is what follows ``megafusion tokenizer`` (e.g. ``["train", "--input", ...]``)."""
    try:
        args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exit_:  # argparse has printed usage / help; return its status instead
        return int(exit_.code or 0)
    # Imported here so that `--help` stays fast.
    import sentencepiece as spm

    from megafusion.data.shards import shard_texts
    from megafusion.data.tokenizer import train_sentencepiece

    try:
        path = train_sentencepiece(shard_texts(args.input), args.vocab_size, args.output,
                                   character_coverage=args.character_coverage, byte_fallback=args.byte_fallback)
    except DataError as exc:
        print(f"megafusion tokenizer: error: {exc}", file=sys.stderr)
        return 2
    size = spm.SentencePieceProcessor(model_file=path).get_piece_size()
    if size < args.vocab_size:
        print(f"note: the corpus gave {size} pieces, fewer than --vocab-size {args.vocab_size}", file=sys.stderr)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
