"""``POST /predict/image`` against a real server holding the demo CNN next to the iris models.

The held-out digits are the images ``mlserve models`` measured its accuracy on; sent as PNG (lossless)
they must reach exactly that accuracy, and every probability must match the model run offline. Bad
images must get their 4xx, fail alone inside a batch, and never crash a worker.
"""

from __future__ import annotations

import asyncio
import io
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import torch
from PIL import Image

from mlserve import repository, runtimes
from mlserve.demo_models import IMAGES, IRIS, digit_images, train_digits, train_iris
from mlserve.repository import ModelSpec
from mlserve.runtimes import torch as torch_runtime
from mlserve.settings import WorkerOptions
from serverproc import Reply, ServerProc, assert_error, assert_ok, call, scrape, serve, watched

MAX_IMAGE_BYTES = 200_000
MAX_IMAGE_PIXELS = 1_000_000
LIMITS = {"MLSERVE_MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES), "MLSERVE_MAX_IMAGE_PIXELS": str(MAX_IMAGE_PIXELS)}


@pytest.fixture(scope="session")
def image_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What ``mlserve models`` writes: the iris versions and the digits CNN."""
    models = tmp_path_factory.mktemp("images") / "models"
    train_iris(models)
    train_digits(models)
    return models


@pytest.fixture(scope="session")
def digits() -> tuple[list[Image.Image], np.ndarray, np.ndarray]:
    return digit_images()


@pytest.fixture(scope="module")
def image_server(image_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    with serve(image_models_dir, tmp_path_factory.mktemp("image-server"), env=LIMITS) as server:
        yield server


@pytest.fixture
def images(image_server: ServerProc) -> Iterator[ServerProc]:
    with watched(image_server) as server:
        yield server


def encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


async def send_raw(
    http: aiohttp.ClientSession, server: ServerProc, data: bytes, content_type: str = "image/png", query: str = ""
) -> Reply:
    return await call(http, "POST", server.url("/predict/image" + query), data=data, headers={"Content-Type": content_type})


async def send_form(
    http: aiohttp.ClientSession,
    server: ServerProc,
    data: bytes,
    content_type: str = "application/octet-stream",
    field: str = "file",
    query: str = "",
) -> Reply:
    form = aiohttp.FormData()
    form.add_field(field, data, filename="digit", content_type=content_type)
    async with http.post(server.url("/predict/image" + query), data=form) as response:
        text = await response.text()
        body = await response.json(content_type=None) if response.content_type == "application/json" else None
        return Reply(response.status, response.headers, text, body)


def offline_probabilities(models_dir: Path, images: list[Image.Image], artifact: str) -> np.ndarray:
    """The demo CNN run in this process, loaded from ``artifact`` with the serving runtime."""
    from torchvision import transforms

    spec = next(s for s in repository.scan(models_dir) if s.name == IMAGES)
    metadata = spec.metadata
    if artifact == torch_runtime.TORCHSCRIPT:
        import msgspec

        metadata = msgspec.structs.replace(metadata, artifact=artifact, module_class="")
    runtime = runtimes.load(ModelSpec(metadata, spec.directory), WorkerOptions(device="cpu"))
    image = metadata.image
    assert image is not None
    to_input = transforms.Compose([transforms.ToTensor(), transforms.Normalize(image.mean, image.std)])
    scores = runtime.predict(torch.stack([to_input(i) for i in images]).numpy())
    return torch.softmax(torch.as_tensor(scores, dtype=torch.float64), dim=1).numpy()


def test_both_saved_forms_load_and_agree(image_models_dir: Path, digits: Any) -> None:
    """The state_dict (with its module class) and the TorchScript file are the same model."""
    images, _, held_out = digits
    sample = [images[i] for i in held_out[:64]]
    from_weights = offline_probabilities(image_models_dir, sample, torch_runtime.STATE_DICT)
    from_script = offline_probabilities(image_models_dir, sample, torch_runtime.TORCHSCRIPT)
    np.testing.assert_allclose(from_weights, from_script, atol=1e-6)


async def test_held_out_digits_reach_the_recorded_accuracy(
    images: ServerProc, image_models_dir: Path, digits: Any, http: aiohttp.ClientSession
) -> None:
    pictures, labels, held_out = digits
    recorded = next(s for s in repository.scan(image_models_dir) if s.name == IMAGES).metadata.accuracy
    assert recorded is not None and recorded > 0.95
    sample = [pictures[i] for i in held_out]
    as_png = [encode(p, "PNG") for p in sample]
    as_jpeg = [encode(p, "JPEG", quality=95) for p in sample]
    gate = asyncio.Semaphore(64)

    async def one(send: Any, data: bytes, content_type: str) -> dict[str, Any]:
        async with gate:
            return assert_ok(await send(http, images, data, content_type))

    replies = await asyncio.gather(
        *(one(send_form, data, "image/png") for data in as_png),
        *(one(send_raw, data, "image/jpeg") for data in as_jpeg),
    )
    png, jpeg = replies[: len(sample)], replies[len(sample) :]
    truth = labels[held_out]
    png_accuracy = float(np.mean([r["class"] for r in png] == truth))
    jpeg_accuracy = float(np.mean([r["class"] for r in jpeg] == truth))
    assert png_accuracy == pytest.approx(recorded, abs=1e-4), "PNG is lossless: served must equal recorded"
    assert jpeg_accuracy >= recorded - 0.02
    offline = offline_probabilities(image_models_dir, sample, torch_runtime.STATE_DICT)
    np.testing.assert_allclose([r["probabilities"] for r in png], offline, atol=1e-5)
    for reply in png:
        assert reply["model"] == IMAGES and reply["model_version"] == "v1"
        assert reply["confidence"] == max(reply["probabilities"]) and len(reply["probabilities"]) == 10
        assert reply["inference_time_ms"] > 0
    metrics = await scrape(http, images)
    batches = metrics.value("mlserve_batch_size_count", model=IMAGES)
    rows = metrics.value("mlserve_batch_size_sum", model=IMAGES)
    assert rows >= 2 * len(sample) and batches < rows, "64 concurrent clients should have formed real batches"


def _modes(picture: Image.Image) -> dict[str, bytes]:
    gray = picture.convert("L")
    with_alpha = picture.copy()
    with_alpha.putalpha(255)
    return {
        "grayscale": encode(gray, "PNG"),
        "grayscale+alpha": encode(gray.convert("LA"), "PNG"),
        "rgba": encode(with_alpha, "PNG"),
        "palette": encode(picture.quantize(256), "PNG"),
        "16-bit grayscale tiff": encode(gray.convert("I;16"), "TIFF"),
        "bmp": encode(picture, "BMP"),
        "webp lossless": encode(picture, "WEBP", lossless=True),
    }


async def test_other_modes_and_formats_are_converted_not_refused(
    images: ServerProc, digits: Any, http: aiohttp.ClientSession
) -> None:
    pictures, labels, held_out = digits
    picture = pictures[held_out[3]]
    reference = assert_ok(await send_raw(http, images, encode(picture, "PNG")))
    assert reference["class"] == labels[held_out[3]]
    for mode, data in _modes(picture).items():
        reply = assert_ok(await send_form(http, images, data))
        assert reply["class"] == reference["class"], mode
        assert reply["confidence"] == pytest.approx(reference["confidence"], abs=0.05), mode


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` and whose pixels are a stream of zeros."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack("!I", len(data)) + kind + data + struct.pack("!I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = b"\0" * (width + 1)
    pixels = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack("!IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def bad_inputs(picture: Image.Image) -> list[tuple[str, str, bytes, str, int]]:
    """(case, how it is sent, body, content type, status)."""
    png = encode(picture, "PNG")
    bomb = _png_header_only(4000, 4000)
    assert len(bomb) < MAX_IMAGE_BYTES, "the bomb must pass the byte limit to test the pixel limit"
    return [
        ("empty raw body", "raw", b"", "image/png", 400),
        ("empty form file", "form", b"", "image/png", 400),
        ("not an image", "raw", b"these are not the pixels you are looking for", "image/png", 400),
        ("not an image, form", "form", b"\x00\x01 plain bytes", "application/octet-stream", 400),
        ("truncated png", "raw", png[: len(png) // 2], "image/png", 400),
        ("truncated png, form", "form", png[:60], "image/png", 400),
        ("text body", "raw", png, "text/plain", 415),
        ("json body", "raw", b"{}", "application/json", 415),
        ("svg content type", "raw", b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml", 415),
        ("ppm in a form", "form", encode(picture, "PPM"), "application/octet-stream", 415),
        ("decompression bomb", "raw", bomb, "image/png", 413),
        ("decompression bomb, form", "form", bomb, "image/png", 413),
        ("over the byte limit", "raw", b"\0" * (MAX_IMAGE_BYTES + 1), "image/png", 413),
    ]


@pytest.mark.parametrize("case", [c[0] for c in bad_inputs(Image.new("RGB", (32, 32)))])
async def test_bad_images_get_a_clear_4xx(
    case: str, images: ServerProc, digits: Any, http: aiohttp.ClientSession
) -> None:
    pictures, _, held_out = digits
    _, how, data, content_type, status = next(c for c in bad_inputs(pictures[held_out[0]]) if c[0] == case)
    send = send_raw if how == "raw" else send_form
    message = assert_error(await send(http, images, data, content_type), status)
    assert "Traceback" not in message


async def test_an_upload_over_the_limit_is_refused_while_streaming(
    images: ServerProc, http: aiohttp.ClientSession
) -> None:
    """Without a Content-Length the server counts bytes as they come and stops at the limit."""
    sent = 0

    async def chunks() -> Any:
        nonlocal sent
        for _ in range(100):
            sent += 65536
            yield b"\0" * 65536

    async with http.post(images.url("/predict/image"), data=chunks(), headers={"Content-Type": "image/png"}) as r:
        assert r.status == 413, await r.text()
        assert "limit" in (await r.json())["error"]


async def test_request_mistakes(images: ServerProc, digits: Any, http: aiohttp.ClientSession) -> None:
    pictures, _, held_out = digits
    png = encode(pictures[held_out[0]], "PNG")
    assert_error(await send_form(http, images, png, field="image"), 400)
    assert_error(await send_raw(http, images, png, query="?model=nope"), 404)
    assert_error(await send_raw(http, images, png, query=f"?model={IMAGES}&model_version=v9"), 404)
    assert_error(await send_raw(http, images, png, query="?modle=x"), 422, path="modle")
    assert_error(await send_raw(http, images, png, query=f"?model={IRIS}"), 422, path="model")
    bad_form = b"--xyz\r\nContent-Disposition: form-data; name=file\r\n\r\n" + png  # never closed
    assert_error(await send_raw(http, images, bad_form, content_type="multipart/form-data; boundary=abc"), 400)
    features = await call(http, "POST", images.url("/predict"), json_body={"features": [0.0] * 4, "model": IMAGES})
    assert_error(features, 422, path="$.model")


async def test_each_endpoint_finds_its_own_model_without_naming_it(
    images: ServerProc, digits: Any, http: aiohttp.ClientSession
) -> None:
    pictures, labels, held_out = digits
    reply = assert_ok(await send_raw(http, images, encode(pictures[held_out[5]], "PNG")))
    assert (reply["model"], reply["class"]) == (IMAGES, labels[held_out[5]])
    iris = assert_ok(await call(http, "POST", images.url("/predict"), json_body={"features": [5.1, 3.5, 1.4, 0.2]}))
    assert iris["model"] == IRIS


async def test_a_bad_image_fails_alone_in_its_batch(
    image_models_dir: Path, digits: Any, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """One worker and a long batching window put every request in one batch; only the bad one fails."""
    pictures, _, held_out = digits
    env = {**LIMITS, "MLSERVE_BATCHING__MAX_DELAY_MS": "1500"}
    with serve(image_models_dir, tmp_path, env=env, workers=1) as server:
        pids = server.worker_pids()
        good = [encode(pictures[i], "PNG") for i in held_out[:6]]
        bad = [b"not an image", _png_header_only(4000, 4000), encode(pictures[0], "PPM")]
        replies = await asyncio.gather(
            *(send_raw(http, server, data) for data in good[:3]),
            *(send_form(http, server, data) for data in bad),
            *(send_raw(http, server, data) for data in good[3:]),
        )
        answers = replies[:3] + replies[6:]
        offline = offline_probabilities(image_models_dir, [pictures[i] for i in held_out[:6]], torch_runtime.STATE_DICT)
        assert [assert_ok(r)["class"] for r in answers] == offline.argmax(axis=1).tolist()
        for reply, status in zip(replies[3:6], (400, 413, 415)):
            assert_error(reply, status)
        metrics = await scrape(http, server)
        assert metrics.value("mlserve_batch_size_count", model=IMAGES) == 1, "all nine should share one batch"
        assert metrics.value("mlserve_batch_size_sum", model=IMAGES) == 9
        assert metrics.value("mlserve_worker_restarts") == 0 and server.worker_pids() == pids


async def test_cached_images_hit_and_an_undecodable_one_is_never_cached(
    image_models_dir: Path, digits: Any, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """The same PNG bytes hit; bytes that fail to decode fail again, computed again, never stored."""
    pictures, labels, held_out = digits
    with serve(image_models_dir, tmp_path, env={**LIMITS, "MLSERVE_CACHE__ENABLED": "true"}) as server:
        png = encode(pictures[held_out[2]], "PNG")
        first, second = await send_raw(http, server, png), await send_raw(http, server, png)
        assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("miss", "hit")
        assert assert_ok(first) | {"inference_time_ms": 0} == assert_ok(second) | {"inference_time_ms": 0}
        assert second.body["class"] == labels[held_out[2]]
        truncated = png[: len(png) // 2]
        for _ in range(2):
            reply = await send_raw(http, server, truncated)
            assert_error(reply, 400)
            assert reply.headers.get("X-Cache") != "hit"
        metrics = await scrape(http, server)
        assert metrics.value("mlserve_batch_size_sum", model=IMAGES) == 3, "the good image once, the bad one twice"
