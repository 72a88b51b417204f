"""The worker processes: start them, dispatch a batch, broadcast load/unload, replace the dead.

Each worker has its own socket, read in the parent by an asyncio protocol, so results resolve on the
event loop without threads or blocking calls. A worker's death shows at once as end-of-file on its socket:
its in-flight batches are retried once on another worker (or fail with ``WorkerUnavailable``) and a
replacement is started and given every loaded model before it takes work. A batch that kills the
worker it is retried on too is a poison batch: it fails rather than killing a third.

A model that hangs shows as no reply: a watchdog looks a few times a second at the batch each
worker is computing (the oldest it has been sent; a worker computes them in order) and, once one has
run past its version's ``max_compute_s``, fails that batch's callers (``ComputeTimedOut``, 504) and
kills the worker; its other batches are retried elsewhere and it is replaced as if it had died.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import math
import multiprocessing
import pickle
import socket
from collections.abc import Callable
from typing import Any

import numpy as np

from mlserve import ipc
from mlserve import worker as worker_main
from mlserve.errors import ComputeTimedOut, PredictionFailed, QueueFull, WorkerUnavailable
from mlserve.repository import ModelSpec
from mlserve.settings import WorkerOptions

log = logging.getLogger(__name__)

_RESTART_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0)


class WorkerDied(Exception):
    """The worker exited with this call in flight; the pool decides whether to retry."""


OnReply = Callable[[int, Any, float], None]
"""Hears a call's reply: ``(status, payload, compute seconds)``; ``STATUS_DIED`` if the worker died first."""

STATUS_DIED = -1
STATUS_HUNG = -2
WATCH_INTERVAL_S = 0.25
"""How often the watchdog looks for a batch past its ``max_compute_s``."""
BACKGROUND_PENALTY = 1_000
"""How many batches of its own a worker counts a background batch as, when batches pick a worker."""


def _settle(future: asyncio.Future[tuple[Any, float]], status: int, payload: Any, compute_s: float) -> None:
    if future.done():
        return
    if status == ipc.STATUS_OK:
        future.set_result((payload, compute_s))
    elif status == STATUS_DIED:
        future.set_exception(WorkerDied(payload))
    elif status == STATUS_HUNG:
        future.set_exception(ComputeTimedOut(payload))
    else:
        future.set_exception(PredictionFailed(payload))


class _Worker(asyncio.Protocol):
    """One worker process and its end of the socket: frames out, each reply handed to its caller.

    A protocol rather than a stream and a reader task: ``data_received`` hands a reply to its
    caller's callback at once, without waking a task that awaits two reads a frame.
    """

    def __init__(self, index: int, process: Any, on_exit: Callable[[_Worker], None]) -> None:
        self.index = index
        self.process = process
        self.pid: int = process.pid
        self.pending: dict[int, OnReply] = {}
        self.batches: dict[int, str] = {}
        """The model key of each batch in ``pending`` (loads and unloads have none)."""
        self.busy_since = 0.0
        """When the oldest call in ``pending`` started to run: its send or the reply before it."""
        self._clock = asyncio.get_running_loop().time
        self.background = 0
        """Batches in ``pending`` that no client waits for (shadow copies): others avoid this worker."""
        self.loaded: set[str] = set()
        self.alive = True
        self.transport: asyncio.Transport | None = None
        self._on_exit = on_exit
        self._buffer = bytearray()

    def send(self, message: ipc.Message, on_reply: OnReply, key: str | None = None) -> None:
        """Send a call; ``key`` names the model of a batch, which the hang watchdog then watches."""
        if not self.alive or self.transport is None:
            raise WorkerDied(f"worker {self.index} is gone")
        if not self.pending:
            self.busy_since = self._clock()
        self.pending[message.id] = on_reply
        if key is not None:
            self.batches[message.id] = key
        self.transport.write(ipc.frame(message))

    async def call(self, message: ipc.Message) -> tuple[Any, float]:
        future: asyncio.Future[tuple[Any, float]] = asyncio.get_running_loop().create_future()
        self.send(message, functools.partial(_settle, future))
        try:
            return await future
        finally:
            self.pending.pop(message.id, None)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        header = ipc.HEADER.size
        start = 0
        with memoryview(buffer) as view:
            while len(buffer) - start >= header:
                (size,) = ipc.HEADER.unpack_from(buffer, start)
                end = start + header + size
                if len(buffer) < end:
                    break
                reply: ipc.Reply = pickle.loads(view[start + header : end])
                on_reply = self.pending.pop(reply.id, None)
                self.batches.pop(reply.id, None)
                if on_reply is not None:
                    on_reply(reply.status, reply.payload, reply.compute_s)
                start = end
        if start:
            self.busy_since = self._clock()
        del buffer[:start]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.alive:
            self.lost(f"worker {self.index} (pid {self.pid}) died")

    def lost(self, why: str) -> None:
        """Leave the pool first, then tell every caller: a retry must not pick this worker again."""
        self.alive = False
        self._on_exit(self)
        pending, self.pending = self.pending, {}
        self.batches.clear()
        for on_reply in pending.values():
            on_reply(STATUS_DIED, why, 0.0)

    def hung(self, now: float, limits: dict[str, float]) -> tuple[int, str, float] | None:
        """The batch this worker computes, its key and its limit, if it has run past the limit."""
        if not self.pending:
            return None
        head = next(iter(self.pending))
        key = self.batches.get(head)
        if key is None:
            return None  # a load or an unload: bounded by their own timeouts
        limit = limits.get(key, math.inf)
        return (head, key, limit) if now - self.busy_since > limit else None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class WorkerPool:
    def __init__(self, size: int, options: WorkerOptions | None = None, start_timeout_s: float = 120.0) -> None:
        self.size = size
        self._options = options or WorkerOptions()
        self._start_timeout_s = start_timeout_s
        self._context = multiprocessing.get_context("spawn")
        self._workers: dict[int, _Worker] = {}
        self._live: list[_Worker] = []
        self._specs: dict[str, tuple[ModelSpec, list[int]]] = {}
        self._ids = itertools.count(1)
        self._restarts: set[asyncio.Task[None]] = set()
        self._limits: dict[str, float] = {}
        """Each loaded key's ``max_compute_s``."""
        self._watchdog: asyncio.Task[None] | None = None
        self._closing = False
        self.restart_count = 0
        self.hung_count = 0
        """Workers killed because a batch ran past its ``max_compute_s``."""

    @property
    def live_workers(self) -> int:
        return len(self._live)

    def worker_pids(self) -> list[int]:
        return [w.pid for w in self._live]

    async def start(self) -> None:
        workers = await asyncio.gather(*(self._spawn(i) for i in range(self.size)), return_exceptions=True)
        failure = next((w for w in workers if isinstance(w, BaseException)), None)
        for w in workers:
            if isinstance(w, _Worker):
                self._adopt(w)
        if failure is not None:
            await self.close()
            raise failure
        self._watchdog = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            now = loop.time()
            for worker in list(self._live):
                found = worker.hung(now, self._limits)
                if found is not None:
                    self._kill_hung(worker, *found)

    def _kill_hung(self, worker: _Worker, head: int, key: str, limit: float) -> None:
        """Fail the batch that hangs (it is not retried: it would hang another worker), then kill its
        worker; the batches queued behind it are retried on the others and the worker is replaced."""
        log.error("worker %d (pid %s) computed a batch of %s for longer than max_compute_s (%gs); killing it",
                  worker.index, worker.pid, key, limit)
        self.hung_count += 1
        on_reply = worker.pending.pop(head)
        worker.batches.pop(head, None)
        on_reply(STATUS_HUNG, f"the model computed a batch of {key} for longer than max_compute_s ({limit:g}s); "
                 "its worker was replaced", 0.0)
        worker.process.kill()
        worker.lost(f"worker {worker.index} (pid {worker.pid}) was killed: a batch of {key} hung")
        worker.close()

    async def _spawn(self, index: int) -> _Worker:
        parent_sock, child_sock = socket.socketpair()
        process = self._context.Process(
            target=worker_main.main,
            args=(child_sock, self._options),
            name=f"mlserve-worker-{index}",
            daemon=True,
        )
        try:
            process.start()
        finally:
            child_sock.close()
        worker = _Worker(index, process, self._on_exit)
        hello: asyncio.Future[tuple[Any, float]] = asyncio.get_running_loop().create_future()
        worker.pending[ipc.HELLO_ID] = functools.partial(_settle, hello)
        try:
            await asyncio.get_running_loop().create_unix_connection(lambda: worker, sock=parent_sock)
            pid, _ = await asyncio.wait_for(hello, self._start_timeout_s)
        except BaseException:
            if worker.transport is None:
                parent_sock.close()
            worker.close()
            process.kill()
            raise
        log.debug("worker %d started (pid %s)", index, pid)
        return worker

    def _adopt(self, worker: _Worker) -> None:
        self._workers[worker.index] = worker
        self._live.append(worker)

    @staticmethod
    def _discard(worker: _Worker) -> None:
        worker.close()
        worker.process.kill()

    def _on_exit(self, worker: _Worker) -> None:
        was_live = worker in self._live
        if was_live:
            self._live.remove(worker)
        if self._closing or not was_live:
            return  # a worker that never went live is retried by whoever was starting it
        log.error("worker %d (pid %s) died; restarting it", worker.index, worker.pid)
        task = asyncio.get_running_loop().create_task(self._restart(worker.index))
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    async def _restart(self, index: int) -> None:
        old = self._workers.get(index)
        if old is not None:
            await asyncio.to_thread(old.process.join, 5)
        for delay in itertools.chain(_RESTART_BACKOFF_S, itertools.repeat(_RESTART_BACKOFF_S[-1])):
            if self._closing:
                return
            worker: _Worker | None = None
            try:
                worker = await self._spawn(index)
                await self._load_missing(worker)
            except asyncio.CancelledError:
                if worker is not None:
                    self._discard(worker)
                raise
            except Exception:
                log.exception("restarting worker %d failed; retrying in %.1fs", index, delay)
                if worker is not None:
                    self._discard(worker)
                await asyncio.sleep(delay)
                continue
            self.restart_count += 1
            self._adopt(worker)
            log.warning("worker %d restarted (pid %s) with %d model(s)", index, worker.pid, len(worker.loaded))
            return

    async def _load_missing(self, worker: _Worker) -> None:
        # Loads may be broadcast while this worker is starting: keep going until it has them all.
        while missing := [key for key in self._specs if key not in worker.loaded]:
            for key in missing:
                entry = self._specs.get(key)
                if entry is None:
                    continue  # unloaded meanwhile
                await worker.call(ipc.Load(next(self._ids), *entry))
                worker.loaded.add(key)

    async def load(self, spec: ModelSpec, warmup_rows: list[int], max_compute_s: float = math.inf) -> ipc.LoadTimes:
        """Load and warm ``spec`` on every worker; it may be used only once this returns.

        Returns the slowest worker's times. If any worker fails, the others drop the model again, so
        a failed load leaves nothing behind. A batch of it that computes past ``max_compute_s`` is
        failed and its worker killed.
        """
        self._specs[spec.key] = (spec, warmup_rows)
        self._limits[spec.key] = max_compute_s
        workers = list(self._live)
        results = await asyncio.gather(
            *(w.call(ipc.Load(next(self._ids), spec, warmup_rows)) for w in workers),
            return_exceptions=True,
        )
        failure = next((r for r in results if isinstance(r, PredictionFailed)), None)
        if failure is not None:
            await self.unload(spec.key)
            raise PredictionFailed(f"loading {spec.key} failed: {failure}")
        times = [ipc.LoadTimes(0.0, 0.0)]
        for w, result in zip(workers, results):
            if not isinstance(result, BaseException):
                w.loaded.add(spec.key)
                times.append(result[0])
        return ipc.LoadTimes(max(t.load_s for t in times), max(t.warm_s for t in times))

    async def unload(self, key: str) -> None:
        self._specs.pop(key, None)
        self._limits.pop(key, None)
        workers = list(self._live)
        await asyncio.gather(*(w.call(ipc.Unload(next(self._ids), key)) for w in workers), return_exceptions=True)
        for w in workers:
            w.loaded.discard(key)

    def predict(self, key: str, rows: np.ndarray | list[bytes]) -> asyncio.Future[tuple[Any, float]]:
        """Run one batch; a worker that dies under it costs one retry on another worker.

        Returns a future that the worker's reply resolves directly: a coroutine here meant a task a
        batch and a chain of frames to resume, measured at 2-4% of the cheap model's throughput.
        """
        result: asyncio.Future[tuple[Any, float]] = asyncio.get_running_loop().create_future()
        self._send_batch(key, rows, result, retries=1)
        return result

    def predict_in_background(self, key: str, rows: np.ndarray | list[bytes]) -> asyncio.Future[tuple[Any, float]]:
        """Run a batch no client waits for on an idle worker, or raise ``QueueFull`` when none is idle.

        Batches that clients wait for are then sent to other workers while one runs, so a slow
        background batch never holds one up (unless every worker is already busy with one).
        """
        worker = next((w for w in self._live if key in w.loaded and not w.pending), None)
        if worker is None:
            raise QueueFull(f"no idle worker for a background batch of {key}")
        result: asyncio.Future[tuple[Any, float]] = asyncio.get_running_loop().create_future()

        def on_reply(status: int, payload: Any, compute_s: float) -> None:
            worker.background -= 1
            if status == STATUS_DIED:
                result.set_exception(WorkerUnavailable(f"the worker running a background batch of {key} died"))
            else:
                _settle(result, status, payload, compute_s)

        worker.send(ipc.Predict(next(self._ids), key, rows), on_reply, key)
        worker.background += 1
        return result

    def _send_batch(
        self, key: str, rows: np.ndarray | list[bytes], result: asyncio.Future[tuple[Any, float]], retries: int
    ) -> None:
        def on_reply(status: int, payload: Any, compute_s: float) -> None:
            if status != STATUS_DIED or result.done():
                _settle(result, status, payload, compute_s)
            elif retries:
                self._send_batch(key, rows, result, retries - 1)
            else:
                result.set_exception(WorkerUnavailable(
                    f"a batch of {key} killed the worker it ran on and the one it was retried on; it is not tried "
                    f"on another (a poison input, or a model out of memory?): {payload}"
                ))

        try:
            worker = self._pick(key)
            worker.send(ipc.Predict(next(self._ids), key, rows), on_reply, key)
        except WorkerUnavailable as exc:
            result.set_exception(exc)
        except WorkerDied as exc:
            on_reply(STATUS_DIED, str(exc), 0.0)

    def _pick(self, key: str) -> _Worker:
        """The live worker holding ``key`` with the least work ahead, avoiding those on background work."""
        best: _Worker | None = None
        best_load = 0
        for w in self._live:
            if key in w.loaded:
                load = len(w.pending) + (BACKGROUND_PENALTY if w.background else 0)
                if best is None or load < best_load:
                    best, best_load = w, load
        if best is None:
            raise WorkerUnavailable(f"no live worker holds {key}; one is restarting")
        return best

    async def close(self, timeout_s: float = 10.0) -> None:
        """Stop every worker: close its socket (it exits on end-of-file), then kill stragglers."""
        self._closing = True
        for task in [*self._restarts, *([self._watchdog] if self._watchdog else [])]:
            task.cancel()
        workers = list(self._workers.values())
        for w in workers:
            w.close()
        for w in workers:
            await asyncio.to_thread(w.process.join, timeout_s)
            if w.process.is_alive():
                log.warning("worker %d did not exit in %.0fs; killing it", w.index, timeout_s)
                w.process.kill()
                await asyncio.to_thread(w.process.join, 5)
        self._live.clear()
