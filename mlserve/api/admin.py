"""The admin API: activate, load and unload versions, rescan the repository; each needs the admin token.

The token is compared in constant time and never echoed. Without a configured token the routes are
open only while the server listens on loopback (only this machine reaches it); on any other address
they answer 403 saying how to set one, rather than letting anyone on the network swap models.
Read routes (``/models``) stay open.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import web

from mlserve.api.errors import guard
from mlserve.api.http import respond
from mlserve.api.keys import CONTROL, SETTINGS
from mlserve.api.routedoc import RouteDoc
from mlserve.control import Activation, RescanReport, VersionState
from mlserve.errors import Forbidden, Unauthorized
from mlserve.settings import Settings

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")
NO_TOKEN = (
    "admin routes are closed: the server listens on a non-loopback address and has no admin token; "
    "set MLSERVE_ADMIN_TOKEN (or admin_token in the settings file) and send it as 'Authorization: Bearer <token>'"
)


def authorize(settings: Settings, header: str | None) -> None:
    """Pass, or raise ``Unauthorized`` (wrong or missing token) or ``Forbidden`` (no token set, open network)."""
    token = settings.admin_token
    if token is None:
        if settings.loopback_only:
            return
        raise Forbidden(NO_TOKEN)
    scheme, _, given = (header or "").partition(" ")
    # Digests of equal length, so the comparison time says nothing about the token, not even its length.
    expected = hashlib.sha256(token.reveal().encode()).digest()
    offered = hashlib.sha256(given.strip().encode()).digest()
    if not hmac.compare_digest(offered, expected) or scheme.lower() != "bearer":
        raise Unauthorized("this route needs the admin token: 'Authorization: Bearer <token>'")


def admin(handler: Handler) -> Handler:
    async def checked(request: web.Request) -> web.StreamResponse:
        authorize(request.app[SETTINGS], request.headers.get("Authorization"))
        return await handler(request)

    return guard(checked)


def _target(request: web.Request) -> tuple[str, str]:
    return request.match_info["name"], request.match_info["version"]


async def finish(change: Awaitable[T]) -> T:
    """Run a change to the end even if its caller hangs up: a load cut off halfway would leave a
    version stuck in ``loading``."""
    return await asyncio.shield(asyncio.ensure_future(change))


async def activate(request: web.Request) -> web.Response:
    return respond(await finish(request.app[CONTROL].activate(*_target(request))))


async def load(request: web.Request) -> web.Response:
    return respond(await finish(request.app[CONTROL].load(*_target(request))))


async def unload(request: web.Request) -> web.Response:
    return respond(await finish(request.app[CONTROL].unload(*_target(request))))


async def rescan(request: web.Request) -> web.Response:
    return respond(await finish(request.app[CONTROL].rescan()))


VERSION = "/models/{name}/versions/{version}"
LOAD_ERRORS = (404, 422, 503)
"""Unknown model or version, the version failed to load, a worker or the state store is unavailable."""
DOCS: tuple[RouteDoc, ...] = (
    RouteDoc("POST", f"{VERSION}/activate", "Load and warm the version if needed, then make it the active one",
             response=Activation, errors=LOAD_ERRORS, admin=True, tag="admin"),
    RouteDoc("POST", f"{VERSION}/load", "Load and warm the version on every worker", response=VersionState,
             errors=LOAD_ERRORS, admin=True, tag="admin"),
    RouteDoc("POST", f"{VERSION}/unload", "Drain the version, then free it on every worker (409 for the active "
             "version, or one an experiment uses)", response=VersionState, errors=(404, 409, 503), admin=True,
             tag="admin"),
    RouteDoc("POST", "/models/rescan", "Pick up versions new in the repository, forget removed ones",
             response=RescanReport, errors=(503,), admin=True, tag="admin"),
)


def add_routes(app: web.Application) -> None:
    version = VERSION
    app.router.add_post(f"{version}/activate", admin(activate), name="activate")
    app.router.add_post(f"{version}/load", admin(load), name="load")
    app.router.add_post(f"{version}/unload", admin(unload), name="unload")
    app.router.add_post("/models/rescan", admin(rescan), name="rescan")
