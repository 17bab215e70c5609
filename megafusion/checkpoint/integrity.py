"""Checksums of every file of a checkpoint: recorded at save, verified before a load.

At save, once megatron-core has written a step directory, each rank hashes the files it wrote
(``__<rank>_<i>.distcp``; rank 0 also every other file: ``.metadata``, ``common.pt``,
``metadata.json``), so hashing is spread over the ranks and reads each byte once; rank 0
gathers the table (name -> [size, blake2b]) and checks it covers every file in the directory
before the manifest records it and ``latest`` moves. Before a load, the ranks split the files
between them the same way and compare size, then digest; any problem stops every rank with the
damaged files named and the complete checkpoints to fall back to. ``megafusion.json`` protects
itself with a digest of its own content (:func:`seal` / :func:`check_seal`).

Checkpoints saved before checksums existed have no table: they load unverified, and the caller
says so.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from megafusion.core.errors import CheckpointError
from megafusion.core.io import file_digest

FILES_KEY = "files"
SEAL_KEY = "digest"
_RANK_FILE = re.compile(r"__(\d+)_\d+\.distcp$")


def _dist():
    """torch.distributed, imported on use: a run's directory is checked before torch is imported."""
    import torch.distributed as dist

    return dist


def _world() -> tuple[int, int]:
    import sys

    if "torch" not in sys.modules:  # no process group without torch
        return 0, 1
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _writer_rank(name: str) -> int:
    """The rank that wrote (and so hashes) file ``name``: its rank prefix, else rank 0."""
    match = _RANK_FILE.match(name)
    return int(match.group(1)) if match else 0


def _describe(path: Path) -> list:
    return [path.stat().st_size, file_digest(path)]


def record_files(path: Path, skip: tuple[str, ...] = ()) -> dict | None:
    """Called by every rank after a save: rank 0 gets ``{name: [size, digest]}`` for every file of
    ``path`` (others get None). Raises ``CheckpointError`` if a file has no hash (nothing unchecked)."""
    rank, world = _world()
    names = sorted(p.name for p in path.iterdir() if p.is_file() and p.name not in skip)
    mine = {n: _describe(path / n) for n in names if _writer_rank(n) % world == rank}
    if world == 1:
        parts = [mine]
    else:
        parts = [None] * world if rank == 0 else None
        _dist().gather_object(mine, parts, dst=0)
    if rank != 0:
        return None
    table = {}
    for part in parts:
        table.update(part)
    missing = sorted(set(names) - set(table))
    if missing:
        raise CheckpointError(f"{path}: no rank hashed {missing}: the checkpoint is incomplete")
    return dict(sorted(table.items()))


def verify_files(path: Path, manifest: dict, fallback: str = "") -> bool:
    """Check every file the manifest lists (every rank checks its share; all ranks agree).
    Returns False for a checkpoint that records no checksums (nothing to verify).

    ``fallback`` is appended to the error: what the user can load instead."""
    table = manifest.get(FILES_KEY)
    if table is None:
        return False
    rank, world = _world()
    problems = []
    for i, (name, (size, digest)) in enumerate(sorted(table.items())):
        if i % world != rank:
            continue
        f = path / name
        if not f.is_file():
            problems.append(f"{name} is missing")
        elif f.stat().st_size != size:
            problems.append(f"{name} has {f.stat().st_size} bytes, {size} were saved (truncated or overwritten)")
        elif file_digest(f) != digest:
            problems.append(f"{name} does not match its checksum (flipped or overwritten bytes)")
    if world > 1:
        everyone = [None] * world
        _dist().all_gather_object(everyone, problems)
        problems = sorted(p for part in everyone for p in part)
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise CheckpointError(f"checkpoint {path} is damaged: {shown}. {fallback}".rstrip())
    return True


def seal(manifest: dict) -> dict:
    """The manifest with a digest of its own content (any changed byte of the file is caught)."""
    body = {k: v for k, v in manifest.items() if k != SEAL_KEY}
    return {**body, SEAL_KEY: _content_digest(body)}


def check_seal(path: Path, manifest: dict, fallback: str = "") -> None:
    if SEAL_KEY not in manifest:
        return  # written before manifests were sealed
    body = {k: v for k, v in manifest.items() if k != SEAL_KEY}
    if _content_digest(body) != manifest[SEAL_KEY]:
        raise CheckpointError(
            f"checkpoint {path} is damaged: megafusion.json does not match its digest (edited or flipped bytes). "
            f"{fallback}".rstrip()
        )


def _content_digest(body: dict) -> str:
    return hashlib.blake2b(json.dumps(body, sort_keys=True).encode(), digest_size=16).hexdigest()


def fallback(path: Path) -> str:
    """What to load instead of damaged checkpoint ``path``: the complete ones beside it."""
    path = Path(path)
    others = sorted(
        p for p in path.parent.glob("step_*") if p != path and p.is_dir() and (p / "megafusion.json").is_file()
    )
    if not others:
        return f"No other complete checkpoint is in {path.parent}: restore {path.name} from a copy, or start afresh"
    steps = [int(p.name.split("_")[1]) for p in others]
    return (
        f"Complete checkpoints beside it: {', '.join(p.name for p in others)}; resume from one with "
        f"checkpoint.load_step={steps[-1]} (or give that directory to the tool)"
    )
