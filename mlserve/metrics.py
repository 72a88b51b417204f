"""Every metric, defined once on a registry owned by the app (no process-global collectors).

aioprometheus owns the registry, the exposition formats and ``/metrics``. The hot path does not
call it: an aioprometheus observation re-encodes its label dict and walks every bucket, which cost
~15 us a request, a fifth of the front end's budget for the cheap model. Instead each labelled
series is a small accumulator, resolved once per label set, that costs a bisect and three adds; the
accumulators are copied into the aioprometheus collectors when ``/metrics`` is scraped. Gauges that
describe state (queue depth, live workers) are also refreshed at scrape time.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence

from aiohttp import web
from aioprometheus import Counter, Gauge, Histogram, Registry
from aioprometheus import histogram as prometheus_histogram
from aioprometheus.renderer import render

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

Labels = dict[str, str]


class Series:
    """One labelled histogram series; ``observe`` is the only thing the hot path calls."""

    __slots__ = ("bounds", "counts", "total", "observations")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0
        self.observations = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.observations += 1

    def export(self, target: prometheus_histogram.Histogram) -> None:
        running = 0
        for bound, count in zip(target.buckets, self.counts):
            running += count
            target.buckets[bound] = running
        target.sum = self.total
        target.observations = self.observations


class RequestRecorder:
    """Count and duration of requests of one (model, version, endpoint, status)."""

    __slots__ = ("count", "duration")

    def __init__(self, duration: Series) -> None:
        self.count = 0
        self.duration = duration

    def record(self, seconds: float) -> None:
        self.count += 1
        self.duration.observe(seconds)


class VariantRecorder(RequestRecorder):
    """A request recorder that also records into an experiment variant's series."""

    __slots__ = ("base",)

    def __init__(self, base: RequestRecorder, variant: Series) -> None:
        super().__init__(variant)
        self.base = base

    def record(self, seconds: float) -> None:
        self.base.record(seconds)
        super().record(seconds)


class _HistogramFamily:
    """A histogram collector and its accumulators, one a label set, each paired with its exported object."""

    def __init__(self, collector: Histogram, bounds: Sequence[float]) -> None:
        self.collector = collector
        self.bounds = bounds
        self.series: dict[tuple[str, ...], tuple[Series, prometheus_histogram.Histogram]] = {}

    def get(self, labels: Labels) -> Series:
        key = tuple(labels.values())
        entry = self.series.get(key)
        if entry is None:
            target = prometheus_histogram.Histogram(*self.bounds)
            self.collector.set_value(dict(labels), target)
            entry = self.series[key] = (Series(self.bounds), target)
        return entry[0]

    def export(self) -> None:
        for series, target in self.series.values():
            series.export(target)


class Metrics:
    def __init__(self) -> None:
        self.registry = Registry()
        self._requests = Counter(
            "mlserve_requests_total", "Requests answered, by model, version, endpoint and status.", registry=self.registry
        )
        self._recorders: dict[tuple[str, str, str, int], RequestRecorder] = {}
        self.request_duration = self._histogram(
            "mlserve_request_duration_seconds",
            "Time from reading a request to having its answer, by model, version and endpoint.",
            LATENCY_BUCKETS,
        )
        self.queue_duration = self._histogram(
            "mlserve_queue_duration_seconds",
            "Time a request waited in its batcher before its batch was dispatched.",
            LATENCY_BUCKETS,
        )
        self.inference_duration = self._histogram(
            "mlserve_inference_duration_seconds",
            "Model compute time of one batch, measured inside the worker process.",
            LATENCY_BUCKETS,
        )
        self.batch_size = self._histogram("mlserve_batch_size", "Rows per dispatched batch.", BATCH_BUCKETS)
        self.queue_depth = self._gauge("mlserve_queue_depth", "Requests waiting in a batcher's queue.")
        self.workers_live = self._gauge("mlserve_workers_live", "Worker processes alive and serving.")
        self.worker_restarts = self._gauge("mlserve_worker_restarts", "Worker processes restarted since start.")
        self.workers_hung = self._gauge(
            "mlserve_workers_hung", "Workers killed because a batch ran past its max_compute_s, since start."
        )
        self.model_info = self._gauge(
            "mlserve_model_info", "1 for each known model version, labelled with its state and whether it is active."
        )
        self.model_accuracy = self._gauge("mlserve_model_accuracy", "Held-out accuracy from the version's metadata.")
        self.load_duration = self._gauge(
            "mlserve_model_load_seconds", "Time the last load took to read the artifact (slowest worker)."
        )
        self.warmup_duration = self._gauge(
            "mlserve_model_warmup_seconds", "Time the last load of the version spent warming it up (slowest worker)."
        )
        self.activations = Counter(
            "mlserve_activations_total", "Changes of a model's active version on this replica.", registry=self.registry
        )
        self.source_checks = Counter(
            "mlserve_model_source_checks_total",
            "Looks at the MLflow source of a model whose alias is followed, by model and result "
            "(unchanged, switched, failed: the new version could not be fetched or loaded; unreachable).",
            registry=self.registry,
        )
        self.cache_requests = Counter(
            "mlserve_cache_requests_total",
            "Rows looked up in the prediction cache, by model, version, layer (l1, redis) and result "
            "(hit, miss, error, bypass).",
            registry=self.registry,
        )
        self.cache_breaker_open = self._gauge(
            "mlserve_cache_breaker_open", "1 while the cache's circuit breaker keeps a failing Redis out of the path."
        )
        self.shadow = Counter(
            "mlserve_shadow_total",
            "Calls copied to an experiment's shadow version, by model, primary and shadow version and result "
            "(agree, disagree, error, dropped).",
            registry=self.registry,
        )
        self.shadow_duration = self._histogram(
            "mlserve_shadow_duration_seconds",
            "Time a shadow version took to answer a copied call, from the copy to its answer.",
            LATENCY_BUCKETS,
        )
        self.variant_duration = self._histogram(
            "mlserve_variant_request_duration_seconds",
            "Requests an experiment assigned to a variant (a version), and their duration, by model and variant.",
            LATENCY_BUCKETS,
        )
        self.loop_busy = self._gauge(
            "mlserve_event_loop_busy_ratio",
            "Share of wall time the front end's event loop spent on work rather than waiting for events, "
            "over the last window read (at least 0.1 s); shadow copies stop above shadow_max_loop_busy.",
        )
        self.prediction_log_dropped = Counter(
            "mlserve_prediction_log_dropped_total",
            "Prediction log records lost: a write failed, or the reader of standard output fell behind.",
            registry=self.registry,
        )
        self._on_scrape: list[Callable[[Metrics], None]] = []

    def _gauge(self, name: str, doc: str) -> Gauge:
        return Gauge(name, doc, registry=self.registry)

    def _histogram(self, name: str, doc: str, bounds: Sequence[float]) -> _HistogramFamily:
        return _HistogramFamily(Histogram(name, doc, buckets=bounds, registry=self.registry), bounds)

    def on_scrape(self, refresh: Callable[[Metrics], None]) -> None:
        self._on_scrape.append(refresh)

    def recorder(self, model: str, version: str, endpoint: str, status: int) -> RequestRecorder:
        """The recorder of one label set; resolve it once and keep it where the hot path can reach it."""
        key = (model, version, endpoint, status)
        recorder = self._recorders.get(key)
        if recorder is None:
            duration = self.request_duration.get({"model": model, "version": version, "endpoint": endpoint})
            recorder = self._recorders[key] = RequestRecorder(duration)
        return recorder

    def variant_recorder(self, model: str, version: str, endpoint: str) -> RequestRecorder:
        """The success recorder of calls an experiment assigned to ``version``: counted as every
        answered request is, and in the variant's own series."""
        return VariantRecorder(
            self.recorder(model, version, endpoint, 200), self.variant_duration.get({"model": model, "variant": version})
        )

    def _export(self) -> None:
        for refresh in self._on_scrape:
            refresh(self)
        for (model, version, endpoint, status), recorder in self._recorders.items():
            labels = {"model": model, "version": version, "endpoint": endpoint, "status": str(status)}
            self._requests.set_value(labels, recorder.count)
        families = (
            self.request_duration,
            self.queue_duration,
            self.inference_duration,
            self.batch_size,
            self.shadow_duration,
            self.variant_duration,
        )
        for family in families:
            family.export()

    async def handle(self, request: web.Request) -> web.Response:
        self._export()
        content, headers = render(self.registry, request.headers.getall("Accept", []))
        return web.Response(body=content, headers=headers)

    def text(self) -> str:
        """This process's figures in Prometheus's text format."""
        self._export()
        content, _ = render(self.registry, [])
        return content.decode()
