"""Built-in "digits" data set: scikit-learn's 1797 8x8 handwritten digits with captions.

The images ship inside scikit-learn (``sklearn.datasets.load_digits``), so nothing is
downloaded. Grey values 0..16 are scaled to 0..255, upscaled by nearest index to
``image_size`` (pixel repetition when it is a multiple of 8) and repeated into RGB. Each
document is the caption ("a handwritten digit seven.") followed by the image.
"""

from __future__ import annotations

import numpy as np

from megafusion.core.errors import DataError
from megafusion.data.codecs.pixel import resize_nearest
from megafusion.data.types import Document, ImageSegment, TextSegment

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def digit_caption(digit: int) -> str:
    return f"a handwritten digit {NUMBER_WORDS[digit]}."


def digit_images(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 ``[n, image_size, image_size, 3]`` images, int64 ``[n]`` digit labels)."""
    if image_size < 1:
        raise DataError(f"builtin:digits: image_size must be >= 1, got {image_size}")
    # Imported here: scikit-learn is only needed by this data set.
    from sklearn.datasets import load_digits

    data = load_digits()
    grey = np.floor(data.images * (255.0 / 16.0) + 0.5).astype(np.uint8)  # [n, 8, 8], 0..255
    # resize_nearest works on the two leading axes: put the sample axis last for it.
    big = resize_nearest(grey.transpose(1, 2, 0), image_size, image_size).transpose(2, 0, 1)
    rgb = np.repeat(big[..., None], 3, axis=-1)
    return np.ascontiguousarray(rgb), data.target.astype(np.int64)


def digits_documents(image_size: int) -> list[Document]:
    images, labels = digit_images(image_size)
    documents = []
    for i, (image, label) in enumerate(zip(images, labels)):
        source = f"builtin:digits:{i}"
        documents.append(
            Document([TextSegment(digit_caption(int(label))), ImageSegment(image, source=source)], source=source)
        )
    return documents
