"""``RedisLink``: one pipelined Redis connection for the prediction cache's own commands.

Why not redis-py's asyncio client on this path: the cache sends a lookup and a write every loop
iteration while the front end is the bottleneck, so the client's CPU a command is throughput, and
redis-py spends most of it outside the wire work (connection checkout, command packing in Python,
stream reader plumbing). Here a command is packed by hiredis, written to the transport without an
await, and its reply, parsed by hiredis' reader in ``data_received``, resolves the future the
caller awaits; replies come back in the order the commands went out. redis-py still reads the URL,
so the forms it takes (``redis://``, ``rediss://``, ``unix://``, user, password, db, ``ssl_cert_reqs``)
mean the same here, and it still serves everything else (the state store and its pub/sub).

Failures are redis-py's exception types, so callers catch one family: a dropped or refused
connection is ``ConnectionError`` for every command in flight (the next command reconnects), an
error reply is ``ResponseError``. Timeouts are the caller's: a command it stops waiting for keeps its
place in the reply order and its late reply is discarded.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from typing import Any

import hiredis
from redis.asyncio.connection import SSLConnection, parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

Reply = Any
"""What hiredis gives back: bytes, an int, None, or a list of them."""


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiting: collections.deque[asyncio.Future[Reply]] = collections.deque()
        self._reader = hiredis.Reader()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        reader, waiting = self._reader, self.waiting
        reader.feed(data)
        while (reply := reader.gets()) is not False:
            future = waiting.popleft()
            if future.done():
                continue  # its caller timed out
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(ResponseError(str(reply)))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        waiting, self.waiting = self.waiting, collections.deque()
        for future in waiting:
            if not future.done():
                future.set_exception(RedisConnectionError(f"Redis closed the connection: {exc!r}"))


class RedisLink:
    def __init__(self, url: str, connect_timeout_s: float) -> None:
        options = parse_url(url)
        self._path: str | None = options.get("path")
        self._host: str = options.get("host", "localhost")
        self._port: int = int(options.get("port", 6379))
        self._ssl = _ssl_context(options) if options.get("connection_class") is SSLConnection else None
        self._hello = _hello(options)
        self._connect_timeout_s = connect_timeout_s
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None

    def send(self, *args: bytes | str | int) -> asyncio.Future[Reply]:
        """Write one command now, on the open connection; its reply arrives in the returned future.
        Raises ``ConnectionError`` when there is none: ``connect`` first."""
        protocol = self._protocol
        if protocol is None or protocol.transport is None:
            raise RedisConnectionError("not connected to Redis")
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        protocol.transport.write(hiredis.pack_command(args))
        protocol.waiting.append(future)
        return future

    async def call(self, *args: bytes | str | int) -> Reply:
        """One command's reply, connecting first when there is no open connection."""
        if self._protocol is None or self._protocol.transport is None:
            await self.connect()
        return await self.send(*args)

    async def connect(self) -> None:
        """Open the connection (once, however many callers ask at the same time) and log in."""
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._protocol is not None and self._protocol.transport is not None:
                return
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(self._connect_timeout_s):
                    if self._path is not None:
                        _, protocol = await loop.create_unix_connection(_Protocol, self._path)
                    else:
                        _, protocol = await loop.create_connection(
                            _Protocol, self._host, self._port, ssl=self._ssl
                        )
                    self._protocol = protocol
                    for command in self._hello:
                        await self.send(*command)
            except (OSError, TimeoutError) as exc:
                self.close()
                raise RedisConnectionError(f"cannot reach Redis: {exc!r}") from exc
            except ResponseError:
                self.close()
                raise

    def close(self) -> None:
        """Drop the connection: every command in flight fails at once with ``ConnectionError``."""
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.abort()


def _hello(options: dict[str, Any]) -> list[tuple[bytes | str | int, ...]]:
    """The commands a new connection starts with: log in, choose the database."""
    commands: list[tuple[bytes | str | int, ...]] = []
    if options.get("password") is not None:
        user = options.get("username")
        commands.append(("AUTH", user, options["password"]) if user else ("AUTH", options["password"]))
    if int(options.get("db") or 0):
        commands.append(("SELECT", int(options["db"])))
    return commands


def _ssl_context(options: dict[str, Any]) -> ssl.SSLContext:
    """TLS for ``rediss://``: verified by default; ``?ssl_cert_reqs=none`` turns verification off."""
    context = ssl.create_default_context(cafile=options.get("ssl_ca_certs"))
    if str(options.get("ssl_cert_reqs", "required")).lower() in ("none", "cert_none"):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
