"""Where a run's indexed datasets are (``data.path``, or each ``data.blend`` entry's ``path``),
checked without importing torch: commands call :func:`check_data_paths` right after the config is
validated, so a mistyped path is told in a moment, naming the key, instead of after the imports.

A path at which no file of a dataset exists is a typo (the message suggests close names in its
directory); a dataset with some of its files is left to the reader
(:func:`megafusion.data.formats.indexed.read_meta`), which says which file is missing.
"""

from __future__ import annotations

import difflib
import os

from megafusion.core.errors import DataError
from megafusion.data.formats.indexed import dataset_paths


def dataset_keys(cfg) -> list[tuple[str, str]]:
    """``(path, config key)`` of every indexed dataset of the run (none unless ``data.source=indexed``)."""
    d = cfg.data
    if d.source != "indexed":
        return []
    if not d.blend:
        return [(d.path, "data.path")] if d.path else []
    return [
        (str(entry["path"]), f"data.blend[{k}].path")
        for k, entry in enumerate(d.blend)
        if isinstance(entry, dict) and entry.get("path")
    ]


def check_data_paths(cfg) -> list[tuple[str, str]]:
    """:func:`check_dataset_exists` for every dataset of the run; returns :func:`dataset_keys`."""
    keys = dataset_keys(cfg)
    for path, key in keys:
        check_dataset_exists(path, key)
    return keys


def check_dataset_exists(path: str, key: str) -> None:
    """A DataError naming ``key`` and ``path`` when no file of a dataset is at ``path``."""
    if any(os.path.exists(p) for p in dataset_paths(path).values()):
        return
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        hint = f"the directory {folder}/ does not exist"
    else:
        suffix = ".meta.json"
        names = sorted(f[: -len(suffix)] for f in os.listdir(folder) if f.endswith(suffix))
        close = difflib.get_close_matches(os.path.basename(path), names, n=3, cutoff=0.6)
        if close:
            hint = "did you mean " + " or ".join(os.path.join(os.path.dirname(path), c) for c in close) + "?"
        elif names:
            hint = f"the datasets in {folder}/ are {', '.join(names[:8])}{', ...' if len(names) > 8 else ''}"
        else:
            hint = f"{folder}/ holds no dataset"
    raise DataError(
        f"{key}={path}: no dataset there ({path}.meta.json does not exist; {hint}): give the --output prefix "
        "of `megafusion data prepare`"
    )
