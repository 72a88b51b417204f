"""What runs inside a worker process: its table of loaded models and its message loop.

The messages and their framing are ``mlserve.ipc``'s. The worker ignores SIGINT and SIGTERM: the
parent decides when it stops, by closing the socket, after it has drained in-flight batches.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import time
from typing import TYPE_CHECKING, Any

from mlserve import ipc
from mlserve.settings import WorkerOptions

if TYPE_CHECKING:
    from mlserve.images import ImageClassifier
    from mlserve.repository import ModelSpec
    from mlserve.runtimes import Runtime

_THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
)


def _limit_threads(threads: int) -> None:
    for variable in _THREAD_VARIABLES:
        os.environ[variable] = str(threads)
    from threadpoolctl import threadpool_limits

    threadpool_limits(threads)


def _limit_memory(megabytes: int) -> None:
    """Cap the worker's heap (``RLIMIT_DATA``: private writable memory, which is what arrays and
    tensors take), so a batch that would exhaust memory raises ``MemoryError`` in this worker and
    fails alone, instead of the kernel's OOM killer choosing a victim, possibly the front end.
    Address-space reservations that are never written (torch's) do not count, unlike ``RLIMIT_AS``."""
    if megabytes:
        _, hard = resource.getrlimit(resource.RLIMIT_DATA)
        resource.setrlimit(resource.RLIMIT_DATA, (megabytes << 20, hard))


def warmup_input(spec: ModelSpec, rows: int) -> Any:
    if spec.metadata.image is not None:
        from mlserve.images import blank_png

        return [blank_png(spec.metadata.image.size)] * rows
    import numpy as np

    shape = (rows, *spec.metadata.input_shape)
    if spec.example:
        return np.resize(np.asarray(spec.example, dtype=np.float64), shape)
    return np.zeros(shape)


class ModelTable:
    """A worker's model table (and an inline executor's); loading warms a model so the first real
    request is not slow."""

    def __init__(self, options: WorkerOptions) -> None:
        self._options = options
        self._table: dict[str, Runtime | ImageClassifier] = {}
        """Each entry predicts a batch: an array of rows, or a list of image bytes for image models."""

    def load(self, spec: ModelSpec, warmup_rows: list[int]) -> ipc.LoadTimes:
        from mlserve import runtimes

        started = time.perf_counter()
        runtime = runtimes.load(spec, self._options)
        _limit_threads(self._options.threads)
        model: Runtime | ImageClassifier = runtime
        if spec.metadata.image is not None:
            from mlserve.images import ImageClassifier

            model = ImageClassifier(runtime, spec.metadata.image, self._options.max_image_pixels)
        loaded = time.perf_counter()
        for rows in warmup_rows:
            outputs = model.predict(warmup_input(spec, rows))  # type: ignore[arg-type]
            if len(outputs) != rows:
                raise ValueError(f"warm-up batch of {rows} rows gave {len(outputs)} outputs")
        self._table[spec.key] = model
        return ipc.LoadTimes(load_s=loaded - started, warm_s=time.perf_counter() - loaded)

    def unload(self, key: str) -> None:
        self._table.pop(key, None)

    def predict(self, key: str, batch: Any) -> Any:
        return self._table[key].predict(batch)


def _handle(models: ModelTable, message: ipc.Message) -> ipc.Reply:
    started = time.perf_counter()
    if isinstance(message, ipc.Predict):
        result = models.predict(message.key, message.rows)
    elif isinstance(message, ipc.Load):
        result = models.load(message.spec, message.warmup_rows)
    elif isinstance(message, ipc.Unload):
        result = models.unload(message.key)
    else:
        raise ValueError(f"unknown message {type(message).__name__}")
    return ipc.Reply(message.id, ipc.STATUS_OK, result, time.perf_counter() - started)


def main(sock: socket.socket, options: WorkerOptions) -> None:
    """Serve requests until the parent closes the socket."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _limit_threads(options.threads)
    _limit_memory(options.max_memory_mb)
    out_of_memory = "the model ran out of memory" + (
        f": a worker may take {options.max_memory_mb} MB (worker_max_memory_mb)" if options.max_memory_mb else ""
    )
    models = ModelTable(options)
    sock.sendall(ipc.frame(ipc.Reply(ipc.HELLO_ID, ipc.STATUS_OK, os.getpid(), 0.0)))
    while True:
        try:
            message = ipc.recv_frame(sock)
        except (EOFError, ConnectionError):
            return
        try:
            reply = ipc.frame(_handle(models, message))
        except MemoryError:
            reply = ipc.frame(ipc.Reply(message.id, ipc.STATUS_ERROR, out_of_memory, 0.0))
        except Exception as exc:  # an unpicklable result too is this call's error, not the worker's end
            reply = ipc.frame(ipc.Reply(message.id, ipc.STATUS_ERROR, f"{type(exc).__name__}: {exc}", 0.0))
        try:
            sock.sendall(reply)
        except OSError:
            return  # the parent closed the socket (shutdown cut this batch off): nobody is waiting
