"""The control plane: which versions are loaded and which one is active, changed while serving.

Every change goes through here, under one lock per model, in the order load -> warm -> activate ->
drain -> unload:

- *load* broadcasts the version to every worker, which loads and warms it; only then does it get a
  batcher and turn ``ready``. A failed load marks it ``failed`` with the reason and changes nothing
  else.
- *activate* loads first if needed, records the choice in the state store, then moves the active
  pointer in one step. Calls already routed keep the version (and batcher) they were routed to, so a
  switch fails no request; a store that cannot record it leaves the pointer where it was.
- *unload* refuses the active version (and any version an experiment sends calls to), then drains:
  new calls are refused, queued and running batches finish, and only then do the workers drop the
  model.
- *set an experiment* checks the document and that every version it names is ready, records it,
  then hands it to the router in one step; *end* it the same way.

A replica on a shared store hears every change and applies it the same way, without writing it back.

A model served from MLflow (``[models.NAME] source``) has the versions its source resolves to rather
than a directory on disk. Its alias is watched: when it moves, the new version is fetched, loaded and
warmed beside the serving one, activated as above, and the old one drains and unloads; if anything
fails, the old one keeps serving and the source's status says why.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec
import numpy as np

from mlserve import repository
from mlserve.batcher import Batcher, Rows
from mlserve.cache import CacheView
from mlserve.errors import (
    Conflict,
    LoadFailed,
    ModelNotFound,
    PredictionFailed,
    RegistryUnavailable,
    SettingsError,
    StateUnavailable,
    ValidationFailed,
)
from mlserve.experiments import Experiment, check
from mlserve.inline import INLINE_BELOW_S, InlineExecutor
from mlserve.metrics import Metrics
from mlserve.pool import WorkerPool
from mlserve.registry import Registry, ServedVersion
from mlserve.repository import ModelSpec
from mlserve.settings import Settings
from mlserve.sources.mlflow import MlflowSource
from mlserve.state import SharedState, StateStore

log = logging.getLogger(__name__)

MIRROR_QUEUE = 64
"""Shadow calls a version's mirror lane holds waiting; more are dropped, never queued behind."""
MAX_WATCH_BACKOFF_S = 300.0
"""The longest pause between looks at a registry that does not answer (the pause doubles up to it)."""


class Activation(msgspec.Struct):
    model: str
    active_version: str
    previous_version: str | None


class VersionState(msgspec.Struct, omit_defaults=True):
    model: str
    version: str
    state: str
    error: str | None = None


class RescanReport(msgspec.Struct):
    added: list[VersionState]
    """Versions new in the repository, with the state their load (if their preload asks for one) left."""
    removed: list[VersionState]
    """Versions gone from the repository: drained, unloaded and forgotten."""
    missing_active: list[VersionState]
    """Active versions whose files are gone: they keep serving from memory until another is activated."""


def _unchanged(rows: Rows) -> Rows:
    return rows


def _stacker(shape: tuple[int, ...]) -> Callable[[Rows], np.ndarray]:
    def stack(rows: Rows) -> np.ndarray:
        try:
            return np.array(rows, dtype=np.float64).reshape(len(rows), *shape)
        except ValueError as exc:
            raise PredictionFailed(f"could not stack the batch: {exc}") from None

    return stack


class ControlPlane:
    def __init__(
        self, settings: Settings, registry: Registry, pool: WorkerPool, store: StateStore, metrics: Metrics
    ) -> None:
        self._settings = settings
        self._registry = registry
        self._pool = pool
        self._inline = InlineExecutor(settings.worker_options)
        """Runs the batches of versions whose ``executor`` is ``inline``, in this process."""
        self._store = store
        self._metrics = metrics
        self._locks: collections.defaultdict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self._rescan_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._up = asyncio.Event()
        """Set with ``_started``, for whoever waits for start-up loading to end."""
        self.draining = False
        """Set by ``drain`` at SIGTERM; readiness answers 503 from then on."""
        self._refused: dict[str, Experiment] = {}
        """Each model's shared experiment that this replica could not run, so it is not retried at every poll."""
        self.activations: collections.Counter[str] = collections.Counter()
        self.sources = {
            model: MlflowSource(model, uri, settings.tracking_uri, settings.mlflow_cache)
            for model, uri in settings.sources.items()
        }
        """The models served from MLflow, by name."""
        self._failed_target: dict[str, str] = {}
        """Each sourced model's version that failed to fetch or load: tried again only after a move."""
        self.source_checks: collections.Counter[tuple[str, str]] = collections.Counter()
        """Looks at each model's source, by (model, result)."""
        self.unloaded_models: set[str] = set()
        """Models an operator unloaded whole (``unload_model``): they do not hold readiness back."""

    # -- start and stop ------------------------------------------------------------------------------

    def discover(self) -> None:
        """Register every version in the repository and pick first active versions; fast and strict.

        Bad metadata or a configured active version that does not exist stops the server here,
        before it listens, rather than surfacing later as a model that never becomes ready.
        """
        specs = self._scan_disk()
        for spec in specs:
            if spec.name in self.sources:
                raise SettingsError(
                    f"model {spec.name!r} has a source ({self.sources[spec.name].ref.uri}) and versions in the "
                    f"repository {self._settings.models_dir}: serve it from one of them"
                )
            self._register(spec)
        for name in self._registry.models():
            wanted = self._configured_active(name)
            if wanted is not None and self._registry.find(name, wanted) is None:
                raise SettingsError(f"active_version {wanted!r} of model {name!r} is not in the repository")
            self._registry.set_active(name, wanted or self._highest(name))
        unknown = set(self._settings.models) - set(self._registry.models()) - set(self.sources)
        if unknown:
            log.warning("settings name models the repository does not hold: %s", ", ".join(sorted(unknown)))
        if not specs and not self.sources:
            log.warning("the model repository %s holds no models", self._settings.models_dir)

    def _scan_disk(self, errors: list[str] | None = None) -> list[ModelSpec]:
        directory = self._settings.models_dir
        return repository.scan(directory, errors) if directory else []

    def _register(self, spec: ModelSpec) -> ServedVersion:
        batching = self._settings.batching_for(spec.name, spec.metadata.batching)
        ttl_s = self._settings.cache_for(spec.name)
        cache = CacheView(spec.name, spec.version, ttl_s) if ttl_s is not None else None
        served = ServedVersion(spec, batching, self._metrics, cache)
        self._registry.add(served)
        return served

    def _configured_active(self, model: str) -> str | None:
        override = self._settings.models.get(model)
        return override.active_version if override else None

    def _highest(self, model: str) -> str:
        return list(self._registry.versions(model))[-1]

    def start(self) -> None:
        """Read the saved state, then load what starts loaded, then follow the shared state."""
        self._tasks.append(asyncio.get_running_loop().create_task(self._start()))

    async def _start(self) -> None:
        for source in self.sources.values():
            await self._attach(source)
        try:
            saved = await self._store.read()
        except StateUnavailable as exc:
            log.warning("starting from the configured active versions: %s", exc)
            saved = SharedState()
        for model, version in saved.active.items():
            if model in self.sources:
                continue  # its source says which version serves
            if self._registry.find(model, version) is not None:
                self._registry.set_active(model, version)
            elif model in self._registry.models():
                log.warning("the saved active version %s of %s is not in the repository; ignored", version, model)
        for served in self._preloaded():
            async with self._locks[served.spec.name]:
                await self._ensure_loaded(served)
        await self._fall_back()
        await self._record_sourced(saved)
        for model, experiment in saved.experiments.items():
            async with self._locks[model]:
                await self._adopt(model, experiment, "saved")
        self._started = True
        self._up.set()
        states = self._registry.states()
        failed = [key for key, state in states.items() if state == "failed"]
        if failed:
            log.error("%d model version(s) failed to load: %s", len(failed), ", ".join(failed))
        log.info(
            "ready: %d of %d model version(s) loaded and warm on %d worker(s)",
            list(states.values()).count("ready"),
            len(states),
            self._pool.size,
        )
        self._tasks.append(asyncio.get_running_loop().create_task(self._store.watch(self._follow)))
        for source in self.sources.values():
            if source.ref.watched or self._registry.active(source.model) is None:
                self._tasks.append(asyncio.get_running_loop().create_task(self._watch(source)))

    async def _attach(self, source: MlflowSource) -> None:
        """Register the version a model's source points to, as the model's active version; when the
        registry cannot say, the version last served from the cache. With neither, the model is
        unavailable (its source's status says why) and the watch keeps asking."""
        model = source.model
        try:
            version = await source.resolve()
        except RegistryUnavailable as exc:
            version = source.last_served()
            if version is None:
                log.error("%s is unavailable: %s, and no version of it is cached", model, exc)
                self._registry.set_unavailable(model, f"{exc}, and no version of it is cached")
                return
            log.warning("%s; serving %s:%s from the cache until the registry answers", exc, model, version)
        try:
            spec = await source.fetch(version)
        except LoadFailed as exc:
            source.status.error = str(exc)
            self._failed_target[model] = version
            log.error("%s is unavailable: %s", model, exc)
            self._registry.set_unavailable(model, str(exc))
            return
        self._register(spec)
        self._registry.set_active(model, version)

    async def _record_sourced(self, saved: SharedState) -> None:
        """Remember what each sourced model serves after start-up, and put it in the shared state when
        it differs, so replicas that follow the state store do not pull this one back to an old version."""
        for model, source in self.sources.items():
            version = self._registry.active(model)
            if version is None or self._registry.get(model, version).state != "ready":
                continue
            await asyncio.to_thread(source.remember, version)
            if saved.active.get(model) != version:
                try:
                    await self._store.set_active(model, version)
                except StateUnavailable as exc:
                    log.warning("cannot record %s:%s in the state store: %s", model, version, exc)

    async def _fall_back(self) -> None:
        """A model whose active version failed to load at start serves its newest version that does.

        One bad artifact must not keep a replica out of service; the store keeps the operator's
        choice until an activation changes it.
        """
        for model, version in list(self._registry.actives().items()):
            if self._registry.get(model, version).state != "failed":
                continue
            for candidate in reversed(self._registry.versions(model).values()):
                if candidate.state == "failed":
                    continue
                async with self._locks[model]:
                    if not await self._ensure_loaded(candidate):
                        continue
                    self._registry.set_active(model, candidate.spec.version)
                    log.error("%s:%s failed to load; serving %s until another version is activated",
                              model, version, candidate.spec.key)
                    break

    def _preloaded(self) -> list[ServedVersion]:
        """What loads at start: each model's active version first, then the rest its preload names."""
        first, rest = [], []
        for model, versions in self._registry.models().items():
            active = self._registry.active(model)
            for version, served in versions.items():
                if version == active:
                    first.append(served)
                elif self._preloads(model, version):
                    rest.append(served)
        return first + rest

    def _preloads(self, model: str, version: str) -> bool:
        """Whether ``[models.NAME] preload`` names this version (the active one always loads too)."""
        setting = self._settings.models.get(model)
        preload = setting.preload if setting else "all"
        return preload == "all" or (isinstance(preload, list) and version in preload)

    def drain(self) -> None:
        """The server is stopping (SIGTERM): from now on it is not ready, so load balancers take it out
        of rotation while it answers what it has."""
        self.draining = True

    async def started(self) -> None:
        """Return once start-up loading has ended, whether every version loaded or not."""
        await self._up.wait()

    @property
    def ready(self) -> bool:
        """Start-up loading is done and every model's active version serves, but for models an operator
        unloaded whole on purpose (``unload_model``); never once draining."""
        return not self.draining and self._started and all(
            self._registry.get(model, version).state == "ready" or model in self.unloaded_models
            for model, version in self._registry.actives().items()
        )

    async def close(self, timeout_s: float) -> None:
        await self._store.close()  # first: it ends the store's watch (see RedisStore.close)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        batchers = [served.batcher for served in self._registry if served.batcher]
        mirrors = [served.mirror for served in self._registry if served.mirror]
        await asyncio.gather(*(b.close(timeout_s) for b in batchers), *(m.close(0) for m in mirrors))

    # -- the changes -----------------------------------------------------------------------------------

    async def load(self, model: str, version: str) -> VersionState:
        async with self._locks[model]:
            served = self._registry.get(model, version)
            if served.state != "ready":
                await self._load(served)
            return _state_of(served)

    async def activate(self, model: str, version: str) -> Activation:
        """Load and warm ``version`` if needed, record it, then make it answer calls without a version."""
        async with self._locks[model]:
            served = self._registry.get(model, version)
            if served.state != "ready":
                await self._load(served)
            previous = self._registry.active(model)
            if previous != version:
                await self._store.set_active(model, version)
                self._registry.set_active(model, version)
                self.activations[model] += 1
                log.info("activated %s (was %s)", served.spec.key, previous)
            return Activation(model=model, active_version=version, previous_version=previous)

    async def unload(self, model: str, version: str) -> VersionState:
        async with self._locks[model]:
            served = self._registry.get(model, version)
            if self._registry.active(model) == version:
                raise Conflict(
                    f"{served.spec.key} is the active version: activate another version before unloading it"
                )
            if self._in_experiment(model, version):
                raise Conflict(f"{served.spec.key} takes part in the model's experiment: change or end it first")
            await self._unload(served)
            return _state_of(served)

    async def set_experiment(self, model: str, experiment: Experiment) -> Experiment:
        """Check, record, then start (or replace) ``model``'s experiment; every version it names must
        already be ready, so starting one never waits on a load."""
        async with self._locks[model]:
            if model not in self._registry.models():
                raise ModelNotFound(f"unknown model {model!r}")
            check(experiment)
            for version, path in experiment.versions():
                served = self._registry.find(model, version)
                if served is None:
                    raise ValidationFailed(f"model {model!r} has no version {version!r}", path)
                if served.state != "ready":
                    raise ValidationFailed(f"{served.spec.key} is {served.state}: load it first", path)
            await self._store.set_experiment(model, experiment)
            self._registry.set_experiment(model, experiment)
            log.info("experiment on %s: %s", model, msgspec.json.encode(experiment).decode())
            return experiment

    async def end_experiment(self, model: str) -> Experiment:
        """End ``model``'s experiment: calls without a version go to the active version again."""
        async with self._locks[model]:
            experiment = self._registry.experiment(model)
            if experiment is None:
                raise ModelNotFound(f"model {model!r} has no experiment")
            await self._store.set_experiment(model, None)
            self._registry.set_experiment(model, None)
            log.info("experiment on %s ended", model)
            return experiment

    async def rescan(self) -> RescanReport:
        """Register versions newly in the repository (loading those their preload names) and forget
        those that left it; an active version that left keeps serving and is reported."""
        async with self._rescan_lock:
            errors: list[str] = []
            found = {spec.key: spec for spec in self._scan_disk(errors) if spec.name not in self.sources}
            for error in errors:
                log.warning("rescan skipped %s", error)
            known = {served.spec.key: served for served in self._registry if served.spec.name not in self.sources}
            added, removed, missing = [], [], []
            new = sorted((found[key] for key in found.keys() - known.keys()), key=_version_key)
            new_models = {spec.name for spec in new if spec.name not in self._registry.models()}
            for spec in new:
                self._register(spec)
            for model in new_models:
                wanted = self._configured_active(model)
                if wanted is None or self._registry.find(model, wanted) is None:
                    wanted = self._highest(model)
                self._registry.set_active(model, wanted)
            for spec in new:
                added.append(await self._load_new(spec))
            for key in sorted(known.keys() - found.keys()):
                served = known[key]
                model, version = served.spec.name, served.spec.version
                async with self._locks[model]:
                    if self._registry.active(model) == version or self._in_experiment(model, version):
                        missing.append(_state_of(served))
                        continue
                    await self._unload(served)
                    self._registry.remove(model, version)
                    removed.append(_state_of(served))
            if added or removed:
                log.info("rescan: %d version(s) added, %d removed", len(added), len(removed))
            return RescanReport(
                added=added,
                removed=removed,
                missing_active=missing,
            )

    async def _load_new(self, spec: ModelSpec) -> VersionState:
        """Load a version a rescan found, if it is its model's active one or its preload names it."""
        async with self._locks[spec.name]:
            served = self._registry.get(spec.name, spec.version)
            if self._preloads(spec.name, spec.version) or self._registry.active(spec.name) == spec.version:
                await self._ensure_loaded(served)
            return _state_of(served)

    # -- what replicas hear ------------------------------------------------------------------------------

    async def _follow(self, shared: SharedState) -> None:
        """Apply another replica's activations and experiments, one model at a time, as this replica
        would its own."""
        for model in list(self._registry.models()):
            wanted = shared.experiments.get(model)
            if wanted == self._registry.experiment(model):
                continue
            async with self._locks[model]:
                if wanted is None:
                    self._registry.set_experiment(model, None)
                    log.info("experiment on %s ended, as another replica did", model)
                else:
                    await self._adopt(model, wanted, "another replica's")
        for model, version in shared.active.items():
            if self._registry.active(model) == version:
                continue
            source = self.sources.get(model)
            if source is not None:
                if self._failed_target.get(model) != version:
                    await self._switch(source, version, publish=False, why="as another replica did")
                continue
            if model not in self._registry.models():
                continue
            async with self._locks[model]:
                served = self._registry.find(model, version)
                if served is None:
                    log.warning("another replica activated %s:%s; this replica's repository lacks it", model, version)
                    continue
                if served.state == "failed":
                    continue  # reported when it failed; an operator's load or activate retries it
                if not await self._ensure_loaded(served):
                    log.error("cannot follow the activation of %s: %s", served.spec.key, served.error)
                    continue
                previous = self._registry.active(model)
                self._registry.set_active(model, version)
                self.activations[model] += 1
                log.info("activated %s (was %s), as another replica did", served.spec.key, previous)

    def _all_ready(self, model: str, experiment: Experiment) -> bool:
        named = (self._registry.find(model, version) for version, _ in experiment.versions())
        return all(served is not None and served.state == "ready" for served in named)

    def _in_experiment(self, model: str, version: str) -> bool:
        experiment = self._registry.experiment(model)
        return experiment is not None and version in dict(experiment.versions())

    async def _adopt(self, model: str, experiment: Experiment, whose: str) -> None:
        """Start an experiment this replica did not check itself (saved, or another replica's): load
        what it names; if anything fails, serve without it and say why (once, not at every poll)."""
        if model not in self._registry.models():
            return
        if self._refused.get(model) == experiment and not self._all_ready(model, experiment):
            return  # said why already; retried once an operator loads what it lacks
        self._refused[model] = experiment
        try:
            check(experiment)
        except ValidationFailed as exc:
            log.error("ignoring %s experiment on %s: %s at %s", whose, model, exc, exc.path)
            return
        for version, _ in experiment.versions():
            served = self._registry.find(model, version)
            if served is None or served.state == "failed" or not await self._ensure_loaded(served):
                why = served.error if served is not None else "this replica's repository lacks it"
                log.error("cannot run %s experiment on %s: version %s: %s", whose, model, version, why)
                return
        del self._refused[model]
        self._registry.set_experiment(model, experiment)
        log.info("experiment on %s (%s): %s", model, whose, msgspec.json.encode(experiment).decode())

    # -- whole models, for the Open Inference Protocol's model repository extension -------------------------

    async def load_model(self, model: str) -> list[VersionState]:
        """Load and warm ``model``'s active version, then the other versions its preload names (as at start),
        so that a model ``unload_model`` took out serves again. A failed active version raises ``LoadFailed``;
        another version that fails stays ``failed``, its state says why. Loading a loaded model changes nothing."""
        async with self._locks[model]:
            versions = self._whole(model)
            active = self._registry.active(model)
            if active is None:
                raise ModelNotFound(f"model {model!r} has no active version")
            served = versions[active]
            if served.state != "ready":
                await self._load(served)
            for version, other in versions.items():
                if other is not served and self._preloads(model, version):
                    await self._ensure_loaded(other)
            self.unloaded_models.discard(model)
            return [_state_of(served) for served in versions.values()]

    async def unload_model(self, model: str) -> list[VersionState]:
        """Drain and unload every version of ``model``, the active one first, so that it stops serving
        (calls get 503 until ``load_model``); refused (409) while an experiment runs on it."""
        async with self._locks[model]:
            versions = self._whole(model)
            if self._registry.experiment(model) is not None:
                raise Conflict(f"model {model!r} runs an experiment: end it before unloading the model")
            self.unloaded_models.add(model)
            active = self._registry.active(model)
            for served in sorted(versions.values(), key=lambda served: served.spec.version != active):
                await self._unload(served)
            log.info("unloaded every version of %s", model)
            return [_state_of(served) for served in versions.values()]

    def _whole(self, model: str) -> dict[str, ServedVersion]:
        versions = self._registry.versions(model)
        if not versions:
            raise ModelNotFound(f"unknown model {model!r}")
        return versions

    # -- models served from MLflow ---------------------------------------------------------------------------

    async def _watch(self, source: MlflowSource) -> None:
        """Ask the registry where the model's alias points every ``watch_interval_s``, and switch when
        it moved. A registry that does not answer is asked again after a pause that doubles each time."""
        model, interval = source.model, self._settings.watch_interval_s
        delay = interval
        while True:
            await asyncio.sleep(delay)
            try:
                version = await source.resolve()
            except RegistryUnavailable as exc:
                if delay == interval:
                    log.warning("%s; %s keeps serving what it serves and asks again", exc, model)
                self.source_checks[(model, "unreachable")] += 1
                delay = min(delay * 2, MAX_WATCH_BACKOFF_S)
                continue
            if delay != interval:
                log.info("the registry answers again: %s is at version %s", source.ref.uri, version)
            delay = interval
            active = self._registry.active(model)
            if version == active:
                self._failed_target.pop(model, None)
            if version in (active, self._failed_target.get(model)):
                self.source_checks[(model, "unchanged")] += 1
                continue
            switched = await self._switch(source, version, publish=True, why=f"{source.ref.uri} moved")
            self.source_checks[(model, "switched" if switched else "failed")] += 1
            if switched and not source.ref.watched:
                return  # a pinned version that serves at last: nothing more to follow

    async def _switch(self, source: MlflowSource, version: str, publish: bool, why: str) -> bool:
        """Fetch, load and warm ``version`` beside the serving one, make it active, then drain and unload
        the model's other versions. On any failure the serving version stays, and False is returned."""
        model = source.model
        async with self._locks[model]:
            served = self._registry.find(model, version)
            if served is None:
                try:
                    spec = await source.fetch(version)
                except LoadFailed as exc:
                    return self._switch_failed(source, version, str(exc))
                served = self._register(spec)
            if not await self._ensure_loaded(served):
                return self._switch_failed(source, version, served.error or "it failed to load")
            previous = self._registry.active(model)
            if publish:
                try:
                    await self._store.set_active(model, version)
                except StateUnavailable as exc:
                    log.error("cannot switch %s to %s: %s", model, version, exc)
                    return False  # not a fault of the version: the next look tries again
            self._registry.set_active(model, version)
            self._registry.set_unavailable(model, None)
            self.activations[model] += 1
            self._failed_target.pop(model, None)
            source.status.error = None
            log.info("activated %s (was %s), %s", served.spec.key, previous, why)
            await asyncio.to_thread(source.remember, version)
            for other in list(self._registry.versions(model).values()):
                if other is not served and not self._in_experiment(model, other.spec.version):
                    await self._unload(other)
                    self._registry.remove(model, other.spec.version)
            return True

    def _switch_failed(self, source: MlflowSource, version: str, why: str) -> bool:
        self._failed_target[source.model] = version
        source.status.error = f"version {version}: {why}"
        serving = self._registry.active(source.model)
        log.error("%s stays on %s: version %s failed: %s", source.model, serving, version, why)
        return False

    # -- transitions (callers hold the model's lock) -------------------------------------------------------

    async def _ensure_loaded(self, served: ServedVersion) -> bool:
        """Load ``served`` unless it is ready; False when the load failed (its state and error say why)."""
        if served.state == "ready":
            return True
        try:
            await self._load(served)
        except LoadFailed:
            return False
        return True

    async def _load(self, served: ServedVersion) -> None:
        spec, knobs = served.spec, served.batching
        served.state, served.error = "loading", None
        started = time.perf_counter()
        warmup_rows = sorted({1, knobs.max_batch_size})
        try:
            served.executor = knobs.executor
            if served.executor != "pool":
                times = await self._inline.load(spec, warmup_rows)
            if served.executor == "auto":
                batch_s = await self._inline.batch_s(spec, knobs.max_batch_size)
                served.executor = "inline" if batch_s < INLINE_BELOW_S else "pool"
                log.info("%s runs %s: a warm batch of %d rows took %.0f us (inline below %.0f us)", spec.key,
                         served.executor, knobs.max_batch_size, batch_s * 1e6, INLINE_BELOW_S * 1e6)
                if served.executor == "pool":
                    self._inline.unload(spec.key)
            if served.executor == "pool":
                times = await self._pool.load(spec, warmup_rows, knobs.max_compute_s)
        except PredictionFailed as exc:
            served.state, served.error = "failed", str(exc)
            log.error("loading %s failed: %s", spec.key, exc)
            raise LoadFailed(str(exc)) from None
        served.load_s, served.warm_s = times.load_s, times.warm_s
        served.batcher = Batcher(
            self._runner(served),
            max_batch_size=knobs.max_batch_size,
            max_delay_ms=knobs.max_delay_ms,
            max_queue=knobs.max_queue,
            # Inline, a batch is done when dispatched: one slot lets the next gather a loop iteration's calls.
            max_inflight=1 if served.executor == "inline" else knobs.max_inflight or self._pool.size,
            overlap_after_ms=knobs.overlap_after_ms,
            admit_by_deadline=self._settings.admission == "deadline",
            name=spec.key,
            on_batch=served.batch_rows.observe,
            on_queued=served.queue_time.observe,
            on_computed=served.compute_time.observe,
        )
        served.mirror = Batcher(
            self._runner(served, background=True),
            max_batch_size=knobs.max_batch_size,
            max_delay_ms=0,
            max_queue=MIRROR_QUEUE,
            max_inflight=1,
            name=f"{spec.key} (shadow)",
        )
        served.state = "ready"
        log.info("loaded %s (%s) in %.2fs", spec.key, spec.metadata.framework, time.perf_counter() - started)

    def _runner(
        self, served: ServedVersion, background: bool = False
    ) -> Callable[[Rows], asyncio.Future[tuple[Any, float]]]:
        """How a batcher runs a batch. A mirror lane's batches run in the background: only on an idle
        worker, and batches clients wait for avoid that worker, so a slow or broken shadow version
        holds up no answer; under load, shadow copies are dropped first."""
        key = served.spec.key
        if served.executor == "inline":
            predict = self._inline.predict
        else:
            predict = self._pool.predict_in_background if background else self._pool.predict
        # An image model's rows are encoded images that its worker decodes; feature rows stack here.
        prepare = _unchanged if served.takes_images else _stacker(served.row_shape)

        def run_batch(rows: Rows) -> asyncio.Future[tuple[Any, float]]:
            return predict(key, prepare(rows))

        return run_batch

    async def _unload(self, served: ServedVersion) -> None:
        if served.state in ("unloaded", "failed"):
            served.state = "unloaded"
            return
        served.state = "draining"
        if served.mirror is not None:
            await served.mirror.close(0)
        if served.batcher is not None:
            why = f"{served.spec.key} is being unloaded; call without a version to reach the active one"
            await served.batcher.drain(self._settings.request_timeout_ms / 1000.0, why)
        if served.executor == "inline":
            self._inline.unload(served.spec.key)
        else:
            await self._pool.unload(served.spec.key)
        served.batcher, served.mirror, served.state = None, None, "unloaded"
        log.info("unloaded %s", served.spec.key)

    # -- gauges ----------------------------------------------------------------------------------------------

    def refresh_gauges(self, metrics: Metrics) -> None:
        metrics.model_info.values.clear()
        metrics.queue_depth.values.clear()
        for served in self._registry:
            labels = {"model": served.spec.name, "version": served.spec.version}
            active = self._registry.active(served.spec.name) == served.spec.version
            metrics.model_info.set({**labels, "state": served.state, "active": str(active).lower()}, 1)
            if served.spec.metadata.accuracy is not None:
                metrics.model_accuracy.set(labels, served.spec.metadata.accuracy)
            if served.load_s is not None and served.warm_s is not None:
                metrics.load_duration.set(labels, served.load_s)
                metrics.warmup_duration.set(labels, served.warm_s)
            if served.batcher is not None:
                metrics.queue_depth.set(labels, served.batcher.queue_depth)
            if served.cache is not None:
                for (layer, result), count in served.cache.counts().items():
                    metrics.cache_requests.set({**labels, "layer": layer, "result": result}, count)
        for model, count in self.activations.items():
            metrics.activations.set({"model": model}, count)
        for (model, result), count in self.source_checks.items():
            metrics.source_checks.set({"model": model, "result": result}, count)
        metrics.workers_live.set({}, self._pool.live_workers)
        metrics.worker_restarts.set({}, self._pool.restart_count)
        metrics.workers_hung.set({}, self._pool.hung_count)


def _version_key(spec: ModelSpec) -> tuple[str, tuple[tuple[int, int | str], ...]]:
    return spec.name, repository.version_order(spec.version)


def _state_of(served: ServedVersion) -> VersionState:
    return VersionState(model=served.spec.name, version=served.spec.version, state=served.state, error=served.error)
