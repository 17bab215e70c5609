"""``python -m megafusion.commands.train --config FILE [section.key=value ...]``.

Works alone (one process) and under ``torchrun`` (any world size); ``--dry-run`` prints the
resolved parallel layout (see :mod:`megafusion.planning.layout`) instead. The config is loaded and
validated against the world size before any process group exists, so a layout that cannot
work stops here with a message that names the key and the fix.
"""

from __future__ import annotations

import os
import sys

from megafusion.config import ConfigError, load_config, parse_cli, validate
from megafusion.models.registry import family_names
from megafusion.objectives.registry import objective_names


def load_and_validate(argv: list[str]):
    path, overrides = parse_cli(argv)
    cfg = load_config(path, overrides)
    validate(cfg, int(os.environ.get("WORLD_SIZE", "1")), known_archs=family_names(), known_objectives=objective_names())
    return cfg


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--dry-run" in argv:  # print the resolved layout: which rank holds what; train nothing
        from megafusion.planning.layout import dry_run_main

        return dry_run_main([a for a in argv if a != "--dry-run"])
    try:
        cfg = load_and_validate(argv)
    except ConfigError as err:
        print(f"megafusion: {err}", file=sys.stderr)
        return 2
    from megafusion.runtime import shutdown
    from megafusion.training.trainer import train

    from megafusion.core.errors import DataError
    from megafusion.training.checkpoint import CheckpointError
    from megafusion.training.metrics import MissingDependencyError

    try:
        train(cfg)
    # Bad input: say what and where, no traceback.
    except (ConfigError, DataError, CheckpointError, MissingDependencyError) as err:
        print(f"megafusion: {err}", file=sys.stderr, flush=True)
        return 2
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
