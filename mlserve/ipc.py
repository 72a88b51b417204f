"""The worker wire format: framing, the message types and the reply statuses.

The parent and a worker talk over one Unix socket with length-prefixed pickle (protocol 5) frames,
so numpy arrays cross as raw buffers, never as JSON. A message to the worker is one of ``Load``,
``Unload`` or ``Predict``; every message is answered by one ``Reply`` with the same ``id``. Compute
time is measured in the worker so the parent's metrics can tell queueing from model time.

Kept free of numpy and aiohttp: the worker imports it before it knows which runtimes it needs.
"""

from __future__ import annotations

import pickle
import socket
import struct
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from mlserve.repository import ModelSpec

HEADER = struct.Struct("!Q")
"""Each frame is its payload's length, then the payload."""
HELLO_ID = 0
"""The id of the reply a worker sends unasked once it runs; its payload is the worker's pid."""
STATUS_OK = 0
STATUS_ERROR = 1
"""The call raised in the worker; the payload is the error's text."""


class Load(msgspec.Struct, tag=True, gc=False):
    """Load ``spec`` and warm it with one batch of each size in ``warmup_rows``.

    Replied with ``LoadTimes``."""

    id: int
    spec: ModelSpec
    warmup_rows: list[int]


class Unload(msgspec.Struct, tag=True, gc=False):
    id: int
    key: str


class Predict(msgspec.Struct, tag=True, gc=False):
    """One batch: a stacked array of feature rows, or a list of encoded images."""

    id: int
    key: str
    rows: Any


Message = Load | Unload | Predict


class Reply(msgspec.Struct, gc=False):
    id: int
    status: int
    payload: Any
    compute_s: float


class LoadTimes(msgspec.Struct, gc=False):
    """What a load cost one worker: reading the artifact, and the warm-up batches."""

    load_s: float
    warm_s: float


def frame(message: Message | Reply) -> bytes:
    """The header and the pickled message as one buffer, ready to write."""
    payload = pickle.dumps(message, protocol=5)
    return HEADER.pack(len(payload)) + payload


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
