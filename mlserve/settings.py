"""Every knob the server has, read once from a TOML file and ``MLSERVE_*`` environment variables.

Precedence, lowest first: defaults, the TOML file (``--config`` or ``MLSERVE_CONFIG``), environment
variables, command-line flags. A nested field is set from the environment with a double underscore:
``MLSERVE_BATCHING__MAX_BATCH_SIZE=1`` turns batching off. Per-model overrides live only in the TOML
file (``[models.NAME]`` and ``[models.NAME.batching]``).

Batching knobs merge in this order: ``BatchingSettings`` defaults, the model's own ``model.toml``,
the operator's ``[batching]``, the operator's ``[models.NAME.batching]``. The operator's tables hold
only the fields actually set, so a model's declared knobs survive unless an operator overrides them.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec

from mlserve.errors import SettingsError

ENV_PREFIX = "MLSERVE_"

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
Device = Literal["auto", "cpu", "cuda"]
Preload = Literal["all", "active"] | list[str]


class Secret:
    """A value that must never be printed: its ``repr`` and ``str`` hide it; ``reveal`` gives it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__


def _decode_custom(kind: type, value: Any) -> Any:
    if kind is Secret and isinstance(value, str):
        return Secret(value)
    raise NotImplementedError(f"cannot read {kind.__name__} from {type(value).__name__}")


class BatchingSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """How one (model, version) batcher coalesces requests; see DESIGN.md, "The batcher".

    ``max_batch_size`` counts rows, not requests. ``max_delay_ms`` only makes a small batch wait for
    mates while a worker slot is free; 0 means eager dispatch. ``max_queue`` counts queued requests.
    ``max_inflight`` defaults to the number of workers. ``overlap_after_ms``: how long a running
    batch has the workers to itself before a batch that is not full may run beside it; 0 sends a
    batch whenever a slot is free. ``max_compute_s``: a batch that a worker has been computing for
    longer fails its callers with 504 and the worker is killed and replaced (a model that hangs).
    """

    max_batch_size: PositiveInt = 64
    max_delay_ms: NonNegativeFloat = 0.0
    max_queue: PositiveInt = 2048
    max_inflight: PositiveInt | None = None
    overlap_after_ms: NonNegativeFloat = 2.0
    max_compute_s: PositiveFloat = 60.0
    executor: Literal["pool", "inline", "auto"] = "pool"
    """Where batches run: ``pool``, the worker processes; ``inline``, the front end's own process, for a
    model whose batch costs less than the trip to a worker (see ``mlserve.inline``); ``auto``, inline
    if a warm batch of ``max_batch_size`` rows measures under ``mlserve.inline.INLINE_BELOW_S`` at load."""


def _check_batching(knobs: Mapping[str, float | str]) -> None:
    try:
        msgspec.convert(knobs, BatchingSettings, strict=False)
    except msgspec.ValidationError as exc:
        raise ValueError(f"batching: {exc}") from None


def _check_redis_url(url: Secret) -> None:
    """A Redis URL the client will take, checked at start; the message never shows the URL (it may
    hold a password)."""
    scheme, separator, _ = url.reveal().partition("://")
    if not separator or scheme not in ("redis", "rediss", "unix"):
        raise ValueError("redis_url and cache.redis_url must start with redis://, rediss:// or unix://")


class CacheSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The prediction cache (``[cache]``); see ``mlserve.cache``."""

    enabled: bool = False
    """Off by default: a model whose output is not a function of its input must not be cached."""
    l1_entries: Annotated[int, msgspec.Meta(ge=0)] = 100_000
    """Rows the in-process LRU holds; 0 turns it off (Redis only)."""
    ttl_s: PositiveFloat = 300.0
    redis_url: Secret | None = None
    """Redis for the shared cache; default: the state store's ``redis_url``. None of either: L1 only."""
    redis_timeout_ms: PositiveFloat = 20.0
    """A Redis lookup slower than this counts as a miss."""


class HttpSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Limits on client connections (``[http]``), so that thousands of idle or trickling connections
    cannot starve real clients; see ``mlserve.connections``."""

    max_header_bytes: PositiveInt = 8192
    """The longest request line or header field (name and value); a longer one is answered 431. It
    bounds what a client makes the server buffer before its request is even routed."""
    keepalive_timeout_s: PositiveFloat = 75.0
    """A connection that has not sent its next complete request head this long after its previous
    answer (or after it was accepted) is closed. Keep it above the idle timeout of any load balancer
    in front (AWS ALB's is 60 s): one that reuses a connection the server is just closing answers its
    client 502."""
    header_timeout_s: PositiveFloat = 10.0
    """A new connection that has not sent its first complete request head this long after it was
    accepted is closed, idle or fed a byte at a time (slowloris): a real client sends its request at
    once, and such connections are the cheapest way to hold the server's."""
    body_timeout_s: PositiveFloat = 60.0
    """A request body not received in full this long after its head is answered 408 and its connection
    closed, so a trickled body cannot hold a request open (60 s takes a 10 MiB image at 1.4 Mbit/s)."""
    backlog: PositiveInt = 2048
    """Connections the kernel queues until the server accepts them (capped by ``net.core.somaxconn``).
    aiohttp's 128 overflows when hundreds connect at once, and a client whose connection attempt is
    dropped retries only a second or more later."""


class PredictionLogSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The prediction log (``[prediction_log]``): one JSON line per prediction; see ``mlserve.predictionlog``."""

    enabled: bool = False
    payloads: bool = False
    """Also log each call's inputs and outputs (an image as its size and sha256). Off by default:
    inputs may be personal data, and they make the lines as large as the requests."""
    sample_rate: Annotated[float, msgspec.Meta(ge=0, le=1)] = 1.0
    """The fraction of predictions logged, drawn at random per request."""
    path: str | None = None
    """The file to append to; None or ``"-"``: standard output (the server's own log goes to stderr)."""
    max_bytes: PositiveInt = 100 << 20
    """A file is rotated (``path.1``, ``path.2``, ...) before a write would take it past this size."""
    backups: Annotated[int, msgspec.Meta(ge=0)] = 5
    """Rotated files kept; 0 keeps none (the file starts over)."""


class ModelCacheSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """``[models.NAME.cache]``: what one model overrides of ``[cache]``."""

    enabled: bool | None = None
    ttl_s: PositiveFloat | None = None


class ModelSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Operator overrides for one model name; they win over the model's own ``model.toml``."""

    source: str | None = None
    """Serve the model from MLflow instead of the repository on disk: ``models:/NAME@ALIAS`` (followed
    as the alias moves), ``models:/NAME/STAGE`` (followed too), ``models:/NAME/VERSION`` or the path
    of a local MLflow model directory."""
    active_version: str | None = None
    """The version that answers at first start; a version activated later is kept in the state store."""
    preload: Preload = "all"
    """Which versions load at start: all of them, only the active one, or those listed (and the
    active one). The others can be loaded or activated later through the admin API."""
    batching: dict[str, float | str] = {}
    cache: ModelCacheSettings = ModelCacheSettings()

    def __post_init__(self) -> None:
        _check_batching(self.batching)


class WorkerOptions(msgspec.Struct, frozen=True):
    """The part of the settings a worker process needs; sent to it once, when it is spawned."""

    threads: int = 1
    device: Device = "auto"
    max_image_pixels: int = 4096 * 4096
    max_memory_mb: int = 0


class Settings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8080
    models_dir: str = "models"
    """The model repository on disk; empty: none (every model comes from its ``source``)."""
    workers: Annotated[int, msgspec.Meta(ge=0)] = 0
    """Worker processes; 0 means one per core."""
    frontends: Annotated[int, msgspec.Meta(ge=0)] = 1
    """Front-end processes sharing the port (``mlserve.frontends``); 0 means one per core that the
    workers leave free, at least one."""
    worker_threads: PositiveInt = 1
    """Threads each worker gives torch/BLAS/OpenMP, so N workers never oversubscribe the cores."""
    worker_start_timeout_s: PositiveFloat = 120.0
    worker_max_memory_mb: Annotated[int, msgspec.Meta(ge=0)] = 0
    """The heap one worker may take (its models and the batches they compute); 0: no limit. A batch
    that would take more fails with 500 and the worker serves on."""
    device: Device = "auto"
    """Where torch models run: ``auto`` takes a CUDA device when one is present, else the CPU."""
    default_model: str | None = None
    request_timeout_ms: PositiveFloat = 10_000.0
    admission: Literal["deadline", "queue"] = "deadline"
    """``deadline``: a request that cannot be answered within its deadline behind the rows queued ahead
    is refused at once (429 with Retry-After); ``queue``: only the bounded queue refuses (503)."""
    max_body_bytes: PositiveInt = 1 << 20
    http: HttpSettings = HttpSettings()
    """Limits on client connections: header size, idle and slow-client timeouts, the listen backlog."""
    max_batch_rows: PositiveInt = 1024
    """Rows one ``/predict/batch`` request may carry (413 beyond)."""
    max_image_bytes: PositiveInt = 10 << 20
    """Bytes of one uploaded image (413 beyond, refused before the body is read in full)."""
    max_image_pixels: PositiveInt = 4096 * 4096
    """Pixels of one image, checked from its header before it is decoded (decompression bombs: 413)."""
    shutdown_timeout_s: PositiveFloat = 30.0
    """How long SIGTERM waits for in-flight requests (aiohttp would read 0 as "wait forever")."""
    drain_delay_s: NonNegativeFloat = 0.0
    """After SIGTERM, how long the server keeps accepting (readiness already answers 503) before it
    stops listening and drains: time for a load balancer's health check to take it out of rotation.
    On Kubernetes the ``preStop`` pause does this and 0 is right; behind HAProxy, a few check intervals."""
    log_level: str = "INFO"
    access_log: bool = False
    """Off by default: aiohttp's access log formats a line per request on the hot path."""
    batching: dict[str, float | str] = {}
    """Knobs forced on every model (fields of ``BatchingSettings``)."""
    models: dict[str, ModelSettings] = {}
    admin_token: Secret | None = None
    """Bearer token the mutating admin routes require. Without one they are open on a loopback
    address and refused (403) on any other."""
    state_path: str | None = None
    """The state file (active versions); default: ``<models_dir>.state.json`` next to the repository."""
    redis_url: Secret | None = None
    """With it, state lives in Redis and every change is published to the other replicas."""
    redis_prefix: str = "mlserve"
    """Prefix of this deployment's Redis keys and channel, so deployments can share one Redis."""
    state_poll_s: PositiveFloat = 5.0
    """How often a replica re-reads the shared state, in case it missed a published change."""
    cache: CacheSettings = CacheSettings()
    prediction_log: PredictionLogSettings = PredictionLogSettings()
    mlflow_tracking_uri: Secret | None = None
    """The MLflow tracking and registry server of models with a ``models:/`` source; default: MLflow's
    own (``MLFLOW_TRACKING_URI``)."""
    mlflow_cache_dir: str | None = None
    """Where registry versions are downloaded to, once each; default: ``$XDG_CACHE_HOME/mlserve/mlflow``."""
    watch_interval_s: PositiveFloat = 10.0
    """How often the registry is asked where each followed alias (or stage) points."""
    shadow_max_loop_busy: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.75
    """Shadow copies are sent only while the event loop was busy less than this share of the last
    tenth of a second: under load they are the first thing dropped (``mlserve.loopload``)."""

    def __post_init__(self) -> None:
        _check_batching(self.batching)
        for url in (self.redis_url, self.cache.redis_url):
            if url is not None:
                _check_redis_url(url)

    @property
    def loopback_only(self) -> bool:
        """Whether the server listens only on a loopback address (so only this machine reaches it)."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def state_file(self) -> str:
        if self.state_path:
            return self.state_path
        if not self.models_dir:
            return os.path.abspath("mlserve.state.json")
        repository = os.path.abspath(self.models_dir)
        return repository.rstrip(os.sep) + ".state.json"

    def cache_for(self, model: str) -> float | None:
        """The TTL of ``model``'s cached predictions, or None when its predictions are not cached."""
        override = self.models.get(model)
        own = override.cache if override else ModelCacheSettings()
        enabled = self.cache.enabled if own.enabled is None else own.enabled
        return (own.ttl_s or self.cache.ttl_s) if enabled else None

    @property
    def caches_any(self) -> bool:
        """Whether some model's predictions may be cached: on for all, or turned on for one."""
        return self.cache.enabled or any(model.cache.enabled for model in self.models.values())

    @property
    def mlflow_cache(self) -> str:
        if self.mlflow_cache_dir:
            return self.mlflow_cache_dir
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return os.path.join(base, "mlserve", "mlflow")

    @property
    def tracking_uri(self) -> str | None:
        """``mlflow_tracking_uri`` revealed, for MLflow's client; None: MLflow's own default."""
        return self.mlflow_tracking_uri.reveal() if self.mlflow_tracking_uri is not None else None

    @property
    def sources(self) -> dict[str, str]:
        """Each model served from MLflow, and its source URI."""
        return {name: model.source for name, model in self.models.items() if model.source}

    @property
    def cache_redis_url(self) -> str | None:
        url = self.cache.redis_url or self.redis_url
        return url.reveal() if url is not None else None

    @property
    def worker_count(self) -> int:
        return self.workers or os.cpu_count() or 1

    @property
    def frontend_count(self) -> int:
        return self.frontends or max(1, (os.cpu_count() or 1) - self.worker_count)

    @property
    def worker_options(self) -> WorkerOptions:
        return WorkerOptions(
            threads=self.worker_threads, device=self.device, max_image_pixels=self.max_image_pixels,
            max_memory_mb=self.worker_max_memory_mb,
        )

    def batching_for(self, model: str, declared: Mapping[str, Any]) -> BatchingSettings:
        """Merge the server defaults, the model's declared knobs and the operator's overrides."""
        merged = dict(declared)
        merged.update(self.batching)
        override = self.models.get(model)
        if override is not None:
            merged.update(override.batching)
        try:
            return msgspec.convert(merged, BatchingSettings, strict=False)
        except msgspec.ValidationError as exc:
            raise SettingsError(f"batching settings for model {model!r}: {exc}") from None


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX) or key == ENV_PREFIX + "CONFIG":
            continue
        path = key[len(ENV_PREFIX) :].lower().split("__")
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SettingsError(f"{key} conflicts with another MLSERVE_ variable")
        node[path[-1]] = value
    return tree


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def load_settings(
    config: str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the one settings object; every invalid value is a ``SettingsError`` naming the field."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    path = config or env.get(ENV_PREFIX + "CONFIG")
    if path:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise SettingsError(f"cannot read config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"config file {path} is not valid TOML: {exc}") from None
    _deep_merge(data, _env_overrides(env))
    _deep_merge(data, {k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return msgspec.convert(data, Settings, strict=False, dec_hook=_decode_custom)
    except msgspec.ValidationError as exc:
        raise SettingsError(f"invalid settings: {exc}") from None
