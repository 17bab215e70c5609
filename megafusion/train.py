"""``python -m megafusion.train``: the training command (torchrun, launch/ and sbatch call it). Kept as a stable entry point; the code lives in
:mod:`megafusion.commands.train`."""

import sys

from megafusion.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
