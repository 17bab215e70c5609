"""``megafusion train`` / ``python -m megafusion.train --config FILE [section.key=value ...]``.

Works alone (one process) and under ``torchrun`` (any world size); ``--dry-run`` prints the
resolved parallel layout (see :mod:`megafusion.commands.dry_run`) instead. The config is loaded and
validated against the world size before any process group exists, so a layout that cannot
work stops here with a message that names the key and the fix. Without ``--config`` the command
prints its help and exits 2: a run of the built-in defaults is never what was meant.
"""

from __future__ import annotations

import argparse
import os
import sys

from megafusion.commands.main import run
from megafusion.commands.parsing import add_config, command_parser, config_missing, config_paths

PROG = "megafusion train"
# `--overwrite` is this override (appended last, so it wins over the config and the other overrides).
OVERWRITE = "checkpoint.overwrite=true"

DESCRIPTION = """\
Train a model described by one or more YAML configs (examples/configs/) plus section.key=value
overrides, in this one process or in each process torchrun starts. The config is checked against
the world size before anything starts: a layout that cannot run stops with the key and the fix."""

NOTES = """\
section.key=value: any config key, e.g. parallel.tp=2 model.arch=mot train.steps=100
  logging.out_dir=runs/x; overrides win over the --config files, later ones over earlier ones.
several processes: torchrun --nproc-per-node N -m megafusion.train ... (same arguments),
  launch/torchrun.sh or launch/slurm/train.sbatch.
exit status: 0 done; 2 a user's error (one line); 75 stopped on a signal (train.stop_signals) with
  a checkpoint saved: run the same command again to continue (train.sbatch requeues); 76 forced
  out without saving (a second signal more than 5 s after the first, or train.stop_deadline_s):
  run again to continue from the last complete checkpoint; anything else: a crash. Plain torchrun
  exits 1 for any of 2, 75, 76 and crashes; launch/torchrun.sh and train.sbatch pass them on."""

EXAMPLES = (
    "megafusion train --config examples/configs/tiny_mixed.yaml",
    "megafusion train --config examples/configs/tiny_mixed.yaml model.arch=mot model.untie=ffn",
    "megafusion train --config examples/configs/tiny_mixed.yaml --overwrite",
    "torchrun --nproc-per-node 4 -m megafusion.train --config examples/configs/tiny_mixed.yaml parallel.tp=2 "
    "parallel.pp=2",
    "megafusion train --dry-run --config examples/configs/tiny_mixed.yaml parallel.tp=2 parallel.pp=2 "
    "--world-size 16 --nproc-per-node 8",
)

# Flags only `--dry-run` reads (megafusion.planning.layout takes them from the forwarded argv).
DRY_RUN_ONLY = {
    "world_size": "--world-size",
    "nnodes": "--nnodes",
    "nproc_per_node": "--nproc-per-node",
    "per_rank": "--per-rank",
    "grouped": "--grouped",
    "json": "--json",
}


def parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: `--conf x` is refused, as the hand-written parser this replaced did.
    p = command_parser(PROG, DESCRIPTION, EXAMPLES, NOTES, allow_abbrev=False)
    add_config(p, "config keys to override (see below)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run from step 0 in a logging.out_dir / checkpoint.dir that holds a run (this one or "
        "another), deleting its checkpoints and metrics first; a requeued SLURM job (the same job id) continues "
        "what it saved instead (the same as the override checkpoint.overwrite=true)",
    )
    dry = p.add_argument_group("layout only (--dry-run)")
    dry.add_argument(
        "--dry-run", action="store_true", help="print which rank holds what and start nothing (trains nothing)"
    )
    # Values stay strings here: megafusion.planning.layout checks them and names the flag.
    dry.add_argument(
        "--world-size", "--world_size", metavar="N", help="processes in all (default: torchrun's / SLURM's)"
    )
    dry.add_argument("--nnodes", metavar="N", help="nodes (with --nproc-per-node instead of --world-size)")
    dry.add_argument("--nproc-per-node", "--nproc_per_node", metavar="M", help="processes per node")
    dry.add_argument("--per-rank", action="store_true", help="one line per rank")
    dry.add_argument("--grouped", action="store_true", help="one line per (node, pipeline stage)")
    dry.add_argument("--json", action="store_true", help="the layout as JSON")
    return p


def parse(argv: list[str]) -> argparse.Namespace | None:
    """The parsed arguments, or None (with the help printed on stderr) when ``--config`` is missing."""
    p = parser()
    args = p.parse_intermixed_args(argv)
    if not args.config:
        config_missing(p)
        return None
    if args.overwrite:
        args.overrides.append(OVERWRITE)
    if not args.dry_run:
        given = [flag for dest, flag in DRY_RUN_ONLY.items() if getattr(args, dest) not in (None, False)]
        if given:
            p.error(f"{', '.join(given)} only go{'es' if len(given) == 1 else ''} with --dry-run")
    return args


def load_and_validate(config: list[str], overrides: list[str]):
    """The config of ``config`` (one or more files) and ``overrides``, validated for this world size."""
    from megafusion.config import load_config, validate
    from megafusion.data.paths import check_data_paths

    cfg = load_config(config_paths(config), overrides)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    validate(cfg, world)
    check_data_paths(cfg)  # a mistyped data.path is told now, before torch is imported
    return cfg


def train_command(argv: list[str]) -> int:
    args = parse(argv)
    if args is None:
        return 2
    if args.dry_run:  # print the resolved layout: which rank holds what; train nothing
        from megafusion.commands import dry_run

        # The layout command reads the launch flags itself (and names a bad one): forward argv as given.
        forwarded = [a for a in argv if a not in ("--dry-run", "--overwrite")]
        return dry_run.main(forwarded + ([OVERWRITE] if args.overwrite else []))
    cfg = load_and_validate(args.config, args.overrides)
    if int(os.environ.get("RANK", "0")) == 0:
        # The run's directories are checked and claimed before torch is imported: a refusal
        # (another run holds them, a changed data setting on resume) takes well under a second.
        from megafusion.training import run_dir

        run_dir.prepare(cfg, print)
    from megafusion.training.trainer import train

    train(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(train_command, argv, PROG, runtime=True)


if __name__ == "__main__":
    sys.exit(main())
