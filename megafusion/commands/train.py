"""``megafusion train`` / ``python -m megafusion.train --config FILE [section.key=value ...]``.

Works alone (one process) and under ``torchrun`` (any world size); ``--dry-run`` prints the
resolved parallel layout (see :mod:`megafusion.commands.dry_run`) instead. The config is loaded and
validated against the world size before any process group exists, so a layout that cannot
work stops here with a message that names the key and the fix.
"""

from __future__ import annotations

import os
import sys

from megafusion.commands.main import run
from megafusion.config import load_config, parse_cli, validate

PROG = "megafusion train"


def load_and_validate(argv: list[str]):
    path, overrides = parse_cli(argv)
    cfg = load_config(path, overrides)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    validate(cfg, world)
    return cfg


def train_command(argv: list[str]) -> int:
    if "--dry-run" in argv:  # print the resolved layout: which rank holds what; train nothing
        from megafusion.commands import dry_run

        return dry_run.main([a for a in argv if a != "--dry-run"])
    cfg = load_and_validate(argv)
    from megafusion.training.trainer import train

    train(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(train_command, argv, PROG, runtime=True)


if __name__ == "__main__":
    sys.exit(main())
