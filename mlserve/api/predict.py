"""The prediction API: ``POST /predict`` (one row), ``POST /predict/batch`` (many rows),
``POST /predict/image`` (one image, for models that take images) and the seed's ``POST /predict/ab``.

Calls that name no version follow the model's experiment when one runs; only then is the caller's
user key read (``X-User-ID``, ``?user_id=`` or the body's ``user_id``)."""

from __future__ import annotations

import math
from collections.abc import Awaitable
from typing import Any

import msgspec
import numpy as np
from aiohttp import web

from mlserve import schemas
from mlserve.api.errors import ErrorEncoder, Handler, MeteredHandler, json_error, metered
from mlserve.api.http import VARIANT_HEADER, decode, mark_cached, priority, respond, timeout, user_key, wants_fresh
from mlserve.api.logged import logged
from mlserve.api.keys import CALL, PREDICTION_LOG, RESULT, SERVED, SERVICE, SETTINGS
from mlserve.api.routedoc import RouteDoc
from mlserve.api.uploads import CONTENT_TYPES, FORM, read_image
from mlserve.batcher import BatchResult
from mlserve.errors import MlserveError, PayloadTooLarge, ValidationFailed
from mlserve.metrics import RequestRecorder
from mlserve.registry import ServedVersion
from mlserve.service import Call

IMAGE_QUERY = {"model", "model_version", "user_id"}
FEW_ROWS = 8
FLOAT32_MAX = float(np.finfo(np.float32).max)
"""The largest feature value taken: some runtimes compute in float32."""


def label(served: ServedVersion, value: Any) -> str | None:
    """The class name of a prediction that is a class index, when the version names its classes."""
    labels = served.labels
    if labels and type(value) is int and 0 <= value < len(labels):
        return labels[value]
    return None


def checked_rows(samples: list[list[float]], served: ServedVersion, path: str, single: bool) -> None:
    """Refuse wrong widths and values that are not finite or beyond float32's range, with the JSON
    path of the first fault.

    JSON has no NaN or infinity literals, but a number like ``1e999`` overflows to infinity, and CSV
    has ``nan``. A finite value beyond float32's range fails the models that compute in float32
    (scikit-learn's trees, torch), and with it every request batched with it, so it is refused here,
    before it is queued. A few rows are checked in Python (cheaper than numpy for a handful of floats);
    a larger batch, or one with a fault to locate, with numpy. The rows go on as lists: the batch
    array is built once a batch, not once a request.
    """
    if served.takes_images:
        raise ValidationFailed(f"{served.spec.key} takes images: POST them to /predict/image", "$.model")
    width = served.n_features
    for index, row in enumerate(samples):
        if len(row) != width:
            where = path if single else f"{path}[{index}]"
            raise ValidationFailed(f"expected {width} features, got {len(row)}", where)
    # A few rows are checked faster in Python than by building an array; ``not width``: max() of an
    # empty row raises.
    if not (len(samples) <= FEW_ROWS and (not width or all(map(_fits, samples)))):
        faults = np.argwhere(~(np.abs(np.array(samples, dtype=np.float64)) <= FLOAT32_MAX))
        if len(faults):
            index, column = faults[0]
            where = f"{path}[{column}]" if single else f"{path}[{index}][{column}]"
            raise ValidationFailed(
                f"features must be finite numbers within float32's range (±{FLOAT32_MAX:.7g}); no NaN or infinity",
                where,
            )
    if served.integral:
        _check_integral(samples, served, path, single)


def _fits(row: list[float]) -> bool:
    """Finite, and within float32's range: three passes in C, cheaper than one in Python. A sum is
    finite only when every term is (float32's range is far inside float64's, so finite terms cannot
    overflow it)."""
    return math.isfinite(sum(row)) and max(row) <= FLOAT32_MAX and min(row) >= -FLOAT32_MAX


def _check_integral(samples: list[list[float]], served: ServedVersion, path: str, single: bool) -> None:
    """Refuse a fraction where the model's signature declares a whole number, before it is queued
    (MLflow's schema check would fail the whole batch it landed in)."""
    for index, row in enumerate(samples):
        for column, name, kind in served.integral:
            value = row[column]
            if value != int(value) or (kind == "boolean" and value not in (0, 1)):
                where = f"{path}[{column}]" if single else f"{path}[{index}][{column}]"
                wanted = "0 or 1" if kind == "boolean" else "a whole number"
                raise ValidationFailed(f"feature {name!r} is {kind}: {value!r} is not {wanted}", where)


def counted(rows: list[Any], limit: int, what: str, path: str, unit: str | None = None) -> None:
    """Refuse a call without rows (422) or with more than ``limit`` (413); ``unit`` counts them
    (``what`` by default)."""
    if not rows:
        raise ValidationFailed(f"{what} must hold at least one row", path)
    if len(rows) > limit:
        raise PayloadTooLarge(f"{len(rows)} {unit or what} is over the limit of {limit} a request")


def routed(request: web.Request, call: Call, user_id: str | None = None) -> ServedVersion:
    """The version that answers ``call`` (by the caller's user key while experiments run), noted on
    the request for the metrics and the prediction log."""
    service = request.app[SERVICE]
    if service.experiments:
        call.routing_key = user_key(request, user_id)
    served = service.route(call)
    request[SERVED] = served
    request[CALL] = call
    return served


def computed(request: web.Request, served: ServedVersion, call: Call) -> Awaitable[BatchResult]:
    """``call``'s validated rows sent to ``served``: the service's own awaitable, not a coroutine layer."""
    if served.cache is not None:
        call.fresh = wants_fresh(request)
    if call.priority is None:
        call.priority = priority(request)
    return request.app[SERVICE].predict(served, call)


def answered(
    body: msgspec.Struct, served: ServedVersion, call: Call, result: BatchResult, endpoint: str
) -> tuple[web.Response, RequestRecorder]:
    """The response and the recorder of its success; it says when the cache or an experiment answered."""
    response = respond(body)
    if served.cache is not None:
        mark_cached(response, result)
    if call.variant is None:
        return response, served.answered[endpoint]
    response.headers[VARIANT_HEADER] = call.variant
    return response, served.as_variant[endpoint]


def predict(request: web.Request) -> Awaitable[tuple[web.Response, RequestRecorder]]:
    """``/predict``: the one-row handler's own coroutine, with no coroutine layer of this function's."""
    return _predict_one(request, "predict")


def predict_ab(request: web.Request) -> Awaitable[tuple[web.Response, RequestRecorder]]:
    """The seed's A/B route: ``/predict``, whose answer always names the version that computed it."""
    return _predict_one(request, "predict_ab")


async def _predict_one(request: web.Request, endpoint: str) -> tuple[web.Response, RequestRecorder]:
    body = decode(schemas.predict_decoder, await request.read())
    call = Call(body.model, body.model_version, [body.features], "features", timeout(request))
    served = routed(request, call, body.user_id)
    checked_rows(call.rows, served, "$.features", single=True)
    result = request[RESULT] = await computed(request, served, call)
    prediction = result.values[0]
    answer = schemas.PredictResponse(
        prediction=prediction,
        model=served.spec.name,
        model_version=served.spec.version,
        inference_time_ms=result.compute_s * 1000.0,
        label=label(served, prediction),
        variant=call.variant or (served.spec.version if endpoint == "predict_ab" else None),
    )
    return answered(answer, served, call, result, endpoint)


async def predict_batch(request: web.Request) -> tuple[web.Response, RequestRecorder]:
    body = decode(schemas.batch_predict_decoder, await request.read())
    counted(body.samples, request.app[SETTINGS].max_batch_rows, "samples", "$.samples")
    call = Call(body.model, body.model_version, body.samples, "features", timeout(request))
    served = routed(request, call, body.user_id)
    checked_rows(call.rows, served, "$.samples", single=False)
    result = request[RESULT] = await computed(request, served, call)
    labels = [label(served, value) for value in result.values] if served.labels else []
    answer = schemas.BatchPredictResponse(
        predictions=result.values,
        total=len(result.values),
        model=served.spec.name,
        model_version=served.spec.version,
        inference_time_ms=result.compute_s * 1000.0,
        labels=labels if labels and None not in labels else None,
        variant=call.variant,
    )
    return answered(answer, served, call, result, "predict_batch")


async def predict_image(request: web.Request) -> tuple[web.Response, RequestRecorder]:
    query = request.query
    unknown = sorted(set(query) - IMAGE_QUERY)
    if unknown:
        known = ", ".join(sorted(IMAGE_QUERY))
        raise ValidationFailed(f"unknown query parameter {unknown[0]!r}; known: {known}", unknown[0])
    call = Call(query.get("model"), query.get("model_version"), [], "image", timeout(request))
    served = routed(request, call)
    if not served.takes_images:
        raise ValidationFailed(f"{served.spec.key} takes feature rows, not images: POST them to /predict", "model")
    call.rows = [await read_image(request, request.app[SETTINGS].max_image_bytes)]
    result = request[RESULT] = await computed(request, served, call)
    value = result.values[0]
    if isinstance(value, MlserveError):
        raise value  # this image's own fault, found by the worker that decoded it
    best, confidence, probabilities = value
    answer = schemas.ImageResponse(
        class_=best,
        confidence=confidence,
        probabilities=probabilities,
        model=served.spec.name,
        model_version=served.spec.version,
        inference_time_ms=result.compute_s * 1000.0,
        variant=call.variant,
    )
    return answered(answer, served, call, result, "predict_image")


def add_prediction_route(
    app: web.Application, path: str, handler: MeteredHandler, encode: ErrorEncoder = json_error
) -> Handler:
    """``POST path`` to ``handler``, metered under its name; with the prediction log on, logged too.
    Returns the wrapped handler, for a protocol that serves it on a second path."""
    log = app.get(PREDICTION_LOG)
    name = handler.__name__
    wrapped = metered(handler, name, encode) if log is None else logged(handler, name, log, encode)
    app.router.add_post(path, wrapped, name=name)
    return wrapped


PREDICTION_ERRORS = (400, 404, 413, 422, 429, 500, 503, 504)
"""Bad JSON or timeout header, unknown model or version, too large, invalid, too much queued ahead to
meet the deadline, the model raised, not ready or the queue full, past the deadline."""
ROW_EXAMPLE = [5.1, 3.5, 1.4, 0.2]
DOCS: tuple[RouteDoc, ...] = (
    RouteDoc("POST", "/predict", "Predict one row of features", schemas.PredictRequest,
             response=schemas.PredictResponse, errors=PREDICTION_ERRORS, tag="predict", query=("user_id",),
             example={"features": ROW_EXAMPLE}),
    RouteDoc("POST", "/predict/ab", "The seed's A/B route: /predict, whose answer always names its version",
             schemas.PredictRequest, response=schemas.PredictResponse, errors=PREDICTION_ERRORS, tag="predict",
             query=("user_id",), example={"features": ROW_EXAMPLE}),
    RouteDoc("POST", "/predict/batch", "Predict many rows of features", schemas.BatchPredictRequest,
             response=schemas.BatchPredictResponse, errors=PREDICTION_ERRORS, tag="predict", query=("user_id",),
             example={"samples": [ROW_EXAMPLE, [6.7, 3.0, 5.2, 2.3]]}),
    RouteDoc("POST", "/predict/image", "Classify one image: the multipart form field `file`, or the raw body",
             request_types=(FORM, *CONTENT_TYPES), response=schemas.ImageResponse,
             errors=(*PREDICTION_ERRORS, 415), tag="predict", query=tuple(sorted(IMAGE_QUERY))),
)


def add_routes(app: web.Application) -> None:
    """Register the prediction routes; with the prediction log on, each also writes its lines."""
    for path, handler in (
        ("/predict", predict),
        ("/predict/ab", predict_ab),
        ("/predict/batch", predict_batch),
        ("/predict/image", predict_image),
    ):
        add_prediction_route(app, path, handler)
