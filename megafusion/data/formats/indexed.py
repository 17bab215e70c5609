"""Pretokenized datasets on disk: megatron-core's indexed format plus a JSON meta file.

A dataset at ``PREFIX`` is three files:

- ``PREFIX.bin`` / ``PREFIX.idx``: written with megatron-core's ``IndexedDatasetBuilder``
  (``multimodal=True``) and read with its ``IndexedDataset``. megatron stores one *mode per
  item*, not per token, so each document is stored as its maximal runs of same-modality tokens:
  one item per run, ``mode = Modality`` value, and ``end_document()`` after the last run of each
  document. Reading puts the per-token modalities back exactly.
- ``PREFIX.meta.json``: the caller's meta (tokenizer config, codec config, ``vocab_size``, ...)
  plus what this module adds: format name and version, token dtype, document and per-modality
  token counts, the byte sizes and blake2b checksums of the ``.bin`` / ``.idx`` (so a truncated,
  corrupt or swapped file is caught before megatron reads it) and the document sources
  (compressed into runs, see ``_encode_sources``) so that later errors can name the shard line.

Everything is written under temporary names first (a failed write leaves an existing dataset
untouched); then the old meta is removed, the new ``.bin`` / ``.idx`` renamed into place and the
new meta written last, atomically. A dataset without a meta file is a half-written one.

Per-document ``TokenizedDocument.meta`` dicts are not stored (only tokens, modalities, source);
a caller with more per-document data (Transfusion latents) writes it as a *sidecar* file that
joins the same all-or-nothing write (see ``write_indexed``).
"""

from __future__ import annotations

import json
import os
import re
import struct
import uuid
from collections.abc import Iterable

import numpy as np

from megafusion.core.errors import DataError
from megafusion.core.io import atomic_write, file_digest
from megafusion.core.modality import MODALITY_NAMES, NUM_MODALITIES
from megafusion.data.types import TokenizedDocument

FORMAT_NAME = "megafusion.indexed"
FORMAT_VERSION = 1
# Keys write_indexed fills in itself; a caller's meta may not set them.
RESERVED_META_KEYS = (
    "format",
    "format_version",
    "token_dtype",
    "documents",
    "items",
    "tokens",
    "files",
    "document_sources",
)
_IDX_HEADER = b"MMIDIDX\x00\x00"
_IDX_HEADER_BYTES = 9 + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence count, document count


def dataset_paths(prefix: str) -> dict[str, str]:
    """The three files of the dataset at ``prefix``."""
    return {"bin": prefix + ".bin", "idx": prefix + ".idx", "meta": prefix + ".meta.json"}


def token_dtype(vocab_size: int) -> type[np.number]:
    """Smallest dtype megatron offers for token ids below ``vocab_size`` (uint16 or int32)."""
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(int(vocab_size))


def _rerun_hint(prefix: str, options: str = "") -> str:
    """The fix for a damaged dataset at ``prefix``; ``options``: flags it was prepared with (``--latent-codec ...``)."""
    return f"re-run `megafusion data prepare ... {options + ' ' if options else ''}--output {prefix}`"


# ---------------------------------------------------------------------------------------------
# document sources: "file.jsonl:12", "file.jsonl:13", ... stored as one run [stem, first, count]


_NUMBERED = re.compile(r"^(.*?)(0|[1-9][0-9]*)$")  # no leading zeros: int() must round-trip


def _encode_sources(sources: Iterable[str]) -> list[list]:
    """Consecutive ``stemN, stem(N+1), ...`` collapse into ``[stem, N, count]``; anything else
    is ``[source, None, 1]``. Exact: ``_decode_sources`` gives back the same strings."""
    runs: list[list] = []
    for src in sources:
        m = _NUMBERED.match(src)
        if m:
            stem, num = m.group(1), int(m.group(2))
            last = runs[-1] if runs else None
            if last is not None and last[1] is not None and last[0] == stem and last[1] + last[2] == num:
                last[2] += 1
            else:
                runs.append([stem, num, 1])
        else:
            runs.append([src, None, 1])
    return runs


def _decode_sources(runs: list, where: str) -> list[str]:
    out: list[str] = []
    try:
        for stem, first, count in runs:
            if first is None:
                out.extend([str(stem)] * int(count))
            else:
                out.extend(f"{stem}{int(first) + k}" for k in range(int(count)))
    except (TypeError, ValueError) as err:
        raise DataError(f"{where}: 'document_sources' is malformed ({err}); {where} is corrupt") from None
    return out


# ---------------------------------------------------------------------------------------------
# writing


def _check_document(doc: TokenizedDocument, index: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    name = doc.source or f"document {index}"
    tokens, mods = np.asarray(doc.tokens), np.asarray(doc.modalities)
    if tokens.ndim != 1 or mods.shape != tokens.shape:
        raise DataError(
            f"{name}: tokens {tokens.shape} and modalities {mods.shape} must be 1-D and of "
            "equal length (a tokenizer bug)"
        )
    if tokens.size == 0:
        raise DataError(
            f"{name}: the document has no tokens; drop it from the input (the tokenizer should "
            "at least emit begin/end-of-document tokens)"
        )
    if not np.issubdtype(tokens.dtype, np.integer):
        raise DataError(f"{name}: tokens have dtype {tokens.dtype}; token ids must be integers")
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= vocab_size:
        raise DataError(
            f"{name}: token ids span [{lo}, {hi}] but vocab_size is {vocab_size}: the document was "
            "tokenized with a different tokenizer than the meta describes"
        )
    mlo, mhi = int(mods.min()), int(mods.max())
    if mlo < 0 or mhi >= NUM_MODALITIES:
        raise DataError(
            f"{name}: modality ids span [{mlo}, {mhi}]; valid ids are 0..{NUM_MODALITIES - 1} "
            f"({', '.join(MODALITY_NAMES)})"
        )
    return tokens, mods.astype(np.int64)


def write_indexed(prefix: str, docs: Iterable[TokenizedDocument], meta: dict, sidecar=None) -> dict:
    """Write ``docs`` (streamed, in order) to ``prefix.{bin,idx,meta.json}``.

    ``meta`` must hold ``vocab_size`` (it picks the token dtype) and be JSON-serialisable; it
    may not use the keys in ``RESERVED_META_KEYS``. Returns stats:
    ``{"documents": n, "items": runs, "tokens": {"text": .., "image": ..}, "files": [paths]}``.
    Raises ``DataError`` for an empty input, an empty document, or ids out of range (naming the
    document's source); then the partial files are removed and any dataset already at ``prefix``
    is left as it was.

    ``sidecar`` (optional) is a writer of more files of the same dataset, fed by the caller while
    ``docs`` is consumed (e.g. ``megafusion.data.formats.indexed_latents.LatentWriter``). It joins the same
    all-or-nothing write: ``finish() -> dict`` is called once every document is written and
    returns more meta keys (its sizes and checksums); ``commit()`` moves its files into place
    after the old meta is removed and before the new one is written; ``abort()`` removes its
    temporary files when anything fails; ``paths`` lists its final files.
    """
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    paths = dataset_paths(prefix)
    clash = sorted(set(meta) & set(RESERVED_META_KEYS))
    if clash:
        raise ValueError(f"write_indexed: meta keys {clash} are filled in by write_indexed itself; remove them")
    if (
        not isinstance(meta.get("vocab_size"), int)
        or isinstance(meta.get("vocab_size"), bool)
        or meta["vocab_size"] <= 0
    ):
        raise ValueError(f"write_indexed: meta['vocab_size'] must be a positive int, got {meta.get('vocab_size')!r}")
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as err:
        raise ValueError(f"write_indexed: meta is not JSON-serialisable: {err}") from None
    vocab_size = meta["vocab_size"]
    dtype = token_dtype(vocab_size)

    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    # Write under private temporary names: a failure (bad document, interrupt) leaves an existing
    # dataset at ``prefix`` untouched and removes the partial files.
    tag = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_bin, tmp_idx = paths["bin"] + tag, paths["idx"] + tag

    counts = np.zeros(NUM_MODALITIES, dtype=np.int64)
    sources: list[str] = []
    items = 0
    builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype, multimodal=True)
    try:
        for index, doc in enumerate(docs):
            tokens, mods = _check_document(doc, index, vocab_size)
            starts = np.concatenate([[0], np.flatnonzero(np.diff(mods)) + 1])
            ends = np.concatenate([starts[1:], [tokens.size]])
            for lo, hi in zip(starts.tolist(), ends.tolist()):
                builder.add_item(
                    torch.from_numpy(np.ascontiguousarray(tokens[lo:hi], dtype=np.int64)), mode=int(mods[lo])
                )
            builder.end_document()
            items += len(starts)
            counts += np.bincount(mods, minlength=NUM_MODALITIES)
            sources.append(doc.source)
        if not sources:
            # megatron cannot even mmap an empty .bin, so an empty dataset is unreadable.
            raise DataError(f"{prefix}: no documents to write; check the --input shards")
        builder.finalize(tmp_idx)
        extra = sidecar.finish() if sidecar is not None else {}
        clash = sorted(set(extra) & (set(RESERVED_META_KEYS) | set(meta)))
        if clash:
            raise ValueError(f"write_indexed: the sidecar's meta keys {clash} are already taken; rename them")
    except BaseException:
        builder.data_file.close()
        for p in (tmp_bin, tmp_idx):
            if os.path.exists(p):
                os.remove(p)
        if sidecar is not None:
            sidecar.abort()
        raise

    tokens_by_name = {name: int(c) for name, c in zip(MODALITY_NAMES, counts)}
    full = dict(meta)
    full.update(extra)
    full.update(
        {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "token_dtype": np.dtype(dtype).name,
            "documents": len(sources),
            "items": items,
            "tokens": tokens_by_name,
            "files": {
                "bin_bytes": os.path.getsize(tmp_bin),
                "idx_bytes": os.path.getsize(tmp_idx),
                "bin_blake2b": file_digest(tmp_bin),
                "idx_blake2b": file_digest(tmp_idx),
            },
            "document_sources": _encode_sources(sources),
        }
    )
    # Old meta first (a new .bin beside an old meta would look complete), then the data, and the
    # new meta last: whatever instant this stops at, a dataset with a meta is a whole one.
    if os.path.exists(paths["meta"]):
        os.remove(paths["meta"])
    os.replace(tmp_bin, paths["bin"])
    os.replace(tmp_idx, paths["idx"])
    if sidecar is not None:
        sidecar.commit()
    atomic_write(paths["meta"], json.dumps(full, indent=1))
    return {
        "documents": len(sources),
        "items": items,
        "tokens": tokens_by_name,
        "files": [paths["bin"], paths["idx"], *(sidecar.paths if sidecar is not None else []), paths["meta"]],
    }


# ---------------------------------------------------------------------------------------------
# reading


def read_meta(prefix: str) -> dict:
    """The parsed, checked ``prefix.meta.json`` (DataError if missing, unreadable or foreign)."""
    path = dataset_paths(prefix)["meta"]
    if not os.path.exists(path):
        raise DataError(
            f"{path} is missing: the dataset at {prefix} was never completely written; {_rerun_hint(prefix)}"
        )
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: cannot read the dataset meta ({err}); {_rerun_hint(prefix)}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise DataError(
            f"{path}: not a megafusion dataset meta (format is "
            f"{meta.get('format') if isinstance(meta, dict) else type(meta).__name__!r}); "
            f"{_rerun_hint(prefix)}"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{path}: format_version {meta.get('format_version')!r} is not the supported "
            f"{FORMAT_VERSION}; {_rerun_hint(prefix)}"
        )
    need = ("vocab_size", "token_dtype", "documents", "tokens", "files", "document_sources")
    missing = [k for k in need if k not in meta]
    if missing:
        raise DataError(f"{path}: missing keys {missing}; the file is corrupt, {_rerun_hint(prefix)}")
    return meta


def _check_files(prefix: str, meta: dict, checksums: bool = True) -> None:
    """Existence and byte sizes against the meta (and, with ``checksums``, their blake2b), and the
    .idx header against its own size: catches truncated / swapped files before megatron mmaps
    them (megatron's own failures are bare asserts and buffer errors that do not say which file
    is bad)."""
    paths = dataset_paths(prefix)
    for kind in ("bin", "idx"):
        path = paths[kind]
        if not os.path.exists(path):
            raise DataError(
                f"{path} is missing (the dataset at {prefix} needs .bin, .idx and .meta.json); {_rerun_hint(prefix)}"
            )
        size, want = os.path.getsize(path), meta["files"].get(f"{kind}_bytes")
        if size != want:
            raise DataError(
                f"{path} is {size} bytes but {paths['meta']} says {want}: the file is truncated or "
                f"was replaced after the meta was written; {_rerun_hint(prefix)}"
            )
    for kind in ("bin", "idx") if checksums else ():
        want = meta["files"].get(f"{kind}_blake2b")
        if want is not None and file_digest(paths[kind]) != want:
            raise DataError(
                f"{paths[kind]}: contents do not match the checksum in {paths['meta']}: the file is "
                f"corrupt or was replaced after the meta was written; {_rerun_hint(prefix)}"
            )
    from megatron.core.datasets.indexed_dataset import DType

    path = paths["idx"]
    with open(path, "rb") as f:
        head = f.read(_IDX_HEADER_BYTES)
    if len(head) < _IDX_HEADER_BYTES or head[:9] != _IDX_HEADER:
        raise DataError(f"{path}: not a megatron index file (bad header {head[:9]!r}); {_rerun_hint(prefix)}")
    version, code, items, doc_bounds = struct.unpack("<QBQQ", head[9:])
    try:
        dtype_name = np.dtype(DType.dtype_from_code(code)).name
    except ValueError:
        dtype_name = f"unknown dtype code {code}"
    # Layout after the header: int32 lengths, int64 pointers, int64 document bounds, int8 modes.
    want_size = _IDX_HEADER_BYTES + items * (4 + 8 + 1) + doc_bounds * 8
    problems = []
    if version != 1:
        problems.append(f"version {version} (expected 1)")
    if dtype_name != meta["token_dtype"]:
        problems.append(f"token dtype {dtype_name} (meta says {meta['token_dtype']})")
    if doc_bounds != meta["documents"] + 1:
        problems.append(f"{doc_bounds - 1} documents (meta says {meta['documents']})")
    if items != meta.get("items", items):
        problems.append(f"{items} items (meta says {meta['items']})")
    if want_size != os.path.getsize(path):
        problems.append(f"its header describes a {want_size}-byte file")
    if problems:
        raise DataError(f"{path}: corrupt index: {'; '.join(problems)}; {_rerun_hint(prefix)}")


def check_index_structure(prefix, meta, dtype, lengths, pointers, doc_index, modes) -> None:
    """The index arrays describe the .bin of the meta: document boundaries from 0 to the item
    count, items of at least one token, contiguous byte offsets, modes that are modalities."""
    problems = []
    if doc_index[0] != 0 or doc_index[-1] != lengths.size or np.any(np.diff(doc_index) < 0):
        problems.append("document boundaries are not a non-decreasing list from 0 to the item count")
    if np.any(lengths <= 0):
        problems.append("an item has no tokens")
    ends = np.cumsum(lengths)
    if not np.array_equal(pointers, np.concatenate([[0], ends[:-1]]) * dtype.itemsize):
        problems.append("item byte offsets are not contiguous")
    if ends[-1] * dtype.itemsize != meta["files"]["bin_bytes"]:
        problems.append(f"items hold {int(ends[-1])} tokens, which is not the size of the .bin")
    if modes.min() < 0 or modes.max() >= NUM_MODALITIES:
        problems.append(f"item modes outside 0..{NUM_MODALITIES - 1}")
    if problems:
        raise DataError(f"{dataset_paths(prefix)['idx']}: corrupt index: {'; '.join(problems)}; {_rerun_hint(prefix)}")


def _load_arrays(prefix: str, meta: dict):
    """(flat tokens, per-item lengths, per-item modes, document item boundaries), all copied out
    of megatron's mmaps so nothing keeps the files open."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    paths = dataset_paths(prefix)
    try:
        ds = IndexedDataset(prefix, multimodal=True)
        index = ds.index
        dtype = np.dtype(index.dtype)
        lengths = np.array(index.sequence_lengths, dtype=np.int64)
        pointers = np.array(index.sequence_pointers, dtype=np.int64)
        doc_index = np.array(index.document_indices, dtype=np.int64)
        # IndexedDataset.sequence_modes asserts on an array's truth value (an error for > 1
        # item), so read the modes off the index reader directly.
        modes = np.array(index.sequence_modes, dtype=np.int64)
    except Exception as err:  # megatron raises AssertionError / ValueError / OSError on bad files
        raise DataError(
            f"{paths['idx']}: megatron cannot read the index ({type(err).__name__}: {err}); the "
            f"file is corrupt, {_rerun_hint(prefix)}"
        ) from err

    try:
        check_index_structure(prefix, meta, dtype, lengths, pointers, doc_index, modes)
    except DataError:
        del ds, index
        raise

    try:
        flat = np.array(ds.bin_reader.read(dtype=dtype, count=int(lengths.sum()), offset=0), dtype=np.int64)
    except Exception as err:
        raise DataError(
            f"{paths['bin']}: megatron cannot read the tokens ({type(err).__name__}: {err}); the "
            f"file is corrupt, {_rerun_hint(prefix)}"
        ) from err
    finally:
        del ds, index
    if flat.min() < 0 or flat.max() >= meta["vocab_size"]:
        raise DataError(
            f"{paths['bin']}: token ids outside [0, {meta['vocab_size']}) (vocab_size in "
            f"{paths['meta']}); the file is corrupt, {_rerun_hint(prefix)}"
        )
    return flat, lengths, modes, doc_index


def read_indexed(prefix: str) -> tuple[list[TokenizedDocument], dict]:
    """All documents of the dataset at ``prefix`` (in written order) and its meta, in memory: for
    tools and tests (the in-memory reference); training streams instead
    (:mod:`megafusion.data.formats.indexed_reader`).

    Tokens come back as int64, modalities per token as uint8, ``source`` as written. Every
    inconsistency (missing file, truncated file, unreadable meta, counts that do not match)
    is a ``DataError`` naming the file.
    """
    meta = read_meta(prefix)
    _check_files(prefix, meta)
    flat, lengths, modes, doc_index = _load_arrays(prefix, meta)
    paths = dataset_paths(prefix)
    sources = _decode_sources(meta["document_sources"], paths["meta"])
    if len(sources) != meta["documents"]:
        raise DataError(
            f"{paths['meta']}: {len(sources)} document sources for {meta['documents']} documents; "
            f"the file is corrupt, {_rerun_hint(prefix)}"
        )

    flat_mods = np.repeat(modes.astype(np.uint8), lengths)
    counts = np.bincount(flat_mods, minlength=NUM_MODALITIES)
    want = [meta["tokens"].get(name) for name in MODALITY_NAMES]
    if counts.tolist() != want:
        raise DataError(
            f"{paths['bin']}: tokens per modality {dict(zip(MODALITY_NAMES, counts.tolist()))} do "
            f"not match {paths['meta']} ({meta['tokens']}); {_rerun_hint(prefix)}"
        )
    # Token offset of every item start, then of every document start.
    item_starts = np.concatenate([[0], np.cumsum(lengths)])
    doc_starts = item_starts[doc_index]
    docs = [
        TokenizedDocument(tokens=flat[lo:hi].copy(), modalities=flat_mods[lo:hi].copy(), source=src)
        for lo, hi, src in zip(doc_starts[:-1].tolist(), doc_starts[1:].tolist(), sources)
    ]
    return docs, meta


__all__ = ["write_indexed", "read_indexed", "read_meta", "dataset_paths", "token_dtype"]
