"""What the OpenAPI document says about one route, declared beside the handler that serves it.

Each handler module lists its routes in a module-level ``DOCS`` tuple; ``api/docs.py`` turns every
module's list into ``/openapi.json``, with schemas generated from the msgspec Structs named here, so
the document cannot drift from the wire types. A test checks that every route the app serves is
documented.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

JSON = "application/json"


@dataclass(frozen=True)
class RouteDoc:
    method: str
    """``GET``, ``POST``, ``PUT`` or ``DELETE``."""
    path: str
    """As registered with aiohttp: ``/v2/models/{name}/infer``."""
    summary: str
    request: type | None = None
    """The msgspec Struct of a JSON body; None when the route takes no body or a non-JSON one."""
    request_types: tuple[str, ...] = ()
    """Content types of a body that is not (only) a JSON Struct: ``text/csv``, ``image/*``, ``application/octet-stream``."""
    response: type | None = None
    """The msgspec Struct of the 200 answer; None for a non-JSON answer (``response_type``)."""
    response_type: str = JSON
    errors: tuple[int, ...] = ()
    """Statuses the route answers with its protocol's error body besides 200."""
    also: tuple[int, ...] = ()
    """Statuses besides 200 answered with the 200 answer's own body (``/health/ready``'s 503 while loading)."""
    error: type | None = None
    """The error body's Struct; None: the server's ``ErrorResponse``."""
    admin: bool = False
    """Needs the admin bearer token (401/403 are then among its answers)."""
    tag: str = ""
    """The group it is listed under on the docs page (``predict``, ``admin``, ``v2``, ``mlflow``...)."""
    query: tuple[str, ...] = ()
    """Query parameters it reads (all optional strings)."""
    example: Any = None
    """A JSON body that succeeds on the demo models: the docs page's "Try it out" starts from it."""
