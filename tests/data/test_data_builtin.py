"""Built-in data sets: shapes (determinism, geometry, captions, the read-back checker) and digits."""

from __future__ import annotations

import numpy as np
import pytest

from megafusion.core.errors import DataError
from megafusion.data.builtin.digits import NUMBER_WORDS, digits_documents
from megafusion.data.builtin.shapes import (
    BACKGROUNDS,
    PALETTE,
    POSITIONS,
    SHAPES,
    ShapeSpec,
    read_shape,
    render_shape,
    shapes_documents,
    shapes_specs,
)
from megafusion.data.codecs.pixel import PixelPatchCodec
from megafusion.data.types import ImageSegment, TextSegment


def _image_and_caption(doc):
    (image,) = [s for s in doc.segments if isinstance(s, ImageSegment)]
    (text,) = [s for s in doc.segments if isinstance(s, TextSegment)]
    return image.pixels, text.text


def test_shapes_deterministic_and_prefix_stable():
    a = shapes_documents(40, seed=7, image_size=16)
    b = shapes_documents(40, seed=7, image_size=16)
    prefix = shapes_documents(10, seed=7, image_size=16)
    other = shapes_documents(40, seed=8, image_size=16)
    for x, y in zip(a, b):
        assert [type(s) for s in x.segments] == [type(s) for s in y.segments]
        (px, tx), (py, ty) = _image_and_caption(x), _image_and_caption(y)
        assert tx == ty and np.array_equal(px, py)
    for x, y in zip(a, prefix):
        assert _image_and_caption(x)[1] == _image_and_caption(y)[1]
    assert [_image_and_caption(d)[1] for d in a] != [_image_and_caption(d)[1] for d in other]
    assert [d.source for d in a[:3]] == ["builtin:shapes:0", "builtin:shapes:1", "builtin:shapes:2"]
    assert shapes_specs(40, 7) == shapes_specs(40, 7)


def test_shapes_images_captions_and_order():
    n = 600
    docs, specs = shapes_documents(n, seed=0, image_size=24), shapes_specs(n, seed=0)
    caption_first = 0
    for doc, spec in zip(docs, specs):
        pixels, text = _image_and_caption(doc)
        assert pixels.shape == (24, 24, 3) and pixels.dtype == np.uint8
        assert np.array_equal(pixels, render_shape(spec, 24))
        # Exactly two colours: the background and the shape's palette colour.
        colours = {tuple(c) for c in pixels.reshape(-1, 3)}
        assert colours == {BACKGROUNDS[spec.background], PALETTE[spec.colour]}
        assert f" {spec.colour} {spec.shape} " in f" {text} " and text.endswith(f" {spec.position}.")
        caption_first += isinstance(doc.segments[0], TextSegment)
    assert 0.74 < caption_first / n < 0.86  # 80% caption first, as in Transfusion
    # Every attribute value occurs.
    assert {s.colour for s in specs} == set(PALETTE) and {s.shape for s in specs} == set(SHAPES)
    assert {s.position for s in specs} == set(POSITIONS)


@pytest.mark.parametrize("image_size", [16, 32, 48])
def test_shape_stays_in_its_cell(image_size):
    cell = image_size / 3
    for spec in shapes_specs(200, seed=1):
        pixels = render_shape(spec, image_size)
        mask = np.any(pixels != BACKGROUNDS[spec.background], axis=-1)
        ys, xs = np.nonzero(mask)
        row, col = divmod(POSITIONS.index(spec.position), 3)
        # Circles are snapped to the pixel grid, so allow one pixel of slack.
        assert ys.min() >= row * cell - 1 and ys.max() + 1 <= (row + 1) * cell + 1
        assert xs.min() >= col * cell - 1 and xs.max() + 1 <= (col + 1) * cell + 1
        assert mask.sum() >= 6


@pytest.mark.parametrize("image_size", [16, 32])
def test_read_shape_reads_back_attributes(image_size):
    specs = shapes_specs(400, seed=3)
    right = sum(
        read_shape(render_shape(s, image_size)) | {"background": None} == s.attributes() | {"background": None}
        for s in specs
    )
    assert right / len(specs) >= 0.95


def test_read_shape_hand_drawn():
    img = np.full((30, 30, 3), 245, dtype=np.uint8)
    img[21:29, 1:9] = (40, 60, 230)  # an 8x8 blue square in the bottom-left cell
    assert read_shape(img) == {"colour": "blue", "shape": "square", "position": "bottom left", "background": "white"}
    img = np.full((30, 30, 3), 16, dtype=np.uint8)
    for r in range(8):  # a triangle: row r of the apex-up triangle is 2r+1 wide
        img[11 + r, 15 - r : 16 + r] = (240, 220, 30)
    assert read_shape(img) == {"colour": "yellow", "shape": "triangle", "position": "center", "background": "black"}
    blank = np.full((30, 30, 3), 16, dtype=np.uint8)
    assert read_shape(blank)["colour"] is None and read_shape(blank)["shape"] is None


def test_read_shape_survives_per_pixel_codec():
    codec = PixelPatchCodec(image_size=16, patch_size=1, levels=4)
    specs = shapes_specs(200, seed=5)
    right = sum(read_shape(codec.decode(codec.encode(render_shape(s, 16))))["shape"] == s.shape for s in specs)
    assert right / len(specs) >= 0.95


def test_shapes_bad_arguments():
    with pytest.raises(DataError, match="image_size must be >= 12"):
        shapes_documents(3, seed=0, image_size=8)
    with pytest.raises(DataError, match="unknown shape"):
        render_shape(ShapeSpec("red", "hexagon", "top", "black", 0.8, 0.0, 0.0), 16)


def test_digits():
    from sklearn.datasets import load_digits

    ref = load_digits()
    docs = digits_documents(16)
    assert len(docs) == len(ref.target) == 1797
    for i in (0, 7, 1000, 1796):
        doc = docs[i]
        assert doc.source == f"builtin:digits:{i}"
        assert isinstance(doc.segments[0], TextSegment) and isinstance(doc.segments[1], ImageSegment)
        assert doc.segments[0].text == f"a handwritten digit {NUMBER_WORDS[ref.target[i]]}."
        pixels = doc.segments[1].pixels
        assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8
        expected = np.kron(np.round(ref.images[i] * 255 / 16), np.ones((2, 2)))
        for c in range(3):
            assert np.array_equal(pixels[..., c], expected)
    assert {d.segments[0].text for d in docs} == {f"a handwritten digit {w}." for w in NUMBER_WORDS}


def test_digits_non_multiple_size():
    small, odd = digits_documents(8), digits_documents(12)
    a, b = small[3].segments[1].pixels, odd[3].segments[1].pixels
    assert b.shape == (12, 12, 3)
    rows = (np.arange(12) * 8) // 12
    assert np.array_equal(b, a[rows][:, rows])
    all_pixels = np.stack([d.segments[1].pixels for d in small])
    assert all_pixels.max() == 255 and all_pixels.min() == 0  # grey 16 -> 255, 0 -> 0
