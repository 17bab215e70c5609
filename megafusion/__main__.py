"""``python -m megafusion <command> [args]`` (and ``torchrun -m megafusion <command> ...``): the
``megafusion`` console command, :func:`megafusion.commands.main.main`."""

from __future__ import annotations

import sys

from megafusion.commands.main import main

if __name__ == "__main__":
    sys.exit(main())
