"""The ``megafusion`` console command: ``megafusion <subcommand> ...``.

Subcommands:
- ``train --config FILE [section.key=value ...] [--dry-run]``: the same as
  ``python -m megafusion.commands.train`` (one process here; launch multi-process runs with
  ``torchrun -m megafusion.commands.train``, ``launch/torchrun.sh`` or ``launch/slurm/train.sbatch``).
- ``flops --config FILE [...]``: parameters and FLOPs per token per modality.
- ``data prepare ...``: raw JSONL / tar shards -> indexed dataset.
- ``tokenizer train|fit-vq ...``: a SentencePiece model from the text of shards, or a k-means
  image patch codebook (the ``vq`` image codec).
- ``convert dense-to-mot ...``: warm-start a Mixture-of-Transformers from a dense checkpoint;
  ``convert hf-to-mf`` / ``mf-to-hf``: Hugging Face Llama checkpoints in and out.
- ``generate ...``: text and images (denoised with classifier-free guidance) from a Transfusion checkpoint.
- ``eval ...``: held-out loss per modality and caption consistency of generated shapes images;
  ``eval --ckpt CKPT --text FILE``: the mean next-token loss on a plain text file.
"""

from __future__ import annotations

import importlib
import sys

USAGE = """usage: megafusion <command> [args]

commands:
  train --config FILE [section.key=value ...] [--dry-run]   train a model (see examples/configs/)
  flops --config FILE [section.key=value ...]               parameters and FLOPs per token per modality
  data prepare --input SHARDS --tokenizer M --output P      shards -> indexed dataset
  tokenizer train --input SHARDS --vocab-size N --output P  train a SentencePiece model
  tokenizer fit-vq --builtin shapes --out CODEBOOK          fit a k-means image patch codebook
  convert dense-to-mot --input CKPT --output DIR            MoT weights copied from a dense checkpoint
  convert hf-to-mf --hf DIR --output CKPT [--config-out F]  import a Hugging Face Llama (safetensors)
  convert mf-to-hf --input CKPT --output DIR                export a dense checkpoint as a Hugging Face Llama
  generate --ckpt CKPT --prompt TEXT --out DIR [--image]    text and images from a Transfusion checkpoint
  eval --ckpt CKPT [--samples N]                            validation loss + caption consistency (shapes)
  eval --ckpt CKPT --text FILE [--tokenizer T]              mean next-token loss on a plain text file
"""

COMMANDS = {
    "train": "megafusion.commands.train:main",
    "flops": "megafusion.commands.flops:main",
    "data": "megafusion.commands.data:main",
    "tokenizer": "megafusion.commands.tokenizer:main",
    "convert": "megafusion.commands.convert:main",
    "generate": "megafusion.inference.generate:main",
    "eval": "megafusion.evaluation.captions:main",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command in COMMANDS:
        module, function = COMMANDS[command].split(":")
        return getattr(importlib.import_module(module), function)(rest)
    print(f"megafusion: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
