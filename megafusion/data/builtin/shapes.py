"""Built-in "shapes" data set: captioned images of one coloured shape, plus a checker for it.

Each sample is a plain background (black or white) with ONE filled circle / square / triangle in
one of six strongly different colours, placed in one cell of a 3x3 grid. The caption states the
colour, the shape and the position ("a red circle at the top left."). Sample ``i`` depends only
on ``(seed, i)``, so any prefix of a larger set is the smaller set.

- ``shapes_specs(n, seed)``: the ``ShapeSpec`` (attributes and exact geometry) of each sample;
- ``render_shape(spec, image_size)``: the uint8 image of a spec (numpy masks, no drawing library);
- ``caption(spec, rng)``: one of a few phrasings;
- ``shapes_documents(n, seed, image_size)``: the Documents (caption first 80% of the time, image
  first otherwise, as in Transfusion);
- ``read_shape(pixels)``: reads colour / shape / position back from an image (rendered or
  generated), so that samples from a model can be scored against their prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megafusion.core.errors import DataError
from megafusion.data.codecs.pixel import check_rgb_image
from megafusion.data.types import Document, ImageSegment, TextSegment

# Far apart in RGB (pairwise distance >= ~150) so that even a coarse codec keeps them apart.
PALETTE = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (40, 60, 230),
    "yellow": (240, 220, 30),
    "magenta": (210, 40, 210),
    "cyan": (40, 210, 220),
}
BACKGROUNDS = {"black": (16, 16, 16), "white": (245, 245, 245)}
SHAPES = ("circle", "square", "triangle")
# Row-major 3x3 grid: POSITIONS[3 * row + col].
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
TEMPLATES = (
    "a {colour} {shape} at the {position}.",
    "a {colour} {shape} in the {position}.",
    "there is a {colour} {shape} at the {position}.",
    "an image of a {colour} {shape} in the {position}.",
)
IMAGE_FIRST_PROBABILITY = 0.2
# Shape extent as a fraction of the grid cell, and how far its centre may move off the cell
# centre (fraction of the cell): with 0.95 / 2 + 0.025 <= 0.5 the shape never leaves its cell.
SCALE_RANGE = (0.8, 0.95)
MAX_OFFSET = 0.025
MIN_IMAGE_SIZE = 12  # below this a shape is ~3 pixels and circle / square / triangle look alike


@dataclass(frozen=True)
class ShapeSpec:
    colour: str
    shape: str
    position: str
    background: str
    scale: float  # shape extent / cell size
    dx: float  # centre offset from the cell centre, in cells
    dy: float

    def attributes(self) -> dict:
        """What the caption states (and ``read_shape`` reads back)."""
        return {"colour": self.colour, "shape": self.shape, "position": self.position}


def _sample_rng(seed: int, index: int) -> np.random.Generator:
    if seed < 0:
        raise DataError(f"builtin:shapes: seed must be >= 0, got {seed}")
    return np.random.default_rng([seed, index])


def _draw_spec(rng: np.random.Generator) -> ShapeSpec:
    colours = tuple(PALETTE)
    return ShapeSpec(
        colour=colours[rng.integers(len(colours))],
        shape=SHAPES[rng.integers(len(SHAPES))],
        position=POSITIONS[rng.integers(len(POSITIONS))],
        background=tuple(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
        scale=float(rng.uniform(*SCALE_RANGE)),
        dx=float(rng.uniform(-MAX_OFFSET, MAX_OFFSET)),
        dy=float(rng.uniform(-MAX_OFFSET, MAX_OFFSET)),
    )


def _sample(seed: int, index: int) -> tuple[ShapeSpec, str, bool]:
    """Spec, caption and order of sample ``index``: the draws happen in this fixed order."""
    rng = _sample_rng(seed, index)
    spec = _draw_spec(rng)
    text = caption(spec, rng)
    image_first = bool(rng.random() < IMAGE_FIRST_PROBABILITY)
    return spec, text, image_first


def shapes_specs(num_samples: int, seed: int) -> list[ShapeSpec]:
    return [_sample(seed, i)[0] for i in range(num_samples)]


def caption(spec: ShapeSpec, rng: np.random.Generator) -> str:
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    return template.format(**spec.attributes())


def _check_image_size(image_size: int) -> None:
    if image_size < MIN_IMAGE_SIZE:
        raise DataError(
            f"builtin:shapes: image_size must be >= {MIN_IMAGE_SIZE} (smaller shapes are "
            f"unrecognisable), got {image_size}"
        )


def _roundest_disc(x: np.ndarray, y: np.ndarray, cx: float, cy: float, h: float) -> np.ndarray:
    """Disc of radius ``h`` near ``(cx, cy)``, centred on a pixel centre or a pixel corner.

    A disc only 3-5 pixels across can rasterise as a full square; which alignment does depends
    on the radius, so both are tried and the one filling less of its bounding box is kept.
    """
    best, best_fill = None, 2.0
    for shift in (0.5, 0.0):  # pixel centre, pixel corner
        ax, ay = np.floor(cx) + shift, np.floor(cy) + shift
        mask = (x - ax) ** 2 + (y - ay) ** 2 <= h * h
        ys, xs = np.nonzero(mask)
        fill = mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1)) if ys.size else 2.0
        if fill < best_fill:
            best, best_fill = mask, fill
    return best


def render_shape(spec: ShapeSpec, image_size: int) -> np.ndarray:
    """uint8 ``[image_size, image_size, 3]``: the shape filled where pixel centres fall inside it."""
    _check_image_size(image_size)
    cell = image_size / 3.0
    index = POSITIONS.index(spec.position)
    row, col = divmod(index, 3)
    cx, cy = (col + 0.5 + spec.dx) * cell, (row + 0.5 + spec.dy) * cell
    h = spec.scale * cell / 2.0  # half extent
    y, x = np.mgrid[0:image_size, 0:image_size] + 0.5
    if spec.shape == "circle":
        mask = _roundest_disc(x, y, cx, cy, h)
    elif spec.shape == "square":
        mask = (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    elif spec.shape == "triangle":
        # Apex up at (cx, cy - h), base from (cx - h, cy + h) to (cx + h, cy + h).
        mask = (y <= cy + h) & (np.abs(x - cx) <= (y - (cy - h)) / 2.0)
    else:
        raise DataError(f"builtin:shapes: unknown shape {spec.shape!r}; known: {', '.join(SHAPES)}")
    image = np.empty((image_size, image_size, 3), dtype=np.uint8)
    image[:] = BACKGROUNDS[spec.background]
    image[mask] = PALETTE[spec.colour]
    return image


def shapes_documents(num_samples: int, seed: int, image_size: int) -> list[Document]:
    _check_image_size(image_size)
    documents = []
    for i in range(num_samples):
        spec, text, image_first = _sample(seed, i)
        source = f"builtin:shapes:{i}"
        segments = [TextSegment(text), ImageSegment(render_shape(spec, image_size), source=source)]
        documents.append(Document(segments[::-1] if image_first else segments, source=source))
    return documents


# --- checker -----------------------------------------------------------------------------------

_CLASS_NAMES = (*PALETTE, *(f"background:{b}" for b in BACKGROUNDS))
_CLASS_RGB = np.array([*PALETTE.values(), *BACKGROUNDS.values()], dtype=np.float64)


def read_shape(pixels: np.ndarray) -> dict:
    """Colour, shape and position of the one shape in ``pixels`` (None where there is no shape).

    Every pixel is assigned to the nearest palette or background colour; the most frequent
    class is the background and the most frequent other class is the shape. Position is the
    grid cell of the shape's centroid. Shape: a triangle has far less mass in the top half of
    its bounding box than in the bottom half; of the symmetric ones, a square fills its box
    (~1.0) and a circle does not (~0.785). Needs the shape at about its rendered resolution: after
    a patch codec that averages 2x2 or larger patches of a 16-32 pixel image, the shape's edge
    patches take mixed colours and the shape is read far less reliably (colour and position hold).
    """
    check_rgb_image(pixels, "read_shape")
    height, width = pixels.shape[:2]
    dist = ((pixels.reshape(-1, 1, 3).astype(np.float64) - _CLASS_RGB[None]) ** 2).sum(-1)
    classes = dist.argmin(-1)
    counts = np.bincount(classes, minlength=len(_CLASS_NAMES))
    order = np.argsort(-counts, kind="stable")
    background, shape_class = order[0], order[1]
    result = {
        "colour": None,
        "shape": None,
        "position": None,
        "background": _CLASS_NAMES[background].removeprefix("background:"),
    }
    if counts[shape_class] == 0 or shape_class >= len(PALETTE):
        return result
    mask = (classes == shape_class).reshape(height, width)
    ys, xs = np.nonzero(mask)
    # Centroid of pixel centres -> grid cell.
    row = min(int((ys.mean() + 0.5) * 3 // height), 2)
    col = min(int((xs.mean() + 0.5) * 3 // width), 2)
    box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    half = box.shape[0] // 2
    # The middle row of an odd-height box belongs to neither half.
    top, bottom = box[:half].sum(), box[box.shape[0] - half :].sum()
    fill = box.mean()
    if bottom > 0 and top / bottom < 0.6:
        shape = "triangle"
    elif fill >= 0.9:
        shape = "square"
    else:
        shape = "circle"
    result.update(colour=_CLASS_NAMES[shape_class], shape=shape, position=POSITIONS[3 * row + col])
    return result
