"""The prediction cache: an in-process LRU (L1) in front of an optional shared Redis (L2), row by row.

A row's key is a 16-byte blake2b digest of two things read in turn: its version's namespace (model
and resolved version, so a new active version never answers from the old one's entries), then the
row's canonical bytes: features packed as float64 (so ``1`` and ``1.0`` are one input), an image's
own bytes.

The hit path is synchronous: when L1 holds every row (``_recall``), the caller gets a future that the
next loop iteration resolves; no batcher, no task, no Redis. Rows that miss L1 go on, in a coroutine, to
Redis, where every lookup made in one loop iteration shares one ``MGET``; then to the batcher, where
identical rows in flight share one computation (single-flight). Results are written to L1 at once
and to Redis in pipelined batches that no caller awaits. Errors are never stored.

With several front ends (``mlserve.frontends``), a table they all map (``mlserve.sharedtable``)
stands behind each one's L1: a row that one front end computed is a hit on the others, and a row
that one is computing is waited for, not computed again, by the others (they look at its slot every
``SHARED_POLL_S``). So hits and single-flight hold across front ends as within one.

Redis is never on the critical path: a lookup slower than ``redis_timeout_ms`` is a miss, and after
``BREAKER_FAILURES`` failures in a row a circuit breaker stops asking for ``BREAKER_COOLDOWN_S``,
then lets traffic probe it again. A dead or paused Redis costs hits, nothing else.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import struct
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import msgspec
from redis.exceptions import RedisError

from mlserve.batcher import BatchResult, Rows
from mlserve.errors import DeadlineExceeded, MlserveError
from mlserve.redislink import RedisLink
from mlserve.settings import CacheSettings
from mlserve.sharedtable import LEAD, PENDING, SharedTable

log = logging.getLogger(__name__)

BREAKER_FAILURES = 3
"""Redis failures in a row (errors or timeouts) that open the breaker."""
BREAKER_COOLDOWN_S = 1.0
"""How long an open breaker keeps Redis out of the path before traffic probes it again."""
MAX_PENDING_WRITES = 10_000
"""Writes waiting for Redis beyond this are dropped: a slow Redis must not grow the server's memory."""
MAX_RUNNING = 10_000
"""Rows in flight beyond which ended computations are swept out of the single-flight table."""
MISS = object()
SHARED_POLL_S = 0.001
"""How often a front end looks at the shared slots of rows another front end is computing for it."""
SET_MANY = "for i, key in ipairs(KEYS) do redis.call('SET', key, ARGV[i], 'PX', ARGV[#ARGV]) end return #KEYS"
"""Stores KEYS[i] = ARGV[i], each expiring after the last argument's milliseconds."""

Submit = Callable[..., "asyncio.Future[BatchResult]"]
"""``Batcher.submit``: rows, a timeout, and what hears the outputs as they are delivered."""
Plan = tuple[dict[bytes, list[int]], list[tuple[int, "_Computation"]], list[int]]
"""Rows to compute (by key, with the rows that repeat it), to take from computations in flight here,
and to await from other front ends."""
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode


_PACKERS: dict[int, Callable[..., bytes]] = {}


def _packer(width: int) -> Callable[..., bytes]:
    """Packs a row of ``width`` features as little-endian float64: made once a width (rows reach the
    cache validated, so only the served versions' widths)."""
    pack = _PACKERS[width] = struct.Struct(f"<{width}d").pack
    return pack


class CacheView:
    """One version's use of the cache: its key namespace, TTL and counters (read by ``/metrics``)."""

    __slots__ = ("_seeded", "ttl_s", "l1_hit", "l1_miss", "redis_hit", "redis_miss", "redis_error", "bypass")

    def __init__(self, model: str, version: str, ttl_s: float) -> None:
        self._seeded = hashlib.blake2b(f"{model}\x00{version}\x00".encode(), digest_size=16)
        """A hasher that has read the namespace: copying it costs less than making one (and a digest
        size given as an argument costs more than the hashing of a row)."""
        self.ttl_s = ttl_s
        self.l1_hit = self.l1_miss = self.redis_hit = self.redis_miss = self.redis_error = self.bypass = 0

    def key(self, row: Any) -> bytes:
        """The row's cache key: the digest of this version's namespace and the row's canonical bytes,
        an image's own or its features as little-endian float64."""
        hasher = self._seeded.copy()
        if isinstance(row, bytes):  # an image
            hasher.update(row)
        else:
            hasher.update((_PACKERS.get(len(row)) or _packer(len(row)))(*row))
        return hasher.digest()

    def counts(self) -> dict[tuple[str, str], int]:
        """(layer, result) -> rows, for ``mlserve_cache_requests_total``."""
        return {
            ("l1", "hit"): self.l1_hit,
            ("l1", "miss"): self.l1_miss,
            ("redis", "hit"): self.redis_hit,
            ("redis", "miss"): self.redis_miss,
            ("redis", "error"): self.redis_error,
            ("l1", "bypass"): self.bypass,
        }


class _Computation:
    """Rows of one version submitted together; the batcher calls it with their outputs."""

    __slots__ = ("cache", "view", "keys", "future")

    def __init__(self, cache: PredictionCache, view: CacheView, keys: list[bytes]) -> None:
        self.cache = cache
        self.view = view
        self.keys = keys
        self.future: asyncio.Future[BatchResult]

    def __call__(self, values: list[Any]) -> None:
        self.cache.stored(self, values)

    def ended(self, future: asyncio.Future[BatchResult]) -> None:
        """With a shared table: a computation that failed (or whose caller went away) gives up its
        claims, so other front ends waiting for its rows compute them at once."""
        if future.cancelled() or future.exception() is not None:
            self.cache.release(self.keys)


class _Breaker:
    def __init__(self) -> None:
        self.failures = 0
        self.open_until = 0.0

    def allows(self, now: float) -> bool:
        return now >= self.open_until

    @property
    def is_open(self) -> bool:
        return self.failures >= BREAKER_FAILURES

    def succeeded(self) -> None:
        if self.failures >= BREAKER_FAILURES:
            log.warning("Redis answers again: the prediction cache uses it again")
        self.failures = 0

    def failed(self, now: float, exc: BaseException) -> None:
        self.failures += 1
        if self.failures == BREAKER_FAILURES:
            log.warning("the prediction cache stops asking Redis for %.0fs: %r", BREAKER_COOLDOWN_S, exc)
        if self.failures >= BREAKER_FAILURES:
            self.open_until = now + BREAKER_COOLDOWN_S


class PredictionCache:
    def __init__(
        self, settings: CacheSettings, redis_url: str | None, prefix: str, shared: SharedTable | None = None
    ) -> None:
        self._l1: collections.OrderedDict[bytes, tuple[Any, float]] = collections.OrderedDict()
        self._l1_entries = settings.l1_entries
        self._timeout_s = settings.redis_timeout_ms / 1000.0
        self._redis = RedisLink(redis_url, self._timeout_s) if redis_url else None
        self._prefix = f"{prefix}:cache:".encode()
        self._breaker = _Breaker()
        self._running: dict[bytes, _Computation] = {}
        """Rows being computed, by key: single-flight within this process."""
        self._shared = shared
        self._awaited: list[tuple[bytes, asyncio.Future[tuple[bytes, float] | None], float]] = []
        """Rows another front end computes, with what waits for them and until when."""
        self._hits: list[tuple[asyncio.Future[BatchResult], BatchResult]] = []
        """Hits answered at the next loop iteration, together (``_hit``)."""
        self._lookups: list[tuple[list[bytes], asyncio.Future[list[Any] | None]]] = []
        self._writes: list[tuple[bytes, bytes, int]] = []
        self._writing = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def breaker_open(self) -> bool:
        return self._breaker.is_open

    # -- the request path ---------------------------------------------------------------------------

    def answer(
        self, view: CacheView, rows: Rows, fresh: bool, submit: Submit, timeout_s: float
    ) -> asyncio.Future[BatchResult] | Awaitable[BatchResult]:
        """``rows``' outputs: from L1, else through Redis, computations in flight, the batcher.

        A full L1 hit is a future resolved on the next loop iteration. A miss that only the batcher
        can fill (no Redis to ask, every row new and distinct) is the batcher's own future; the
        batcher hands the outputs to ``_Computation`` as it delivers them. Only the other cases pay
        for a coroutine. Each step was measured on the cheap model: a coroutine, a closure and a
        done-callback a request each cost more than the cache lookup itself.
        """
        if len(rows) == 1 and self._shared is None:
            return self._answer_row(view, rows, fresh, submit, timeout_s)
        keys, values, missing = self.lookup(view, rows, fresh)
        loop = self._loop or self._bind()
        if not missing:
            return self._hit(values)
        if self._redis is not None and not fresh:
            if self._breaker.allows(now := loop.time()):
                return self._complete(view, rows, keys, values, missing, submit, now + timeout_s, fresh)
            view.redis_error += len(missing)
        if (self._shared is None or fresh) and len(missing) == len(rows) and self._none_running(keys):
            return self._compute(view, keys, rows, submit, timeout_s)
        deadline = loop.time() + timeout_s
        # With a shared table, claims decide first (no coroutine yet): most misses are new everywhere.
        plan = self._plan(keys, values, missing, deadline, fresh)
        leaders, followers, elsewhere = plan
        if not followers and not elsewhere:
            if len(leaders) == len(rows):
                return self._compute(view, keys, rows, submit, timeout_s)
            if not leaders:
                return self._hit(values)  # every row from the shared table
        return self._finish(view, rows, keys, values, plan, submit, deadline)

    def _answer_row(
        self, view: CacheView, rows: Rows, fresh: bool, submit: Submit, timeout_s: float
    ) -> asyncio.Future[BatchResult] | Awaitable[BatchResult]:
        """``answer`` for the most common call, one row on one front end: the same steps without the
        lists of keys, values and missing indices, and the plan, that a batch needs. While Redis's
        breaker is open a miss goes straight to the batcher, as with no Redis at all."""
        key = view.key(rows[0])
        loop = self._loop or self._bind()
        if fresh:
            view.bypass += 1
        else:
            value = self._recall(key, now := loop.time())
            if value is not MISS:
                view.l1_hit += 1
                return self._hit([value])
            view.l1_miss += 1
            if self._redis is not None:
                if self._breaker.allows(now):
                    return self._complete(view, rows, [key], [MISS], [0], submit, now + timeout_s, fresh)
                view.redis_error += 1
        running = self._running_computation(key)
        if running is None:
            return self._compute(view, [key], rows, submit, timeout_s)
        return self._finish(view, rows, [key], [MISS], ({}, [(0, running)], []), submit, loop.time() + timeout_s)

    def _recall(self, key: bytes, now: float) -> Any:
        """The row's value from L1 (now its most recent entry), or ``MISS``."""
        entry = self._l1.get(key)
        if entry is None or entry[1] <= now:
            return MISS
        self._l1.move_to_end(key)
        return entry[0]

    def _hit(self, values: list[Any]) -> asyncio.Future[BatchResult]:
        """Every row's value found: a future resolved on the next loop iteration, not now. A handler that
        finishes inside the read that brought its request answers one socket per wake-up, which
        measured a third more CPU a request (twice the system time) than answering the iteration's
        hits together."""
        loop = self._loop or self._bind()
        done: asyncio.Future[BatchResult] = loop.create_future()
        if not self._hits:
            loop.call_soon(self._resolve_hits)
        self._hits.append((done, BatchResult(values, 0.0, cached=True)))
        return done

    def _resolve_hits(self) -> None:
        """Answer the hits of the last loop iteration, in one loop callback rather than one each; a hit
        whose caller went away (a client that hung up cancels its handler) is dropped."""
        hits, self._hits = self._hits, []
        for done, result in hits:
            if not done.done():
                done.set_result(result)

    def lookup(self, view: CacheView, rows: Rows, bypass: bool) -> tuple[list[bytes], list[Any], list[int]]:
        """Keys, values found in L1 (``MISS`` elsewhere), and the indices still missing."""
        keys = [view.key(rows[0])] if len(rows) == 1 else [view.key(row) for row in rows]
        if bypass:
            view.bypass += len(rows)
            return keys, [MISS] * len(rows), list(range(len(rows)))
        now = (self._loop or self._bind()).time()
        values = [self._recall(key, now) for key in keys]
        missing = [index for index, value in enumerate(values) if value is MISS]
        view.l1_hit += len(rows) - len(missing)
        view.l1_miss += len(missing)
        return keys, values, missing

    def _none_running(self, keys: list[bytes]) -> bool:
        """Whether no key is being computed already and none repeats."""
        if len(keys) == 1:
            return self._running_computation(keys[0]) is None
        return len(set(keys)) == len(keys) and all(self._running_computation(key) is None for key in keys)

    def _running_computation(self, key: bytes) -> _Computation | None:
        """The computation in flight for ``key``; one that ended without storing it (it failed or its
        caller went away) is forgotten here rather than by a done-callback on every computation."""
        computation = self._running.get(key)
        if computation is not None and computation.future.done():
            del self._running[key]
            return None
        return computation

    def _compute(
        self, view: CacheView, keys: list[bytes], rows: Rows, submit: Submit, timeout_s: float
    ) -> asyncio.Future[BatchResult]:
        """Submit ``rows`` (all distinct, none in flight), marked as in flight until they are stored."""
        computation = _Computation(self, view, keys)
        future = computation.future = submit(rows, timeout_s, computation)
        if self._shared is not None:
            future.add_done_callback(computation.ended)
        running = self._running
        if len(running) > MAX_RUNNING:
            for key in [k for k, c in running.items() if c.future.done()]:
                del running[key]
        for key in keys:
            running[key] = computation
        return future

    async def _complete(
        self,
        view: CacheView,
        rows: Rows,
        keys: list[bytes],
        values: list[Any],
        missing: list[int],
        submit: Submit,
        deadline: float,
        fresh: bool,
    ) -> BatchResult:
        """Fill the rows L1 missed from Redis, then as ``_finish`` does."""
        missing = await self._from_redis(view, keys, values, missing)
        if not missing:
            return BatchResult(values, 0.0, cached=True)
        return await self._finish(view, rows, keys, values, self._plan(keys, values, missing, deadline, fresh),
                                  submit, deadline)

    def _plan(self, keys: list[bytes], values: list[Any], missing: list[int], deadline: float, fresh: bool) -> Plan:
        """How each missing row gets its value: computed here (by key, the rows that repeat it), taken
        from a computation in flight here, or awaited from another front end's; rows the shared table
        holds are filled in at once."""
        leaders: dict[bytes, list[int]] = {}
        followers: list[tuple[int, _Computation]] = []
        elsewhere: list[int] = []
        shared = None if fresh else self._shared
        now = (self._loop or self._bind()).time()
        for index in missing:
            key = keys[index]
            running = self._running_computation(key)
            if running is not None:
                followers.append((index, running))
                continue
            if shared is not None and key not in leaders:
                claim = shared.claim(key, deadline, now)
                if claim is PENDING:
                    elsewhere.append(index)
                    continue
                if claim is not LEAD:
                    values[index] = self._found(key, claim)
                    continue
            leaders.setdefault(key, []).append(index)
        return leaders, followers, elsewhere

    async def _finish(
        self, view: CacheView, rows: Rows, keys: list[bytes], values: list[Any], plan: Plan, submit: Submit,
        deadline: float,
    ) -> BatchResult:
        """Carry out ``plan``: compute the leading rows in one submission, then collect the others."""
        leaders, followers, elsewhere = plan
        loop = self._loop or self._bind()
        compute_s = 0.0
        if leaders:
            order = list(leaders)
            result = await self._compute(view, order, [rows[leaders[key][0]] for key in order], submit,
                                         deadline - loop.time())
            compute_s = result.compute_s
            for position, key in enumerate(order):
                for index in leaders[key]:
                    values[index] = result.values[position]
        for index, computation in followers:
            values[index] = await self._follow(computation, keys[index], rows[index], submit, deadline)
        for index in elsewhere:
            values[index] = await self._from_elsewhere(view, keys[index], rows[index], submit, deadline)
        return BatchResult(values, compute_s)

    async def _follow(
        self, computation: _Computation, key: bytes, row: Any, submit: Submit, deadline: float
    ) -> Any:
        """Share another request's computation of this row; if that request went away or ran out of
        time, compute the row for this one."""
        try:
            result = await asyncio.shield(computation.future)
            return result.values[computation.keys.index(key)]
        except (asyncio.CancelledError, DeadlineExceeded):
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
        loop = self._loop or self._bind()
        return (await submit([row], deadline - loop.time())).values[0]

    async def _from_elsewhere(self, view: CacheView, key: bytes, row: Any, submit: Submit, deadline: float) -> Any:
        """Wait for the row that another front end computes; if it gives up on it (its batch failed, its
        caller went away, or its deadline passed), compute the row here."""
        assert self._shared is not None
        loop = self._loop or self._bind()
        waited: asyncio.Future[tuple[bytes, float] | None] = loop.create_future()
        if not self._awaited:
            loop.call_later(SHARED_POLL_S, self._poll)
        self._awaited.append((key, waited, deadline))
        found = await waited
        if found is not None:
            return self._found(key, found)
        if (running := self._running_computation(key)) is not None:
            return await self._follow(running, key, row, submit, deadline)
        return (await self._compute(view, [key], [row], submit, deadline - loop.time())).values[0]

    def _poll(self) -> None:
        """Look at the shared slots of the rows awaited from other front ends; again soon while any are."""
        assert self._shared is not None
        loop = self._loop or self._bind()
        now = loop.time()
        still = []
        for entry in self._awaited:
            key, waited, deadline = entry
            if waited.done():
                continue  # its caller went away
            found = self._shared.look(key, now)
            if found is PENDING and now < deadline:
                still.append(entry)
            else:
                waited.set_result(None if found is PENDING else found)
        self._awaited = still
        if still:
            loop.call_later(SHARED_POLL_S, self._poll)

    def _found(self, key: bytes, found: tuple[bytes, float]) -> Any:
        """A row's value from the shared table, kept in this front end's L1 until it expires there."""
        value = _decode(found[0])
        if self._l1_entries:
            self._remember(key, value, found[1])
        return value

    def release(self, keys: Sequence[bytes]) -> None:
        """Let other front ends compute rows this one claimed and will not store."""
        if self._shared is not None:
            for key in keys:
                self._shared.release(key)

    def stored(self, computation: _Computation, values: list[Any]) -> None:
        """A computation delivered its outputs: store them, and it is no longer in flight."""
        running = self._running
        for key in computation.keys:
            if running.get(key) is computation:
                del running[key]
        self.store(computation.view, computation.keys, values)

    def store(self, view: CacheView, keys: Sequence[bytes], values: Sequence[Any]) -> None:
        loop = self._loop or self._bind()
        now = loop.time()
        expires = now + view.ttl_s
        limit = self._l1_entries
        writes = []
        shared = self._shared
        # Nothing for Redis while its breaker is open, or while it is too far behind to take more.
        to_redis = self._redis is not None and self._breaker.allows(now) and len(self._writes) < MAX_PENDING_WRITES
        for key, value in zip(keys, values):
            if isinstance(value, MlserveError):
                self.release((key,))
                continue  # this row's own failure (an image that did not decode): never cached
            if limit:
                self._remember(key, value, expires)
            if shared is not None or to_redis:
                encoded = _encode(value)
                if shared is not None:
                    shared.put(key, encoded, expires)
                if to_redis:
                    writes.append((self._prefix + key, encoded, int(view.ttl_s * 1000)))
        if writes:
            self._writes += writes
            if not self._writing:
                self._writing = True
                self._spawn(self._write())

    def _remember(self, key: bytes, value: Any, expires: float) -> None:
        """Put one row in L1 as its most recent entry, evicting the least recent beyond the limit."""
        l1 = self._l1
        l1[key] = (value, expires)
        l1.move_to_end(key)
        if len(l1) > self._l1_entries:
            l1.popitem(last=False)

    # -- Redis ---------------------------------------------------------------------------------------

    async def _from_redis(self, view: CacheView, keys: list[bytes], values: list[Any], missing: list[int]) -> list[int]:
        loop = self._loop or self._bind()
        if not self._breaker.allows(loop.time()):
            view.redis_error += len(missing)
            return missing
        future: asyncio.Future[list[Any] | None] = loop.create_future()
        if not self._lookups:
            loop.call_soon(self._send_lookups)
        self._lookups.append(([keys[index] for index in missing], future))
        found = await future
        if found is None:
            view.redis_error += len(missing)
            return missing
        still = []
        limit, expires = self._l1_entries, loop.time() + view.ttl_s
        for index, raw in zip(missing, found):
            if raw is None:
                still.append(index)
                continue
            values[index] = value = _decode(raw)
            if limit:
                self._remember(keys[index], value, expires)
        view.redis_hit += len(missing) - len(still)
        view.redis_miss += len(still)
        return still

    def _send_lookups(self) -> None:
        """Every lookup of this loop iteration, in one MGET."""
        batch, self._lookups = self._lookups, []
        self._spawn(self._mget(batch))

    async def _mget(self, batch: list[tuple[list[bytes], asyncio.Future[list[Any] | None]]]) -> None:
        assert self._redis is not None
        loop = self._loop or self._bind()
        keys = [self._prefix + key for wanted, _ in batch for key in wanted]
        found: list[Any] | None = None
        try:
            async with asyncio.timeout(self._timeout_s):
                found = await self._redis.call(b"MGET", *keys)
            self._breaker.succeeded()
        except (RedisError, OSError, TimeoutError) as exc:
            self._breaker.failed(loop.time(), exc)
        start = 0
        for wanted, future in batch:
            if not future.done():
                future.set_result(None if found is None else found[start : start + len(wanted)])
            start += len(wanted)

    async def _write(self) -> None:
        """Drain the pending writes, one script call per TTL a batch; a failing Redis drops them.

        One script call that sets every key is one command to pack, send and read, where a pipeline
        of ``SET``s is one a key.
        """
        assert self._redis is not None
        loop = self._loop or self._bind()
        try:
            while self._writes:
                batch, self._writes = self._writes, []
                by_ttl: dict[int, tuple[list[bytes], list[bytes]]] = {}
                for key, value, ttl_ms in batch:
                    keys, values = by_ttl.setdefault(ttl_ms, ([], []))
                    keys.append(key)
                    values.append(value)
                try:
                    async with asyncio.timeout(self._timeout_s * 5):
                        for ttl_ms, (keys, values) in by_ttl.items():
                            await self._redis.call(b"EVAL", SET_MANY, len(keys), *keys, *values, ttl_ms)
                    self._breaker.succeeded()
                except (RedisError, OSError, TimeoutError) as exc:
                    self._breaker.failed(loop.time(), exc)
                    self._writes.clear()
        finally:
            self._writing = False

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _bind(self) -> asyncio.AbstractEventLoop:
        self._loop = asyncio.get_running_loop()
        return self._loop

    async def close(self) -> None:
        if self._redis is not None:  # first: a dropped connection ends a Redis call at once
            self._redis.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._shared is not None:
            self._awaited.clear()
            self._shared.close()
