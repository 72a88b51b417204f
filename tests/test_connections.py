"""Connection limits (``mlserve.connections``): oversized heads get 431, idle, slowloris and slow-body
connections are closed on time, and hundreds of them starve no real client.

Everything runs against a real server over raw sockets, so the bytes on the wire are the test's own.
Most tests share one server whose limits are small enough to watch them act within a second or two.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import resource
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mlserve.errors import SettingsError
from mlserve.settings import HttpSettings, load_settings
from serverproc import ServerProc, assert_ok, call, predict, serve, watched

MAX_HEADER_BYTES = 2048
KEEPALIVE_S = 1.5
HEADER_S = 0.5
BODY_S = 1.0
LIMITS = {
    "MLSERVE_HTTP__MAX_HEADER_BYTES": str(MAX_HEADER_BYTES),
    "MLSERVE_HTTP__KEEPALIVE_TIMEOUT_S": str(KEEPALIVE_S),
    "MLSERVE_HTTP__HEADER_TIMEOUT_S": str(HEADER_S),
    "MLSERVE_HTTP__BODY_TIMEOUT_S": str(BODY_S),
}
LATE_S = 0.6
"""How late a deadline may act: the sweep runs every quarter of the shortest timeout (0.125 s here),
and a loaded test machine adds its own delays."""
FEATURES = [5.1, 3.5, 1.4, 0.2]
HEAD = b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
TRICKLE_S = 0.05
"""The pause between the bytes a slow client sends."""
FLOOD_TRICKLE_S = 0.5
"""The pause of the flood's slowloris connections: slower, as real ones are, so that 50 of them do not
load the test machine itself."""
FLOOD_SOFT_LIMIT = 256
"""The open files soft limit the flood test's server inherits: far below the connections it is sent."""


@pytest.fixture(scope="module")
def limited_server(demo_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    with serve(demo_models_dir, tmp_path_factory.mktemp("limited-server"), env=LIMITS) as server:
        yield server


@pytest.fixture
def limited(limited_server: ServerProc) -> Iterator[ServerProc]:
    with watched(limited_server) as server:
        yield server


@dataclass(frozen=True)
class RawReply:
    status: int
    headers: dict[str, str]
    body: bytes

    def error(self) -> str:
        """The message of a JSON error answer, checking its shape: ``{"error": "..."}``."""
        assert self.headers.get("content-type", "").startswith("application/json"), self
        message = json.loads(self.body)["error"]
        assert isinstance(message, str) and message, self
        return message


def parse(data: bytes) -> RawReply:
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return RawReply(int(status_line.split()[1]), headers, body)


@contextlib.asynccontextmanager
async def connection(server: ServerProc) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        yield reader, writer
    finally:
        writer.close()


async def exchange(server: ServerProc, request: bytes) -> RawReply:
    """Send ``request`` on a new connection and read until the server closes it."""
    async with connection(server) as (reader, writer):
        writer.write(request)
        return parse(await asyncio.wait_for(reader.read(), 5))


async def read_answer(reader: asyncio.StreamReader) -> RawReply:
    """One answer on a connection that stays open, framed by its Content-Length."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    reply = parse(head)
    return RawReply(reply.status, reply.headers, await reader.readexactly(int(reply.headers["content-length"])))


async def until_closed(reader: asyncio.StreamReader, timeout_s: float = 5.0) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    started = time.monotonic()
    try:
        data = await asyncio.wait_for(reader.read(), timeout_s)
    except ConnectionResetError:
        data = b""
    return data, time.monotonic() - started


async def trickle(
    writer: asyncio.StreamWriter, data: bytes, until: asyncio.Future[Any], pause_s: float = TRICKLE_S
) -> None:
    """Send ``data`` a byte at a time, then keep sending spaces, until ``until`` is done or the
    connection is gone."""
    with contextlib.suppress(ConnectionError):
        for index in itertools.count():
            if until.done():
                return
            writer.write(data[index : index + 1] or b" ")
            await writer.drain()
            await asyncio.sleep(pause_s)


def head_with(*fields: bytes, target: bytes = b"/health/live") -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\nHost: test\r\n" + b"".join(field + b"\r\n" for field in fields) + b"\r\n"


def test_http_limits_are_settings_of_their_own_table(tmp_path: Path) -> None:
    assert load_settings(env={}).http == HttpSettings()
    config = tmp_path / "s.toml"
    config.write_text("[http]\nmax_header_bytes = 4096\nkeepalive_timeout_s = 20\n")
    http = load_settings(str(config), env={"MLSERVE_HTTP__BODY_TIMEOUT_S": "2.5"}).http
    assert (http.max_header_bytes, http.keepalive_timeout_s, http.body_timeout_s) == (4096, 20.0, 2.5)
    with pytest.raises(SettingsError, match="header_timeout_s"):
        load_settings(env={"MLSERVE_HTTP__HEADER_TIMEOUT_S": "0"})
    with pytest.raises(SettingsError, match="idle_timeout_s"):
        load_settings(env={"MLSERVE_HTTP__IDLE_TIMEOUT_S": "5"})


OVERSIZED = {
    "a long header value": head_with(b"X-Big: " + b"a" * 3000),
    "a long header name": head_with(b"X-" + b"a" * 3000 + b": 1"),
    "too many header fields": head_with(*(b"X-%d: 1" % n for n in range(200))),
    "a long request line": head_with(target=b"/health/live?pad=" + b"a" * 3000),
}


@pytest.mark.parametrize("request_head", OVERSIZED.values(), ids=OVERSIZED.keys())
async def test_a_head_over_the_limits_is_431_in_json_and_the_server_stays_healthy(
    limited: ServerProc, http: aiohttp.ClientSession, request_head: bytes
) -> None:
    reply = await exchange(limited, request_head)
    assert reply.status == 431, reply
    assert "too large" in reply.error(), reply
    assert_ok(await call(http, "GET", limited.url("/health/live")))


async def test_a_header_within_the_limit_is_served(limited: ServerProc, http: aiohttp.ClientSession) -> None:
    reply = await call(
        http, "POST", limited.url("/predict"), json_body={"features": FEATURES}, headers={"X-Pad": "a" * 1900}
    )
    assert assert_ok(reply)["prediction"] == 0


async def test_a_malformed_head_is_400_in_json(limited: ServerProc) -> None:
    reply = await exchange(limited, head_with(b"Bad Header: 1"))
    assert reply.status == 400, reply
    assert reply.error().startswith("malformed request"), reply


async def test_the_default_header_limit_is_8_kib(iris: ServerProc, http: aiohttp.ClientSession) -> None:
    assert (await exchange(iris, head_with(b"X-Big: " + b"a" * 8200))).status == 431
    assert_ok(await call(http, "GET", iris.url("/health/live"), headers={"X-Big": "a" * 8000}))


async def test_an_idle_keepalive_connection_is_closed_after_keepalive_timeout(limited: ServerProc) -> None:
    async with connection(limited) as (reader, writer):
        writer.write(head_with())
        assert (await read_answer(reader)).status == 200
        data, waited_s = await until_closed(reader)
    assert data == b""
    assert KEEPALIVE_S - 0.1 <= waited_s <= KEEPALIVE_S + LATE_S, waited_s


async def test_a_new_connection_that_sends_nothing_is_closed_after_header_timeout(limited: ServerProc) -> None:
    async with connection(limited) as (reader, _):
        data, waited_s = await until_closed(reader)
    assert data == b""
    assert HEADER_S - 0.05 <= waited_s <= HEADER_S + LATE_S < KEEPALIVE_S, waited_s


async def test_a_slowloris_connection_is_closed_after_header_timeout(limited: ServerProc) -> None:
    async with connection(limited) as (reader, writer):
        closed = asyncio.ensure_future(until_closed(reader))
        await trickle(writer, HEAD + b"X-Slow: ", closed)
        data, waited_s = await closed
    assert data == b"", data
    assert HEADER_S - 0.05 <= waited_s <= HEADER_S + LATE_S < KEEPALIVE_S, waited_s


async def test_a_slow_body_is_408_while_other_connections_are_served(
    limited: ServerProc, http: aiohttp.ClientSession
) -> None:
    latencies: list[float] = []

    async def others_predict(until: asyncio.Future[Any]) -> None:
        while not until.done():
            started = time.monotonic()
            assert assert_ok(await predict(http, limited, FEATURES))["prediction"] == 0
            latencies.append(time.monotonic() - started)
            await asyncio.sleep(0.02)

    async with connection(limited) as (reader, writer):
        writer.write(HEAD + b"Content-Length: 64\r\n\r\n")
        closed = asyncio.ensure_future(until_closed(reader))
        await asyncio.gather(trickle(writer, b'{"features": ', closed), others_predict(closed))
        data, waited_s = await closed
    reply = parse(data)
    assert reply.status == 408, data
    assert "did not arrive" in reply.error()
    assert BODY_S - 0.05 <= waited_s <= BODY_S + LATE_S, waited_s
    assert len(latencies) >= 10 and max(latencies) < 0.5, latencies


@contextlib.contextmanager
def soft_file_limit(limit: int) -> Iterator[None]:
    """Lower this process's soft limit on open files, so that a server started meanwhile inherits it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(limit, soft), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def open_files_limits(pid: int) -> tuple[int, int]:
    """The soft and hard limits on open files of process ``pid``, from ``/proc``."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError(f"no open files limit for {pid}")


@pytest.mark.skipif(
    int(Path("/proc/sys/net/core/somaxconn").read_text()) < 1024, reason="the kernel caps the listen backlog lower"
)
async def test_hundreds_of_idle_and_slowloris_connections_starve_no_client(
    demo_models_dir: Path, start_server: Callable[..., ServerProc]
) -> None:
    """500 idle and 50 slowloris connections stay open while a client makes 200 predictions, each on a
    new connection: every one is answered at once.

    The server started with an open files soft limit far below that, which it raises to the hard limit;
    a server that did not would stop accepting. The idle connections arrive while the server is stopped
    (as when its loop is busy): the kernel queues them all, where aiohttp's backlog of 128 would drop
    most, to be retried seconds later."""
    with soft_file_limit(FLOOD_SOFT_LIMIT):
        server = start_server(demo_models_dir, env={"MLSERVE_HTTP__HEADER_TIMEOUT_S": "60"}, workers=1)
    soft, hard = open_files_limits(server.pid)
    assert soft == hard == resource.getrlimit(resource.RLIMIT_NOFILE)[1]

    os.kill(server.pid, signal.SIGSTOP)
    try:
        idle = await asyncio.wait_for(
            asyncio.gather(*(asyncio.open_connection("127.0.0.1", server.port) for _ in range(500))), 3
        )
    finally:
        os.kill(server.pid, signal.SIGCONT)
    slow = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", server.port) for _ in range(50)))
    done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    trickles = [asyncio.ensure_future(trickle(writer, HEAD + b"X-Slow: ", done, FLOOD_TRICKLE_S)) for _, writer in slow]
    latencies = []
    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True), timeout=aiohttp.ClientTimeout(total=5)
        ) as fresh:
            for _ in range(200):
                started = time.monotonic()
                assert assert_ok(await predict(fresh, server, FEATURES))["prediction"] == 0
                latencies.append(time.monotonic() - started)
        still_open = [not reader.at_eof() for reader, _ in idle + slow]
    finally:
        done.set_result(None)
        await asyncio.gather(*trickles)
        for _, writer in idle + slow:
            writer.close()
    assert all(still_open), f"{still_open.count(False)} of the flood's connections were closed"
    assert max(latencies) < 1.0, sorted(latencies)[-5:]
