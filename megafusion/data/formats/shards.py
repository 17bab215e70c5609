"""Real data on disk: JSONL shards (and WebDataset-style tar shards) of text + image documents.

JSONL shard: one document per line::

    {"segments": [{"text": "a red circle."}, {"image": "shard_images/000000_1.png"}]}

Image paths are relative to the shard's directory (absolute paths work too); images are read
with PIL and converted to RGB uint8 (alpha is dropped, palette / grey images are expanded).
Other keys of the document object are allowed (metadata) and ignored; a segment holds exactly
one key, ``text`` or ``image``. Blank lines hold no document and are passed over.

Tar shard (uncompressed ``*.tar``): members ``<key>.json`` hold the same ``{"segments": [...]}``
object; an image segment names another member of the same tar (e.g. ``{"image": "000000.1.png"}``).
Documents come in member order.

Every problem is a ``DataError`` naming the file and line (``shard.jsonl:12``) or tar member
(``shard.tar:000012.json``). ``write_jsonl_shard`` / ``write_tar_shard`` write the formats
(images as PNG), for tests and for exporting the built-in sets.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from megafusion.core.errors import DataError
from megafusion.data.codecs.pixel import check_rgb_image
from megafusion.data.types import Document, ImageSegment, Segment, TextSegment

SHARD_SUFFIXES = (".jsonl", ".tar")
FORMAT_HINT = 'each document is {"segments": [{"text": "..."}, {"image": "path.png"}, ...]}'


# --- parsing -------------------------------------------------------------------------------------


def _parse_document(obj, where: str) -> list[tuple[str, str]]:
    """Validated ``[("text" | "image", value), ...]`` of one parsed JSON document."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}; {FORMAT_HINT}")
    if "segments" not in obj:
        raise DataError(f'{where}: no "segments" key (keys: {sorted(obj)}); {FORMAT_HINT}')
    segments = obj["segments"]
    if not isinstance(segments, list):
        raise DataError(f'{where}: "segments" must be a list, got {type(segments).__name__}; {FORMAT_HINT}')
    if not segments:
        raise DataError(
            f'{where}: "segments" is empty; a document needs at least one text or image '
            "segment (remove the line if it holds nothing)"
        )
    parsed = []
    for k, seg in enumerate(segments):
        at = f"{where}: segment {k}"
        if not isinstance(seg, dict):
            raise DataError(f'{at} must be an object {{"text": ...}} or {{"image": ...}}, got {type(seg).__name__}')
        kinds = [key for key in ("text", "image") if key in seg]
        if len(kinds) != 1:
            what = 'both "text" and "image"' if kinds else f'neither "text" nor "image" (keys: {sorted(seg)})'
            raise DataError(f"{at} has {what}; each segment holds exactly one of them (split it in two)")
        extra = sorted(set(seg) - {"text", "image"})
        if extra:
            raise DataError(f'{at} has unknown keys {extra}; a segment holds only "text" or "image"')
        kind = kinds[0]
        value = seg[kind]
        if not isinstance(value, str):
            raise DataError(f'{at}: "{kind}" must be a string, got {type(value).__name__} ({value!r:.40})')
        if kind == "image" and not value:
            raise DataError(f'{at}: "image" is an empty path; give the image file name')
        parsed.append((kind, value))
    return parsed


def _decode_image(fileobj, where: str, name: str) -> np.ndarray:
    try:
        with Image.open(fileobj) as image:
            image.load()  # decode now, so a corrupt / truncated file fails here with its name
            rgb = image.convert("RGB")
    # PIL reports bad files with several exception types (OSError, SyntaxError, ValueError,
    # struct.error, DecompressionBombError, ...); all of them mean "this image cannot be read".
    except Exception as exc:  # noqa: BLE001
        raise DataError(
            f"{where}: image {name} cannot be read ({type(exc).__name__}: {exc}); the file is "
            "corrupt, truncated or not an image: re-export it or drop the segment"
        ) from None
    return np.array(rgb, dtype=np.uint8)


def _json_lines(path: str) -> Iterator[tuple[str, object]]:
    """``(where, parsed object)`` per non-blank line of a JSONL file."""
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise DataError(f"{path}: cannot open shard ({exc.strerror or exc})") from None
    with handle:
        for lineno, raw in enumerate(handle, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{where}: not valid UTF-8 ({exc}); shards must be UTF-8 text") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                truncated = (
                    ""
                    if raw.endswith(b"\n")
                    else (
                        " The last line has no newline: the file looks truncated (an interrupted write?);"
                        " regenerate the shard or delete the partial line."
                    )
                )
                raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno}).{truncated}") from None
            yield where, obj


# --- JSONL ---------------------------------------------------------------------------------------


def _jsonl_image_path(shard: str, ref: str) -> str:
    return os.path.join(os.path.dirname(shard), ref)


def read_jsonl_shard(path: str) -> Iterator[Document]:
    path = str(path)
    for where, obj in _json_lines(path):
        segments: list[Segment] = []
        for kind, value in _parse_document(obj, where):
            if kind == "text":
                segments.append(TextSegment(value))
                continue
            image_path = _jsonl_image_path(path, value)
            if not os.path.isfile(image_path):
                raise DataError(
                    f"{where}: image file {image_path} not found (paths are relative to the "
                    "shard's directory); fix the path or add the file"
                )
            segments.append(ImageSegment(_decode_image(image_path, where, image_path), source=image_path))
        yield Document(segments, source=where)


# --- tar -----------------------------------------------------------------------------------------


def _tar_members(path: str) -> tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]:
    try:
        tar = tarfile.open(path, "r:")  # uncompressed: the end-marker check below reads raw bytes
        members = {m.name: m for m in tar.getmembers()}
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(
            f"{path}: cannot read tar shard ({type(exc).__name__}: {exc}); the file is corrupt or "
            "truncated: regenerate it"
        ) from None
    # A tar cut exactly at a member boundary reads without error, just with members missing;
    # only the end-of-archive marker (two zero 512-byte blocks after the last member) tells.
    with open(path, "rb") as handle:
        handle.seek(tar.offset)
        marker = handle.read(1024)
    if marker != bytes(1024):
        tar.close()
        raise DataError(
            f"{path}: tar shard has no end-of-archive marker after its last member "
            f"({len(members)} members read): the file looks truncated; regenerate it"
        )
    return tar, members


def _tar_documents(path: str, load_images: bool) -> Iterator[tuple[str, list[tuple[str, str]], list]]:
    """``(where, parsed segments, [pixels or None per segment])`` per ``.json`` member."""
    tar, members = _tar_members(path)
    with tar:
        for name, member in members.items():
            if not name.endswith(".json"):
                continue
            where = f"{path}:{name}"
            try:
                data = tar.extractfile(member).read()
                obj = json.loads(data.decode("utf-8"))
            except (tarfile.TarError, OSError, EOFError, AttributeError) as exc:
                raise DataError(f"{where}: cannot read member ({exc}); the tar is corrupt: regenerate it") from None
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise DataError(f"{where}: invalid JSON ({exc})") from None
            parsed = _parse_document(obj, where)
            pixels = []
            for kind, value in parsed:
                if kind == "text":
                    pixels.append(None)
                    continue
                if value not in members or not members[value].isfile():
                    raise DataError(
                        f"{where}: image member {value!r} not in {path}; image segments name "
                        "another member of the same tar"
                    )
                if not load_images:
                    pixels.append(None)
                    continue
                try:
                    raw = tar.extractfile(members[value]).read()
                except (tarfile.TarError, OSError, EOFError) as exc:
                    raise DataError(
                        f"{where}: cannot read image member {value!r} ({exc}); regenerate the tar"
                    ) from None
                pixels.append(_decode_image(io.BytesIO(raw), where, f"{path}:{value}"))
            yield where, parsed, pixels


def read_tar_shard(path: str) -> Iterator[Document]:
    path = str(path)
    for where, parsed, pixels in _tar_documents(path, load_images=True):
        segments: list[Segment] = [
            TextSegment(value) if kind == "text" else ImageSegment(image, source=f"{path}:{value}")
            for (kind, value), image in zip(parsed, pixels)
        ]
        yield Document(segments, source=where)


# --- many shards ---------------------------------------------------------------------------------


def shard_files(paths: list[str]) -> list[str]:
    """The shard files named by ``paths``: files as given, directories as their sorted *.jsonl / *.tar."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = []
    for p in map(str, paths):
        if os.path.isdir(p):
            found = sorted(str(f) for f in Path(p).iterdir() if f.is_file() and f.suffix in SHARD_SUFFIXES)
            if not found:
                raise DataError(f"{p}: directory holds no shards (*.jsonl or *.tar)")
            files += found
        elif os.path.isfile(p):
            if Path(p).suffix not in SHARD_SUFFIXES:
                raise DataError(f"{p}: not a shard; shards are *.jsonl (or WebDataset-style *.tar) files")
            files.append(p)
        else:
            raise DataError(f"{p}: no such shard file or directory")
    return files


def read_shards(paths: list[str]) -> Iterator[Document]:
    for path in shard_files(paths):
        yield from (read_tar_shard(path) if path.endswith(".tar") else read_jsonl_shard(path))


def shard_texts(paths: list[str]) -> Iterator[str]:
    """The text segments of the shards, in order (for tokenizer training). Documents are fully
    validated and image files / members must exist, but images are not decoded."""
    for path in shard_files(paths):
        if path.endswith(".tar"):
            for _, parsed, _ in _tar_documents(path, load_images=False):
                yield from (value for kind, value in parsed if kind == "text")
            continue
        for where, obj in _json_lines(path):
            for kind, value in _parse_document(obj, where):
                if kind == "text":
                    yield value
                elif not os.path.isfile(_jsonl_image_path(path, value)):
                    raise DataError(
                        f"{where}: image file {_jsonl_image_path(path, value)} not found (paths are "
                        "relative to the shard's directory); fix the path or add the file"
                    )


# --- writing -------------------------------------------------------------------------------------


def _png_bytes(pixels: np.ndarray, where: str) -> bytes:
    check_rgb_image(pixels, where)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return buffer.getvalue()


def _segment_objects(doc: Document, where: str, image_ref) -> list[dict]:
    """JSON segments of ``doc``; ``image_ref(k, png_bytes)`` stores image k and returns its reference."""
    if not doc.segments:
        raise DataError(f"{where}: document has no segments; nothing to write")
    out = []
    for k, seg in enumerate(doc.segments):
        if isinstance(seg, TextSegment):
            if not isinstance(seg.text, str):
                raise DataError(f"{where} segment {k}: text must be a string, got {type(seg.text).__name__}")
            out.append({"text": seg.text})
        elif isinstance(seg, ImageSegment):
            out.append({"image": image_ref(k, _png_bytes(seg.pixels, f"{where} segment {k}"))})
        else:
            raise DataError(f"{where} segment {k}: unknown segment type {type(seg).__name__}")
    return out


def _temp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex}")


def write_jsonl_shard(documents: list[Document], path: str) -> str:
    """Write ``documents`` to ``path`` with images as ``<stem>_images/<doc>_<segment>.png``."""
    path = Path(path)
    image_dir = path.parent / f"{path.stem}_images"
    image_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, doc in enumerate(documents):

        def store(k: int, png: bytes, i=i) -> str:
            name = f"{i:06d}_{k}.png"
            (image_dir / name).write_bytes(png)
            return f"{image_dir.name}/{name}"

        segments = _segment_objects(doc, doc.source or f"document {i}", store)
        lines.append(json.dumps({"segments": segments}, ensure_ascii=False))
    # The shard appears only when complete (images are written first).
    tmp = _temp_name(path)
    try:
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return str(path)


def write_tar_shard(documents: list[Document], path: str) -> str:
    """Write ``documents`` as a tar of ``<doc>.json`` plus ``<doc>.<segment>.png`` members."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)

    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    try:
        with tarfile.open(tmp, "w") as tar:
            for i, doc in enumerate(documents):

                def store(k: int, png: bytes, i=i, tar=tar) -> str:
                    name = f"{i:06d}.{k}.png"
                    add(tar, name, png)
                    return name

                segments = _segment_objects(doc, doc.source or f"document {i}", store)
                add(tar, f"{i:06d}.json", json.dumps({"segments": segments}, ensure_ascii=False).encode("utf-8"))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return str(path)
