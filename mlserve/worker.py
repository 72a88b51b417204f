"""What runs inside a worker process: its table of loaded models and its message loop.

The parent and the worker talk over one Unix socket with length-prefixed pickle (protocol 5) frames,
so numpy arrays cross as raw buffers, never as JSON. A request is ``(op, request_id, arg, extra)``;
a reply is ``(request_id, status, payload, compute_seconds)``. Compute time is measured here so the
parent's metrics can tell queueing from model time. The worker ignores SIGINT and SIGTERM: the
parent decides when it stops, by closing the socket, after it has drained in-flight batches.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import struct
import time
from typing import TYPE_CHECKING, Any

from mlserve.settings import WorkerOptions

if TYPE_CHECKING:
    from mlserve.images import ImageClassifier
    from mlserve.repository import ModelSpec
    from mlserve.runtimes import Runtime

HEADER = struct.Struct("!Q")
OP_LOAD = 1
OP_UNLOAD = 2
OP_PREDICT = 3
STATUS_OK = 0
STATUS_ERROR = 1
HELLO_ID = 0
_SMALL_FRAME = 1 << 16
_THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
)


def encode(message: tuple[Any, ...]) -> bytes:
    return pickle.dumps(message, protocol=5)


def send_frame(sock: socket.socket, payload: bytes) -> None:
    header = HEADER.pack(len(payload))
    if len(payload) < _SMALL_FRAME:
        sock.sendall(header + payload)
    else:
        sock.sendall(header)
        sock.sendall(payload)


def _recv_exact(sock: socket.socket, size: int) -> bytearray:
    buffer = bytearray(size)
    view = memoryview(buffer)
    received = 0
    while received < size:
        count = sock.recv_into(view[received:])
        if count == 0:
            raise EOFError
        received += count
    return buffer


def recv_frame(sock: socket.socket) -> Any:
    (size,) = HEADER.unpack(_recv_exact(sock, HEADER.size))
    return pickle.loads(_recv_exact(sock, size))


def _limit_threads(threads: int) -> None:
    for variable in _THREAD_VARIABLES:
        os.environ[variable] = str(threads)
    from threadpoolctl import threadpool_limits

    threadpool_limits(threads)


def _warmup_input(spec: ModelSpec, rows: int) -> Any:
    if spec.metadata.image is not None:
        from mlserve.images import blank_png

        return [blank_png(spec.metadata.image.size)] * rows
    import numpy as np

    return np.zeros((rows, *spec.metadata.input_shape))


class _Models:
    """The worker's model table; loading warms a model so the first real request is not slow."""

    def __init__(self, options: WorkerOptions) -> None:
        self._options = options
        self._table: dict[str, Runtime | ImageClassifier] = {}
        """Each entry predicts a batch: an array of rows, or a list of image bytes for image models."""

    def load(self, spec: ModelSpec, warmup_rows: list[int]) -> None:
        from mlserve import runtimes

        runtime = runtimes.load(spec, self._options)
        _limit_threads(self._options.threads)
        model: Runtime | ImageClassifier = runtime
        if spec.metadata.image is not None:
            from mlserve.images import ImageClassifier

            model = ImageClassifier(runtime, spec.metadata.image, self._options.max_image_pixels)
        for rows in warmup_rows:
            outputs = model.predict(_warmup_input(spec, rows))  # type: ignore[arg-type]
            if len(outputs) != rows:
                raise ValueError(f"warm-up batch of {rows} rows gave {len(outputs)} outputs")
        self._table[spec.key] = model

    def unload(self, key: str) -> None:
        self._table.pop(key, None)

    def predict(self, key: str, batch: Any) -> Any:
        return self._table[key].predict(batch)


def _handle(models: _Models, message: tuple[Any, ...]) -> tuple[Any, ...]:
    op, request_id, arg, extra = message
    started = time.perf_counter()
    if op == OP_PREDICT:
        result = models.predict(arg, extra)
    elif op == OP_LOAD:
        result = models.load(arg, extra)
    elif op == OP_UNLOAD:
        result = models.unload(arg)
    else:
        raise ValueError(f"unknown op {op}")
    return (request_id, STATUS_OK, result, time.perf_counter() - started)


def main(sock: socket.socket, options: WorkerOptions) -> None:
    """Serve requests until the parent closes the socket."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _limit_threads(options.threads)
    models = _Models(options)
    send_frame(sock, encode((HELLO_ID, STATUS_OK, os.getpid(), 0.0)))
    while True:
        try:
            message = recv_frame(sock)
        except (EOFError, ConnectionError):
            return
        try:
            reply = encode(_handle(models, message))
        except Exception as exc:
            reply = encode((message[1], STATUS_ERROR, f"{type(exc).__name__}: {exc}", 0.0))
        try:
            send_frame(sock, reply)
        except OSError:
            return  # the parent closed the socket (shutdown cut this batch off): nobody is waiting
