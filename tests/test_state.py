"""The state stores in-process: the file store's atomic writes, Redis's shared hash and its notices.

The Redis tests run against a real ``redis-server`` on a free port, stopped mid-test where a test
needs Redis to fail.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from mlserve.errors import StateUnavailable
from mlserve.experiments import Experiment, Shadow
from mlserve.state import FileStore, RedisStore, SharedState
from redisproc import RedisProc
from serverproc import free_port


async def test_file_store_reads_back_what_it_wrote(tmp_path: Path) -> None:
    path = tmp_path / "state" / "active.json"
    store = FileStore(str(path))
    assert await store.read() == SharedState(), "no file yet is no saved state"
    await store.set_active("iris", "v1")
    await store.set_active("images", "v3")
    await store.set_active("iris", "v2")
    await store.set_experiment("iris", SPLIT)
    assert json.loads(path.read_text()) == {
        "active": {"iris": "v2", "images": "v3"},
        "experiments": {"iris": {"variants": {"v1": 0.8, "v2": 0.2}, "salt": "s"}},
    }
    expected = SharedState(active={"iris": "v2", "images": "v3"}, experiments={"iris": SPLIT})
    assert await FileStore(str(path)).read() == expected, "a new process reads the same"
    assert os.listdir(path.parent) == ["active.json"], "no temporary file is left beside it"
    await store.set_experiment("iris", None)
    assert (await FileStore(str(path)).read()).experiments == {}, "an ended experiment is gone after a restart"


async def test_file_store_keeps_other_models_when_it_starts_from_a_saved_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"active": {"a": "v1", "b": "v2"}}))
    store = FileStore(str(path))
    await store.read()
    await store.set_active("a", "v9")
    assert json.loads(path.read_text())["active"] == {"a": "v9", "b": "v2"}
    assert "experiments" not in json.loads(path.read_text()), "no experiment, no key in the file"


async def test_file_store_that_cannot_write_refuses_the_change(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    store = FileStore(str(blocker / "state.json"))
    with pytest.raises(StateUnavailable, match="cannot write the state file"):
        await store.set_active("iris", "v1")


async def test_corrupt_state_file_is_reported_not_trusted(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text('{"active": {"iris": ')
    with pytest.raises(StateUnavailable, match="unreadable"):
        await FileStore(str(path)).read()


SPLIT = Experiment(variants={"v1": 0.8, "v2": 0.2}, salt="s")


async def heard_state(heard: asyncio.Queue[SharedState], state: SharedState) -> None:
    """Until the watch reports ``state`` (it may report the unchanged state before, on polls)."""
    while (await heard.get()) != state:
        pass


async def test_redis_store_change_reaches_another_replicas_watch(redis: RedisProc) -> None:
    first, second = RedisStore(redis.url, "t", 30.0), RedisStore(redis.url, "t", 30.0)
    heard: asyncio.Queue[SharedState] = asyncio.Queue()

    async def on_change(state: SharedState) -> None:
        await heard.put(state)

    watch = asyncio.create_task(second.watch(on_change))
    try:
        assert await asyncio.wait_for(heard.get(), 5) == SharedState(), "the watch starts by catching up"
        await first.set_active("iris", "v1")
        # A notice, not the 30 s poll, brings it.
        await asyncio.wait_for(heard_state(heard, SharedState(active={"iris": "v1"})), 2)
        shadowed = Experiment(shadow=Shadow(version="v2", fraction=0.5))
        await first.set_experiment("iris", shadowed)
        await asyncio.wait_for(heard_state(heard, SharedState({"iris": "v1"}, {"iris": shadowed})), 2)
        await first.set_experiment("iris", None)
        await asyncio.wait_for(heard_state(heard, SharedState(active={"iris": "v1"})), 2)
        assert await second.read() == SharedState(active={"iris": "v1"})
        other = RedisStore(redis.url, "other", 30.0)
        assert await other.read() == SharedState(), "another prefix is another deployment"
        await other.close()
    finally:
        for store in (first, second):
            await store.close()
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)


async def test_redis_down_refuses_changes_and_the_watch_recovers(redis: RedisProc) -> None:
    store = RedisStore(redis.url, "t", 0.2)
    heard: asyncio.Queue[SharedState] = asyncio.Queue()

    async def on_change(state: SharedState) -> None:
        await heard.put(state)

    watch = asyncio.create_task(store.watch(on_change))
    try:
        await asyncio.wait_for(heard.get(), 5)
        redis.stop()
        with pytest.raises(StateUnavailable, match="the change was not made"):
            await store.set_active("iris", "v1")
        with pytest.raises(StateUnavailable, match="the change was not made"):
            await store.set_experiment("iris", SPLIT)
        redis.start()
        writer = RedisStore(redis.url, "t", 30.0)
        await writer.set_active("iris", "v2")
        await writer.close()

        await asyncio.wait_for(heard_state(heard, SharedState(active={"iris": "v2"})), 10)
    finally:
        await store.close()
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)


async def test_unreachable_redis_fails_fast_with_state_unavailable() -> None:
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", "t", 1.0)
    with pytest.raises(StateUnavailable, match="Redis is unavailable"):
        await asyncio.wait_for(store.read(), 5)
    await store.close()
