"""``python -m megafusion.evaluate``: megafusion eval (torchrun for --text). Kept as a stable entry point; the code lives in
:mod:`megafusion.evaluation.captions`."""

import sys

from megafusion.evaluation.captions import main

if __name__ == "__main__":
    sys.exit(main())
