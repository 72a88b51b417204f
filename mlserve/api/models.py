"""Read-only model listing: ``GET /models`` and ``GET /models/{name}/versions``."""

from __future__ import annotations

from aiohttp import web

from mlserve.api.errors import guard
from mlserve.api.keys import SERVICE
from mlserve.api.predict import respond
from mlserve.errors import ModelNotFound


async def list_models(request: web.Request) -> web.Response:
    return respond(request.app[SERVICE].describe())


async def list_versions(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    found = request.app[SERVICE].describe(name).models
    if not found:
        raise ModelNotFound(f"unknown model {name!r}")
    return respond(found[0])


def add_routes(app: web.Application) -> None:
    app.router.add_get("/models", guard(list_models), name="models")
    app.router.add_get("/models/{name}/versions", guard(list_versions), name="model_versions")
