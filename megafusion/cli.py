"""``python -m megafusion.cli``: the ``megafusion`` console command.

A stable entry point; the code lives in :mod:`megafusion.commands.main` (the dispatcher: each
subcommand runs through :func:`megafusion.commands.main.run`).
"""

from __future__ import annotations

import sys

from megafusion.commands.main import main

if __name__ == "__main__":
    sys.exit(main())
