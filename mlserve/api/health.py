"""Liveness (the process answers) and readiness (every model version loaded and warm)."""

from __future__ import annotations

from aiohttp import web

from mlserve.api.errors import guard
from mlserve.api.keys import SERVICE
from mlserve.api.predict import respond
from mlserve.schemas import HealthResponse


async def live(request: web.Request) -> web.Response:
    return respond(HealthResponse(status="alive"))


async def ready(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    states = service.states()
    if service.ready:
        return respond(HealthResponse(status="ready", models=states))
    status = "failed" if "failed" in states.values() else "loading"
    response = respond(HealthResponse(status=status, models=states))
    response.set_status(503)
    return response


def add_routes(app: web.Application) -> None:
    app.router.add_get("/health/live", guard(live), name="health_live")
    app.router.add_get("/health/ready", guard(ready), name="health_ready")
