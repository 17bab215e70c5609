"""The ``megafusion`` console command: ``megafusion <subcommand> ...``.

Subcommands:
- ``train --config FILE [section.key=value ...]``: the same as ``python -m megafusion.train``
  (one process here; launch multi-process runs with ``torchrun -m megafusion.train`` or
  ``launch/torchrun.sh``).
"""

from __future__ import annotations

import sys

USAGE = """usage: megafusion <command> [args]

commands:
  train --config FILE [section.key=value ...]   train a model (see examples/configs/)
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from megafusion.train import main as train_main

        return train_main(rest)
    print(f"megafusion: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
