"""``python -m megafusion.logits``: full-vocabulary logits of a checkpoint (torchrun). Kept as a stable entry point; the code lives in
:mod:`megafusion.inference.logits`."""

import sys

from megafusion.inference.logits import main

if __name__ == "__main__":
    sys.exit(main())
