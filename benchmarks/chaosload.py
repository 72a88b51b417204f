"""Recording load for the chaos suite: what happened to every request, not only percentiles.

``benchmarks.openloop`` reports aggregates and assumes the server keeps its connections. Under chaos
the server refuses, loses workers, closes connections and exits, and the questions are about single
requests: did every refusal carry ``Retry-After``, was any request left without an answer. So this
generator keeps one ``Outcome`` per request and tells apart a request the server answered, one whose
connection closed under it (``LOST``), one that never got a connection (``REFUSED``) and one still
unanswered when the run gave up on it (``HUNG``). Connections the server closes are reopened, and an
answer with ``Connection: close`` retires its connection, as a client library would.

Open and closed loop share one pool of keep-alive connections, one request in flight on each: open
loop submits on a fixed schedule (a due request waits here for a free connection, and that wait
counts as latency); closed loop keeps N requests in flight, submitting the next as each one ends.
Every request carries its own ``X-Request-ID``, so its fate can be matched with the server's
prediction log. Requests are prebuilt bytes, as in ``benchmarks.openloop``, so the generator stays
light beside the server on a 2-core machine.

``Crowd`` holds idle and slowloris connections: sockets that cost the server a file descriptor (and
a partial request head) without ever asking for anything. It runs in a process of its own
(``python -m benchmarks.chaosload PORT``), so that its thousands of connects and reconnects are the
server's work and not pauses in the event loop that times the real clients.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import json
import random
import resource
import signal
import sys
from collections import deque
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from typing import NamedTuple

from benchmarks import openloop

HOST = "127.0.0.1"
LOST = 0
"""The connection closed after the request was written and before its answer, on a connection the server
had answered on before: it dropped a request it had taken the connection up for."""
RESET = -3
"""A new connection closed under its first request: the server never served on it (one still in the
listen backlog when the listener closed, say)."""
REFUSED = -1
"""No connection could be opened for the request: it never reached the server."""
HUNG = -2
"""Still unanswered when the run stopped waiting for it."""
TICK_S = 0.0005
RECONNECT_PAUSE_S = 0.05
CONNECT_CHUNK = 64
"""Connections opened at once: more than the listen backlog takes risks dropped SYNs (a 1 s retry)."""


@contextlib.contextmanager
def steady_gc() -> Iterator[None]:
    """No garbage collection in this process meanwhile.

    A run keeps a record a request, and a full collection over a hundred thousand of them stops the
    generator's event loop for tens of milliseconds: answers would be read late and the pause counted
    as the server's latency. The records hold no cycles; what little cyclic garbage asyncio leaves
    waits until the end.
    """
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


class Outcome(NamedTuple):
    """One request's fate. Times are seconds on the recorder's clock (0 = when it was made)."""

    due: float
    """When the request was submitted (open loop: when its turn in the schedule came)."""
    latency: float
    """From ``due`` to its answer, loss or refusal; for ``HUNG``, to when the run gave up."""
    status: int
    """The HTTP status, or ``LOST``, ``REFUSED`` or ``HUNG``."""
    retry_after: bool
    kind: str
    """The traffic it belongs to ("clients", "burst", "high", ...)."""
    rid: int


class Traffic:
    """Prebuilt ``POST`` requests of one kind, each with a slot for its ``X-Request-ID``."""

    def __init__(self, kind: str, url: str, bodies: list[tuple[bytes, bytes]], headers: Mapping[str, str] = {}) -> None:
        self.kind = kind
        extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items()).encode()
        self._parts = []
        for payload in openloop.requests(url, bodies):
            line, rest = payload.split(b"\r\n", 1)
            self._parts.append((line + b"\r\n" + extra + b"X-Request-ID: ", b"\r\n" + rest))

    def payload(self, rid: int) -> bytes:
        head, tail = self._parts[rid % len(self._parts)]
        return head + str(rid).encode() + tail


class Request:
    __slots__ = ("due", "rid", "traffic")

    def __init__(self, traffic: Traffic, rid: int, due: float) -> None:
        self.traffic = traffic
        self.rid = rid
        self.due = due


class Recorder:
    """Every outcome and every chaos event of one scenario, on one clock."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.t0 = self.loop.time()
        self.outcomes: list[Outcome] = []
        self.events: list[tuple[float, str]] = []
        self._rids = itertools.count(1)

    def now(self) -> float:
        return self.loop.time() - self.t0

    def event(self, label: str) -> float:
        at = self.now()
        self.events.append((at, label))
        return at

    def request(self, traffic: Traffic) -> Request:
        return Request(traffic, next(self._rids), self.loop.time())

    def add(self, request: Request, status: int, retry_after: bool = False) -> None:
        end = self.loop.time()
        self.outcomes.append(
            Outcome(request.due - self.t0, end - request.due, status, retry_after, request.traffic.kind, request.rid)
        )


class Link(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time; answers are framed by Content-Length."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.request: Request | None = None
        self.buffer = bytearray()
        self.answers = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def send(self, request: Request) -> None:
        assert self.transport is not None
        self.request = request
        self.transport.write(request.traffic.payload(request.rid))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).lower()
        length = openloop.content_length(head)
        if len(self.buffer) < end + 4 + length:
            return
        del self.buffer[: end + 4 + length]
        request, self.request = self.request, None
        self.answers += 1
        if request is not None:
            self.pool.answered(self, request, int(head[9:12]), b"\r\nretry-after:" in head,
                               b"\r\nconnection: close" in head)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.pool.lost(self)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Pool:
    """Keep-alive links to one server; submitted requests go to an idle link or wait for one.

    Idle links are used in turn, the longest idle first, so that none sits unused for long: a server
    closes a connection that has sent nothing for its header timeout, and a request written just as
    it does is lost to a race that is the client's to handle, not a fault of the server.
    ``refill``, when set, hears every request that ends (closed loop submits the next from it).
    """

    def __init__(self, recorder: Recorder, port: int, size: int) -> None:
        self.recorder = recorder
        self.port = port
        self.size = size
        self.idle: deque[Link] = deque()
        self.links: set[Link] = set()
        self.waiting: deque[Request] = deque()
        self.pending = 0
        """Requests submitted and not ended."""
        self.queued = 0
        """Submissions that found every link busy and had to wait."""
        self.told_to_close = 0
        """Answers that said ``Connection: close``: the server's notice that it will close that link."""
        self.refill: Callable[[Request], None] | None = None
        self.closed = False
        self._reconnecting: set[asyncio.Task[None]] = set()

    async def open(self) -> None:
        """Open the links, a chunk at a time; one that cannot connect keeps trying in the background."""
        for start in range(0, self.size, CONNECT_CHUNK):
            chunk = range(start, min(self.size, start + CONNECT_CHUNK))
            results = await asyncio.gather(*(self._connect() for _ in chunk))
            for _ in range(results.count(False)):
                self._start_reconnect()

    def submit(self, request: Request) -> None:
        self.pending += 1
        if self.idle:
            self.idle.popleft().send(request)
        else:
            self.queued += 1
            self.waiting.append(request)

    def answered(self, link: Link, request: Request, status: int, retry_after: bool, close: bool) -> None:
        self._end(request, status, retry_after)
        if close:
            self.told_to_close += 1
            link.close()  # its connection_lost replaces it
        else:
            self._give(link)

    def lost(self, link: Link) -> None:
        self.links.discard(link)
        if link in self.idle:
            self.idle.remove(link)
        request, link.request = link.request, None
        if request is not None:
            self._end(request, LOST if link.answers else RESET)
        if not self.closed:
            self._start_reconnect()

    async def settle(self, grace_s: float) -> None:
        """Wait up to ``grace_s`` for the requests in flight; record the rest as ``HUNG``; close."""
        self.refill = None
        deadline = self.recorder.loop.time() + grace_s
        while self.pending and self.recorder.loop.time() < deadline:
            await asyncio.sleep(0.01)
        self.closed = True
        for link in list(self.links):
            if link.request is not None:
                request, link.request = link.request, None
                self._end(request, HUNG)
            link.close()
        while self.waiting:
            self._end(self.waiting.popleft(), HUNG)

    def _end(self, request: Request, status: int, retry_after: bool = False) -> None:
        self.pending -= 1
        self.recorder.add(request, status, retry_after)
        if self.refill is not None:
            self.refill(request)

    def _give(self, link: Link) -> None:
        if self.waiting:
            link.send(self.waiting.popleft())
        else:
            self.idle.append(link)

    async def _connect(self) -> bool:
        try:
            _, link = await self.recorder.loop.create_connection(lambda: Link(self), HOST, self.port)
        except OSError:
            return False
        if self.closed:
            link.close()
        else:
            self.links.add(link)
            self._give(link)
        return True

    def _start_reconnect(self) -> None:
        task = asyncio.create_task(self._reconnect())
        self._reconnecting.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(self._reconnecting.discard)

    async def _reconnect(self) -> None:
        """Reconnect until it works; each failed try refuses the request that waited longest."""
        while not self.closed and not await self._connect():
            if self.waiting:
                self._end(self.waiting.popleft(), REFUSED)
            await asyncio.sleep(RECONNECT_PAUSE_S)


class Schedule(NamedTuple):
    """What an open-loop run offered: the rate it kept to and how late its timer saw requests fall due."""

    submitted: int
    duration_s: float
    lag_p99_ms: float

    @property
    def rate(self) -> float:
        return self.submitted / self.duration_s


async def offer(pool: Pool, pattern: Sequence[Traffic], rate: float, duration_s: float) -> Schedule:
    """Submit ``rate`` requests a second for ``duration_s``, whatever the answers do (open loop).

    Request ``i`` is of kind ``pattern[i % len(pattern)]``, so a pattern sets the mix of kinds.
    """
    loop = pool.recorder.loop
    start = loop.time()
    total = round(rate * duration_s)
    sent = 0
    lags: list[float] = []
    while sent < total:
        now = loop.time()
        due = min(total, int((now - start) * rate) + 1)
        while sent < due:
            lags.append(now - start - sent / rate)
            pool.submit(pool.recorder.request(pattern[sent % len(pattern)]))
            sent += 1
        await asyncio.sleep(TICK_S)
    lags.sort()
    lag_p99 = lags[min(len(lags) - 1, int(0.99 * len(lags)))] if lags else 0.0
    return Schedule(sent, loop.time() - start, round(1000 * max(0.0, lag_p99), 3))


class ClosedLoop:
    """``clients`` requests always in flight on ``pool``: each that ends submits the next, until stopped."""

    def __init__(self, pool: Pool, traffic: Traffic, clients: int) -> None:
        self.pool = pool
        self.traffic = traffic
        self.clients = clients

    def start(self) -> None:
        self.pool.refill = self._next
        for _ in range(self.clients):
            self.pool.submit(self.pool.recorder.request(self.traffic))

    def stop(self) -> None:
        self.pool.refill = None

    def _next(self, ended: Request) -> None:
        self.pool.submit(self.pool.recorder.request(self.traffic))


async def closed_loop(pool: Pool, traffic: Traffic, clients: int, duration_s: float) -> None:
    """Run ``clients`` closed-loop clients for ``duration_s``; their last requests are still in flight."""
    clients_loop = ClosedLoop(pool, traffic, clients)
    clients_loop.start()
    await asyncio.sleep(duration_s)
    clients_loop.stop()


SLOWLORIS_HEAD = b"POST /predict HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\nX-Slow: "
"""A request head that never ends: after it, one more byte of the header's value at a time."""


class Idler(asyncio.Protocol):
    """A connection that sends nothing (idle) or a byte at a time (slowloris) and notes when it closes."""

    def __init__(self, crowd: Crowd, kind: str) -> None:
        self.crowd = crowd
        self.kind = kind
        self.transport: asyncio.Transport | None = None
        self.sent = 0
        self.next_byte_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def drip(self, now: float) -> None:
        """The next byte of a never-ending head, then wait 0.5-1 s."""
        assert self.transport is not None
        byte = SLOWLORIS_HEAD[self.sent : self.sent + 1] or b"x"
        self.transport.write(byte)
        self.sent += 1
        self.next_byte_at = now + random.uniform(0.5, 1.0)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.crowd.closed(self)


class Crowd:
    """``idle`` connections that never send and ``slowloris`` ones that drip a request head forever.

    A connection the server closes is reopened after a pause, as an attacker would; ``closed_by_server``
    counts those closes by kind.
    """

    KINDS = ("idle", "slowloris")

    def __init__(self, port: int, idle: int, slowloris: int) -> None:
        self.port = port
        self.wanted = {"idle": idle, "slowloris": slowloris}
        self.members: set[Idler] = set()
        self.closed_by_server = dict.fromkeys(self.KINDS, 0)
        self.failed_connects = dict.fromkeys(self.KINDS, 0)
        self.closing = False
        self._tasks: set[asyncio.Task[None]] = set()

    def open_now(self) -> dict[str, int]:
        return {kind: sum(1 for m in self.members if m.kind == kind) for kind in self.KINDS}

    async def open(self) -> None:
        kinds = [kind for kind in self.KINDS for _ in range(self.wanted[kind])]
        for start in range(0, len(kinds), CONNECT_CHUNK):
            await asyncio.gather(*(self._connect(kind) for kind in kinds[start : start + CONNECT_CHUNK]))
        self._spawn(self._drip())

    def closed(self, member: Idler) -> None:
        self.members.discard(member)
        if not self.closing:
            self.closed_by_server[member.kind] += 1
            self._spawn(self._connect(member.kind, after_s=0.5))

    async def close(self) -> None:
        self.closing = True
        for task in list(self._tasks):
            task.cancel()
        for member in list(self.members):
            if member.transport is not None:
                member.transport.close()
        await asyncio.sleep(0)

    def _spawn(self, work: Coroutine[object, object, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, kind: str, after_s: float = 0.0) -> None:
        await asyncio.sleep(after_s)
        try:
            _, member = await asyncio.get_running_loop().create_connection(lambda: Idler(self, kind), HOST, self.port)
        except OSError:
            self.failed_connects[kind] += 1
            return
        if self.closing:
            member.transport.close()  # type: ignore[union-attr]
        else:
            self.members.add(member)

    async def _drip(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            for member in list(self.members):
                if member.kind == "slowloris" and member.transport is not None and member.next_byte_at <= now:
                    member.drip(now)
            await asyncio.sleep(0.05)


CROWD_OPEN = "CROWD-OPEN "
CROWD_DONE = "CROWD-DONE "
"""The two lines a crowd process prints: once its connections are open, and its counts as it ends."""


def allow_descriptors(needed: int) -> None:
    """Raise this process's open-file limit to ``needed`` where the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


async def hold_crowd(port: int, idle: int, slowloris: int, seconds: float) -> dict[str, object]:
    """Open the crowd, say so, and hold it until SIGTERM (or ``seconds``); its counts at the end."""
    crowd = Crowd(port, idle, slowloris)
    await crowd.open()
    sys.stdout.write(CROWD_OPEN + json.dumps(crowd.open_now()) + "\n")
    sys.stdout.flush()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    counts: dict[str, object] = {"open_at_end": crowd.open_now(), "closed_by_server": crowd.closed_by_server,
                                 "failed_connects": crowd.failed_connects}
    await crowd.close()
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chaosload",
                                     description="Hold idle and slowloris connections to a server on 127.0.0.1.")
    parser.add_argument("port", type=int)
    parser.add_argument("--idle", type=int, default=2000)
    parser.add_argument("--slowloris", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60.0, help="the longest it holds them (SIGTERM ends it)")
    args = parser.parse_args(argv)
    allow_descriptors(args.idle + args.slowloris + 64)
    counts = asyncio.run(hold_crowd(args.port, args.idle, args.slowloris, args.seconds))
    sys.stdout.write(CROWD_DONE + json.dumps(counts) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
