"""Lineage: which seed checkpoint a run's weights descend from (``lineage`` in ``megafusion.json``).

A run started with ``checkpoint.init_from=SEED`` records, in every checkpoint it saves::

    "lineage": {"seed": "<sha256>", "seed_path": "/abs/SEED/step_...", "seed_step": 100}

``seed`` is the seed checkpoint's *identity*: a sha256 over its per-file table (``files``:
``{name: [size, blake2b]}``, recorded at save by :mod:`megafusion.checkpoint.integrity`), so it
costs nothing to compute (the table is in the manifest), names the exact bytes of the seed's
weights, and does not depend on how the run that starts from it is laid out (TP, PP, DP: the
seed's files are what they are). A checkpoint saved before checksums existed has no table: its
files are hashed the same way, giving the same identity a recorded table would. The same weights
saved twice (another layout, another run) are two different seeds: lineage says "started from
this checkpoint", not "holds equal numbers".

A resumed run keeps the lineage its checkpoint records (it is the same run). A checkpoint that
has a lineage of its own and is given to ``checkpoint.init_from`` is the new run's seed: the new
run records *its* identity (the chain is not followed). ``megafusion convert btx-merge`` relies
on it: averaging weights is only meaningful between branches of one seed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from megafusion.checkpoint import integrity
from megafusion.checkpoint.manifest import MANIFEST
from megafusion.core.io import file_digest

LINEAGE = "lineage"


def file_table(path: Path, manifest: dict) -> dict:
    """``{name: [size, digest]}`` of checkpoint ``path``'s files: the recorded table, else computed
    (an older checkpoint) the way :func:`integrity.record_files` records it."""
    table = manifest.get(integrity.FILES_KEY)
    if table is not None:
        return table
    path = Path(path)
    names = sorted(p.name for p in path.iterdir() if p.is_file() and p.name != MANIFEST)
    return {n: [(path / n).stat().st_size, file_digest(path / n)] for n in names}


def identity(path: Path, manifest: dict) -> str:
    """The sha256 (hex) that identifies checkpoint ``path``'s weights: over its sorted file table."""
    table = file_table(path, manifest)
    text = json.dumps(sorted([name, list(entry)] for name, entry in table.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def seed_lineage(path: Path, manifest: dict) -> dict:
    """What a run started with ``checkpoint.init_from=path`` records: the seed's identity and where it was."""
    return {"seed": identity(path, manifest), "seed_path": str(Path(path).resolve()), "seed_step": manifest.get("step")}


def recorded_lineage(manifest: dict) -> dict | None:
    """The lineage checkpoint ``manifest`` records (None: trained from scratch, converted, or older)."""
    return manifest.get(LINEAGE)
