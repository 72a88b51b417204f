"""The prediction log: one JSON line per prediction, carrying the request id the client sent.

In-process tests cover the writer (rotation, drops, encoding), the request ids and the wrapper's
sampling and payload shapes; spawned processes share one file, as the front ends of a server do; two
real servers show what an operator sees: a file with a line for every answer and every error, and
the same lines on standard output.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import multiprocessing
import os
import random
import re
from collections.abc import Callable
from multiprocessing.synchronize import Barrier
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from mlserve import predictionlog
from mlserve.api.logged import logged
from mlserve.api.keys import CALL, METRICS, RESULT, SERVED
from mlserve.batcher import BatchResult
from mlserve.errors import SettingsError
from mlserve.metrics import Metrics
from mlserve.predictionlog import BackgroundWriter, PredictionLog, Record, RotatingFile
from mlserve.service import Call
from mlserve.settings import PredictionLogSettings, load_settings
from serverproc import ServerProc, assert_error, assert_ok, call, poll, scrape

StartServer = Callable[..., ServerProc]
ROW = [6.3, 3.3, 6.0, 2.5]
METADATA = {"time", "request_id", "endpoint", "model", "version", "variant", "cache", "status", "latency_ms"}


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def record(request_id: str, status: int = 200) -> Record:
    return Record(1.5, request_id, "predict", "m", "v1", None, None, status, 0.25)


# -- in-process: the writer -------------------------------------------------------------------------


async def test_rotation_keeps_backups_and_never_splits_a_line(tmp_path: Path) -> None:
    path = tmp_path / "predictions.jsonl"
    sink = RotatingFile(str(path), max_bytes=100, backups=2)
    written = [f'{{"n":{n:02d},"pad":"{"x" * 20}"}}\n'.encode() for n in range(20)]  # 32 bytes a line
    for first in range(0, 20, 2):
        sink.write(written[first] + written[first + 1])
    await sink.close()
    files = [path, tmp_path / "predictions.jsonl.1", tmp_path / "predictions.jsonl.2"]
    assert sorted(tmp_path.iterdir()) == files, "two backups, no third"
    assert all(file.stat().st_size <= 100 for file in files)
    kept = [line["n"] for file in reversed(files) for line in lines_of(file)]
    assert kept == list(range(20 - len(kept), 20)), "the newest lines, in order, oldest file first"


async def test_no_backups_starts_the_file_over(tmp_path: Path) -> None:
    path = tmp_path / "predictions.jsonl"
    sink = RotatingFile(str(path), max_bytes=10, backups=0)
    for text in (b"first line\n", b"second line\n"):
        sink.write(text)
    await sink.close()
    assert [p.name for p in tmp_path.iterdir()] == ["predictions.jsonl"]
    assert path.read_bytes() == b"second line\n"


async def test_a_writer_follows_a_rotation_another_made(tmp_path: Path) -> None:
    """Two writers of one path, taking turns: each sees the other's bytes, and the one whose file was
    moved away writes to the new one rather than rotating it early."""
    path = tmp_path / "predictions.jsonl"
    first, second = (RotatingFile(str(path), max_bytes=100, backups=3) for _ in range(2))
    for index, sink in enumerate([first, second, first, second, second, first]):
        sink.write(f'{{"n":{index},"pad":"{"x" * 24}"}}\n'.encode())  # 40 bytes a line
    await first.close()
    await second.close()
    files = [tmp_path / "predictions.jsonl.2", tmp_path / "predictions.jsonl.1", path]
    assert sorted(tmp_path.iterdir(), reverse=True) == files
    assert [[line["n"] for line in lines_of(file)] for file in files] == [[0, 1], [2, 3], [4, 5]]


SHARED_MAX_BYTES = 8192
SHARED_BACKUPS = 400
LINES_EACH = 10_000
LARGEST_BATCH = 8
NUMBERED_LINE = re.compile(rb'\{"writer":(\d),"n":(\d{5})\}')


def numbered_line(writer: int, n: int) -> bytes:
    return b'{"writer":%d,"n":%05d}\n' % (writer, n)


LINE_BYTES = len(numbered_line(0, 0))


def write_numbered_lines(path: str, writer: int, start: Barrier) -> None:
    """A front end's prediction log: ``LINES_EACH`` numbered lines in batches of 1 to ``LARGEST_BATCH``,
    written as fast as it can beside the other processes'."""
    sink = RotatingFile(path, SHARED_MAX_BYTES, SHARED_BACKUPS)
    sizes = random.Random(writer)
    start.wait(timeout=30)
    n = 0
    while n < LINES_EACH:
        count = min(sizes.randint(1, LARGEST_BATCH), LINES_EACH - n)
        sink.write(b"".join(numbered_line(writer, i) for i in range(n, n + count)))
        n += count
    asyncio.run(sink.close())


def test_processes_sharing_the_file_rotate_it_together_and_keep_every_line(tmp_path: Path) -> None:
    """Three processes, each with its own ``RotatingFile`` on one path: every line lands once, whole,
    in order; no file passes ``max_bytes`` (each process counting only its own bytes let it grow to
    three times that) and none is rotated before the next batch would not fit (a process that rotated
    on its own count moved another's fresh file away)."""
    path = tmp_path / "predictions.jsonl"
    spawn = multiprocessing.get_context("spawn")
    start = spawn.Barrier(3)
    writers = [spawn.Process(target=write_numbered_lines, args=(str(path), writer, start)) for writer in range(3)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(120)
    assert [writer.exitcode for writer in writers] == [0, 0, 0]
    files = [path, *(tmp_path / f"predictions.jsonl.{index}" for index in range(1, len(list(tmp_path.iterdir()))))]
    assert sorted(tmp_path.iterdir()) == sorted(files) and len(files) < SHARED_BACKUPS, "backups 1 to N, none dropped"
    numbers: list[list[int]] = [[], [], []]
    authors: list[set[int]] = []
    for file in reversed(files):  # oldest first
        data = file.read_bytes()
        assert data.endswith(b"\n"), f"{file.name} ends mid-line"
        assert len(data) <= SHARED_MAX_BYTES, f"{file.name} holds {len(data)} bytes"
        if file != path:
            assert len(data) > SHARED_MAX_BYTES - LARGEST_BATCH * LINE_BYTES, f"{file.name} was rotated early"
        authors.append(set())
        for line in data.splitlines():
            match = NUMBERED_LINE.fullmatch(line)
            assert match, f"a torn line in {file.name}: {line!r}"
            numbers[int(match[1])].append(int(match[2]))
            authors[-1].add(int(match[1]))
    assert all(written == list(range(LINES_EACH)) for written in numbers), "each line once, in order"
    assert any(len(wrote) > 1 for wrote in authors), "the processes wrote side by side"


async def test_lines_are_json_and_unset_fields_are_left_out(tmp_path: Path) -> None:
    path = tmp_path / "predictions.jsonl"
    log = PredictionLog(PredictionLogSettings(enabled=True, path=str(path)))
    log.start()
    log.add(record("a"))
    log.add(record("b"))
    await asyncio.sleep(predictionlog.FLUSH_INTERVAL_S * 2)
    assert len(lines_of(path)) == 2, "written within the interval, before shutdown"
    failed = record("c", 422)
    failed.error = "expected 4 features, got 3"
    failed.inputs = [[1.0, 2.0, 3.0]]
    log.add(failed)
    await log.close()
    lines = lines_of(path)
    assert [line["request_id"] for line in lines] == ["a", "b", "c"]
    assert set(lines[0]) == METADATA, "no error, inputs or outputs keys when they are unset"
    assert lines[2]["error"] == "expected 4 features, got 3" and lines[2]["inputs"] == [[1.0, 2.0, 3.0]]
    assert "outputs" not in lines[2]
    assert log.dropped == 0


async def test_a_stdout_reader_that_falls_behind_costs_lines_not_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Standard output as a pipe nobody reads: its thread blocks, the backlog fills, lines are dropped
    and counted; once the reader catches up, everything queued arrives."""
    monkeypatch.setattr(predictionlog, "MAX_BACKLOG_BYTES", 1000)
    reader, writer = os.pipe()
    sink = BackgroundWriter(writer)
    log = PredictionLog(PredictionLogSettings(enabled=True, path="-"))
    log._sink = sink
    log.start()
    for index in range(2000):  # batches of one line, ~180 bytes each: more than the pipe holds
        log.add(record(str(index)))
        log.flush()
        await asyncio.sleep(0)
    assert 1000 < log.dropped < 2000

    def read_to_the_end() -> bytes:
        received = bytearray()
        while chunk := os.read(reader, 1 << 20):
            received += chunk
        return bytes(received)

    reading = asyncio.ensure_future(asyncio.to_thread(read_to_the_end))
    await log.close()
    os.close(writer)
    received = await reading
    os.close(reader)
    ids = [json.loads(line)["request_id"] for line in received.splitlines()]
    assert len(ids) == 2000 - log.dropped and ids == sorted(ids, key=int)


def test_request_id_is_the_clients_when_usable() -> None:
    log = PredictionLog(PredictionLogSettings(enabled=True, path="-"))
    assert log.request_id("checkout-7f3a") == "checkout-7f3a"
    assert log.request_id("x" * 200) == "x" * 200
    for unusable in (None, "", "x" * 201, "caf\u00e9", "a\nb", "a\x00b"):
        generated = log.request_id(unusable)
        assert generated != unusable and generated.isascii() and generated.isprintable()
    ids = {log.request_id(None) for _ in range(1000)}
    assert len(ids) == 1000
    other = PredictionLog(PredictionLogSettings(enabled=True, path="-"))
    assert other.request_id(None) not in ids, "each process has a prefix of its own"


def test_sample_rate_is_the_fraction_logged() -> None:
    def kept(rate: float) -> int:
        log = PredictionLog(PredictionLogSettings(enabled=True, path="-", sample_rate=rate))
        return sum(log.sampled() for _ in range(4000))

    assert (kept(0.0), kept(1.0)) == (0, 4000)
    assert 1700 < kept(0.5) < 2300


def test_settings_are_validated(tmp_path: Path) -> None:
    settings = load_settings(env={"MLSERVE_PREDICTION_LOG__ENABLED": "true", "MLSERVE_PREDICTION_LOG__SAMPLE_RATE": "0.5"})
    assert settings.prediction_log.enabled and settings.prediction_log.sample_rate == 0.5
    assert settings.prediction_log.path is None and not settings.prediction_log.payloads
    for field, value in (("SAMPLE_RATE", "1.5"), ("MAX_BYTES", "0"), ("BACKUPS", "-1")):
        with pytest.raises(SettingsError, match=field.lower()):
            load_settings(env={f"MLSERVE_PREDICTION_LOG__{field}": value})
    with pytest.raises(SettingsError, match="prediction_log.path"):
        PredictionLog(PredictionLogSettings(enabled=True, path=str(tmp_path / "missing" / "p.jsonl")))


# -- in-process: the wrapper ------------------------------------------------------------------------


async def serve_logged(handler: Any, log: PredictionLog) -> TestServer:
    """A bare app with one logged prediction route, as ``create_app`` wires it. Like ``app.run``, the test
    server cancels the handler of a client that hangs up."""

    async def metered_handler(request: web.Request) -> Any:
        return await handler(request), Metrics().recorder("m", "v1", "predict_image", 200)

    app = web.Application()
    app[METRICS] = Metrics()
    app.router.add_post("/predict", logged(metered_handler, "predict_image", log))
    server = TestServer(app)
    await server.start_server()
    log.start()
    return server


async def test_sample_rate_zero_logs_nothing_but_echoes_the_id(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    log = PredictionLog(PredictionLogSettings(enabled=True, path=str(path), sample_rate=0.0))

    async def handler(request: web.Request) -> web.Response:
        raise web.HTTPNotFound()

    server = await serve_logged(handler, log)
    async with aiohttp.ClientSession() as http:
        for _ in range(20):
            async with http.post(server.make_url("/predict"), headers={"X-Request-ID": "r-1"}) as response:
                assert response.status == 404 and response.headers["X-Request-ID"] == "r-1"
    await server.close()
    await log.close()
    assert path.read_text() == ""


async def test_an_image_is_logged_as_its_size_and_digest(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    log = PredictionLog(PredictionLogSettings(enabled=True, path=str(path), payloads=True))
    image = b"\x89PNG\r\n\x1a\n" + bytes(range(256))

    async def handler(request: web.Request) -> web.Response:
        request[SERVED] = SimpleNamespace(spec=SimpleNamespace(name="digits", version="v1"), cache=None)  # type: ignore[assignment]
        request[CALL] = Call("digits", None, [image], "image", 1.0, variant="v1")
        request[RESULT] = BatchResult([(7, 0.93, [0.01] * 10)], 0.001)
        return web.Response(text="{}")

    server = await serve_logged(handler, log)
    async with aiohttp.ClientSession() as http:
        async with http.post(server.make_url("/predict")) as response:
            generated = response.headers["X-Request-ID"]
    await server.close()
    await log.close()
    [line] = lines_of(path)
    assert line["request_id"] == generated and line["variant"] == "v1" and line["endpoint"] == "predict_image"
    assert line["inputs"] == [{"bytes": len(image), "sha256": hashlib.sha256(image).hexdigest()}]
    assert line["outputs"] == [{"class": 7, "confidence": 0.93}]


async def test_a_client_that_hangs_up_is_logged_as_499(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    log = PredictionLog(PredictionLogSettings(enabled=True, path=str(path)))

    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        raise AssertionError("the handler should have been cancelled")

    server = await serve_logged(handler, log)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.2)) as http:
        with pytest.raises(asyncio.TimeoutError):
            await http.post(server.make_url("/predict"), headers={"X-Request-ID": "gone"})

    async def written() -> bool:
        return path.read_text() != ""

    await poll(written, timeout_s=5, what="the hung-up request's line")
    await server.close()
    await log.close()
    [line] = lines_of(path)
    assert (line["request_id"], line["status"], line["model"]) == ("gone", 499, None)
    assert line["latency_ms"] >= 150


# -- a real server ----------------------------------------------------------------------------------


async def post(
    http: aiohttp.ClientSession, server: ServerProc, path: str, body: dict[str, Any], request_id: str | None = None
) -> Any:
    headers = {"X-Request-ID": request_id} if request_id is not None else None
    return await call(http, "POST", server.url(path), json_body=body, headers=headers)


async def test_file_log_has_a_line_per_answer_and_error_with_the_clients_id(
    http: aiohttp.ClientSession, start_server: StartServer, demo_models_dir: Path, tmp_path: Path,
    offline: dict[str, list[int]], iris_rows: list[list[float]],
) -> None:
    from mlserve.demo_models import IRIS  # here: the spawned writers import this module, and sklearn takes seconds

    path = tmp_path / "predictions.jsonl"
    server = start_server(demo_models_dir, env={
        "MLSERVE_PREDICTION_LOG__ENABLED": "true",
        "MLSERVE_PREDICTION_LOG__PATH": str(path),
        "MLSERVE_PREDICTION_LOG__PAYLOADS": "true",
        "MLSERVE_CACHE__ENABLED": "true",
    })
    one = {"features": iris_rows[120], "model": IRIS, "model_version": "v1"}
    replies = {
        "first": await post(http, server, "/predict", one, "client-first"),
        "again": await post(http, server, "/predict", one, "client-again"),
        "batch": await post(http, server, "/predict/batch", {"samples": iris_rows[:3]}, "client-batch"),
        "unnamed": await post(http, server, "/predict", {"features": ROW}),
        "garbled": await post(http, server, "/predict", {"features": ROW}, "caf\u00e9"),
        "narrow": await post(http, server, "/predict", {"features": ROW[:3]}, "client-narrow"),
        "unknown": await post(http, server, "/predict", {"features": ROW, "model": "nope"}, "client-unknown"),
    }
    for name in ("first", "again", "batch", "unnamed", "garbled"):
        assert_ok(replies[name])
    assert_error(replies["narrow"], 422)
    assert_error(replies["unknown"], 404)
    ids = {name: reply.headers.get("X-Request-ID") for name, reply in replies.items()}
    assert ids["first"] == "client-first" and ids["narrow"] == "client-narrow", "the client's id is echoed"
    assert ids["unnamed"] and ids["garbled"] and ids["garbled"] != "caf\u00e9", "a usable id is generated"
    assert len(set(ids.values())) == len(ids)

    async def all_written() -> bool:
        return path.exists() and len(path.read_text().splitlines()) == len(replies)

    await poll(all_written, timeout_s=5, what="a line for every request, written while the server runs")
    lines = {line["request_id"]: line for line in lines_of(path)}
    assert set(lines) == set(ids.values())
    first = lines["client-first"]
    assert METADATA <= set(first) and first["endpoint"] == "predict" and first["status"] == 200
    assert (first["model"], first["version"], first["variant"]) == (IRIS, "v1", None)
    assert first["inputs"] == [iris_rows[120]] and first["outputs"] == [offline["v1"][120]]
    assert (first["cache"], lines["client-again"]["cache"]) == ("miss", "hit")
    assert 0 < first["latency_ms"] < 5000 and abs(first["time"] - lines[ids["unnamed"]]["time"]) < 60
    batch = lines["client-batch"]
    assert (batch["endpoint"], batch["version"], batch["outputs"]) == ("predict_batch", "v2", offline["v2"][:3])
    narrow = lines["client-narrow"]
    assert (narrow["status"], narrow["model"], narrow["inputs"]) == (422, IRIS, [ROW[:3]])
    assert "expected 4 features" in narrow["error"] and "outputs" not in narrow
    unknown = lines["client-unknown"]
    assert (unknown["status"], unknown["model"], unknown["version"]) == (404, None, None)
    assert unknown["error"] == replies["unknown"].body["error"]
    assert (await scrape(http, server)).value("mlserve_prediction_log_dropped_total") == 0


async def test_stdout_log_is_metadata_only_by_default(
    http: aiohttp.ClientSession, start_server: StartServer, demo_models_dir: Path
) -> None:
    server = start_server(demo_models_dir, env={"MLSERVE_PREDICTION_LOG__ENABLED": "true"})
    for index in range(3):
        assert_ok(await post(http, server, "/predict", {"features": ROW}, f"stdout-{index}"))

    def logged() -> list[dict[str, Any]]:
        """The JSON lines among the server's output (its stdout and stderr share the harness's file)."""
        return [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]

    async def all_written() -> bool:
        return len(logged()) == 3

    await poll(all_written, timeout_s=5, what="three JSON lines on the server's stdout")
    lines = logged()
    assert [line["request_id"] for line in lines] == ["stdout-0", "stdout-1", "stdout-2"]
    assert all(set(line) == METADATA and line["status"] == 200 and line["version"] == "v2" for line in lines)
    assert all(line["cache"] is None for line in lines), "the cache is off"
