"""The ``megafusion`` console command (``megafusion <subcommand> ...``) and :func:`run`, the one way
every command runs and reports a user's error.

Subcommands:
- ``train --config FILE [section.key=value ...] [--dry-run] [--overwrite]``: the same as
  ``python -m megafusion.train`` (one process here; launch multi-process runs with
  ``torchrun -m megafusion.train``, ``launch/torchrun.sh`` or ``launch/slurm/train.sbatch``).
- ``flops --config FILE [...]``: parameters and FLOPs per token per modality.
- ``plan --config FILE --gpus N --gpu h100|a100|h200 [...]``: the parallel layouts that validate,
  their predicted memory per GPU and step time, ranked.
- ``data prepare ...``: raw JSONL / tar shards -> indexed dataset; ``data export-builtin``: a built-in
  set as a JSONL shard; ``data index``: a run's sample index, built ahead of the run.
- ``tokenizer train|fit-vq ...``: a SentencePiece model from the text of shards, or a k-means
  image patch codebook (the ``vq`` image codec).
- ``convert dense-to-mot ...``: warm-start a Mixture-of-Transformers from a dense checkpoint;
  ``convert upcycle ...``: a MoMa checkpoint from a MoT (or dense) one, every expert a copy of its FFN;
  ``convert hf-to-mf`` / ``mf-to-hf``: Hugging Face Llama checkpoints in and out.
- ``generate ...``: text and images (denoised with classifier-free guidance) from a Transfusion checkpoint.
- ``eval ...``: held-out loss per modality and caption consistency of generated shapes images;
  ``eval --ckpt CKPT --text FILE``: the mean next-token loss on a plain text file.

``megafusion --version`` (and ``megafusion <command> --version``) prints the installed version;
``megafusion <command> --help`` the command's options and examples (the parsers:
:mod:`megafusion.commands.parsing`). ``USAGE`` lists every command and subcommand (a test derives
them from the parsers).

Each command module under :mod:`megafusion.commands` holds only its argument parsing and a
``main(argv) -> int`` that is ``run(<the command>, argv, <its prog>)``: this console command, the
``python -m megafusion.<name>`` entry points (``train``, ``cli``, ``evaluate``, ``logits``,
``generate``, ``launch_plan``) and in-process callers all go through :func:`run`, so every
command prints a user's error the same way: one line ``<prog>: <message>``, ``<prog>`` being the
command as typed up to its subcommand (``megafusion train``, ``megafusion data prepare``,
``megafusion convert mf-to-hf``), the prefix of argparse's own usage errors too. Nothing here
imports torch, and no command module imports it before its arguments are parsed (``--help``,
argument errors and ``--dry-run`` stay instant).
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from collections.abc import Callable, Sequence

from megafusion.core.errors import MegafusionError

USAGE = """usage: megafusion <command> [args]      (megafusion <command> --help: its options and examples)
       megafusion [<command>] --version

commands:
  train --config FILE [section.key=value ...] [--dry-run]   train a model (see examples/configs/)
  flops --config FILE [section.key=value ...]               parameters and FLOPs per token per modality
  plan --config FILE --gpus N [--gpu h100|a100|h200]        layouts that fit, memory and step time per GPU
  data prepare --input SHARDS --tokenizer M --output P      shards -> indexed dataset
  data export-builtin --set shapes|digits --output F.jsonl  a built-in set as a JSONL shard (to try the tools on)
  data index --config FILE [section.key=value ...]          build a run's sample index ahead of a large job
  tokenizer train --input SHARDS --vocab-size N --output P  train a SentencePiece model
  tokenizer fit-vq --builtin shapes --output CODEBOOK       fit a k-means image patch codebook
  convert dense-to-mot --ckpt CKPT --output DIR             MoT weights copied from a dense checkpoint
  convert upcycle --ckpt CKPT --output DIR [--experts E]    MoMa experts copied from a MoT / dense checkpoint
  convert hf-to-mf --hf DIR --output CKPT [--config-out F]  import a Hugging Face Llama (safetensors)
  convert mf-to-hf --ckpt CKPT --output DIR                 export a dense checkpoint as a Hugging Face Llama
  generate --ckpt CKPT --prompt TEXT --output DIR           text (and --image) from a Transfusion checkpoint
  eval --ckpt CKPT [--samples N]                            validation loss + caption consistency (shapes)
  eval --ckpt CKPT --text FILE [--tokenizer T]              mean next-token loss on a plain text file
"""

# Subcommand -> "module:function", the function being that module's run-wrapped main.
COMMANDS = {
    "train": "megafusion.commands.train:main",
    "flops": "megafusion.commands.flops:main",
    "plan": "megafusion.commands.plan:main",
    "data": "megafusion.commands.data:main",
    "tokenizer": "megafusion.commands.tokenizer:main",
    "convert": "megafusion.commands.convert:main",
    "generate": "megafusion.commands.generate:main",
    "eval": "megafusion.commands.eval:main",
}

DEBUG_VARIABLE = "MEGAFUSION_DEBUG"  # =1: a user's error also prints its traceback


def run(
    command: Callable[[list[str]], int | None],
    argv: Sequence[str] | None = None,
    prog: str = "megafusion",
    *,
    runtime: bool = False,
) -> int:
    """Run ``command(argv)`` (``argv`` default: ``sys.argv[1:]``) as a command line; returns the exit status.

    - ``command``'s return value is the status (None: 0);
    - a :class:`~megafusion.core.errors.MegafusionError` (bad input: the message names it and
      the fix) prints ``<prog>: <message>`` on stderr and gives 2, without a traceback unless
      the environment has ``MEGAFUSION_DEBUG=1``; any other exception is a bug and propagates;
    - ``SystemExit`` (argparse's usage errors, status 2, and ``--help``, 0) becomes its status, so
      in-process callers get a number instead of an exit;
    - ``runtime=True``: the command may initialise megafusion's runtime (process groups), which
      is shut down afterwards, whatever happened.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        status = command(argv)
        return 0 if status is None else int(status)
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        print(exit_.code, file=sys.stderr, flush=True)  # sys.exit("message"): Python's own behaviour
        return 1
    except MegafusionError as err:
        if os.environ.get(DEBUG_VARIABLE) == "1":
            traceback.print_exc()
        print(f"{prog}: {err}", file=sys.stderr, flush=True)
        return 2
    finally:
        # Only a command that imported the runtime can have started one; importing it here
        # otherwise would cost a torch import (and tear down a caller's process groups).
        loaded = sys.modules.get("megafusion.runtime") if runtime else None
        if loaded is not None:
            loaded.shutdown()
        claimed = sys.modules.get("megafusion.training.run_dir") if runtime else None
        if claimed is not None:  # a training run's directory locks, however it ended
            claimed.release()
        children = sys.modules.get("megafusion.runtime.children") if runtime else None
        if children is not None:  # a training run: no process it started outlives it, on any exit path
            children.reap_children()


def version() -> str:
    """The installed distribution's version, else the package's own (a source tree on PYTHONPATH)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("megafusion")
    except PackageNotFoundError:
        import megafusion

        return getattr(megafusion, "__version__", "unknown")


def main(argv: list[str] | None = None) -> int:
    """``megafusion <command> [args]``: hands ``args`` to the command's ``main``."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"megafusion {version()}")
        return 0
    command, rest = argv[0], argv[1:]
    if command in COMMANDS:
        module, function = COMMANDS[command].split(":")
        return getattr(importlib.import_module(module), function)(rest)
    print(f"megafusion: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
