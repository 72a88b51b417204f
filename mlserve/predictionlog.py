"""The prediction log: one JSON line per prediction, written off the request path.

A request only appends a small Struct to a list. The first append after a flush schedules the next
one ``FLUSH_INTERVAL_S`` later, which encodes the whole list with one msgspec call and writes it: a
busy server pays one encode call and one write a few dozen times a second, not once a request (a
write is a system call, dear on some virtual machines) nor once a loop iteration.

Who writes depends on where the lines go. A file is written by the loop itself: a write to the page
cache is quick, while a writer thread shares the GIL with the loop, and handing the GIL back and
forth under load measured dearer than the writes. Standard output may be a pipe whose reader is
slow, and a blocked write must not stall the loop, so it has a thread that does nothing but write:
no ``logging`` handler, no formatting. Lines that cannot be written (a full disk, a reader
``MAX_BACKLOG_BYTES`` behind) are dropped and counted (``mlserve_prediction_log_dropped_total``),
never waited for.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import itertools
import logging
import os
import queue
import random
import threading
from typing import Any

import msgspec

from mlserve.errors import SettingsError
from mlserve.settings import PredictionLogSettings

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 0.05
"""How long a record may wait to be written with the others: how late a line reaches its file."""
MAX_PENDING = 4096
"""Records that are flushed at once rather than at the interval, to bound the memory a burst holds."""
MAX_BACKLOG_BYTES = 64 << 20
"""Lines handed to the standard output thread and not yet written, beyond which new ones are dropped."""
CLOSE_TIMEOUT_S = 10.0
"""How long shutdown waits for the standard output thread (a pipe nobody reads would block it)."""
MAX_REQUEST_ID_LENGTH = 200
STDOUT = (None, "-")


class Record(msgspec.Struct, gc=False, omit_defaults=True):
    """One line. ``time`` is Unix epoch seconds (UTC) when the answer was ready: a float needs no
    formatting on the loop, and every log tool converts it. ``model``/``version`` are null for a request that
    failed before it was routed; ``cache`` is null when the version's answers are not cached."""

    time: float
    request_id: str
    endpoint: str
    model: str | None
    version: str | None
    variant: str | None
    cache: str | None
    status: int
    latency_ms: float
    error: str | None = None
    inputs: list[Any] | msgspec.UnsetType = msgspec.UNSET
    outputs: list[Any] | msgspec.UnsetType = msgspec.UNSET


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class RotatingFile:
    """An append-only file, written by the loop, that moves to ``path.1`` (``path.1`` to ``path.2``,
    ...) before a write would take it past ``max_bytes``; ``backups`` old files are kept. A batch is
    never split, so a file passes ``max_bytes`` only when one batch alone is larger.

    Several processes may write one path (the front ends of ``mlserve serve --frontends N``), each
    with a ``RotatingFile`` of its own, so nothing is kept about the file that another process can
    change. Each write takes an exclusive ``flock`` on the descriptor, then checks that the path
    still names the descriptor's file (another process, or an outside logrotate, may have moved it:
    then it reopens the path and tries again) and takes the size from ``fstat`` (a private count
    would see only this process's bytes, and the file would grow to N times ``max_bytes``). Under
    the lock the size is exact and no other process can rotate or append, so the batch goes whole
    into the file that is current, and only one process rotates a full file: the others, once they
    get its lock, see that the path has moved on and reopen. The lock is held for a few system
    calls and one write to the page cache, a few dozen times a second per process: cheap to take
    and to wait for, even on the loop.
    """

    lost = 0
    """Lines lost after ``write`` returned: none, since a write that fails raises."""

    def __init__(self, path: str, max_bytes: int, backups: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._fd = self._open()

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def start(self) -> None:
        """Nothing runs beside the loop for a file."""

    def write(self, data: bytes) -> None:
        """Append ``data`` with one write, rotating first if it would not fit. Each retry follows a
        rotation (ours or another process's) that made a new, emptier file at the path, so it ends."""
        while not self._write_locked(data):
            self._reopen()

    def _write_locked(self, data: bytes) -> bool:
        """Under the descriptor's lock: write, and say so; or find that the path has moved on (another
        process rotated) or move it on (rotate), and return False for the caller to reopen the path.
        The lock is let go in every case, an error's too: a lock left held would stall every front end."""
        fd = self._fd
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            ours = os.fstat(fd)
            if not self._names(ours):
                return False
            if ours.st_size and ours.st_size + len(data) > self.max_bytes:
                self._rotate()
                return False
            write_all(fd, data)
            return True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _names(self, ours: os.stat_result) -> bool:
        """Whether the path still names the file our descriptor is open on."""
        try:
            named = os.stat(self.path)
        except FileNotFoundError:
            return False
        return (named.st_dev, named.st_ino) == (ours.st_dev, ours.st_ino)

    def _rotate(self) -> None:
        """Move the files along; the caller holds the lock of the file at ``path``, so no other
        process rotates (every rotation locks the file at ``path``) or writes meanwhile."""
        for index in range(self.backups - 1, 0, -1):
            older = f"{self.path}.{index}"
            if os.path.exists(older):
                os.replace(older, f"{self.path}.{index + 1}")
        if self.backups:
            os.replace(self.path, f"{self.path}.1")
        else:
            os.unlink(self.path)

    def _reopen(self) -> None:
        """Open the file at ``path`` (making it if no process has yet), then close the old one: if
        the open fails, the old descriptor stays valid and the next write tries again."""
        fd = self._open()
        os.close(self._fd)
        self._fd = fd

    async def close(self) -> None:
        os.close(self._fd)


class BackgroundWriter:
    """Writes to a descriptor that may block (standard output: a pipe, a terminal) from a thread of
    its own. ``write`` only queues; it refuses, with ``BlockingIOError``, once ``MAX_BACKLOG_BYTES``
    wait. The descriptor is not ours, so it is never closed."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._handed = 0
        """Bytes queued (only the loop writes this)."""
        self._taken = 0
        """Bytes the thread has taken off the queue (only the thread writes this)."""
        self.lost = 0
        """Lines the thread could not write (only the thread writes this)."""
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def write(self, data: bytes) -> None:
        if self._handed - self._taken + len(data) > MAX_BACKLOG_BYTES:
            raise BlockingIOError(errno.EAGAIN, f"the reader of standard output is {MAX_BACKLOG_BYTES >> 20} MiB behind")
        self._handed += len(data)
        self._queue.put(data)

    def _run(self) -> None:
        """Everything queued since the last write goes out in one write."""
        warned = False
        while True:
            chunks = [self._queue.get()]
            while True:
                try:
                    chunks.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            data = b"".join(chunk for chunk in chunks if chunk is not None)
            try:
                write_all(self._fd, data)
            except OSError as exc:
                self.lost += data.count(b"\n")
                if not warned:
                    warned = True
                    log.warning("cannot write the prediction log (%s); its lines are dropped", exc)
            self._taken += len(data)
            if None in chunks:
                return

    async def close(self) -> None:
        """Write what is queued, then stop; give up after ``CLOSE_TIMEOUT_S``."""
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join, CLOSE_TIMEOUT_S)
        if self._thread.is_alive():
            log.warning("the prediction log's writer did not finish within %.0f s", CLOSE_TIMEOUT_S)


def open_sink(settings: PredictionLogSettings) -> RotatingFile | BackgroundWriter:
    """Where the lines go; a file that cannot be opened is a settings error, found at start."""
    if settings.path in STDOUT:
        return BackgroundWriter(1)
    assert settings.path is not None
    try:
        return RotatingFile(settings.path, settings.max_bytes, settings.backups)
    except OSError as exc:
        raise SettingsError(f"prediction_log.path: cannot open {settings.path}: {exc.strerror}") from None


class PredictionLog:
    """Takes ``Record``s on the event loop and writes them every ``FLUSH_INTERVAL_S`` (``start`` to ``close``)."""

    def __init__(self, settings: PredictionLogSettings) -> None:
        self.payloads = settings.payloads
        self.sample_rate = settings.sample_rate
        self._sink = open_sink(settings)
        self._pending: list[Record] = []
        self._encoder = msgspec.json.Encoder()
        self._dropped = 0
        self._warned = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._id_prefix = os.urandom(6).hex() + "-"
        self._id_count = itertools.count(1)

    @property
    def dropped(self) -> int:
        """Records lost: to a failed write, or to a reader of standard output too far behind."""
        return self._dropped + self._sink.lost

    def request_id(self, offered: str | None) -> str:
        """The client's id when it is usable (printable ASCII, at most 200 characters), else a new one:
        this process's random prefix and a counter, unique without a uuid4 a request."""
        if offered and len(offered) <= MAX_REQUEST_ID_LENGTH and offered.isascii() and offered.isprintable():
            return offered
        return self._id_prefix + str(next(self._id_count))

    def sampled(self) -> bool:
        """Whether this request is one of the ``sample_rate`` logged (``random()`` is below 1.0, so all
        of them at 1.0, none at 0)."""
        return random.random() < self.sample_rate

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._sink.start()

    def add(self, record: Record) -> None:
        """Queue one record; the first after a flush schedules the next."""
        pending = self._pending
        pending.append(record)
        count = len(pending)
        if count == 1:
            assert self._loop is not None, "PredictionLog.add before start"
            self._loop.call_later(FLUSH_INTERVAL_S, self.flush)
        elif count >= MAX_PENDING:
            self.flush()

    def flush(self) -> None:
        """Encode what is pending and write it, or drop it if it cannot be written now."""
        records, self._pending = self._pending, []
        if not records:
            return
        try:
            self._sink.write(self._encoder.encode_lines(records))
        except OSError as exc:
            self._dropped += len(records)
            if not self._warned:
                self._warned = True
                log.warning("cannot write the prediction log (%s); its lines are dropped", exc)

    async def close(self) -> None:
        """Write everything still pending, then close the file or stop the thread."""
        self.flush()
        await self._sink.close()
