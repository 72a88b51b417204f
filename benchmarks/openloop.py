"""Open-loop load: requests sent at a fixed arrival rate, whatever the server's answers do.

Why not wrk: wrk is closed loop (each connection waits for its answer before sending again), so
a slow server slows the load and its latency hides queueing and stalls (coordinated omission).
wrk2 runs the open-loop points where it is found (``wrk_runner.find_wrk2``); Debian ships none, so
where it is not, this small generator of our own does: a fixed schedule of send times and a
pool of keep-alive connections. When every connection is busy, due requests wait in the generator
and that wait counts as latency, as a user arriving then would see it.

A request's clock starts when the generator's timer notices it is due: the event loop's timers
have about 1 ms resolution, and that lag is the generator's, not the server's. It is reported
apart (``lag_p99_ms``), so a starved generator is visible rather than blamed on the server.

It runs in its own process, pinned like wrk, and reports its own CPU. Requests are built once,
before the clock starts: the per-request cost is one ``transport.write`` and a header scan. Run:
``python -m benchmarks.openloop URL --rate R --duration S (--iris MODEL VERSION | --images FILE)``;
it prints one ``OPENLOOP {json}`` line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import struct
import sys
from collections import deque
from pathlib import Path
from urllib.parse import urlsplit

from benchmarks.scenarios import IRIS_RANGES
from benchmarks.wrk_runner import LoadError, pinned, run_process, with_own_cpu

MARKER = "OPENLOOP "
TICK_S = 0.0005
CONNECTIONS = 256
WARMUP_S = 1.0
"""Seconds sent at the point's rate before it is measured, by whichever generator runs it."""


def iris_bodies(model: str, version: str, count: int) -> list[tuple[bytes, bytes]]:
    rng = random.Random(4321)
    bodies = []
    for _ in range(count):
        row = [round(lo + (hi - lo) * rng.random(), 3) for lo, hi in IRIS_RANGES]
        body = json.dumps({"features": row, "model": model, "model_version": version})
        bodies.append((b"application/json", body.encode()))
    return bodies


def image_bodies(path: Path) -> list[tuple[bytes, bytes]]:
    """The images file ``benchmarks.imageset.write`` makes: length-prefixed PNGs."""
    data = path.read_bytes()
    bodies, pos = [], 0
    while pos + 4 <= len(data):
        (size,) = struct.unpack_from("!I", data, pos)
        bodies.append((b"image/png", data[pos + 4 : pos + 4 + size]))
        pos += 4 + size
    return bodies


def requests(url: str, bodies: list[tuple[bytes, bytes]]) -> list[bytes]:
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    head = f"POST {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n".encode()
    return [
        head + b"Content-Type: " + kind + b"\r\nContent-Length: " + str(len(body)).encode()
        + b"\r\n\r\n" + body
        for kind, body in bodies
    ]


def content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


class Load:
    """The schedule, the idle connections and the results, shared by every connection."""

    def __init__(self, payloads: list[bytes], measure_from: float) -> None:
        self.payloads = payloads
        self.next_payload = 0
        self.idle: list[Connection] = []
        self.waiting: deque[float] = deque()
        self.measure_from = measure_from
        self.latencies: list[float] = []
        self.lags: list[float] = []
        self.statuses: dict[int, int] = {}
        self.outstanding = 0
        self.errors = 0

    def due(self, scheduled: float, now: float) -> None:
        """``scheduled`` is when the request was due, ``now`` when the generator's timer saw it."""
        self.outstanding += 1
        if scheduled >= self.measure_from:
            self.lags.append(now - scheduled)
        if self.idle:
            self.idle.pop().send(now)
        else:
            self.waiting.append(now)

    def payload(self) -> bytes:
        self.next_payload = (self.next_payload + 1) % len(self.payloads)
        return self.payloads[self.next_payload]

    def answered(self, conn: Connection, started: float, status: int, now: float) -> None:
        self.outstanding -= 1
        if started >= self.measure_from:
            self.latencies.append(now - started)
            self.statuses[status] = self.statuses.get(status, 0) + 1
        if self.waiting:
            conn.send(self.waiting.popleft())
        else:
            self.idle.append(conn)


class Connection(asyncio.Protocol):
    """One keep-alive connection: one request in flight, answers parsed by Content-Length."""

    def __init__(self, load: Load, loop: asyncio.AbstractEventLoop) -> None:
        self.load = load
        self.loop = loop
        self.buffer = bytearray()
        self.started = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.load.idle.append(self)

    def send(self, started: float) -> None:
        self.started = started
        assert self.transport is not None
        self.transport.write(self.load.payload())

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end])
        length = content_length(head)
        if len(self.buffer) < end + 4 + length:
            return
        del self.buffer[: end + 4 + length]
        self.load.answered(self, self.started, int(head[9:12]), self.loop.time())

    def connection_lost(self, exc: Exception | None) -> None:
        self.load.errors += 1


async def drive(
    url: str, payloads: list[bytes], rate: float, duration_s: float, warmup_s: float, connections: int
) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    parts = urlsplit(url)
    load = Load(payloads, measure_from=float("inf"))
    for _ in range(connections):
        await loop.create_connection(lambda: Connection(load, loop), parts.hostname, parts.port)
    start = loop.time()
    load.measure_from = start + warmup_s
    stop = load.measure_from + duration_s
    sent = 0
    while True:
        now = loop.time()
        due = min(int((now - start) * rate), int((stop - start) * rate)) - sent
        for _ in range(due):
            load.due(start + sent / rate, now)
            sent += 1
        if now >= stop:
            break
        await asyncio.sleep(TICK_S)
    drain_until = loop.time() + max(5.0, duration_s)
    while load.outstanding and loop.time() < drain_until:
        await asyncio.sleep(0.01)
    measured = len(load.latencies)
    lat = sorted(load.latencies)
    lags = sorted(load.lags)

    def pct(q: float, values: list[float] = lat) -> float:
        return round(1000 * values[min(len(values) - 1, int(q * len(values)))], 3) if values else 0.0

    return {
        "generator": "openloop",
        "target_rps": rate,
        "duration_s": duration_s,
        "connections": connections,
        "requests": measured,
        "rps": measured / duration_s,
        "p50_ms": pct(0.50),
        "p90_ms": pct(0.90),
        "p99_ms": pct(0.99),
        "max_ms": round(1000 * lat[-1], 3) if lat else 0.0,
        "lag_p99_ms": pct(0.99, lags),
        "non2xx": sum(n for status, n in load.statuses.items() if status >= 300),
        "unanswered": load.outstanding,
        "socket_errors": load.errors,
    }


def run_open(
    url: str, rate: float, duration_s: float, source: list[str], core: int | None
) -> dict[str, object]:
    """Run the generator in its own process, pinned to ``core``; its result and its own CPU use."""
    argv = pinned(
        [sys.executable, "-m", "benchmarks.openloop", url, f"--rate={rate:.1f}",
         f"--duration={duration_s:g}", *source],
        core,
    )
    run = run_process(argv, 2 * duration_s + 60.0)
    for line in run.stdout.splitlines():
        if line.startswith(MARKER):
            return with_own_cpu(json.loads(line[len(MARKER) :]), run)
    raise LoadError(f"no {MARKER.strip()} line in the open-loop output:\n{run.stdout[-1000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.openloop")
    parser.add_argument("url")
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=WARMUP_S, help="seconds sent but not measured")
    parser.add_argument("--connections", type=int, default=CONNECTIONS)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--iris", nargs=2, metavar=("MODEL", "VERSION"))
    source.add_argument("--images", type=Path)
    args = parser.parse_args(argv)
    bodies = image_bodies(args.images) if args.images else iris_bodies(*args.iris, count=8192)
    payloads = requests(args.url, bodies)
    result = asyncio.run(
        drive(args.url, payloads, args.rate, args.duration, args.warmup, args.connections)
    )
    sys.stdout.write(MARKER + json.dumps(result) + "\n")
    sys.stdout.flush()
    os._exit(0)  # skip closing hundreds of transports one by one


if __name__ == "__main__":
    sys.exit(main())
