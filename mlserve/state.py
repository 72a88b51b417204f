"""What must survive a restart and be shared by replicas: each model's active version and experiment.

Two stores behave alike for the control plane. ``FileStore`` keeps a JSON file, replaced atomically
(write a temporary file, fsync, rename), so a crash leaves the old state or the new, never half of
one. The front-end processes of one machine share that file: each change re-reads it under an
exclusive ``flock`` on a lock file beside it, so concurrent changes from two processes both land
(the kernel drops the lock of a process that dies, so a crash never wedges the others), and each
process polls the file's identity every 50 ms to follow the others. Polling needs no inotify
dependency and costs a ``stat`` (microseconds) a poll; readers need no lock, since a rename is
atomic. ``RedisStore`` keeps a hash in Redis and publishes every change on a channel; every replica
watches it and re-reads the hash on each notice, and also every ``state_poll_s`` in case it missed
one (Redis restarted, a network blip), so replicas converge on Redis's word whatever order notices
arrive in. An experiment is kept as the document the operator sent.

A store that cannot record a change raises ``StateUnavailable`` and the change is not made: an
operator is never told that an activation succeeded when a restart would lose it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
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

FileIdentity = tuple[int, int, int]
"""A state file's (inode, modification time in ns, size): a changed one means the file was replaced."""

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
    """The state in a JSON file, optionally shared by the processes of one machine.

    Every change is a read-modify-write under an exclusive ``flock`` on ``<path>.lock``, re-reading
    the file inside the lock, so two processes changing different models at once both land (a
    cached copy would let the second writer drop the first's change). Unshared stores take the same
    path: it costs a lock and a read of a small file on an operator's change, not a request's.

    With ``shared``, ``watch`` follows the other processes' changes by polling the file's identity.
    A process hears its own writes there too; the control plane applies state idempotently.
    """

    def __init__(self, path: str, shared: bool = False, poll_s: float = 0.05) -> None:
        self.path = Path(path)
        self.shared = shared
        self.poll_s = poll_s
        self._lock_path = self.path.with_name(f"{self.path.name}.lock")
        # Queues this process's writes on the loop, so they do not park pool threads on the flock.
        self._lock = asyncio.Lock()

    async def read(self) -> SharedState:
        loaded = await asyncio.to_thread(self._load)
        return SharedState() if loaded is None else loaded[1]

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
            await asyncio.to_thread(self._update, change)

    def _update(self, change: Callable[[SharedState], SharedState]) -> None:
        """Apply ``change`` to what the file holds now, holding the lock file's flock throughout.

        The lock file is never removed: a process that removed it could leave two others locking
        different files. The flock goes with the descriptor, so a writer that dies drops it.
        """
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self._lock_path, "ab") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                loaded = self._load()
                state = change(SharedState() if loaded is None else loaded[1])
                _write_atomically(self.path, msgspec.json.format(msgspec.json.encode(state)))
        except OSError as exc:
            raise StateUnavailable(f"cannot write the state file {self.path}: {exc.strerror}") from None

    def _load(self) -> tuple[FileIdentity, SharedState] | None:
        """The file's identity and contents, taken from one open file so the two agree; None when
        there is no file yet."""
        try:
            with open(self.path, "rb") as fh:
                identity = _identity(os.fstat(fh.fileno()))
                raw = fh.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateUnavailable(f"cannot read the state file {self.path}: {exc.strerror}") from None
        try:
            return identity, msgspec.json.decode(raw, type=SharedState)
        except msgspec.DecodeError as exc:
            raise StateUnavailable(f"the state file {self.path} is unreadable: {exc}") from None

    async def watch(self, on_change: OnChange) -> None:
        """Catch up, then report the state whenever the file is replaced; runs until cancelled.

        Every ``poll_s`` a plain ``stat`` (microseconds, so on the loop) compares the file's inode,
        modification time and size with those of the state last reported; the atomic rename gives
        every write a new inode. A file that cannot be read, or that vanished, is warned of once and
        not reported (an empty state would end every experiment); polling goes on, and the next file
        written is reported. A failing ``on_change`` is logged, not raised: following goes on.
        """
        if not self.shared:
            return
        reported: FileIdentity | None = None
        caught_up = False
        trouble = False
        while True:
            try:
                now = self._stat()
                if not caught_up or (now is not None and now != reported):
                    loaded = await asyncio.to_thread(self._load)
                    if loaded is not None or not caught_up:
                        reported, state = loaded or (None, SharedState())
                        caught_up = True
                        if trouble:
                            log.warning("the state file %s is readable again; following it", self.path)
                            trouble = False
                        await self._tell(on_change, state)
                elif now is None and reported is not None:
                    raise StateUnavailable(f"the state file {self.path} vanished")
            except StateUnavailable as exc:
                if not trouble:
                    log.warning("%s; serving on with the state last read, polling every %.2fs", exc, self.poll_s)
                    trouble = True
            await asyncio.sleep(self.poll_s)

    def _stat(self) -> FileIdentity | None:
        try:
            return _identity(os.stat(self.path))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateUnavailable(f"cannot read the state file {self.path}: {exc.strerror}") from None

    @staticmethod
    async def _tell(on_change: OnChange, state: SharedState) -> None:
        try:
            await on_change(state)
        except Exception:
            log.exception("applying the shared state failed; following it still")

    async def close(self) -> None:
        return None


def _identity(stat: os.stat_result) -> FileIdentity:
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def _write_atomically(path: Path, content: bytes) -> None:
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


def open_store(settings: Settings, shared: bool = False) -> StateStore:
    """The store the settings name. ``shared``: other processes on this machine use the same state
    file, so the file store follows their changes (a Redis store is shared already)."""
    if settings.redis_url is not None:
        return RedisStore(settings.redis_url.reveal(), settings.redis_prefix, settings.state_poll_s)
    return FileStore(settings.state_file, shared=shared)
