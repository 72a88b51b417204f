"""``RedisLink`` against a real ``redis-server``: replies in order, errors, logins, and a Redis that
dies, pauses or comes back."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from mlserve.redislink import RedisLink
from redisproc import RedisProc

TIMEOUT_S = 1.0


@pytest.fixture
async def link(redis: RedisProc) -> AsyncIterator[RedisLink]:
    """A link to the test's own Redis, closed after the test."""
    opened = RedisLink(redis.url, TIMEOUT_S)
    yield opened
    opened.close()


async def test_pipelined_commands_get_their_own_replies_in_order(redis: RedisProc) -> None:
    link = RedisLink(redis.url, TIMEOUT_S)
    try:
        assert await link.call(b"SET", b"k", b"v") == b"OK"
        await link.call("MSET", *[item for n in range(50) for item in (f"n{n}", n)])
        # Sent in one go, without awaiting between them: each future gets its own command's reply.
        replies = await asyncio.gather(*(link.send(b"GET", f"n{n}") for n in range(50)))
        assert replies == [str(n).encode() for n in range(50)]
        assert await link.call(b"MGET", b"k", b"absent") == [b"v", None]
        with pytest.raises(ResponseError, match="unknown command"):
            await link.call(b"NOSUCHCOMMAND")
        assert await link.call(b"GET", b"k") == b"v", "an error reply leaves the connection usable"
    finally:
        link.close()


async def test_password_and_database_from_the_url(redis: RedisProc) -> None:
    admin = RedisLink(redis.url, TIMEOUT_S)
    try:
        assert await admin.call(b"CONFIG", b"SET", b"requirepass", b"s3cret") == b"OK"
        link = RedisLink(f"redis://:s3cret@127.0.0.1:{redis.port}/3", TIMEOUT_S)
        await link.call(b"SET", b"where", b"db3")
        assert b" db=3 " in await link.call(b"CLIENT", b"INFO")
        assert await admin.call(b"GET", b"where") is None, "the key went to database 3, not 0"
        link.close()
        wrong = RedisLink(f"redis://:nope@127.0.0.1:{redis.port}/0", TIMEOUT_S)
        with pytest.raises(ResponseError):
            await wrong.call(b"PING")
    finally:
        admin.close()


async def test_dead_redis_fails_commands_at_once_and_a_restarted_one_is_reconnected(
    redis: RedisProc, link: RedisLink
) -> None:
    await link.call(b"SET", b"k", b"v")
    assert redis.proc is not None
    os.kill(redis.proc.pid, signal.SIGSTOP)
    in_flight = link.send(b"GET", b"k")
    redis.proc.kill()  # a SIGKILL is delivered to a stopped process too
    redis.proc.wait()
    async with asyncio.timeout(TIMEOUT_S):
        with pytest.raises(RedisConnectionError):
            await in_flight
    with pytest.raises(RedisConnectionError):
        await link.call(b"PING")
    redis.start()
    assert await link.call(b"PING") == b"PONG"


async def test_a_paused_redis_times_out_and_its_late_reply_goes_to_no_one_else(
    redis: RedisProc, link: RedisLink
) -> None:
    await link.call(b"SET", b"a", b"1")
    await link.call(b"SET", b"b", b"2")
    assert redis.proc is not None
    os.kill(redis.proc.pid, signal.SIGSTOP)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await link.call(b"GET", b"a")
    os.kill(redis.proc.pid, signal.SIGCONT)
    assert await link.call(b"GET", b"b") == b"2", "the late reply to GET a is discarded, not handed on"
