"""The ``megafusion`` console command (``megafusion <command> ...``, also ``python -m megafusion
<command> ...``), its command table :data:`COMMANDS` and :func:`run`, the one way every command
runs and reports a user's error.

:data:`COMMANDS` is the one list of the commands: the dispatcher, ``megafusion --help``
(:func:`usage`) and the tests read it. ``megafusion --version`` (and ``megafusion <command>
--version``) prints the installed version; ``megafusion <command> --help`` the command's options
and examples (the parsers: :mod:`megafusion.commands.parsing`).

Each command module ``megafusion.commands.<name>`` holds only its argument parsing and a
``main(argv) -> int`` that is ``run(<the command>, argv, <its prog>)``: this console command,
``python -m megafusion.train`` (kept for ``torchrun -m megafusion.train``) and in-process callers
all go through :func:`run`, so every command prints a user's error the same way: one line
``<prog>: <message>``, ``<prog>`` being the command as typed up to its subcommand (``megafusion
train``, ``megafusion data prepare``, ``megafusion convert mf-to-hf``), the prefix of argparse's
own usage errors too. Nothing here imports torch, and no command module imports it before its
arguments are parsed (``--help``, argument errors and ``--dry-run`` stay instant).
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from difflib import get_close_matches

from megafusion.core.errors import MegafusionError


@dataclass(frozen=True)
class Command:
    """One ``megafusion`` subcommand: its ``main`` is ``megafusion.commands.<name>.main`` (that
    module's run-wrapped main); ``usage``: one ``(arguments, what it does)`` per form of the
    command, the lines ``megafusion --help`` shows."""

    usage: tuple[tuple[str, str], ...]


# The commands, in the order the usage lists them: the one place they are written down.
COMMANDS = {
    "train": Command((("--config FILE [section.key=value ...] [--dry-run]", "train a model (see examples/configs/)"),)),
    "flops": Command((("--config FILE [section.key=value ...]", "parameters and FLOPs per token per modality"),)),
    "plan": Command(
        (("--config FILE --gpus N [--gpu h100|a100|h200]", "layouts that fit, memory and step time per GPU"),)
    ),
    "data": Command(
        (
            ("prepare --input SHARDS --tokenizer M --output P", "shards -> indexed dataset"),
            (
                "export-builtin --set shapes|digits --output F.jsonl",
                "a built-in set as a JSONL shard (to try the tools on)",
            ),
            ("index --config FILE [section.key=value ...]", "build a run's sample index ahead of a large job"),
        )
    ),
    "tokenizer": Command(
        (
            ("train --input SHARDS --vocab-size N --output P", "train a SentencePiece model"),
            ("fit-vq --builtin shapes --output CODEBOOK", "fit a k-means image patch codebook"),
        )
    ),
    "convert": Command(
        (
            ("dense-to-mot --ckpt CKPT --output DIR", "MoT weights copied from a dense checkpoint"),
            ("upcycle --ckpt CKPT --output DIR [--experts E]", "MoMa experts copied from a MoT / dense checkpoint"),
            (
                "btx-merge --seed CKPT --branch CKPT ... --output DIR",
                "BTX: branches' FFNs as experts, the rest averaged",
            ),
            ("hf-to-mf --hf DIR --output CKPT [--config-out F]", "import a Hugging Face Llama (safetensors)"),
            ("mf-to-hf --ckpt CKPT --output DIR", "export a dense checkpoint as a Hugging Face Llama"),
        )
    ),
    "generate": Command(
        (("--ckpt CKPT --prompt TEXT --output DIR", "text (and --image) from a Transfusion checkpoint"),)
    ),
    "eval": Command(
        (
            ("--ckpt CKPT [--samples N]", "validation loss + caption consistency (shapes)"),
            ("--ckpt CKPT --text FILE [--tokenizer T]", "mean next-token loss on a plain text file"),
        )
    ),
    "logits": Command(
        (("--ckpt CKPT --tokens IN.pt --output OUT.pt", "full-vocabulary logits of token ids (any layout)"),)
    ),
}


def usage() -> str:
    """``megafusion --help``: every form of every command of :data:`COMMANDS`, in its order."""
    lines = [(f"{name} {arguments}", what) for name, command in COMMANDS.items() for arguments, what in command.usage]
    width = max(len(left) for left, _ in lines) + 3
    listed = "\n".join(f"  {left:<{width}}{what}" for left, what in lines)
    return (
        "usage: megafusion <command> [args]      (megafusion <command> --help: its options and examples)\n"
        "       megafusion [<command>] --version\n"
        "       python -m megafusion <command> [args]   (the same; torchrun -m megafusion <command> ...)\n"
        f"\ncommands:\n{listed}\n"
    )


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
        print(usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"megafusion {version()}")
        return 0
    command, rest = argv[0], argv[1:]
    if command in COMMANDS:
        return importlib.import_module(f"megafusion.commands.{command}").main(rest)
    guess = get_close_matches(command, COMMANDS, n=1)
    hint = f", did you mean {guess[0]!r}?" if guess else ""
    print(
        f"megafusion: unknown command {command!r}{hint} (the commands: {', '.join(COMMANDS)}; "
        "megafusion --help shows their arguments)",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
