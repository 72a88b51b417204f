"""The prediction log's side of a prediction endpoint: the request id, and one record a request.

``logged`` is what ``metered`` is when the log is on; the routes choose one of the two when the app
is built, so a server with the log off runs exactly the code it ran before the log existed.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

from aiohttp import web

from mlserve.api.errors import (
    CLIENT_CLOSED_REQUEST, ErrorEncoder, Handler, MeteredHandler, error_response, error_text, json_error, observe
)
from mlserve.api.keys import CALL, RESULT, SERVED
from mlserve.batcher import BatchResult
from mlserve.predictionlog import PredictionLog, Record
from mlserve.registry import ServedVersion
from mlserve.service import Call

REQUEST_ID_HEADER = "X-Request-ID"


def logged(handler: MeteredHandler, endpoint: str, log: PredictionLog, encode: ErrorEncoder = json_error) -> Handler:
    """``metered`` that also echoes the request id and adds a record to the prediction log.

    The record is built from what the handler set on the request (``SERVED``, ``CALL``, ``RESULT``);
    an answered request has all three, a failed one whatever was known when it failed.
    """
    payloads = log.payloads
    every = log.sample_rate == 1.0  # spares the common case a call to ``sampled``

    async def guarded(request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        request_id = log.request_id(request.headers.get(REQUEST_ID_HEADER))
        try:
            response, recorder = await handler(request)
        except asyncio.CancelledError:
            elapsed = observe(request, endpoint, CLIENT_CLOSED_REQUEST, started)
            if every or log.sampled():
                log.add(_record(endpoint, request_id, CLIENT_CLOSED_REQUEST, elapsed, payloads,
                                request.get(SERVED), request.get(CALL), request.get(RESULT)))
            raise
        except Exception as exc:
            response = error_response(request, exc, encode)
            elapsed = observe(request, endpoint, response.status, started)
            response.headers[REQUEST_ID_HEADER] = request_id
            if every or log.sampled():
                record = _record(endpoint, request_id, response.status, elapsed, payloads,
                                 request.get(SERVED), request.get(CALL), request.get(RESULT))
                record.error = error_text(response)
                log.add(record)
            return response
        elapsed = time.perf_counter() - started
        recorder.record(elapsed)
        response.headers[REQUEST_ID_HEADER] = request_id
        if every or log.sampled():
            log.add(_record(endpoint, request_id, response.status, elapsed, payloads,
                            request[SERVED], request[CALL], request[RESULT]))
        return response

    return guarded


def _record(
    endpoint: str, request_id: str, status: int, elapsed: float, payloads: bool,
    served: ServedVersion | None, call: Call | None, result: BatchResult | None,
) -> Record:
    """One request's line. A request that failed before it was routed has no model or version; one that
    failed before its call was decoded has no inputs; only an answered one has outputs."""
    cache = None
    if served is not None and served.cache is not None and result is not None:
        cache = "hit" if result.cached else "miss"
    record = Record(
        time.time(),
        request_id,
        endpoint,
        served.spec.name if served is not None else None,
        served.spec.version if served is not None else None,
        call.variant if call is not None else None,
        cache,
        status,
        int(elapsed * 1e6) / 1000,  # milliseconds to the microsecond; round() costs five times as much
    )
    if payloads and call is not None:
        record.inputs = _inputs(call.rows, call.inputs)
        if result is not None and status < 400:
            record.outputs = _outputs(result.values, call.inputs)
    return record


def _inputs(rows: list[Any], kind: str) -> list[Any]:
    """Feature rows as they came; an image as its size and sha256, never its bytes."""
    if kind == "image":
        return [{"bytes": len(image), "sha256": hashlib.sha256(image).hexdigest()} for image in rows]
    return rows


def _outputs(values: list[Any], kind: str) -> list[Any]:
    """Predictions as answered; an image's class and confidence, without its probabilities."""
    if kind == "image":
        return [{"class": value[0], "confidence": value[1]} for value in values]
    return values
