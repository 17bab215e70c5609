"""A built-in set written as a JSONL shard (``megafusion data export-builtin``): data to try
``megafusion tokenizer train``, ``megafusion data prepare`` and ``data.blend`` on without a download.

The images go as PNG files beside the shard (:func:`megafusion.data.formats.shards.write_jsonl_shard`).
Importing this module is cheap; the sets are generated when asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

from megafusion.core.errors import UsageError
from megafusion.core.io import ensure_writable_file_parent

SETS = ("shapes", "digits")
SHAPES_DEFAULT = 4000  # shapes: documents generated unless a number is given
DIGITS_TOTAL = 1797  # scikit-learn's handwritten digits (load_digits)


@dataclass(frozen=True)
class Exported:
    path: str  # the shard written
    documents: int  # documents in it
    available: int  # documents of the set it was taken from (digits: all 1797; shapes: as many)


def export_builtin(name: str, output: str, num_samples: int | None = None, image_size: int = 16, seed: int = 0):
    """Write the built-in set ``name`` to the JSONL shard ``output``: shapes generates ``num_samples``
    documents (default :data:`SHAPES_DEFAULT`) from ``seed``; digits writes the first ``num_samples``
    of its :data:`DIGITS_TOTAL` (default all). Returns :class:`Exported`. Bad arguments are a
    UsageError naming the command's flag (``--set``, ``--num-samples``, ``--output``)."""
    from megafusion.data.formats.shards import write_jsonl_shard

    if name not in SETS:
        raise UsageError(f"--set {name}: not a built-in set; the sets: {', '.join(SETS)}")
    n = num_samples
    if n is not None and n < 1:
        raise UsageError(f"--num-samples {n} must be >= 1")
    if n is not None and name == "digits" and n > DIGITS_TOTAL:
        raise UsageError(f"--num-samples {n}: the digits set has {DIGITS_TOTAL} documents; give at most that")
    ensure_writable_file_parent(output, "--output")  # before the set is generated
    if name == "shapes":
        from megafusion.data.builtin.shapes import shapes_documents

        docs = shapes_documents(SHAPES_DEFAULT if n is None else n, seed, image_size)
        available = len(docs)
    else:
        from megafusion.data.builtin.digits import digits_documents

        docs = digits_documents(image_size)
        available = len(docs)
        docs = docs[:n]
    return Exported(write_jsonl_shard(docs, output), len(docs), available)
