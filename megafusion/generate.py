"""``python -m megafusion.generate``: megafusion generate. Kept as a stable entry point; the code lives in
:mod:`megafusion.inference.generate`."""

import sys

from megafusion.inference.generate import main

if __name__ == "__main__":
    sys.exit(main())
