"""Files written whole or not at all, and file digests.

``atomic_write`` writes to a private temporary name in the same directory, fsyncs and renames:
a reader never sees a partial file, a crash leaves the old file, and two writers of the same
content cannot corrupt each other. ``file_digest`` streams a file once (datasets record it so
any flipped byte is caught on read).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path


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
