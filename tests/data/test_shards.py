"""JSONL / tar shards: round trips through the writers, directory expansion, and one DataError
(naming file and line / member) per kind of bad input."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megafusion.core.errors import DataError
from megafusion.data.formats.shards import (
    read_jsonl_shard,
    read_shards,
    read_tar_shard,
    shard_files,
    shard_texts,
    write_jsonl_shard,
    write_tar_shard,
)
from megafusion.data.types import Document, ImageSegment, TextSegment


def _docs(n: int = 4) -> list[Document]:
    rng = np.random.default_rng(0)
    docs = []
    for i in range(n):
        img = rng.integers(0, 256, size=(5 + i, 7, 3), dtype=np.uint8)
        segs = [TextSegment(f"document {i}: naïve café ✓"), ImageSegment(img)]
        if i % 2:
            segs.append(TextSegment("after the image"))
        docs.append(Document(segs, source=f"test:{i}"))
    return docs


def _assert_same(read: list[Document], written: list[Document]) -> None:
    assert len(read) == len(written)
    for a, b in zip(read, written):
        assert [type(s) for s in a.segments] == [type(s) for s in b.segments]
        for x, y in zip(a.segments, b.segments):
            if isinstance(x, TextSegment):
                assert x.text == y.text
            else:
                assert x.pixels.dtype == np.uint8 and np.array_equal(x.pixels, y.pixels)


def _png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _shard(tmp_path: Path, lines: list[str], name: str = "shard.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_jsonl_round_trip(tmp_path):
    docs = _docs()
    path = write_jsonl_shard(docs, str(tmp_path / "data" / "part-000.jsonl"))
    assert (tmp_path / "data" / "part-000_images").is_dir()
    first = json.loads(Path(path).read_text(encoding="utf-8").splitlines()[0])
    assert first == {"segments": [{"text": "document 0: naïve café ✓"}, {"image": "part-000_images/000000_1.png"}]}
    read = list(read_jsonl_shard(path))
    _assert_same(read, docs)
    assert [d.source for d in read] == [f"{path}:{i}" for i in range(1, 5)]
    assert read[0].segments[1].source == str(tmp_path / "data" / "part-000_images" / "000000_1.png")


def test_tar_round_trip(tmp_path):
    docs = _docs()
    path = write_tar_shard(docs, str(tmp_path / "part-000.tar"))
    read = list(read_tar_shard(path))
    _assert_same(read, docs)
    assert read[2].source == f"{path}:000002.json"
    assert list(shard_texts([path])) == [s.text for d in docs for s in d.segments if isinstance(s, TextSegment)]


def test_directories_sorted_and_mixed(tmp_path):
    docs = _docs(6)
    write_jsonl_shard(docs[4:], str(tmp_path / "c.jsonl"))
    write_jsonl_shard(docs[:2], str(tmp_path / "a.jsonl"))
    write_tar_shard(docs[2:4], str(tmp_path / "b.tar"))
    (tmp_path / "notes.txt").write_text("not a shard")
    assert [Path(f).name for f in shard_files([str(tmp_path)])] == ["a.jsonl", "b.tar", "c.jsonl"]
    _assert_same(list(read_shards([str(tmp_path)])), docs)
    _assert_same(list(read_shards([str(tmp_path / "c.jsonl"), str(tmp_path / "a.jsonl")])), docs[4:] + docs[:2])


def test_image_paths_and_modes(tmp_path):
    rgba = np.random.default_rng(1).integers(0, 256, size=(4, 6, 4), dtype=np.uint8)
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    _png(tmp_path / "imgs" / "rgba.png", rgba)
    _png(tmp_path / "imgs" / "grey.png", grey)
    elsewhere = tmp_path / "elsewhere" / "abs.png"
    _png(elsewhere, rgba[..., :3])
    path = _shard(
        tmp_path,
        [
            json.dumps(
                {
                    "id": 7,
                    "segments": [{"image": "imgs/rgba.png"}, {"image": "imgs/grey.png"}, {"image": str(elsewhere)}],
                }
            )
        ],
    )
    (doc,) = read_jsonl_shard(str(path))
    a, b, c = (s.pixels for s in doc.segments)
    assert a.shape == (4, 6, 3) and np.array_equal(a, rgba[..., :3])
    assert b.shape == (3, 4, 3) and all(np.array_equal(b[..., k], grey) for k in range(3))
    assert np.array_equal(c, rgba[..., :3])


def test_blank_lines_keep_line_numbers(tmp_path):
    path = _shard(tmp_path, ['{"segments": [{"text": "one"}]}', "", "   ", '{"segments": [{"text": "two"}]}'])
    docs = list(read_jsonl_shard(str(path)))
    assert [d.segments[0].text for d in docs] == ["one", "two"]
    assert [d.source for d in docs] == [f"{path}:1", f"{path}:4"]


GOOD = '{"segments": [{"text": "fine"}]}'


@pytest.mark.parametrize(
    "line,match",
    [
        ('{"segments": [{"text": "broken"}', "invalid JSON"),
        ('["text"]', "expected a JSON object"),
        ('{"segs": []}', 'no "segments" key'),
        ('{"segments": []}', '"segments" is empty'),
        ('{"segments": {"text": "x"}}', '"segments" must be a list'),
        ('{"segments": [{"caption": "x"}]}', 'segment 0 has neither "text" nor "image"'),
        ('{"segments": [{"text": "a"}, {"text": "x", "image": "y.png"}]}', 'segment 1 has both "text" and "image"'),
        ('{"segments": [{"text": 5}]}', '"text" must be a string'),
        ('{"segments": [{"text": "x", "lang": "en"}]}', "unknown keys"),
        ('{"segments": ["just text"]}', "segment 0 must be an object"),
        ('{"segments": [{"image": "missing.png"}]}', "missing.png not found"),
        ('{"segments": [{"image": ""}]}', "empty path"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, line, match):
    path = _shard(tmp_path, [GOOD, line, GOOD])
    with pytest.raises(DataError, match=match) as err:
        list(read_jsonl_shard(str(path)))
    assert f"{path}:2:" in str(err.value)


def test_truncated_last_line(tmp_path):
    path = tmp_path / "cut.jsonl"
    path.write_text(GOOD + "\n" + GOOD + "\n" + '{"segments": [{"text": "interru')
    docs = read_jsonl_shard(str(path))
    assert next(docs).segments[0].text == "fine" and next(docs).segments[0].text == "fine"
    with pytest.raises(DataError, match=r"cut\.jsonl:3: invalid JSON.*truncated"):
        next(docs)


def test_bad_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + '{"segments": [{"text": "caf\xe9"}]}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not valid UTF-8"):
        list(read_jsonl_shard(str(path)))


@pytest.mark.parametrize("kind", ["garbage", "truncated", "empty"])
def test_corrupt_png(tmp_path, kind):
    good = tmp_path / "good.png"
    _png(good, np.random.default_rng(2).integers(0, 256, size=(32, 32, 3), dtype=np.uint8))
    data = {
        "garbage": b"\x89PNG not really" * 20,
        "truncated": good.read_bytes()[: good.stat().st_size // 2],
        "empty": b"",
    }[kind]
    (tmp_path / "bad.png").write_bytes(data)
    path = _shard(tmp_path, [GOOD, '{"segments": [{"text": "x"}, {"image": "bad.png"}]}'])
    with pytest.raises(DataError, match="cannot be read") as err:
        list(read_jsonl_shard(str(path)))
    assert f"{path}:2:" in str(err.value) and "bad.png" in str(err.value)
    # Tokenizer training reads only the text: the image must exist but is not decoded.
    assert list(shard_texts([str(path)])) == ["fine", "x"]


def test_shard_texts_checks_images_exist(tmp_path):
    path = _shard(tmp_path, [GOOD, '{"segments": [{"image": "gone.png"}]}'])
    with pytest.raises(DataError, match=r"shard\.jsonl:2: image file .*gone\.png not found"):
        list(shard_texts([str(path)]))


def test_tar_errors(tmp_path):
    path = Path(write_tar_shard(_docs(2), str(tmp_path / "ok.tar")))
    data, cut = path.read_bytes(), tmp_path / "cut.tar"
    cut.write_bytes(data[:700])  # inside a member
    with pytest.raises(DataError, match=r"cut\.tar: cannot read tar shard"):
        list(read_tar_shard(str(cut)))
    # Cut at any block boundary (incl. exactly between members): an error or every document.
    for size in range(0, len(data), 512):
        cut.write_bytes(data[:size])
        try:
            assert len(list(read_tar_shard(str(cut)))) == 2
        except DataError as exc:
            assert "cut.tar" in str(exc)
    with tarfile.open(path) as tar:
        second = [m for m in tar.getmembers() if m.name.startswith("000001")][0]
    cut.write_bytes(data[: second.offset])  # exactly after document 0: tarfile itself sees no error
    with pytest.raises(DataError, match="no end-of-archive marker"):
        list(read_tar_shard(str(cut)))
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        for name, data in [
            ("000000.json", b'{"segments": [{"image": "000000.1.png"}]}'),
            ("000001.json", b'{"segments": [{"image": "nothere.png"}]}'),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match=r"bad\.tar:000000\.json: image member '000000\.1\.png' not in"):
        list(read_tar_shard(str(bad)))


def test_shard_file_errors(tmp_path):
    with pytest.raises(DataError, match="no such shard"):
        shard_files([str(tmp_path / "absent.jsonl")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no shards"):
        shard_files([str(tmp_path / "empty")])
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(DataError, match=r"data\.csv: not a shard"):
        list(read_shards([str(tmp_path / "data.csv")]))


def test_writer_rejects_bad_documents(tmp_path):
    bad = [Document([TextSegment("ok"), ImageSegment(np.zeros((4, 4), dtype=np.uint8))], source="mine:3")]
    with pytest.raises(DataError, match=r"mine:3 segment 1.*shape \(4, 4\)"):
        write_jsonl_shard(bad, str(tmp_path / "x.jsonl"))
    assert not (tmp_path / "x.jsonl").exists()


def test_export_builtin_writes_the_builtin_set_as_a_shard(tmp_path):
    from megafusion.data.builtin.export import Exported, export_builtin
    from megafusion.data.builtin.shapes import shapes_documents

    out = tmp_path / "shards" / "shapes.jsonl"
    assert export_builtin("shapes", str(out), num_samples=6, seed=3) == Exported(str(out), 6, 6)
    read = list(read_shards([str(out)]))
    made = shapes_documents(6, 3, 16)
    assert len(read) == len(made)
    for a, b in zip(read, made):
        assert [type(x) for x in a.segments] == [type(x) for x in b.segments]
        for x, y in zip(a.segments, b.segments):
            assert x.text == y.text if hasattr(y, "text") else np.array_equal(x.pixels, y.pixels)


def test_export_builtin_digits_writes_the_number_asked_for(tmp_path, capsys):
    from megafusion.commands.data import main
    from megafusion.data.builtin.digits import digits_documents

    out = tmp_path / "digits.jsonl"
    assert main(["export-builtin", "--set", "digits", "--num-samples", "60", "--output", str(out)]) == 0
    everything = digits_documents(16)
    read = list(read_shards([str(out)]))
    assert len(read) == 60 and len(everything) == 1797
    assert [d.segments[0].text for d in read] == [d.segments[0].text for d in everything[:60]]
    assert np.array_equal(read[59].segments[1].pixels, everything[59].segments[1].pixels)
    assert capsys.readouterr().out == (
        f"wrote the first 60 of the 1797 digits documents to {out} (images in {tmp_path / 'digits'}_images/)\n"
    )
    assert main(["export-builtin", "--set", "digits", "--num-samples", "1798", "--output", str(out)]) == 2
    assert capsys.readouterr().err == (
        "megafusion data export-builtin: --num-samples 1798: the digits set has 1797 documents; give at most that\n"
    )
