"""What must survive a restart and be shared by replicas: each model's active version and experiment.

Two stores behave alike for the control plane. ``FileStore`` keeps a JSON file, replaced atomically
(write a temporary file, fsync, rename), so a crash leaves the old state or the new, never half of
one. ``RedisStore`` keeps a hash in Redis and publishes every change on a channel; every replica
watches it and re-reads the hash on each notice, and also every ``state_poll_s`` in case it missed
one (Redis restarted, a network blip), so replicas converge on Redis's word whatever order notices
arrive in. An experiment is kept as the document the operator sent.

A store that cannot record a change raises ``StateUnavailable`` and the change is not made: an
operator is never told that an activation succeeded when a restart would lose it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from mlserve.errors import StateUnavailable
from mlserve.experiments import Experiment
from mlserve.settings import Settings

log = logging.getLogger(__name__)


class SharedState(msgspec.Struct, forbid_unknown_fields=False, omit_defaults=True):
    """Everything the store keeps (and the state file's contents)."""

    active: dict[str, str] = {}
    """Model -> active version."""
    experiments: dict[str, Experiment] = {}
    """Model -> its running experiment."""


OnChange = Callable[[SharedState], Awaitable[None]]
"""Hears the whole shared state whenever it may have changed."""

REDIS_TIMEOUT_S = 2.0
"""A Redis that does not answer within this is treated as down: the state feature degrades, the
data plane never waits on it."""


class StateStore(Protocol):
    async def read(self) -> SharedState:
        """The saved state; raises ``StateUnavailable`` when the store cannot be read."""
        ...

    async def set_active(self, model: str, version: str) -> None:
        """Record (and, where shared, announce) a model's active version, or raise ``StateUnavailable``."""
        ...

    async def set_experiment(self, model: str, experiment: Experiment | None) -> None:
        """Record and announce a model's experiment (None: it ended), or raise ``StateUnavailable``."""
        ...

    async def watch(self, on_change: OnChange) -> None:
        """Call ``on_change`` with the state whenever another replica may have changed it; runs until
        cancelled (returns at once for a store no one else writes)."""
        ...

    async def close(self) -> None: ...


class FileStore:
    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._state = SharedState()
        self._lock = asyncio.Lock()

    async def read(self) -> SharedState:
        try:
            raw = await asyncio.to_thread(self.path.read_bytes)
        except FileNotFoundError:
            return SharedState()
        except OSError as exc:
            raise StateUnavailable(f"cannot read the state file {self.path}: {exc.strerror}") from None
        try:
            self._state = msgspec.json.decode(raw, type=SharedState)
        except msgspec.DecodeError as exc:
            raise StateUnavailable(f"the state file {self.path} is unreadable: {exc}") from None
        return self._state

    async def set_active(self, model: str, version: str) -> None:
        await self._write(lambda state: msgspec.structs.replace(state, active={**state.active, model: version}))

    async def set_experiment(self, model: str, experiment: Experiment | None) -> None:
        def change(state: SharedState) -> SharedState:
            experiments = {name: e for name, e in state.experiments.items() if name != model}
            if experiment is not None:
                experiments[model] = experiment
            return msgspec.structs.replace(state, experiments=experiments)

        await self._write(change)

    async def _write(self, change: Callable[[SharedState], SharedState]) -> None:
        async with self._lock:
            state = change(self._state)
            try:
                await asyncio.to_thread(_write_atomically, self.path, msgspec.json.format(msgspec.json.encode(state)))
            except OSError as exc:
                raise StateUnavailable(f"cannot write the state file {self.path}: {exc.strerror}") from None
            self._state = state

    async def watch(self, on_change: OnChange) -> None:
        return None

    async def close(self) -> None:
        return None


def _write_atomically(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(content + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(staging, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(staging)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class RedisStore:
    def __init__(self, url: str, prefix: str, poll_s: float) -> None:
        self._redis = aioredis.Redis.from_url(
            url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S, decode_responses=True
        )
        self._key = f"{prefix}:active"
        self._experiments_key = f"{prefix}:experiments"
        self._channel = f"{prefix}:changes"
        self._poll_s = poll_s
        self._closed = False

    async def read(self) -> SharedState:
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(self._key)
                pipe.hgetall(self._experiments_key)
                active, documents = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StateUnavailable(f"Redis is unavailable: {exc}") from None
        experiments = {}
        for model, document in documents.items():
            try:
                experiments[model] = msgspec.json.decode(document, type=Experiment)
            except msgspec.DecodeError as exc:
                log.warning("ignoring the unreadable experiment of %s in Redis: %s", model, exc)
        return SharedState(active=active, experiments=experiments)

    async def set_active(self, model: str, version: str) -> None:
        await self._change(model, lambda pipe: pipe.hset(self._key, model, version))

    async def set_experiment(self, model: str, experiment: Experiment | None) -> None:
        if experiment is None:
            await self._change(model, lambda pipe: pipe.hdel(self._experiments_key, model))
        else:
            document = msgspec.json.encode(experiment)
            await self._change(model, lambda pipe: pipe.hset(self._experiments_key, model, document))

    async def _change(self, model: str, write: Callable[[Any], Any]) -> None:
        """Write and announce in one transaction, so no replica hears of a change it cannot read."""
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                write(pipe)
                pipe.publish(self._channel, model)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StateUnavailable(f"Redis is unavailable, so the change was not made: {exc}") from None

    async def watch(self, on_change: OnChange) -> None:
        """Subscribe, catch up, then re-read on every notice and every ``poll_s``; survive outages."""
        down = False
        while not self._closed:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel)
                await on_change(await self.read())
                if down:
                    log.warning("Redis is back; shared state is followed again")
                    down = False
                while not self._closed:
                    await pubsub.get_message(timeout=self._poll_s)
                    await on_change(await self.read())
            except (RedisError, OSError, StateUnavailable) as exc:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError from exc  # redis-py turned our cancellation into an error
                if not down:
                    log.warning("Redis is unavailable (%s); serving on, retrying every %.0fs", exc, self._poll_s)
                    down = True
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()
            await asyncio.sleep(self._poll_s)

    async def close(self) -> None:
        """Stop the watch and drop the connections; call before cancelling the watch's task, since a
        cancellation that lands inside redis-py's pub/sub read can leave it waiting forever."""
        self._closed = True
        with contextlib.suppress(RedisError, OSError):
            await self._redis.connection_pool.disconnect()
            await self._redis.aclose()


def open_store(settings: Settings) -> StateStore:
    if settings.redis_url is not None:
        return RedisStore(settings.redis_url.reveal(), settings.redis_prefix, settings.state_poll_s)
    return FileStore(settings.state_file)
