"""Reading one uploaded image: a multipart form field ``file``, or the raw body with an image type.

Bytes are only collected here; decoding happens in a worker. The byte limit is enforced while
reading, so an oversized upload is refused without being held in memory: at once when its
``Content-Length`` says so, else as soon as the bytes read pass the limit.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import BodyPartReader, hdrs, web
from aiohttp.http_exceptions import BadHttpMessage

from mlserve.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from mlserve.images import CONTENT_TYPES

FIELD = "file"
FORM = "multipart/form-data"
FORM_OVERHEAD = 16 << 10
"""Bytes a form may add around its file (boundaries, part headers) before its length alone is too much."""


async def read_image(request: web.Request, limit: int) -> bytes:
    declared = request.content_length
    if request.content_type == FORM:
        if declared is not None and declared > limit + FORM_OVERHEAD:
            raise _too_large(limit)
        return await _from_form(request, limit)
    if request.content_type.startswith("image/"):
        _check_type(request.content_type)
        if declared is not None and declared > limit:
            raise _too_large(limit)
        return _non_empty(await _read_limited(request.content.readany, limit))
    raise UnsupportedMediaType(
        f"send the image as the form field {FIELD!r} of a {FORM} body, or as the raw body with an image "
        f"content type ({', '.join(sorted(CONTENT_TYPES))}); got {request.content_type}"
    )


async def _from_form(request: web.Request, limit: int) -> bytes:
    image: bytes | None = None
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader) or part.name != FIELD or image is not None:
                name = getattr(part, "name", None)
                raise BadRequest(
                    f"unexpected form field {name!r}: the form takes one field, {FIELD!r}, holding the image "
                    "(model and model_version go in the query string)"
                )
            _check_type(part.headers.get(hdrs.CONTENT_TYPE, "application/octet-stream"))
            image = await _read_limited(part.read_chunk, limit)
    except (ValueError, AssertionError) as exc:
        raise BadRequest(f"malformed {FORM} body: {exc}") from None
    except BadHttpMessage as exc:  # a part's headers: no colon, a bad name, too long, too many
        raise BadRequest(f"malformed {FORM} body: {' '.join(exc.message.split())}") from None
    if image is None:
        raise BadRequest(f"the form has no field {FIELD!r}: send the image in it")
    return _non_empty(image)


def _check_type(content_type: str) -> None:
    """An image type the server cannot decode is refused here; others (octet-stream) are sniffed later."""
    base = content_type.partition(";")[0].strip().lower()
    if base.startswith("image/") and base not in CONTENT_TYPES:
        raise UnsupportedMediaType(f"{base} is not supported; send one of {', '.join(sorted(CONTENT_TYPES))}")


async def _read_limited(read: Callable[[], Awaitable[bytes]], limit: int) -> bytes:
    chunks, size = [], 0
    while chunk := await read():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _non_empty(image: bytes) -> bytes:
    if not image:
        raise BadRequest("the image is empty")
    return image


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the image is over the limit of {limit} bytes")
