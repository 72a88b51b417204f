"""Liveness (the process answers) and readiness (start-up loading done, every active version serving)."""

from __future__ import annotations

from aiohttp import web

from mlserve.api.errors import guard
from mlserve.api.http import respond
from mlserve.api.keys import CONTROL, REGISTRY
from mlserve.api.routedoc import RouteDoc
from mlserve.schemas import HealthResponse


async def live(request: web.Request) -> web.Response:
    return respond(HealthResponse(status="alive"))


async def ready(request: web.Request) -> web.Response:
    states = request.app[REGISTRY].states()
    if request.app[CONTROL].ready:
        return respond(HealthResponse(status="ready", models=states))
    control = request.app[CONTROL]
    status = "draining" if control.draining else "failed" if "failed" in states.values() else "loading"
    response = respond(HealthResponse(status=status, models=states))
    response.set_status(503)
    return response


DOCS: tuple[RouteDoc, ...] = (
    RouteDoc("GET", "/health/live", "200 while the process is up", response=HealthResponse, tag="health"),
    RouteDoc("GET", "/health/ready", "200 once start-up loading is done and every active version serves; 503 before, and from SIGTERM on",
             response=HealthResponse, also=(503,), tag="health"),
)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/health/live", guard(live), name="health_live")
    app.router.add_get("/health/ready", guard(ready), name="health_ready")
