"""Files written whole or not at all, file digests, and output locations checked up front.

``atomic_write`` writes to a private temporary name in the same directory, fsyncs and renames:
a reader never sees a partial file, a crash leaves the old file, and two writers of the same
content cannot corrupt each other. ``file_digest`` streams a file once (datasets record it so
any flipped byte is caught on read). ``ensure_writable_dir`` / ``ensure_writable_file_parent``
let a command refuse an output it could not write before it loads anything, and ``ensure_exists``
an input that is not there, with one line that names the flag, the path, the cause and the fix.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

from megafusion.core.errors import UsageError


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def file_digest(path: str | os.PathLike, algorithm: str = "blake2b", digest_size: int = 16) -> str:
    """Hex digest of a file's bytes (blake2b-128 by default; ``sha256`` for recorded identities)."""
    h = hashlib.blake2b(digest_size=digest_size) if algorithm == "blake2b" else hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def ensure_writable_dir(path: str | os.PathLike, what: str, *, create: bool = False) -> Path:
    """Check that directory ``path`` (named ``what`` in messages, e.g. ``"--output"``) exists or can be
    created, and that files can be written in it; raises :class:`UsageError` otherwise.

    By default nothing is left behind: a missing directory is checked through its nearest existing
    ancestor (a probe file is written and removed there), so a command refused later for another
    reason leaves no empty output directory, and processes of one job checking the same path
    cannot remove a directory under each other. ``create=True`` also makes it (``mkdir -p``).
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise _unwritable(what, path, f"'{target}' is a file, not a directory")
    _probe(target, what, path)
    if create:
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise _unwritable(what, path, err.strerror or str(err)) from None
    return target


def ensure_writable_file_parent(path: str | os.PathLike, what: str) -> Path:
    """Check that file ``path`` (or a prefix of files, e.g. ``PREFIX.bin``) can be written: it is not a
    directory, and its directory exists or can be created and is writable. Creates nothing."""
    target = Path(path)
    if target.is_dir():
        raise _unwritable(what, path, f"'{target}' is a directory")
    _probe(target.parent, what, path)
    return target


def ensure_exists(
    path: str | os.PathLike, what: str, expected: str, *, kind: str | None = None, error: type = UsageError
) -> Path:
    """Check that input ``path`` (named ``what`` in messages, e.g. ``"--ckpt"``) exists and, with
    ``kind="dir"`` / ``"file"``, is one, before anything heavy is imported or loaded; raises ``error``
    naming the flag, the path, close names beside it and ``expected`` otherwise."""
    target = Path(path)
    if not target.exists():
        raise error(f"{what} {path}: no such file or directory{_close_names(target)}: give {expected}")
    if kind == "dir" and not target.is_dir():
        raise error(f"{what} {path}: a file, not a directory: give {expected}")
    if kind == "file" and target.is_dir():
        raise error(f"{what} {path}: a directory, not a file: give {expected}")
    return target


def _close_names(target: Path) -> str:
    """What is missing and what is close: `` (runs/x does not exist; did you mean runs/y?)``, for the
    first component of ``target`` that does not exist (``target`` itself: only the suggestion)."""
    import difflib

    missing = target
    while not missing.parent.exists() and missing.parent != missing:
        missing = missing.parent
    gone = f"{missing} does not exist" if missing != target else ""
    try:
        names = [entry.name for entry in missing.parent.iterdir()] if missing.parent.is_dir() else []
    except OSError:
        names = []
    close = difflib.get_close_matches(missing.name, names, n=3, cutoff=0.6)
    mean = f"did you mean {' or '.join(str(missing.parent / name) for name in close)}?" if close else ""
    said = "; ".join(x for x in (gone, mean) if x)
    return f" ({said})" if said else ""


def _probe(directory: Path, what: str, shown) -> None:
    """Write and remove a file in ``directory``, or in its nearest existing ancestor when it is missing
    (whatever can be written there can also be created there)."""
    existing = directory
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise _unwritable(what, shown, f"'{existing}' is a file, not a directory")
    probe = existing / f".megafusion-write-probe-{os.getpid()}-{uuid.uuid4().hex}"
    try:
        with open(probe, "wb"):
            pass
    except OSError as err:
        raise _unwritable(what, shown, f"cannot write in '{existing}': {err.strerror or err}") from None
    try:
        probe.unlink()
    except OSError:
        pass  # a probe that cannot be removed does not make the location unwritable


def _unwritable(what: str, path, cause: str) -> UsageError:
    return UsageError(f"{what} {path}: cannot write there ({cause}): choose another {what}")
