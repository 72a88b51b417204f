"""The prediction API: ``POST /predict`` (one row), ``POST /predict/batch`` (many rows) and
``POST /predict/image`` (one image, for models that take images)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from aiohttp import web

from mlserve import schemas
from mlserve.api.errors import metered
from mlserve.api.http import decode, mark_cached, respond, timeout, wants_fresh
from mlserve.api.keys import SERVED, SERVICE, SETTINGS
from mlserve.api.uploads import read_image
from mlserve.errors import MlserveError, PayloadTooLarge, ValidationFailed
from mlserve.metrics import RequestRecorder
from mlserve.registry import ServedVersion
from mlserve.service import Call

IMAGE_QUERY = {"model", "model_version"}


def label(served: ServedVersion, value: Any) -> str | None:
    """The class name of a prediction that is a class index, when the version names its classes."""
    labels = served.labels
    if labels and type(value) is int and 0 <= value < len(labels):
        return labels[value]
    return None


def checked_rows(samples: list[list[float]], served: ServedVersion, path: str, single: bool) -> None:
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
        return
    faults = np.argwhere(~np.isfinite(np.array(samples, dtype=np.float64)))
    if not len(faults):
        return
    index, column = faults[0]
    where = f"{path}[{column}]" if single else f"{path}[{index}][{column}]"
    raise ValidationFailed("features must be finite numbers (no NaN or infinity)", where)


async def predict(request: web.Request) -> tuple[web.Response, RequestRecorder]:
    body = decode(schemas.predict_decoder, await request.read())
    service = request.app[SERVICE]
    call = Call(body.model, body.model_version, [body.features], "features", timeout(request))
    served = service.route(call)
    request[SERVED] = served
    checked_rows(call.rows, served, "$.features", single=True)
    if served.cache is not None:
        call.fresh = wants_fresh(request)
    result = await service.predict(served, call)
    prediction = result.values[0]
    answer = schemas.PredictResponse(
        prediction=prediction,
        model=served.spec.name,
        model_version=served.spec.version,
        inference_time_ms=result.compute_s * 1000.0,
        label=label(served, prediction),
    )
    if served.cache is not None:
        return mark_cached(respond(answer), result), served.answered["predict"]
    return respond(answer), served.answered["predict"]


async def predict_batch(request: web.Request) -> tuple[web.Response, RequestRecorder]:
    body = decode(schemas.batch_predict_decoder, await request.read())
    limit = request.app[SETTINGS].max_batch_rows
    if not body.samples:
        raise ValidationFailed("samples must hold at least one row", "$.samples")
    if len(body.samples) > limit:
        raise PayloadTooLarge(f"{len(body.samples)} samples is over the limit of {limit} a request")
    service = request.app[SERVICE]
    call = Call(body.model, body.model_version, body.samples, "features", timeout(request))
    served = service.route(call)
    request[SERVED] = served
    checked_rows(call.rows, served, "$.samples", single=False)
    if served.cache is not None:
        call.fresh = wants_fresh(request)
    result = await service.predict(served, call)
    labels = [label(served, value) for value in result.values] if served.labels else []
    answer = schemas.BatchPredictResponse(
        predictions=result.values,
        total=len(result.values),
        model=served.spec.name,
        model_version=served.spec.version,
        inference_time_ms=result.compute_s * 1000.0,
        labels=labels if labels and None not in labels else None,
    )
    if served.cache is not None:
        return mark_cached(respond(answer), result), served.answered["predict_batch"]
    return respond(answer), served.answered["predict_batch"]


async def predict_image(request: web.Request) -> tuple[web.Response, RequestRecorder]:
    query = request.query
    unknown = sorted(set(query) - IMAGE_QUERY)
    if unknown:
        raise ValidationFailed(f"unknown query parameter {unknown[0]!r}; known: model, model_version", unknown[0])
    service = request.app[SERVICE]
    call = Call(query.get("model"), query.get("model_version"), [], "image", timeout(request))
    served = service.route(call)
    request[SERVED] = served
    if not served.takes_images:
        raise ValidationFailed(f"{served.spec.key} takes feature rows, not images: POST them to /predict", "model")
    call.rows = [await read_image(request, request.app[SETTINGS].max_image_bytes)]
    if served.cache is not None:
        call.fresh = wants_fresh(request)
    result = await service.predict(served, call)
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
    if served.cache is not None:
        return mark_cached(respond(response), result), served.answered["predict_image"]
    return respond(response), served.answered["predict_image"]


def add_routes(app: web.Application) -> None:
    app.router.add_post("/predict", metered(predict, "predict"), name="predict")
    app.router.add_post("/predict/batch", metered(predict_batch, "predict_batch"), name="predict_batch")
    app.router.add_post("/predict/image", metered(predict_image, "predict_image"), name="predict_image")
