"""``python -m megafusion.generate``: ``megafusion generate``.

A stable entry point (torchrun, launch/, sbatch and users call it). The code lives in
:mod:`megafusion.commands.generate`; its ``main`` runs the command through :func:`megafusion.commands.main.run`
(a user's error: one line on stderr, exit status 2).
"""

from __future__ import annotations

import sys

from megafusion.commands.generate import main

if __name__ == "__main__":
    sys.exit(main())
