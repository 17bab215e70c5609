"""``megafusion train --dry-run``: the command line of
:func:`megafusion.planning.layout.dry_run` (the resolved parallel layout of a run, printed
without starting any process; ``launch/slurm/train.sbatch --dry-run`` calls it).
"""

from __future__ import annotations

import sys

from megafusion.commands.main import run, version
from megafusion.planning.layout import dry_run

PROG = "megafusion train --dry-run"


def main(argv: list[str] | None = None) -> int:
    """0, or 2 with the message on stderr when the arguments or the configuration are invalid."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--version" in argv:  # as every command answers it (the layout's own flags are read in planning)
        print(f"megafusion {version()}")
        return 0
    return run(dry_run, argv, PROG)


if __name__ == "__main__":
    sys.exit(main())
