"""A run's sample index built ahead of the run (``megafusion data index``).

In this one process, as the run's first rank would: the full check of the files, the held-out
split, the packed rows and the epoch orders of every indexed dataset of the run (``data.path``
or each of ``data.blend``), cached under ``data.index_cache`` (default ``PREFIX.index/``, see
:mod:`megafusion.data.sample_index`). A large multi-node job then starts at once instead of
holding every rank at a barrier while its first rank builds the index.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from megafusion.core.errors import UsageError


@dataclass(frozen=True)
class BuiltIndex:
    describe: str  # the run's train / validation sources, one line each
    caches: list[str]  # where each dataset's index is cached
    seconds: float


def build_run_index(cfg) -> BuiltIndex:
    """Build the sample index of the indexed data of ``cfg`` (a validated config)."""
    if cfg.data.source != "indexed":
        raise UsageError(f"data.source={cfg.data.source} has no sample index: it is for data.source=indexed")
    from megafusion.data.paths import check_data_paths

    check_data_paths(cfg)  # before torch is imported
    from megafusion.data.sample_index import default_cache
    from megafusion.data.sources import blend_entries, build_data

    start = time.perf_counter()
    data = build_data(cfg)
    caches = [cfg.data.index_cache or default_cache(path) for path, _, _ in blend_entries(cfg)]
    return BuiltIndex(data.describe(), caches, time.perf_counter() - start)
