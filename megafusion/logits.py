"""``python -m megafusion.logits``: full-vocabulary logits of a checkpoint, alone or under torchrun.

A stable entry point (torchrun, launch/, sbatch and users call it). The code lives in
:mod:`megafusion.commands.logits`; its ``main`` runs the command through :func:`megafusion.commands.main.run`
(a user's error: one line on stderr, exit status 2).
"""

from __future__ import annotations

import sys

from megafusion.commands.logits import main

if __name__ == "__main__":
    sys.exit(main())
