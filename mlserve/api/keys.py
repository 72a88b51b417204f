"""Typed keys for what the app holds; handlers reach shared state only through these."""

from __future__ import annotations

from aiohttp import web

from mlserve.batcher import BatchResult
from mlserve.cache import PredictionCache
from mlserve.control import ControlPlane
from mlserve.siblings import Role
from mlserve.loopload import LoopLoad
from mlserve.metrics import Metrics
from mlserve.pool import WorkerPool
from mlserve.predictionlog import PredictionLog
from mlserve.registry import Registry, ServedVersion
from mlserve.service import Call, ModelService
from mlserve.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
POOL = web.AppKey("pool", WorkerPool)
REGISTRY = web.AppKey("registry", Registry)
SERVICE = web.AppKey("service", ModelService)
CONTROL = web.AppKey("control", ControlPlane)
CACHE = web.AppKey("cache", PredictionCache)
PREDICTION_LOG = web.AppKey("prediction_log", PredictionLog)
"""Present only when ``[prediction_log] enabled``: its absence is what keeps the log off the request path."""
LOOP_LOAD = web.AppKey("loop_load", LoopLoad)
ROLE = web.AppKey("role", Role)
"""Set only in a front end among several (``mlserve.frontends``, ``mlserve.siblings``)."""
SERVED = web.RequestKey("served", ServedVersion)
"""Request-scoped: the version that answered, so `guard` can label its metrics."""
CALL = web.RequestKey("call", Call)
"""Request-scoped: the prediction call as decoded and routed (its rows, variant), for the prediction log."""
RESULT = web.RequestKey("result", BatchResult)
"""Request-scoped: the call's outputs, for the prediction log's payloads."""
