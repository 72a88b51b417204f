"""Typed keys for what the app holds; handlers reach shared state only through these."""

from __future__ import annotations

from aiohttp import web

from mlserve.cache import PredictionCache
from mlserve.control import ControlPlane
from mlserve.metrics import Metrics
from mlserve.pool import WorkerPool
from mlserve.registry import Registry, ServedVersion
from mlserve.service import ModelService
from mlserve.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
POOL = web.AppKey("pool", WorkerPool)
REGISTRY = web.AppKey("registry", Registry)
SERVICE = web.AppKey("service", ModelService)
CONTROL = web.AppKey("control", ControlPlane)
CACHE = web.AppKey("cache", PredictionCache)
SERVED = web.RequestKey("served", ServedVersion)
"""Request-scoped: the version that answered, so `guard` can label its metrics."""
