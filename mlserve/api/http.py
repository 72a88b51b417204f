"""What every protocol's handlers share: decoding a JSON body, encoding an answer, and the deadline."""

from __future__ import annotations

import math
from typing import Any

import msgspec
from aiohttp import web

from mlserve import schemas
from mlserve.api.errors import validation_path
from mlserve.api.keys import SETTINGS
from mlserve.batcher import NORMAL, PRIORITIES, BatchResult
from mlserve.errors import BadRequest, ValidationFailed

TIMEOUT_HEADER = "X-Request-Timeout-Ms"
PRIORITY_HEADER = "X-Priority"
USER_HEADER = "X-User-ID"
VARIANT_HEADER = "X-Variant"
JSON = "application/json"


def decode(decoder: msgspec.json.Decoder[Any], body: bytes) -> Any:
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise ValidationFailed(str(exc), validation_path(exc)) from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None


def respond(body: msgspec.Struct, status: int = 200) -> web.Response:
    return web.Response(body=schemas.encoder.encode(body), content_type=JSON, status=status)


def wants_fresh(request: web.Request) -> bool:
    """``Cache-Control: no-cache``: skip the cache lookup (the answer is still stored)."""
    return "no-cache" in request.headers.get("Cache-Control", "").lower()


def mark_cached(response: web.Response, result: BatchResult) -> web.Response:
    """``X-Cache: hit`` when every row came from the cache, ``miss`` otherwise."""
    response.headers["X-Cache"] = "hit" if result.cached else "miss"
    return response


JSON_KINDS: dict[type, str] = {
    str: "a string", type(None): "null", bool: "a boolean", int: "a number", float: "a number",
    list: "an array", dict: "an object",
}


def json_kind(value: Any) -> str:
    """What a decoded JSON value is, as an error message names it: ``a string``, ``null``..."""
    return JSON_KINDS.get(type(value), type(value).__name__)


def user_key(request: web.Request, from_body: str | None = None) -> str | None:
    """Who is calling, for a sticky experiment arm: ``X-User-ID``, else ``?user_id=``, else the body's."""
    key = request.headers.get(USER_HEADER) or request.query.get("user_id") or from_body
    if key is not None and len(key) > schemas.MAX_USER_ID_CHARS:
        raise ValidationFailed(f"a user id has at most {schemas.MAX_USER_ID_CHARS} characters", USER_HEADER)
    return key


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


def priority(request: web.Request) -> int:
    """The call's priority from ``X-Priority`` (``high``, ``normal`` or ``low``); normal without one."""
    raw = request.headers.get(PRIORITY_HEADER)
    if raw is None:
        return NORMAL
    level = PRIORITIES.get(raw.strip().lower())
    if level is None:
        raise BadRequest(f"{PRIORITY_HEADER} must be high, normal or low, got {raw!r}")
    return level
