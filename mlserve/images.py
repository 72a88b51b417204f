"""Uploaded images: the formats the server takes, and turning image bytes into class answers.

This runs in the worker processes, never on the event loop. Each image is checked before it is
decoded: its format against the allowed ones, and its pixel count, read from the header, against the
limit, so a decompression bomb is refused having cost only the parse of its header. Each image of a
batch fails alone: its typed error takes its place among the outputs and its batch-mates are answered.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import numpy as np

from mlserve.errors import BadRequest, MlserveError, PayloadTooLarge, UnsupportedMediaType
from mlserve.schemas import ImageInput

if TYPE_CHECKING:
    from PIL.Image import Image

    from mlserve.runtimes import Runtime

CONTENT_TYPES = {
    "image/png": "PNG",
    "image/jpeg": "JPEG",
    "image/webp": "WEBP",
    "image/bmp": "BMP",
    "image/x-ms-bmp": "BMP",
    "image/gif": "GIF",
    "image/tiff": "TIFF",
}
"""Content types a client may declare, and the Pillow format each stands for."""
FORMATS = tuple(sorted(set(CONTENT_TYPES.values())))
Answer = tuple[int, float, list[float]]
"""One image's class, its probability, and every class's probability."""


def decode(data: bytes, max_pixels: int) -> Image:
    """An RGB image from ``data``; grayscale, alpha and palette images are converted, not refused.

    Any failure of the decoder is the input's fault, so it becomes a 400, never a worker crash.
    """
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    try:
        image = PILImage.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise _unidentified(data) from None
    except Exception as exc:
        raise BadRequest(f"the image could not be read: {exc}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise PayloadTooLarge(
            f"the image is {width}x{height} ({width * height} pixels); the limit is {max_pixels} pixels"
        )
    try:
        return image.convert("RGB")
    except Exception as exc:
        raise BadRequest(f"the {image.format} image could not be decoded: {exc}") from None


def _unidentified(data: bytes) -> MlserveError:
    """415 for an image in a format the server does not take; 400 for bytes that are no image at all."""
    from PIL import Image as PILImage

    try:
        found = PILImage.open(io.BytesIO(data)).format
    except Exception:
        found = None
    if found:
        return UnsupportedMediaType(f"{found} images are not supported; send one of {', '.join(FORMATS)}")
    return BadRequest(f"the body is not an image in a supported format ({', '.join(FORMATS)})")


def blank_png(size: list[int]) -> bytes:
    """A black PNG of ``size`` (height, width): warm-up input that exercises the whole pipeline."""
    from PIL import Image as PILImage

    buffer = io.BytesIO()
    PILImage.new("RGB", (size[1], size[0])).save(buffer, "PNG")
    return buffer.getvalue()


def softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


class ImageClassifier:
    """Wraps a runtime: decodes a batch of images, transforms the good ones together, predicts once.

    Resizing runs per image (only when the size differs); scaling to [0, 1] and normalizing run once
    on the stacked batch, with torchvision's own functions, which cost a tenth of per-image
    ``ToTensor``/``Normalize`` calls for small images and give the same floats.
    """

    def __init__(self, runtime: Runtime, spec: ImageInput, max_pixels: int) -> None:
        from PIL import Image as PILImage
        from torchvision import transforms
        from torchvision.transforms import functional

        PILImage.MAX_IMAGE_PIXELS = None  # our own limit, checked before decoding, replaces Pillow's warning
        self._runtime = runtime
        self._max_pixels = max_pixels
        self._spec = spec
        self._size = (spec.size[1], spec.size[0])  # PIL's (width, height)
        self._resize = transforms.Resize(tuple(spec.size))
        self._normalize = functional.normalize

    def _pixels(self, data: bytes) -> np.ndarray:
        image = decode(data, self._max_pixels)
        if image.size != self._size:
            image = self._resize(image)
        return np.asarray(image)

    def predict(self, images: list[bytes]) -> list[Answer | MlserveError]:
        import torch

        outputs: list[Any] = [None] * len(images)
        pixels, places = [], []
        for index, data in enumerate(images):
            try:
                pixels.append(self._pixels(data))
            except MlserveError as exc:
                outputs[index] = exc
                continue
            places.append(index)
        if not pixels:
            return outputs
        batch = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float().div(255)
        batch = self._normalize(batch, self._spec.mean, self._spec.std)
        scores = np.asarray(self._runtime.predict(batch.numpy()), dtype=np.float64)
        if len(scores) != len(pixels):
            raise ValueError(f"the model returned {len(scores)} outputs for {len(pixels)} images")
        probabilities = softmax(scores) if self._spec.logits else scores
        for index, row in zip(places, probabilities.tolist()):
            best = max(range(len(row)), key=row.__getitem__)
            outputs[index] = (best, row[best], row)
        return outputs
