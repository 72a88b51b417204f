"""The prediction API: ``POST /predict`` (one row), ``POST /predict/batch`` (many rows) and
``POST /predict/image`` (one image, for models that take images)."""

from __future__ import annotations

import math
from typing import Any

import msgspec
import numpy as np
from aiohttp import web

from mlserve import schemas
from mlserve.api.errors import metered, validation_path
from mlserve.api.keys import SERVED, SERVICE, SETTINGS
from mlserve.api.uploads import read_image
from mlserve.errors import BadRequest, MlserveError, PayloadTooLarge, ValidationFailed
from mlserve.metrics import RequestRecorder
from mlserve.service import ServedVersion

TIMEOUT_HEADER = "X-Request-Timeout-Ms"
JSON = "application/json"
IMAGE_QUERY = {"model", "model_version"}


def decode(decoder: msgspec.json.Decoder[Any], body: bytes) -> Any:
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise ValidationFailed(str(exc), validation_path(exc)) from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None


def checked_rows(samples: list[list[float]], served: ServedVersion, path: str, single: bool) -> list[list[float]]:
    """Refuse wrong widths and non-finite values, with the JSON path of the first fault.

    JSON has no NaN or infinity literals, but a number like ``1e999`` overflows to infinity. One row is
    checked in Python (cheaper than numpy for a handful of floats); a batch with numpy. The rows go
    on as lists: the batch array is built once a batch, not once a request.
    """
    if served.takes_images:
        raise ValidationFailed(f"{served.spec.key} takes images: POST them to /predict/image", "$.model")
    width = served.n_features
    for index, row in enumerate(samples):
        if len(row) != width:
            where = path if single else f"{path}[{index}]"
            raise ValidationFailed(f"expected {width} features, got {len(row)}", where)
    if single and all(map(math.isfinite, samples[0])):
        return samples
    faults = np.argwhere(~np.isfinite(np.array(samples, dtype=np.float64)))
    if not len(faults):
        return samples
    index, column = faults[0]
    where = f"{path}[{column}]" if single else f"{path}[{index}][{column}]"
    raise ValidationFailed("features must be finite numbers (no NaN or infinity)", where)


def timeout(request: web.Request) -> float:
    """Seconds the request may take: the server default, lowered (never raised) by the client's header."""
    timeout_s = request.app[SETTINGS].request_timeout_ms / 1000.0
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is not None:
        try:
            asked = float(raw)
        except ValueError:
            asked = math.nan
        if not (asked > 0 and math.isfinite(asked)):
            raise BadRequest(f"{TIMEOUT_HEADER} must be a positive number of milliseconds, got {raw!r}")
        timeout_s = min(timeout_s, asked / 1000.0)
    return timeout_s


def respond(body: msgspec.Struct) -> web.Response:
    return web.Response(body=schemas.encoder.encode(body), content_type=JSON)


async def predict(request: web.Request) -> tuple[web.Response, RequestRecorder]:
    body = decode(schemas.predict_decoder, await request.read())
    service = request.app[SERVICE]
    served = service.resolve(body.model, body.model_version)
    request[SERVED] = served
    rows = checked_rows([body.features], served, "$.features", single=True)
    result = await service.predict(served, rows, timeout(request))
    answer = schemas.PredictResponse(
        prediction=result.values[0],
        model=served.spec.name,
        model_version=served.spec.version,
        inference_time_ms=result.compute_s * 1000.0,
    )
    return respond(answer), served.answered["predict"]


async def predict_batch(request: web.Request) -> tuple[web.Response, RequestRecorder]:
    body = decode(schemas.batch_predict_decoder, await request.read())
    limit = request.app[SETTINGS].max_batch_rows
    if not body.samples:
        raise ValidationFailed("samples must hold at least one row", "$.samples")
    if len(body.samples) > limit:
        raise PayloadTooLarge(f"{len(body.samples)} samples is over the limit of {limit} a request")
    service = request.app[SERVICE]
    served = service.resolve(body.model, body.model_version)
    request[SERVED] = served
    rows = checked_rows(body.samples, served, "$.samples", single=False)
    result = await service.predict(served, rows, timeout(request))
    answer = schemas.BatchPredictResponse(
        predictions=result.values,
        total=len(result.values),
        model=served.spec.name,
        model_version=served.spec.version,
        inference_time_ms=result.compute_s * 1000.0,
    )
    return respond(answer), served.answered["predict_batch"]


async def predict_image(request: web.Request) -> tuple[web.Response, RequestRecorder]:
    query = request.query
    unknown = sorted(set(query) - IMAGE_QUERY)
    if unknown:
        raise ValidationFailed(f"unknown query parameter {unknown[0]!r}; known: model, model_version", unknown[0])
    service = request.app[SERVICE]
    served = service.resolve(query.get("model"), query.get("model_version"), images=True)
    request[SERVED] = served
    if not served.takes_images:
        raise ValidationFailed(f"{served.spec.key} takes feature rows, not images: POST them to /predict", "model")
    image = await read_image(request, request.app[SETTINGS].max_image_bytes)
    result = await service.predict(served, [image], timeout(request))
    answer = result.values[0]
    if isinstance(answer, MlserveError):
        raise answer  # this image's own fault, found by the worker that decoded it
    best, confidence, probabilities = answer
    response = schemas.ImageResponse(
        class_=best,
        confidence=confidence,
        probabilities=probabilities,
        model=served.spec.name,
        model_version=served.spec.version,
        inference_time_ms=result.compute_s * 1000.0,
    )
    return respond(response), served.answered["predict_image"]


def add_routes(app: web.Application) -> None:
    app.router.add_post("/predict", metered(predict, "predict"), name="predict")
    app.router.add_post("/predict/batch", metered(predict_batch, "predict_batch"), name="predict_batch")
    app.router.add_post("/predict/image", metered(predict_image, "predict_image"), name="predict_image")
