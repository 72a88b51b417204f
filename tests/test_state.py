"""The state stores: the file store's atomic writes, its sharing by processes of one machine (locked
read-modify-writes, a polling watch), Redis's shared hash and its notices.

The Redis tests run against a real ``redis-server`` on a free port, stopped mid-test where a test
needs Redis to fail. The file store's concurrency test runs its writers in spawned processes, each
with its own loop, as the server's front ends do.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
from multiprocessing.synchronize import Barrier
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
    assert sorted(os.listdir(path.parent)) == ["active.json", "active.json.lock"], "no temporary file is left beside it"
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
    with pytest.raises(StateUnavailable, match="unreadable"):
        await FileStore(str(path)).set_active("iris", "v1")
    assert path.read_text() == '{"active": {"iris": ', "a change is not written over what it could not read"


def activate_many(path: str, prefix: str, start: Barrier) -> None:
    """A front-end process: activate 50 models of its own, one change at a time, on its own loop."""

    async def activate() -> None:
        store = FileStore(path)
        for i in range(50):
            await store.set_active(f"{prefix}{i}", "v1")

    start.wait(timeout=30)
    asyncio.run(activate())


def test_file_store_changes_from_two_processes_at_once_all_land(tmp_path: Path) -> None:
    path = str(tmp_path / "state.json")
    spawn = multiprocessing.get_context("spawn")
    start = spawn.Barrier(2)
    writers = [spawn.Process(target=activate_many, args=(path, prefix, start)) for prefix in ("a", "b")]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(60)
    assert [writer.exitcode for writer in writers] == [0, 0]
    expected = {f"{prefix}{i}": "v1" for prefix in ("a", "b") for i in range(50)}
    assert json.loads(Path(path).read_text())["active"] == expected, "no process's change is lost"


async def test_shared_file_store_watch_hears_another_writer(tmp_path: Path) -> None:
    path = str(tmp_path / "state.json")
    writer = FileStore(path)
    await writer.set_active("images", "v3")
    heard: asyncio.Queue[SharedState] = asyncio.Queue()

    async def on_change(state: SharedState) -> None:
        await heard.put(state)

    watch = asyncio.create_task(FileStore(path, shared=True).watch(on_change))
    try:
        assert await asyncio.wait_for(heard.get(), 1) == SharedState(active={"images": "v3"}), "it catches up first"
        await writer.set_active("iris", "v2")
        await asyncio.wait_for(heard_state(heard, SharedState(active={"images": "v3", "iris": "v2"})), 1)
        await writer.set_experiment("iris", SPLIT)
        await asyncio.wait_for(heard_state(heard, SharedState({"images": "v3", "iris": "v2"}, {"iris": SPLIT})), 1)
        await writer.set_experiment("iris", None)
        await asyncio.wait_for(heard_state(heard, SharedState(active={"images": "v3", "iris": "v2"})), 1)
        await asyncio.sleep(0.2)
        assert heard.empty(), "an unchanged file is not reported again"
    finally:
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)


async def test_unshared_file_store_watch_returns_at_once(tmp_path: Path) -> None:
    async def on_change(state: SharedState) -> None:
        raise AssertionError("an unshared store reports nothing")

    await asyncio.wait_for(FileStore(str(tmp_path / "state.json")).watch(on_change), 0.1)


async def test_shared_file_store_watch_survives_the_file_deleted_and_recreated(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.json"
    writer = FileStore(str(path))
    await writer.set_active("iris", "v1")
    heard: asyncio.Queue[SharedState] = asyncio.Queue()

    async def on_change(state: SharedState) -> None:
        await heard.put(state)

    watch = asyncio.create_task(FileStore(str(path), shared=True, poll_s=0.01).watch(on_change))
    try:
        assert await asyncio.wait_for(heard.get(), 1) == SharedState(active={"iris": "v1"})
        with caplog.at_level(logging.WARNING, logger="mlserve.state"):
            path.unlink()
            await asyncio.sleep(0.2)
            assert heard.empty(), "a vanished file is not reported as an empty state"
            warnings = [r.getMessage() for r in caplog.records if r.name == "mlserve.state"]
            assert len(warnings) == 1 and "vanished" in warnings[0], "one warning, not one a poll"
            await writer.set_active("images", "v3")
            await asyncio.wait_for(heard_state(heard, SharedState(active={"images": "v3"})), 1)
        assert "readable again" in [r.getMessage() for r in caplog.records if r.name == "mlserve.state"][-1]
        assert not watch.done()
    finally:
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)


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
