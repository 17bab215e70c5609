"""``python -m megafusion.launch_plan``: the resolved parallel layout
(``megafusion train --dry-run``; ``launch/slurm/train.sbatch --dry-run`` calls it).

A stable entry point (torchrun, launch/, sbatch and users call it). The code lives in
:mod:`megafusion.commands.dry_run`; its ``main`` runs the command through :func:`megafusion.commands.main.run`
(a user's error: one line on stderr, exit status 2).
"""

from __future__ import annotations

import sys

from megafusion.commands.dry_run import main

if __name__ == "__main__":
    sys.exit(main())
