"""Several front ends on one port (``--frontends``) act as one server: what a client and an operator see.

Each test opens a new connection a request where it matters (``spread``), so the kernel's
``SO_REUSEPORT`` choice sends requests to every front end, and looks at each front end alone over the
Unix socket it answers on besides the port.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest

from mlserve.demo_models import IRIS
from mlserve.frontends import worker_share
from serverproc import (
    Metrics, ServerProc, assert_ok, call, child_pids, mlserve_command, mlserve_env, poll, predict, scrape,
)
from testmodels import SlowModel, SlowRaisingModel, write_model

StartServer = Callable[..., ServerProc]
FRONTENDS = 2
ROW = [6.1, 2.8, 4.7, 1.2]


def sockets(server: ServerProc) -> list[str]:
    """Each front end's own Unix socket, from the supervisor's log."""
    found = re.search(r"front ends listen on \S+ \(and each on (\S+)\)", server.log())
    assert found, server.log()
    return [found.group(1).replace("<n>", str(index)) for index in range(server.frontends)]


def frontend_pids(server: ServerProc) -> list[int]:
    return [pid for pid in child_pids(server.pid) if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()]


@pytest.fixture
async def spread() -> AsyncIterator[aiohttp.ClientSession]:
    """A client that opens a new connection for every request."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        yield session


async def on_each(server: ServerProc, method: str, path: str, **options: object) -> list[dict[str, object]]:
    """The JSON answer of every front end alone to one request."""
    answers = []
    for path_of_socket in sockets(server):
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path_of_socket)) as session:
            reply = await call(session, method, f"http://frontend{path}", **options)  # type: ignore[arg-type]
            answers.append(assert_ok(reply))
    return answers


async def frontend_metrics(server: ServerProc) -> list[Metrics]:
    found = []
    for path_of_socket in sockets(server):
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path_of_socket)) as session:
            async with session.get("http://frontend/metrics", params={"scope": "frontend"}) as response:
                found.append(Metrics.parse(await response.text()))
    return found


def test_workers_are_split_evenly_and_each_front_end_gets_one() -> None:
    assert [worker_share(5, 2, i) for i in range(2)] == [3, 2]
    assert [worker_share(2, 4, i) for i in range(4)] == [1, 1, 1, 1]


async def test_requests_spread_and_metrics_describe_the_whole_server(
    spread: aiohttp.ClientSession, start_server: StartServer, demo_models_dir: Path, offline: dict[str, list[int]],
    iris_rows: list[list[float]],
) -> None:
    server = start_server(demo_models_dir, frontends=FRONTENDS)
    rows = iris_rows[:60]
    replies = await asyncio.gather(*(predict(spread, server, row, model_version="v1") for row in rows))
    assert [assert_ok(r)["prediction"] for r in replies] == offline["v1"][:60]
    each = await frontend_metrics(server)
    answered = [m.value("mlserve_requests_total", model=IRIS, version="v1", endpoint="predict", status="200")
                for m in each]
    assert all(count > 0 for count in answered), f"a front end took no request: {answered}"
    whole = await scrape(spread, server)
    assert whole.value("mlserve_frontends_scraped") == FRONTENDS
    assert whole.value("mlserve_requests_total", model=IRIS, version="v1", endpoint="predict", status="200") == 60
    assert whole.value("mlserve_workers_live") == 2, "the workers of both front ends"
    assert whole.value("mlserve_model_info", model=IRIS, version="v1", state="ready", active="false") == 1


async def test_an_activation_and_an_experiment_reach_every_front_end(
    spread: aiohttp.ClientSession, start_server: StartServer, demo_models_dir: Path
) -> None:
    server = start_server(demo_models_dir, frontends=FRONTENDS)
    assert {str(a["active_version"]) for a in await on_each(server, "GET", f"/models/{IRIS}/versions")} == {"v2"}
    assert_ok(await call(spread, "POST", server.url(f"/models/{IRIS}/versions/v1/activate")))
    started = time.monotonic()

    async def all_on_v1() -> bool:
        return {str(a["active_version"]) for a in await on_each(server, "GET", f"/models/{IRIS}/versions")} == {"v1"}

    await poll(all_on_v1, timeout_s=2.0, what="every front end to serve v1", interval_s=0.01)
    assert time.monotonic() - started < 1.0
    replies = await asyncio.gather(*(predict(spread, server, ROW) for _ in range(20)))
    assert {assert_ok(r)["model_version"] for r in replies} == {"v1"}

    split = {"variants": {"v1": 0.5, "v2": 0.5}, "salt": "frontends"}
    assert_ok(await call(spread, "PUT", server.url(f"/models/{IRIS}/experiment"), json_body=split))

    async def all_split() -> bool:
        try:
            return all(a["variants"] == split["variants"] for a in await on_each(server, "GET", f"/models/{IRIS}/experiment"))
        except AssertionError:  # 404 where it has not arrived yet
            return False

    await poll(all_split, timeout_s=2.0, what="every front end to run the experiment", interval_s=0.01)
    users = [f"user-{n}" for n in range(40)]
    chosen = []
    for socket_path in sockets(server):
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(socket_path)) as session:
            chosen.append([
                assert_ok(await call(session, "POST", "http://frontend/predict", json_body={"features": ROW},
                                     headers={"X-User-ID": user}))["variant"]
                for user in users
            ])
    assert chosen[0] == chosen[1], "a user sees the same version whichever front end answers"
    assert set(chosen[0]) == {"v1", "v2"}
    whole = assert_ok(await call(spread, "GET", server.url(f"/models/{IRIS}/experiment")))
    assert sum(whole["assigned"].values()) == FRONTENDS * len(users), "every front end's calls, wherever it is asked"
    alone = await on_each(server, "GET", f"/models/{IRIS}/experiment?scope=frontend")
    assert [sum(a["assigned"].values()) for a in alone] == [len(users)] * FRONTENDS  # type: ignore[union-attr]


async def test_a_front_end_that_dies_is_replaced_while_the_others_serve(
    spread: aiohttp.ClientSession, start_server: StartServer, demo_models_dir: Path
) -> None:
    server = start_server(demo_models_dir, frontends=FRONTENDS)
    before = server.log_size()
    victim = frontend_pids(server)[0]
    os.kill(victim, signal.SIGKILL)
    statuses: list[int | str] = []
    for _ in range(30):  # the survivor answers meanwhile; the dead one's port is closed with it
        try:
            statuses.append((await predict(spread, server, ROW)).status)
        except aiohttp.ClientError as exc:
            statuses.append(type(exc).__name__)
    assert statuses.count(200) >= 29, statuses

    async def replaced() -> bool:
        return "listen on" in server.log(before) and len(frontend_pids(server)) == FRONTENDS

    await poll(replaced, timeout_s=60.0, what="the dead front end to be started again and listen")
    assert "exited (-9); starting it again" in server.log(before)
    assert victim not in frontend_pids(server)
    assert (await scrape(spread, server)).value("mlserve_frontends_scraped") == FRONTENDS


async def test_sigterm_drains_every_front_end_and_answers_what_they_took(
    spread: aiohttp.ClientSession, start_server: StartServer, tmp_path: Path
) -> None:
    """SIGTERM with 1 s requests in flight on both front ends: every one is answered, then exit 0.

    (Clients that keep sending on keep-alive connections through the end of the drain can have a
    request reset as a front end closes an idle connection: the race every HTTP/1.1 server has, and
    why load balancers stop sending during ``drain_delay_s``. What a server must not do is drop a
    request it took, which this checks.)"""
    models = tmp_path / "models"
    write_model(models, "slow", "v1", SlowModel(1.0))
    server = start_server(models, frontends=FRONTENDS, env={"MLSERVE_DRAIN_DELAY_S": "0.2"})
    calls = [asyncio.create_task(predict(spread, server, [float(i), 0, 0, 0])) for i in range(16)]

    async def all_arrived() -> bool:
        each = await frontend_metrics(server)
        taken = [m.value("mlserve_batch_size_sum") + m.value("mlserve_queue_depth") for m in each]
        return sum(taken) == len(calls) and all(taken)

    await poll(all_arrived, timeout_s=10, what="the requests to reach both front ends' batchers")
    server.terminate()
    replies = await asyncio.wait_for(asyncio.gather(*calls), timeout=30)
    assert [assert_ok(r)["prediction"] for r in replies] == [2.0 * i for i in range(16)]
    assert await asyncio.to_thread(server.wait_exit) == 0, server.log()


@pytest.mark.parametrize("through", ["table", "redis"])
async def test_cache_hits_and_single_flight_hold_across_front_ends(
    spread: aiohttp.ClientSession, start_server: StartServer, tmp_path: Path, request: pytest.FixtureRequest,
    through: str,
) -> None:
    models = tmp_path / "models"
    write_model(models, "slow", "v1", SlowModel(0.5))
    env = {"MLSERVE_CACHE__ENABLED": "true"}
    if through == "redis":
        env["MLSERVE_CACHE__REDIS_URL"] = request.getfixturevalue("redis").url
    server = start_server(models, frontends=FRONTENDS, env=env)

    async def computed() -> float:
        return (await scrape(spread, server)).value("mlserve_batch_size_sum", model="slow", version="v1")

    replies = await asyncio.gather(*(predict(spread, server, [4.0, 1, 2, 3]) for _ in range(50)))
    assert {assert_ok(r)["prediction"] for r in replies} == {8.0}
    assert await computed() == 1, "fifty callers over both front ends, one row computed"
    later = await asyncio.gather(*(predict(spread, server, [4.0, 1, 2, 3]) for _ in range(20)))
    assert [r.headers.get("X-Cache") for r in later] == ["hit"] * 20, "a hit on whichever front end answers"
    each = await frontend_metrics(server)
    hits = [m.value("mlserve_cache_requests_total", model="slow", version="v1", layer="l1", result="hit") for m in each]
    assert all(count > 0 for count in hits), f"a front end answered no hit: {hits}"
    assert await computed() == 1


async def test_a_row_whose_batch_fails_is_not_awaited_across_front_ends_until_the_deadline(
    spread: aiohttp.ClientSession, start_server: StartServer, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    write_model(models, "broken", "v1", SlowRaisingModel(0.5))
    server = start_server(models, frontends=FRONTENDS,
                          env={"MLSERVE_CACHE__ENABLED": "true", "MLSERVE_REQUEST_TIMEOUT_MS": "20000"})
    started = time.monotonic()
    replies = await asyncio.gather(*(predict(spread, server, [4.0, 1, 2, 3]) for _ in range(20)))
    assert {r.status for r in replies} == {500}
    assert time.monotonic() - started < 10, "those waiting in the other front end computed it themselves at once"
    each = await frontend_metrics(server)
    assert all(m.value("mlserve_requests_total", model="broken", version="v1", endpoint="predict", status="500") > 0
               for m in each), "both front ends took some of the calls"


def running(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie that nobody reaped has stopped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


async def test_a_supervisor_killed_outright_leaves_no_front_end_and_the_next_start_removes_its_run_directory(
    start_server: StartServer, demo_models_dir: Path
) -> None:
    cache_on = {"MLSERVE_CACHE__ENABLED": "true"}
    first = start_server(demo_models_dir, frontends=FRONTENDS, env=cache_on)
    run_dir = Path(sockets(first)[0]).parent
    front_ends = frontend_pids(first)
    assert len(front_ends) == FRONTENDS and (run_dir / "cached-rows.table").exists()
    os.kill(first.pid, signal.SIGKILL)
    assert first.wait_exit() == -signal.SIGKILL  # reaped, as its parent (a shell, an init) would

    async def front_ends_gone() -> bool:
        return not any(map(running, front_ends))

    await poll(front_ends_gone, timeout_s=20, what="the front ends to stop with their supervisor")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", first.port), timeout=2).close()
    assert run_dir.exists(), "SIGKILL ran no clean-up"
    start_server(demo_models_dir, frontends=FRONTENDS, env=cache_on)
    assert not run_dir.exists(), "the next supervisor removed what the killed one left"


def test_a_taken_port_stops_the_whole_server(demo_models_dir: Path, tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        argv = mlserve_command("serve", "--port", str(port), "--models-dir", str(demo_models_dir), "--workers", "2",
                               "--frontends", str(FRONTENDS))
        env = mlserve_env({"MLSERVE_STATE_PATH": str(tmp_path / "state.json")})
        done = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "address already in use" in done.stderr.lower() and "failed to start" in done.stderr


async def test_every_front_end_writes_the_one_prediction_log_whole(
    spread: aiohttp.ClientSession, start_server: StartServer, demo_models_dir: Path, tmp_path: Path
) -> None:
    path = tmp_path / "predictions.jsonl"
    env = {"MLSERVE_PREDICTION_LOG__ENABLED": "true", "MLSERVE_PREDICTION_LOG__PATH": str(path)}
    server = start_server(demo_models_dir, frontends=FRONTENDS, env=env)
    ids = [f"client-{n}" for n in range(200)]
    replies = await asyncio.gather(*(
        call(spread, "POST", server.url("/predict"), json_body={"features": ROW}, headers={"X-Request-ID": i})
        for i in ids
    ))
    assert all(r.status == 200 for r in replies)

    async def all_written() -> bool:
        return path.exists() and len(path.read_bytes().splitlines()) >= len(ids)

    await poll(all_written, timeout_s=5.0, what="a line for every request, from both front ends")
    logged = [json.loads(line)["request_id"] for line in path.read_bytes().splitlines()]
    assert sorted(logged) == sorted(ids), "each request once, no line torn or lost"
    each = await frontend_metrics(server)
    assert all(m.value("mlserve_requests_total", model=IRIS, version="v2", endpoint="predict", status="200") > 0
               for m in each), "both front ends wrote to it"
