"""A run's checkpoint directory: its step directories, ``latest``, and which step a run resumes from.

A step directory is *complete* when its ``megafusion.json`` exists (rank 0 writes it last), and
``latest`` names the newest complete one (rewritten atomically after every save). When ``latest``
is missing, empty or names an incomplete step although complete steps exist (deleted by hand, a
crash between the manifest and ``latest``, a torn write on a shared filesystem),
:func:`recover_latest` rebuilds it from the newest complete step whose files verify, and says so:
a run never refuses its own checkpoints, and nothing is deleted to get past it.

Nothing here imports torch (the training command checks the run directory before it does).
"""

from __future__ import annotations

import os
from pathlib import Path

from megafusion.checkpoint import integrity
from megafusion.checkpoint.manifest import LATEST, MANIFEST, read_manifest
from megafusion.core.errors import CheckpointError
from megafusion.core.io import atomic_write


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:07d}"


def resolve_dir(cfg) -> Path:
    return Path(cfg.checkpoint.dir or os.path.join(cfg.logging.out_dir, "checkpoints"))


def complete_steps(root: str | Path) -> list[Path]:
    """The complete step directories under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and (p / MANIFEST).is_file())


def _named(root: Path) -> str | None:
    pointer = root / LATEST
    try:
        return pointer.read_text().strip()
    except FileNotFoundError:
        return None


def latest_checkpoint(root: str | Path) -> Path | None:
    """The directory ``latest`` names, or None when there is no ``latest``."""
    root = Path(root)
    named = _named(root)
    if named is None:
        return None
    path = root / named
    if not named or not (path / MANIFEST).exists():
        what = f"names {path}, which is not a complete megafusion checkpoint (no {MANIFEST})" if named else "is empty"
        raise CheckpointError(
            f"{root / LATEST} {what} and no complete checkpoint is beside it: pass --overwrite "
            f"(checkpoint.overwrite=true) to start afresh in {root}, or restore a checkpoint there"
        )
    return path


def recover_latest(root: str | Path, verify: bool, say) -> Path | None:
    """Rebuild ``latest`` when it is missing, empty or names an incomplete step while complete steps
    exist: from the newest complete step that verifies (``verify``: every file's checksum, else the
    manifest's seal). Returns the step it now names (None: nothing to recover). Rank 0 only."""
    root = Path(root)
    named = _named(root)
    if named and (root / named / MANIFEST).is_file():
        return None
    complete = complete_steps(root)
    if not complete:
        return None
    state = "was missing" if named is None else "was empty" if not named else f"named {named}, which is incomplete"
    rejected = []
    for path in reversed(complete):
        try:
            manifest = read_manifest(path)
            if verify:
                integrity.verify_files(path, manifest)
        except CheckpointError as err:
            rejected.append(f"{path.name} ({str(err).split(' is damaged: ', 1)[-1].split('. ')[0]})")
            continue
        atomic_write(root / LATEST, path.name + "\n")
        also = f"; newer ones failed verification: {', '.join(rejected)}" if rejected else ""
        how = "verified" if verify else "its manifest checked (checkpoint.verify=false)"
        say(
            f"[megafusion] {root / LATEST} {state}: rebuilt it to name {path.name}, the newest complete "
            f"checkpoint ({how}{also})"
        )
        return path
    raise CheckpointError(
        f"{root / LATEST} {state}, and none of the complete checkpoints verifies: {'; '.join(rejected)}. "
        f"Restore one of them, or pass --overwrite to start afresh in {root}"
    )


def checkpoint_to_resume(root: str | Path, load_step: int | None = None) -> Path | None:
    """The step directory a run resumes from: ``checkpoint.load_step``'s, else the one ``latest`` names."""
    if load_step is None:
        return latest_checkpoint(root)
    path = step_dir(root, load_step)
    if not (path / MANIFEST).is_file():
        complete = [p.name for p in complete_steps(root)]
        raise CheckpointError(
            f"checkpoint.load_step={load_step}: {path} is not a complete checkpoint; complete ones in {root}: "
            f"{', '.join(complete) or 'none'}"
        )
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory, or a run's checkpoint directory (then the step ``latest`` names)."""
    path = Path(path)
    if (path / MANIFEST).exists():
        return path
    found = latest_checkpoint(path) if (path / LATEST).exists() else None
    if found is None:
        steps = complete_steps(path)
        hint = f" ({path} holds {steps[-1].name} but no '{LATEST}': give that directory)" if steps else ""
        raise CheckpointError(
            f"{path} is neither a megafusion checkpoint (no {MANIFEST}) nor a checkpoint "
            f"directory with a '{LATEST}' file: give a step directory or a run's checkpoint.dir{hint}"
        )
    return found


def latest_size(root: Path) -> int | None:
    """Bytes of the checkpoint ``latest`` names (its recorded files), None when unknown."""
    try:
        path = latest_checkpoint(root)
        files = read_manifest(path).get(integrity.FILES_KEY) if path else None
    except CheckpointError:
        return None
    return sum(size for size, _ in files.values()) if files else None
