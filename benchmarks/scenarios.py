"""What gets measured: the scenario catalogue, filters and the time budget.

Why separate: the plan (which servers, which concurrencies, how long) is
decided before anything starts, so the harness can print an honest time
estimate and refuse silly combinations up front instead of 8 minutes in.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass


IRIS = "iris_classifier"
IMAGES = "image_classifier"
# Iris feature ranges (min, max), as wrk/common.lua draws them: every request a different row.
IRIS_RANGES = ((4.3, 7.9), (2.0, 4.4), (1.0, 6.9), (0.1, 2.5))
# Their names, as scikit-learn's iris data set (and so the MLflow models' signatures) call them.
IRIS_COLUMNS = ("sepal length (cm)", "sepal width (cm)", "petal length (cm)", "petal width (cm)")
REGISTRY_MODEL = "iris"
REGISTRY_ALIAS = "champion"
"""The run's MLflow registry holds the disk iris versions as ``iris`` "1" and "2"; the alias is on "1"."""
PEER_VERSION = "1.7.1"


@dataclass(frozen=True)
class Scenario:
    """One server configuration; all its concurrency points share one server start."""

    name: str
    kind: str  # "floor", "mlserve", or "mlserver" (the peer, MLServer)
    version: str  # model_version sent by wrk (the floor ignores it)
    batching: bool | None  # None for the floor
    model: str = IRIS
    baseline: bool = False
    """Served by the ``--baseline`` command (another build of mlserve) rather than this one."""
    closed_only: bool = False
    """Skip the open-loop points (``--closed-only``), for quick before/after comparisons."""
    cache: str | None = None
    """The prediction cache: None (off), "l1" (in-process only), "redis" (Redis only, L1 off), or
    "l1+redis". The harness starts a redis-server of its own for the Redis ones."""
    distinct: int = 0
    """Rows drawn from this many distinct rows (cache hits once warm); 0: a fresh row every request."""
    outage: bool = False
    """Measure in one-second slices at 64 connections while the run's Redis is killed and restarted."""
    points: tuple[int, ...] | None = None
    """Concurrency points of its own (the cache scenarios run at 64 only), else the run's."""
    prediction_log: bool = False
    """The prediction log on (metadata only, every request), written to a file in the scenario's temp dir."""
    experiment: str | None = None
    """A traffic experiment (its JSON document) on the model, saved in the state file the server starts
    from; wrk then names no version and sends a random ``X-User-ID`` with every request."""
    registry: bool = False
    """Served from the run's MLflow registry as ``models:/MODEL@champion`` instead of from the disk
    repository; ``version`` is the registry version the alias points to, and requests name none."""
    protocol: str = "predict"
    """How requests reach the model: ``predict`` (``POST /predict``), ``invocations`` (MLflow's
    scoring protocol, a one-row ``dataframe_split`` body; the URL names model and version) or ``v2``
    (the Open Inference Protocol: ``POST /v2/models/MODEL/versions/V/infer``, a one-row JSON tensor as
    MLServer is sent, or ``rows_per_request`` rows as binary tensor data)."""
    rows_per_request: int = 1
    """Rows each request carries; above 1 the reference table also compares rows/s."""
    reference: str | None = None
    """The scenario this one is read against at the same concurrency (req/s, p50 and p99 ratios)."""
    open_loop_at: str | None = None
    """Open-loop points at that scenario's arrival rates rather than at its own capacity's, run just
    after that scenario's, on a second start of this server: the floor's tails at v1-on's rates."""
    frontends: int = 1
    """Processes sharing the port: mlserve's ``--frontends`` (the run's ``--workers`` split between them),
    or the floor's ``--workers``; above 1 the kernel spreads connections over them (SO_REUSEPORT)."""
    executor: str = "pool"
    """Where mlserve runs batches (``[batching] executor``): ``pool``, the worker processes, or ``inline``,
    each front end's own process."""

    @property
    def open_loop(self) -> bool:
        """Batching-on mlserve scenarios also get open-loop points (latency against arrival rate), and
        a scenario that takes another's rates (``open_loop_at``) does, when that one is in the run."""
        if self.open_loop_at is not None:
            return not self.closed_only
        return (
            self.kind == "mlserve"
            and self.batching is True
            and not self.closed_only
            and self.cache is None
            and self.experiment is None
        )

    def concurrency(self, default: list[int]) -> list[int]:
        return list(self.points) if self.points is not None else default

    @property
    def names_version(self) -> bool:
        """Whether requests name the version; under an experiment its routing picks, from the registry the alias."""
        return self.experiment is None and not self.registry

    @property
    def needs_redis(self) -> bool:
        return self.cache is not None and "redis" in self.cache

    @property
    def peer_model(self) -> str:
        """The model's name inside MLServer's repository."""
        return f"iris-{self.version}"

    @property
    def images(self) -> bool:
        return self.model == IMAGES

    @property
    def path(self) -> str:
        if self.kind == "mlserver":
            return f"/v2/models/{self.peer_model}/infer"
        if self.images:
            return f"/predict/image?model={self.model}&model_version={self.version}"
        if self.protocol == "invocations":
            return f"/invocations?model={self.model}&version={self.version}"
        if self.protocol == "v2":
            return f"/v2/models/{self.model}/versions/{self.version}/infer"
        return "/predict"

    @property
    def script(self) -> str:
        """The wrk Lua script: a fresh iris row, or the next of many distinct PNGs, per request."""
        if self.kind == "mlserver" or (self.protocol == "v2" and self.rows_per_request == 1):
            return "v2infer.lua"
        if self.protocol == "v2":
            return "v2binary.lua"
        if self.protocol == "invocations":
            return "invocations.lua"
        return "image.lua" if self.images else "predict.lua"

    @property
    def ready_path(self) -> str:
        return "/v2/health/ready" if self.kind == "mlserver" else "/health/ready"

    @property
    def frontend_series(self) -> str | None:
        """The line of the front-ends table and plot this scenario is a point of: ``floor`` (by its
        processes) or the executor of plain iris v1 with batching on, whatever its front ends; None for
        any other, whose req/s says something besides what more front ends buy."""
        if self.kind == "floor":
            return "floor"
        plain = dataclasses.replace(self, name=PLAIN_V1.name, closed_only=False, points=None, reference=None,
                                    open_loop_at=None, frontends=1, executor="pool")
        return self.executor if plain == PLAIN_V1 else None

    def _processes(self) -> str:
        """The label's word on front ends and executor, empty for the one-process pool default."""
        text = f", {self.frontends} {'processes' if self.kind == 'floor' else 'front ends'}" if (
            self.frontends > 1) else ""
        return text + (", inline executor" if self.executor == "inline" else "")

    @property
    def label(self) -> str:
        if self.kind == "floor":
            return "HTTP floor (bare aiohttp)" + self._processes()
        if self.kind == "mlserver":
            return f"MLServer {PEER_VERSION} {self.version} adaptive batching"
        name = "image" if self.images else self.version
        if self.registry:
            name = f"MLflow {self.model}@{REGISTRY_ALIAS} ({self.version})"
        suffix = " (baseline build)" if self.baseline else ""
        if self.protocol != "predict":
            suffix += f" via /{self.protocol}"
        if self.rows_per_request > 1:
            suffix += f", {self.rows_per_request} rows a request (binary)"
        if self.cache is not None:
            rows = f"{self.distinct} distinct rows" if self.distinct else "every row new"
            suffix += f" cache={self.cache}, {rows}{', Redis killed mid-run' if self.outage else ''}"
        if self.experiment is not None:
            suffix += f" experiment {self.experiment}"
        if self.prediction_log:
            suffix += " prediction log on"
        return f"{name} batching={'on' if self.batching else 'off'}{suffix}{self._processes()}"

    @property
    def env(self) -> dict[str, str]:
        """Env vars that define the scenario (batching off = max batch size 1)."""
        env: dict[str, str] = {}
        if self.kind == "mlserve" and self.batching is False:
            env["MLSERVE_BATCHING__MAX_BATCH_SIZE"] = "1"
        if self.cache is not None:
            env["MLSERVE_CACHE__ENABLED"] = "true"
            if self.cache == "redis":
                env["MLSERVE_CACHE__L1_ENTRIES"] = "0"
        if self.prediction_log:
            env["MLSERVE_PREDICTION_LOG__ENABLED"] = "true"
        if self.kind == "mlserve" and self.executor != "pool":
            env["MLSERVE_BATCHING__EXECUTOR"] = self.executor
        return env


PLAIN_V1 = Scenario("v1-on", "mlserve", "v1", True)
"""The served configuration that the front-end scenarios vary only in front ends and executor."""
FRONTEND_CONCURRENCY = 64
"""Connections the front-end points run at: enough to keep every front end busy, as the headline's are."""


def frontend_scenario(series: str, count: int) -> Scenario:
    """The floor at ``count`` processes (``series`` "floor"), or plain v1 on ``count`` front ends with
    that executor: named ``floor-fe2``, ``v1-fe2``, ``v1-fe2-inline``, at 64 connections, closed loop only
    (more front ends move the capacity, which the closed loop measures; the open loop's rates follow it)."""
    points = (FRONTEND_CONCURRENCY,)
    if series == "floor":
        return Scenario(f"floor-fe{count}", "floor", "v1", None, frontends=count, closed_only=True, points=points)
    suffix = "" if series == "pool" else f"-{series}"
    return dataclasses.replace(PLAIN_V1, name=f"v1-fe{count}{suffix}", frontends=count, executor=series,
                               closed_only=True, points=points)


CACHE_DISTINCT = 1000
"""Distinct rows the cache-hit scenarios draw from: warm after the warm-up, a small working set."""
SPLIT = '{"variants": {"v1": 1.0, "v2": 0.0}, "salt": "bench"}'
SHADOWED = '{"variants": {"v1": 1.0}, "shadow": {"version": "v2", "fraction": 0.1}}'
OUTAGE_SLICES = (3, 5, 4)
"""One-second slices of the outage scenario: Redis up, killed, restarted."""

# Order matters a little on a noisy box: the floor goes first so every later
# ratio uses a floor measured minutes, not hours, apart; its open-loop points
# wait for v1-on's capacity and run right after v1-on's, on a second start.
CATALOGUE: tuple[Scenario, ...] = (
    Scenario("floor", "floor", "v1", None, open_loop_at="v1-on"),
    Scenario("v1-on", "mlserve", "v1", True),
    # Two front ends on one port, batches in the worker pool and in the front ends themselves, at 64
    # connections: read against the single-process floor and v1-on in the front-ends table.
    frontend_scenario("pool", 2),
    frontend_scenario("inline", 2),
    Scenario("v1-off", "mlserve", "v1", False),
    Scenario("v2-on", "mlserve", "v2", True),
    Scenario("v2-off", "mlserve", "v2", False),
    Scenario("image-on", "mlserve", "v1", True, IMAGES),
    Scenario("image-off", "mlserve", "v1", False, IMAGES),
    # The prediction cache, at 64 connections, each against v1-on (cache off) in the same run.
    Scenario("v1-cache-hit", "mlserve", "v1", True, cache="l1", distinct=CACHE_DISTINCT, points=(64,)),
    Scenario("v1-cache-hit-redis", "mlserve", "v1", True, cache="redis", distinct=CACHE_DISTINCT, points=(64,)),
    Scenario("v1-cache-miss", "mlserve", "v1", True, cache="l1", points=(64,)),
    Scenario("v1-cache-miss-redis", "mlserve", "v1", True, cache="l1+redis", points=(64,)),
    # The same with two front ends sharing the cache (hits and single-flight through their shared
    # table), each against v1-fe2 (two front ends, cache off).
    Scenario("v1-cache-hit-fe2", "mlserve", "v1", True, cache="l1", distinct=CACHE_DISTINCT, points=(64,), frontends=2),
    Scenario("v1-cache-miss-fe2", "mlserve", "v1", True, cache="l1", points=(64,), frontends=2),
    Scenario("v1-cache-outage", "mlserve", "v1", True, cache="redis", distinct=CACHE_DISTINCT, outage=True,
             points=()),
    # Traffic experiments, at 64 connections: every call assigned by user (all to v1, so the model's
    # cost is the same) against v1-on, and the same with 10% of calls copied to v2 in the shadow
    # against that (the copies' cost alone).
    Scenario("v1-experiment", "mlserve", "v1", True, experiment=SPLIT, points=(64,), reference="v1-on"),
    Scenario("v1-shadow", "mlserve", "v1", True, experiment=SHADOWED, points=(64,), reference="v1-experiment"),
    # The prediction log's cost, at 64 connections, against v1-on (log off): a line for every request.
    Scenario("v1-log", "mlserve", "v1", True, prediction_log=True, closed_only=True, points=(64,),
             reference="v1-on"),
    # The same v1 estimator by other ways, at 64 connections, against v1-on: from an MLflow registry
    # (the run logs one, once, when a scenario needs it), and through MLflow's scoring protocol.
    Scenario("mlflow-v1", "mlserve", "1", True, REGISTRY_MODEL, registry=True, closed_only=True, points=(64,),
             reference="v1-on"),
    Scenario("v1-invocations", "mlserve", "v1", True, protocol="invocations", closed_only=True, points=(64,),
             reference="v1-on"),
    # The Open Inference Protocol (v2): one JSON row a request against /predict, and 64 rows a request as
    # binary tensor data against 64 one-row JSON requests (rows/s is its figure of merit). v2-v2 is the iris
    # v2 model the same way, so that ``--peers`` compares both models with MLServer on its own protocol.
    Scenario("v1-v2", "mlserve", "v1", True, protocol="v2", closed_only=True, points=(64,), reference="v1-on"),
    Scenario("v1-v2-binary64", "mlserve", "v1", True, protocol="v2", rows_per_request=64, closed_only=True,
             points=(64,), reference="v1-v2"),
    Scenario("v2-v2", "mlserve", "v2", True, protocol="v2", closed_only=True, points=(64,), reference="v2-on"),
)
# The peers run only when asked for (``--peers`` or ``make bench-peers``): they need their own venv.
PEERS: tuple[Scenario, ...] = (
    Scenario("mlserver-v1", "mlserver", "v1", True),
    Scenario("mlserver-v2", "mlserver", "v2", True),
)
PEER_BASELINES = ("floor", "v1-on", "v2-on", "v1-v2", "v2-v2")
DEFAULT_CONCURRENCY: tuple[int, ...] = (1, 16, 64, 256)
# Open-loop arrival rates, as fractions of the same server's best closed-loop req/s at up to 64
# connections in this run.
OPEN_LOOP_FRACTIONS: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)


def open_loop_runs(scenarios: list[Scenario]) -> list[Scenario]:
    """The scenarios that get open-loop points in a run of ``scenarios``: one that takes another's
    rates only when that one is in the run (and gets open-loop points itself)."""
    own = [s for s in scenarios if s.open_loop and s.open_loop_at is None]
    names = {s.name for s in own}
    return own + [s for s in scenarios if s.open_loop and s.open_loop_at in names]


@dataclass(frozen=True)
class Timing:
    """Per-point durations; ``quick`` trades precision for a ~1-2 minute smoke run."""

    duration_s: float
    warmup_s: float
    offline_s: float
    open_loop_s: float

    @classmethod
    def default(cls, quick: bool) -> Timing:
        if quick:
            return cls(duration_s=3.0, warmup_s=1.0, offline_s=0.5, open_loop_s=2.0)
        return cls(duration_s=10.0, warmup_s=2.0, offline_s=2.0, open_loop_s=6.0)


def select(patterns: str | None, peers: bool = False) -> list[Scenario]:
    """Filter the catalogue by comma-separated names or globs (``v1-*,floor``).

    With no patterns: every mlserve scenario, or with ``peers`` the peers beside the scenarios
    they are compared with.
    """
    every = CATALOGUE + PEERS
    if not patterns:
        if peers:
            return [s for s in CATALOGUE if s.name in PEER_BASELINES] + list(PEERS)
        return list(CATALOGUE)
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = [s for s in every if any(fnmatch.fnmatchcase(s.name, p) for p in wanted)]
    unknown = [p for p in wanted if not any(fnmatch.fnmatchcase(s.name, p) for s in every)]
    if unknown:
        names = ", ".join(s.name for s in every)
        raise ValueError(f"unknown scenario(s) {unknown}; choose from: {names}")
    return chosen


def with_baseline(chosen: list[Scenario]) -> list[Scenario]:
    """Each chosen mlserve scenario followed by its twin on the baseline build, for before/after."""
    paired: list[Scenario] = []
    for scenario in chosen:
        paired.append(scenario)
        if scenario.kind == "mlserve":
            reference = f"{scenario.reference}@baseline" if scenario.reference else None
            paired.append(dataclasses.replace(scenario, name=f"{scenario.name}@baseline", baseline=True,
                                              reference=reference))
    return paired


def parse_concurrency(text: str | None) -> list[int]:
    """``"1,16,64"`` -> [1, 16, 64]; sorted, deduplicated, all >= 1."""
    return parse_counts(text, "concurrency") if text else list(DEFAULT_CONCURRENCY)


def parse_counts(text: str, what: str) -> list[int]:
    """``"4,1,2,2"`` -> [1, 2, 4]: sorted, deduplicated, all >= 1 (``what`` names them in the error)."""
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        values = []
    if not values or values[0] < 1:
        raise ValueError(f"{what} values must be integers >= 1, got {text!r}")
    return values


FRONTEND_SERIES = ("floor", "pool", "inline")
"""The lines of the front-ends sweep, in the order each count's scenarios run."""


def with_frontends(chosen: list[Scenario], counts: list[int], concurrency: list[int]) -> list[Scenario]:
    """``chosen`` plus, for each count, the floor at that many processes and v1 on that many front ends
    with each executor (``frontend_scenario``), left out where a chosen scenario measures the same at 64
    connections already (v1-on is the one-front-end pool point, the floor the one-process floor).

    The added ones run right after the last chosen scenario of the sweep's lines (else at the end), so
    that the points read against each other are measured minutes apart.
    """
    def key(s: Scenario) -> tuple[str | None, int]:
        return s.frontend_series, s.frontends

    measured = {key(s) for s in chosen if FRONTEND_CONCURRENCY in s.concurrency(concurrency)}
    added = [frontend_scenario(series, count) for count in counts for series in FRONTEND_SERIES
             if (series, count) not in measured]
    names = {s.name for s in chosen}
    added = [s for s in added if s.name not in names]
    last = max((i for i, s in enumerate(chosen) if s.frontend_series is not None), default=len(chosen) - 1)
    return chosen[: last + 1] + added + chosen[last + 1 :]


def estimate_seconds(
    scenarios: list[Scenario], concurrency: list[int], timing: Timing, offline: bool
) -> float:
    """Rough wall-clock estimate: load time + ~0.5 s per point + ~5 s per server start/stop."""
    per_point = timing.duration_s + timing.warmup_s + 0.5
    open_loop = open_loop_runs(scenarios)
    open_points = len(open_loop) * len(OPEN_LOOP_FRACTIONS)
    per_open_point = timing.open_loop_s + 2.5  # the generator's own start and warm-up second
    servers = (len(scenarios) + sum(s.open_loop_at is not None for s in open_loop)) * 5.0
    training = 25.0 if any(s.kind == "mlserve" for s in scenarios) else 0.0
    registry = 25.0 if any(s.registry for s in scenarios) else 0.0
    offline_s = (6 * timing.offline_s + 8.0) if offline else 0.0
    closed = sum(len(s.concurrency(concurrency)) for s in scenarios) * per_point
    outage = sum(s.outage for s in scenarios) * (sum(OUTAGE_SLICES) + 3 * timing.warmup_s)
    return closed + open_points * per_open_point + servers + training + registry + offline_s + outage
