"""The one place where errors become HTTP statuses, and where request metrics are recorded.

Every failure leaves as a JSON object with an ``"error"`` string: the core's typed errors, aiohttp's
own (unknown route, wrong method, body over ``client_max_size``) and anything unexpected, which is
logged with its traceback and answered with a 500 that reveals nothing internal.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import msgspec
from aiohttp import web

from mlserve import errors
from mlserve.api.keys import METRICS, SERVED
from mlserve.schemas import ErrorResponse, encoder

log = logging.getLogger(__name__)

STATUS: dict[type[errors.MlserveError], int] = {
    errors.BadRequest: 400,
    errors.ModelNotFound: 404,
    errors.PayloadTooLarge: 413,
    errors.ValidationFailed: 422,
    errors.PredictionFailed: 500,
    errors.ModelNotReady: 503,
    errors.QueueFull: 503,
    errors.ShuttingDown: 503,
    errors.WorkerUnavailable: 503,
    errors.DeadlineExceeded: 504,
}
METERED_ENDPOINTS = frozenset({"predict", "predict_batch"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_error(status: int, message: str, path: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=encoder.encode(ErrorResponse(error=message, path=path)),
        content_type="application/json",
        headers=headers,
    )


def from_error(exc: errors.MlserveError) -> web.Response:
    status = next((code for kind, code in STATUS.items() if isinstance(exc, kind)), 500)
    retry_after = getattr(exc, "retry_after_s", None)
    if status == 503 and retry_after is None:
        retry_after = 1
    headers = {"Retry-After": str(retry_after)} if status == 503 else None
    return json_error(status, str(exc), getattr(exc, "path", None), headers)


def from_http_exception(exc: web.HTTPException) -> web.Response:
    """aiohttp's own refusals; a 413's text already names the limit and the size it saw."""
    message = exc.text if isinstance(exc, web.HTTPRequestEntityTooLarge) and exc.text else exc.reason
    headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
    return json_error(exc.status, message, headers=headers or None)


def validation_path(exc: msgspec.ValidationError) -> str | None:
    _, marker, path = str(exc).rpartition(" - at `")
    return path.rstrip("`") if marker else None


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    try:
        response = await handler(request)
    except errors.MlserveError as exc:
        response = from_error(exc)
    except web.HTTPException as exc:
        response = from_http_exception(exc)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        response = json_error(500, "internal server error")
    route = request.match_info.route.name
    if route in METERED_ENDPOINTS:
        served = request.get(SERVED)
        model, version = (served.spec.name, served.spec.version) if served is not None else ("", "")
        request.app[METRICS].observe_request(model, version, route, response.status, time.perf_counter() - started)
    return response
