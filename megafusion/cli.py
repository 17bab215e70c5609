"""``python -m megafusion.cli``: the megafusion console command. Kept as a stable entry point; the code lives in
:mod:`megafusion.commands.main`."""

import sys

from megafusion.commands.main import main

if __name__ == "__main__":
    sys.exit(main())
