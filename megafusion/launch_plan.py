"""``python -m megafusion.launch_plan``: the resolved parallel layout (launch/slurm/train.sbatch --dry-run). Kept as a stable entry point; the code lives in
:mod:`megafusion.planning.layout`."""

import sys

from megafusion.planning.layout import dry_run_main as main

if __name__ == "__main__":
    sys.exit(main())
