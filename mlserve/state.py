"""What must survive a restart and be shared by replicas: each model's active version.

Two stores behave alike for the control plane. ``FileStore`` keeps a JSON file, replaced atomically
(write a temporary file, fsync, rename), so a crash leaves the old state or the new, never half of
one. ``RedisStore`` keeps a hash in Redis and publishes every change on a channel; every replica
watches it and re-reads the hash on each notice, and also every ``state_poll_s`` in case it missed
one (Redis restarted, a network blip), so replicas converge on Redis's word whatever order notices
arrive in.

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
from typing import Protocol

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from mlserve.errors import StateUnavailable
from mlserve.settings import Settings

log = logging.getLogger(__name__)

OnChange = Callable[[dict[str, str]], Awaitable[None]]
"""Hears the whole shared state (model -> active version) whenever it may have changed."""

REDIS_TIMEOUT_S = 2.0
"""A Redis that does not answer within this is treated as down: the state feature degrades, the
data plane never waits on it."""


class StateStore(Protocol):
    async def read(self) -> dict[str, str]:
        """Each model's saved active version; raises ``StateUnavailable`` when the store cannot be read."""
        ...

    async def set_active(self, model: str, version: str) -> None:
        """Record (and, where shared, announce) a model's active version, or raise ``StateUnavailable``."""
        ...

    async def watch(self, on_change: OnChange) -> None:
        """Call ``on_change`` with the state whenever another replica may have changed it; runs until
        cancelled (returns at once for a store no one else writes)."""
        ...

    async def close(self) -> None: ...


class SavedState(msgspec.Struct, forbid_unknown_fields=False):
    """The state file's contents."""

    active: dict[str, str] = {}


class FileStore:
    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._state = SavedState()
        self._lock = asyncio.Lock()

    async def read(self) -> dict[str, str]:
        try:
            raw = await asyncio.to_thread(self.path.read_bytes)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise StateUnavailable(f"cannot read the state file {self.path}: {exc.strerror}") from None
        try:
            self._state = msgspec.json.decode(raw, type=SavedState)
        except msgspec.DecodeError as exc:
            raise StateUnavailable(f"the state file {self.path} is unreadable: {exc}") from None
        return dict(self._state.active)

    async def set_active(self, model: str, version: str) -> None:
        async with self._lock:
            state = SavedState(active={**self._state.active, model: version})
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
        self._channel = f"{prefix}:changes"
        self._poll_s = poll_s
        self._closed = False

    async def read(self) -> dict[str, str]:
        try:
            return await self._redis.hgetall(self._key)  # type: ignore[no-any-return,misc]
        except (RedisError, OSError) as exc:
            raise StateUnavailable(f"Redis is unavailable: {exc}") from None

    async def set_active(self, model: str, version: str) -> None:
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(self._key, model, version)
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
