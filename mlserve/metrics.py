"""Every metric, defined once on a registry owned by the app (no process-global collectors).

Per-request updates reuse cached label dicts; gauges that describe state (queue depth, live
workers) are refreshed when ``/metrics`` is scraped, not on every request.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from aioprometheus import Counter, Gauge, Histogram, Registry
from aioprometheus.renderer import render

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

Labels = dict[str, str]


class Metrics:
    def __init__(self) -> None:
        self.registry = Registry()
        self.requests = Counter(
            "mlserve_requests_total", "Requests answered, by model, version, endpoint and status.", registry=self.registry
        )
        self.request_duration = Histogram(
            "mlserve_request_duration_seconds",
            "Time from reading a request to having its answer, by model, version and endpoint.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_duration = Histogram(
            "mlserve_queue_duration_seconds",
            "Time a request waited in its batcher before its batch was dispatched.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inference_duration = Histogram(
            "mlserve_inference_duration_seconds",
            "Model compute time of one batch, measured inside the worker process.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "mlserve_batch_size", "Rows per dispatched batch.", buckets=BATCH_BUCKETS, registry=self.registry
        )
        self.queue_depth = Gauge("mlserve_queue_depth", "Requests waiting in a batcher's queue.", registry=self.registry)
        self.workers_live = Gauge("mlserve_workers_live", "Worker processes alive and serving.", registry=self.registry)
        self.worker_restarts = Gauge(
            "mlserve_worker_restarts", "Worker processes restarted since start.", registry=self.registry
        )
        self._request_labels: dict[tuple[str, str, str, int], Labels] = {}
        self._duration_labels: dict[tuple[str, str, str], Labels] = {}
        self._on_scrape: list[Callable[[Metrics], None]] = []

    def on_scrape(self, refresh: Callable[[Metrics], None]) -> None:
        self._on_scrape.append(refresh)

    def observe_request(self, model: str, version: str, endpoint: str, status: int, seconds: float) -> None:
        key = (model, version, endpoint, status)
        labels = self._request_labels.get(key)
        if labels is None:
            labels = {"model": model, "version": version, "endpoint": endpoint, "status": str(status)}
            self._request_labels[key] = labels
        self.requests.inc(labels)
        duration_labels = self._duration_labels.get(key[:3])
        if duration_labels is None:
            duration_labels = {"model": model, "version": version, "endpoint": endpoint}
            self._duration_labels[key[:3]] = duration_labels
        self.request_duration.observe(duration_labels, seconds)

    async def handle(self, request: web.Request) -> web.Response:
        for refresh in self._on_scrape:
            refresh(self)
        content, headers = render(self.registry, request.headers.getall("Accept", []))
        return web.Response(body=content, headers=headers)
