"""``create_app(settings)``: the one place where the pieces are built and wired together.

Each resource has its own ``cleanup_ctx`` generator, so teardown runs in reverse order and only for
what started. Graceful shutdown comes from aiohttp: on SIGTERM/SIGINT it stops listening, waits up to
``shutdown_timeout_s`` for in-flight requests, and only then runs these teardowns.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import AsyncIterator, Callable

from aiohttp import web
from aiohttp.web_runner import GracefulExit

from mlserve import connections, siblings
from mlserve.api import admin, docs, experiments, health, invocations, models, predict, v2
from mlserve.api.errors import add_fallback_route, guard
from mlserve.api.keys import (
    CACHE, CONTROL, LOOP_LOAD, METRICS, POOL, PREDICTION_LOG, REGISTRY, ROLE, SERVICE, SETTINGS,
)
from mlserve.api.routedoc import RouteDoc
from mlserve.cache import PredictionCache
from mlserve.control import ControlPlane
from mlserve.loopload import LoopLoad
from mlserve.metrics import Metrics
from mlserve.pool import WorkerPool
from mlserve.predictionlog import PredictionLog
from mlserve.registry import Registry
from mlserve.service import ModelService
from mlserve.settings import Settings
from mlserve.sharedtable import open_table
from mlserve.state import open_store

log = logging.getLogger(__name__)


async def _prediction_log_ctx(app: web.Application) -> AsyncIterator[None]:
    """First in, so last out: every request, the late ones of a graceful shutdown too, is written."""
    prediction_log = app[PREDICTION_LOG]
    prediction_log.start()
    yield
    await prediction_log.close()


async def _pool_ctx(app: web.Application) -> AsyncIterator[None]:
    pool = app[POOL]
    await pool.start()
    yield
    await pool.close()


async def _cache_ctx(app: web.Application) -> AsyncIterator[None]:
    yield
    await app[CACHE].close()


async def _control_ctx(app: web.Application) -> AsyncIterator[None]:
    control = app[CONTROL]
    control.start()
    yield
    await control.close(app[SETTINGS].shutdown_timeout_s)


METRICS_DOCS = (RouteDoc("GET", "/metrics", "Prometheus metrics", response_type="text/plain", tag="health"),)


def documented() -> tuple[RouteDoc, ...]:
    """Every route ``create_app`` registers but the docs' own, as ``/openapi.json`` describes them: each
    handler module's ``DOCS``. A new handler module adds its ``DOCS`` here (tests/test_docs.py fails
    on a route that is not documented)."""
    return (
        *predict.DOCS, *models.DOCS, *admin.DOCS, *experiments.DOCS, *health.DOCS, *invocations.DOCS,
        *v2.DOCS,
        *METRICS_DOCS,
    )


GC_YOUNG_THRESHOLD = 20_000
"""Allocations between young-generation collections (Python's default is 700)."""


async def _loop_load_ctx(app: web.Application) -> AsyncIterator[None]:
    app[LOOP_LOAD].attach(asyncio.get_running_loop())
    yield
    app[LOOP_LOAD].detach()


async def _drain_ctx(app: web.Application) -> AsyncIterator[None]:
    """SIGTERM starts the drain: readiness answers 503 at once, and only ``drain_delay_s`` later does
    aiohttp's graceful exit stop listening and wait for the requests in flight.

    aiohttp's own SIGTERM handler (installed before the app starts, removed after it stops) would stop
    listening at once, before a load balancer's health check could see the 503. A second SIGTERM
    exits at once.
    """
    loop = asyncio.get_running_loop()
    delay_s = app[SETTINGS].drain_delay_s

    def begin() -> None:
        if app[CONTROL].draining:
            _graceful_exit()
        app[CONTROL].drain()
        log.info("SIGTERM: readiness answers 503; the server stops listening in %.1fs and drains", delay_s)
        loop.call_later(delay_s, _graceful_exit)

    loop.add_signal_handler(signal.SIGTERM, begin)
    yield


def _graceful_exit() -> None:
    """What aiohttp's signal handler does: raised in a loop callback, it ends ``connections.serve``'s loop."""
    raise GracefulExit()


async def _gc_ctx(app: web.Application) -> AsyncIterator[None]:
    """Keep the garbage collector off the hot path.

    Startup leaves ~45k long-lived objects (aiohttp, numpy, the app) that every full collection
    would scan again; ``gc.freeze`` moves them out of its reach. A request's objects die by reference
    counting, so young collections every 700 allocations mostly found nothing. Measured on the cheap
    model at 64 connections: p99 from 5.0-6.2 ms to 4.0-4.3 ms, throughput within noise.
    """
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *thresholds[1:])
    yield
    gc.set_threshold(*thresholds)
    gc.unfreeze()


def create_app(settings: Settings, role: siblings.Role | None = None) -> web.Application:
    """Build everything and check the repository now; processes start only when the app does.

    ``role`` says which of several front ends this is (``mlserve.siblings``): the state store is
    then shared with its siblings, and ``/metrics`` gathers theirs.

    A bad repository or settings error raises here, before any worker exists: aiohttp does not run
    the teardown of contexts that started when a later one fails to.
    """
    app = web.Application(client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    if role is not None:
        app[ROLE] = role
    app[METRICS] = Metrics()
    app[POOL] = WorkerPool(settings.worker_count, settings.worker_options, settings.worker_start_timeout_s)
    app[REGISTRY] = Registry()
    app[CONTROL] = ControlPlane(settings, app[REGISTRY], app[POOL], open_store(settings, shared=role is not None), app[METRICS])
    app[CONTROL].discover()
    app[METRICS].on_scrape(app[CONTROL].refresh_gauges)
    # Front ends share cached rows through a table in their run directory, when some model caches.
    table = open_table(role.cache_table, settings.cache.l1_entries) if role and settings.caches_any else None
    app[CACHE] = cache = PredictionCache(settings.cache, settings.cache_redis_url, settings.redis_prefix, table)
    app[METRICS].on_scrape(lambda metrics: metrics.cache_breaker_open.set({}, int(cache.breaker_open)))
    app[LOOP_LOAD] = load = LoopLoad(settings.shadow_max_loop_busy)
    app[METRICS].on_scrape(lambda metrics: metrics.loop_busy.set({}, load.share()))
    app[SERVICE] = service = ModelService(app[REGISTRY], cache, app[METRICS], load, settings.default_model)
    app[METRICS].on_scrape(service.shadow.refresh_gauges)
    if settings.prediction_log.enabled:
        app[PREDICTION_LOG] = prediction_log = PredictionLog(settings.prediction_log)
        app[METRICS].on_scrape(lambda metrics: metrics.prediction_log_dropped.set({}, prediction_log.dropped))
        app.cleanup_ctx.append(_prediction_log_ctx)
    if settings.admin_token is None and not settings.loopback_only:
        log.warning("no admin token is set and the server listens on %s, beyond loopback: the admin routes "
            "answer 403 until MLSERVE_ADMIN_TOKEN (or admin_token) is set", settings.host)
    app.cleanup_ctx.append(_pool_ctx)
    app.cleanup_ctx.append(_cache_ctx)
    app.cleanup_ctx.append(_control_ctx)
    app.cleanup_ctx.append(_loop_load_ctx)
    app.cleanup_ctx.append(_drain_ctx)
    app.cleanup_ctx.append(_gc_ctx)
    predict.add_routes(app)
    models.add_routes(app)
    admin.add_routes(app)
    experiments.add_routes(app)
    health.add_routes(app)
    invocations.add_routes(app)
    v2.add_routes(app)
    scrape = app[METRICS].handle if role is None else siblings.whole_server_metrics(app[METRICS], role)
    app.router.add_get("/metrics", guard(scrape), name="metrics")
    docs.add_routes(app, documented())
    add_fallback_route(app)
    return app


def run(settings: Settings, role: siblings.Role | None = None, on_listening: Callable[[], None] | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then drain and stop; as one of several front ends with ``role``."""
    app = create_app(settings, role)
    connections.serve(
        app,
        settings.http,
        host=settings.host,
        port=settings.port,
        reuse_port=role is not None,
        unix_path=None if role is None else role.own_socket,
        on_listening=on_listening,
        # Among several front ends, the kernel sends new connections to any that listens: one that
        # (re)starts joins them only once its models are loaded, so none is sent to it to fail.
        port_after=None if role is None else app[CONTROL].started,
        signals=role is None,
        access_log=logging.getLogger("aiohttp.access") if settings.access_log else None,
        shutdown_timeout=settings.shutdown_timeout_s,
        # A client that hangs up cancels its handler, so its queued rows are dropped, not computed.
        handler_cancellation=True,
    )
