"""Cached rows that every front end of one server reads and writes: a table of slots in a shared file.

With ``--frontends N`` each front end has its own L1, and the kernel sends a client's next request to
any of them. This table, mapped by all of them, makes a row computed by one a hit on every other, and
lets one computation of a row serve the same row asked of several front ends at once (single-flight
across processes), as a single front end does by itself.

A slot is chosen by the row's key (the cache's 16-byte digest), as in a direct-mapped CPU cache: a
newer row whose key falls in a taken slot replaces the older one. No reader locks anything. Each
slot carries a checksum of its contents, so a read that met a write halfway (two front ends may
write one slot at once) fails the check and counts as a miss, never as another row's answer. Only a
*claim*, which turns a miss into "I compute this row" or "another front end is computing it", takes
a lock, on that slot's byte of the file (``fcntl.lockf``), for the microseconds its read and write
take.

Times are ``time.monotonic()``, the event loop's clock, which is one clock for every process of the
machine.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import mmap
import os
import struct
from typing import Literal

log = logging.getLogger(__name__)

SLOT_BYTES = 256
HEADER = struct.Struct("<8s16sddiH")
"""checksum, key, expires, pending until, pending owner's pid, value length; the value follows."""
MAX_VALUE_BYTES = SLOT_BYTES - HEADER.size
"""An encoded value longer than this is not shared (the front end that computed it keeps it in its L1)."""
PENDING: Literal["pending"] = "pending"
LEAD: Literal["lead"] = "lead"
Found = tuple[bytes, float]
"""A row's encoded value and when it expires."""
Claim = Found | Literal["pending", "lead"]
"""What a claim found: the value, another process computing the row, or the row is now this one's to compute."""


def _checksum(body: bytes | memoryview) -> bytes:
    return hashlib.blake2b(body, digest_size=8).digest()


class SharedTable:
    """``slots`` rows in the file at ``path``, created (and its space reserved) by whichever process
    opens it first."""

    def __init__(self, path: str, slots: int) -> None:
        self._slots = slots
        self._pid = os.getpid()
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            # Reserved now: a write to a page that a full tmpfs cannot back would kill the process (SIGBUS).
            os.posix_fallocate(self._fd, 0, slots * SLOT_BYTES)
            self._map = mmap.mmap(self._fd, slots * SLOT_BYTES)
        except OSError:
            os.close(self._fd)
            raise

    def _offset(self, key: bytes) -> int:
        return int.from_bytes(key[:8], "little") % self._slots * SLOT_BYTES

    def _read(self, offset: int) -> tuple[bytes, float, float, int, bytes] | None:
        """A slot's key, expiry, pending deadline, pending owner and value; None for an empty or torn one."""
        raw = self._map[offset : offset + SLOT_BYTES]
        check, key, expires, pending, owner, length = HEADER.unpack_from(raw)
        end = HEADER.size + length
        if length > MAX_VALUE_BYTES or check != _checksum(raw[8:end]):
            return None
        return key, expires, pending, owner, raw[HEADER.size : end]

    def _write(self, offset: int, key: bytes, expires: float, pending: float, owner: int, value: bytes) -> None:
        body = HEADER.pack(b"", key, expires, pending, owner, len(value))[8:] + value
        self._map[offset : offset + 8 + len(body)] = _checksum(body) + body

    def look(self, key: bytes, now: float) -> Found | Literal["pending"] | None:
        """The row's encoded value and its expiry; else ``PENDING`` while another process computes it."""
        slot = self._read(self._offset(key))
        if slot is None or slot[0] != key:
            return None
        _, expires, pending, owner, value = slot
        if value and expires > now:
            return value, expires
        return PENDING if pending > now and owner != self._pid else None

    def claim(self, key: bytes, until: float, now: float) -> Claim:
        """The row's value, else ``PENDING`` while another process computes it (until its deadline),
        else ``LEAD``: the slot now says this process computes the row, until ``until``."""
        offset = self._offset(key)
        fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, offset)
        try:
            slot = self._read(offset)
            if slot is not None and slot[0] == key:
                _, expires, pending, owner, value = slot
                if value and expires > now:
                    return value, expires
                if pending > now and owner != self._pid:
                    return PENDING
            self._write(offset, key, 0.0, until, self._pid, b"")
            return LEAD
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, offset)

    def put(self, key: bytes, value: bytes, expires: float) -> None:
        """Store the row's value (ending this process's claim on it); one too long only ends the claim."""
        if len(value) > MAX_VALUE_BYTES:
            self.release(key)
            return
        self._write(self._offset(key), key, expires, 0.0, 0, value)

    def release(self, key: bytes) -> None:
        """End this process's claim on a row it did not compute (its batch failed or timed out), so
        those waiting for it compute it themselves at once."""
        offset = self._offset(key)
        fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, offset)
        try:
            slot = self._read(offset)
            if slot is not None and slot[0] == key and slot[3] == self._pid and not slot[4]:
                self._write(offset, key, 0.0, 0.0, 0, b"")
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, offset)

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)


def open_table(path: str | None, slots: int) -> SharedTable | None:
    """The server's shared table, or None without one (a single front end, or L1 off); a table that
    cannot be made (no room in the file system) leaves each front end its own L1 alone."""
    if path is None or slots == 0:
        return None
    try:
        return SharedTable(path, slots)
    except OSError as exc:
        log.warning("the front ends do not share cached rows: %s (%d MB for %s)", exc,
                    slots * SLOT_BYTES // 2**20, path)
        return None
