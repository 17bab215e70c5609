"""``python -m megafusion.train --config FILE [section.key=value ...]``.

Works alone (one process) and under ``torchrun`` (any world size). The config is loaded and
validated against the world size before any process group exists, so a layout that cannot
work stops here with a message that names the key and the fix.
"""

from __future__ import annotations

import os
import sys

from megafusion.config import ConfigError, load_config, parse_cli, validate
from megafusion.models import ARCHS


def load_and_validate(argv: list[str]):
    path, overrides = parse_cli(argv)
    cfg = load_config(path, overrides)
    validate(cfg, int(os.environ.get("WORLD_SIZE", "1")), known_archs=tuple(ARCHS))
    return cfg


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = load_and_validate(sys.argv[1:] if argv is None else argv)
    except ConfigError as err:
        print(f"megafusion: {err}", file=sys.stderr)
        return 2
    from megafusion.runtime import shutdown
    from megafusion.training.loop import train

    try:
        train(cfg)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
