"""The image scenario's inputs: many distinct PNG digits in one file, read by ``wrk/image.lua``.

Why distinct: every request must carry a different input, so that no cache could answer. Each image
is one of scikit-learn's digits with its index written into the lowest bit of 16 pixel values: the
model sees the same digit, the bytes differ.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np

COUNT = 16384


def pngs(count: int) -> list[bytes]:
    from PIL import Image

    from mlserve.demo_models import digit_images

    digits = [np.asarray(image) for image in digit_images()[0]]
    bits = 1 << np.arange(16)
    out = []
    for index in range(count):
        pixels = digits[index % len(digits)].copy()
        flat = pixels.reshape(-1)
        flat[:16] = (flat[:16] & 0xFE) | ((index & bits) > 0)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


def write(path: Path, count: int = COUNT) -> Path:
    """``count`` distinct PNGs, each as a 4-byte big-endian length and its bytes."""
    with path.open("wb") as out:
        for data in pngs(count):
            out.write(struct.pack("!I", len(data)) + data)
    return path
