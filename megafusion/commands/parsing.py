"""The commands' argument parsers: one look for ``--help`` and one spelling per kind of flag.

Every parser shows a description and an ``examples:`` epilog of commands that work, printed as
written (``RawDescriptionHelpFormatter``, so the examples keep their lines). Flags read the same
in every command: ``--ckpt`` names a checkpoint that is read, ``--output`` what the command
writes; the spellings they replaced stay accepted as aliases so that existing scripts keep working.
Nothing here imports more than argparse: ``--help`` and argument errors stay instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

FORMATTER = argparse.RawDescriptionHelpFormatter


def epilog(examples: Sequence[str], notes: str = "") -> str:
    """``notes`` (optional), then ``examples:`` with one command per line."""
    text = "examples:\n" + "\n".join(f"  {line}" for line in examples)
    return f"{notes.strip()}\n\n{text}" if notes else text


class _Version(argparse.Action):
    """``--version``: prints ``megafusion <version>`` and exits 0, like ``megafusion --version``
    (the version is looked up only when asked for)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from megafusion.commands.main import version

        print(f"megafusion {version()}")
        parser.exit()


def add_version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action=_Version, help="print the installed megafusion version and exit")


def command_parser(
    prog: str, description: str, examples: Sequence[str], notes: str = "", **kwargs
) -> argparse.ArgumentParser:
    """A command's parser: ``description`` above the options, ``notes`` and ``examples`` below,
    and ``--version``."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, epilog=epilog(examples, notes), formatter_class=FORMATTER, **kwargs
    )
    add_version(parser)
    return parser


def subcommand(
    subparsers, name: str, summary: str, description: str, examples: Sequence[str], notes: str = ""
) -> argparse.ArgumentParser:
    """A sub-subcommand (``megafusion convert mf-to-hf``) with the same look; ``summary`` is its line
    in the parent's help."""
    parser = subparsers.add_parser(
        name, help=summary, description=description, epilog=epilog(examples, notes), formatter_class=FORMATTER
    )
    add_version(parser)
    return parser


# What --ckpt takes, in messages.
CKPT = "a step directory or a run's checkpoint.dir"


def check_ckpt(path: str, flag: str = "--ckpt") -> None:
    """``--ckpt`` (or ``flag``) exists and is a directory: told before torch is imported (what it
    holds is checked on load)."""
    from megafusion.core.errors import CheckpointError
    from megafusion.core.io import ensure_exists

    ensure_exists(path, flag, CKPT, kind="dir", error=CheckpointError)


def add_ckpt(parser: argparse.ArgumentParser, help: str, *old: str, required: bool = True) -> None:
    """``--ckpt CKPT`` (a checkpoint that is read), also accepted as ``old`` spellings."""
    parser.add_argument("--ckpt", *old, dest="ckpt", required=required, metavar="CKPT", help=help)


def add_output(
    parser: argparse.ArgumentParser,
    help: str,
    *old: str,
    metavar: str = "DIR",
    required: bool = True,
    dest: str = "output",
) -> None:
    """``--output`` (what the command writes), also accepted as ``old`` spellings."""
    parser.add_argument("--output", *old, dest=dest, required=required, metavar=metavar, help=help)


def add_config(parser: argparse.ArgumentParser, overrides_help: str = "config keys to override") -> None:
    """``--config FILE`` (repeatable) and ``section.key=value`` overrides: parse with
    ``parse_intermixed_args`` so that overrides may come before, between and after the flags."""
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FILE",
        help="YAML config (required; repeatable: later files override earlier ones key by key)",
    )
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help=overrides_help)


def config_paths(config: list[str]) -> str | list[str]:
    """``--config`` as ``megafusion.config.load_config`` takes it (one path, or the list of several)."""
    return config[0] if len(config) == 1 else list(config)


def config_missing(parser: argparse.ArgumentParser) -> int:
    """No ``--config``: the help and the error on stderr, exit status 2 (a run of the built-in defaults
    is never what was meant)."""
    parser.print_help(sys.stderr)
    print(f"\n{parser.prog}: error: --config FILE is required (examples/configs/ has some)", file=sys.stderr)
    return 2
