"""Typed keys for what the app holds; handlers reach shared state only through these."""

from __future__ import annotations

from aiohttp import web

from mlserve.metrics import Metrics
from mlserve.pool import WorkerPool
from mlserve.service import ModelService, ServedVersion
from mlserve.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
POOL = web.AppKey("pool", WorkerPool)
SERVICE = web.AppKey("service", ModelService)
SERVED = "mlserve.served"
"""Request-scoped: the version that answered, so `guard` can label its metrics."""
