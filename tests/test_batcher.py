"""The batcher's races, one test each, named after the race they guard (DESIGN.md, "The batcher").

``run_batch`` is a gated fake: a batch waits on an event until the test opens it, so the test
decides exactly what is queued while a slot is busy. No pool is involved.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np
import pytest

from mlserve.batcher import HIGH, LOW, NORMAL, Batcher, BatchResult
from mlserve.errors import DeadlineExceeded, Overloaded, PredictionFailed, QueueFull, ShuttingDown


class GatedRunner:
    """Records every batch; each waits for ``gate`` before answering ``10 * x[0]`` a row."""

    def __init__(self, gated: bool = False, output: Callable[[np.ndarray], object] | None = None) -> None:
        self.batches: list[np.ndarray] = []
        self.gate = asyncio.Event()
        self.started = asyncio.Event()
        self.output = output or (lambda rows: rows[:, 0] * 10)
        if not gated:
            self.gate.set()

    async def __call__(self, rows: list[list[float]]) -> tuple[object, float]:
        batch = np.array(rows, dtype=np.float64)  # stacking is run_batch's job, as in the service
        self.batches.append(batch)
        self.started.set()
        await self.gate.wait()
        return self.output(batch), 0.002

    @property
    def sizes(self) -> list[int]:
        return [len(batch) for batch in self.batches]


def rows(*values: float) -> list[list[float]]:
    return [[v, 0.0] for v in values]


def make(runner: GatedRunner, **knobs: float) -> Batcher:
    settings = {"max_batch_size": 4, "max_delay_ms": 0.0, "max_queue": 100, "max_inflight": 1} | knobs
    return Batcher(runner, **settings)  # type: ignore[arg-type]


def within(seconds: float = 30.0) -> float:
    """A request's timeout: long unless the test is about deadlines."""
    return seconds


async def occupy_slot(batcher: Batcher, runner: GatedRunner) -> asyncio.Task[BatchResult]:
    """Submit one request and wait until its batch holds the only slot (the gate is closed)."""
    task = asyncio.ensure_future(batcher.submit(rows(-1), within()))
    await asyncio.wait_for(runner.started.wait(), 5)
    return task


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_eager_dispatch_at_one_client() -> None:
    runner = GatedRunner()
    batcher = make(runner, max_delay_ms=0)
    result = await asyncio.wait_for(batcher.submit(rows(3), within()), 5)
    assert result.values == [30.0]
    assert result.compute_s == 0.002
    assert runner.sizes == [1]
    await batcher.close()


async def test_full_batch_closes_without_waiting_for_the_delay() -> None:
    runner = GatedRunner()
    batcher = make(runner, max_batch_size=4, max_delay_ms=60_000)
    results = await asyncio.wait_for(asyncio.gather(*(batcher.submit(rows(i), within()) for i in range(4))), 5)
    assert [r.values for r in results] == [[0.0], [10.0], [20.0], [30.0]]
    assert runner.sizes == [4]
    await batcher.close()


async def test_batch_filled_while_its_delay_window_is_open_goes_at_once() -> None:
    runner = GatedRunner()
    batcher = make(runner, max_batch_size=4, max_delay_ms=60_000)
    first = asyncio.ensure_future(batcher.submit(rows(0), within()))
    await settle()
    assert runner.sizes == [], "one row waits for mates"
    rest = [batcher.submit(rows(i), within()) for i in (1, 2, 3)]
    results = await asyncio.wait_for(asyncio.gather(first, *rest), 5)
    assert [r.values for r in results] == [[0.0], [10.0], [20.0], [30.0]]
    assert runner.sizes == [4]
    await batcher.close()


async def test_delay_window_is_measured_from_first_enqueue() -> None:
    runner = GatedRunner()
    batcher = make(runner, max_batch_size=100, max_delay_ms=400)
    loop = asyncio.get_running_loop()
    started = loop.time()
    first = asyncio.ensure_future(batcher.submit(rows(1), within()))
    await asyncio.sleep(0.3)
    second = asyncio.ensure_future(batcher.submit(rows(2), within()))
    await asyncio.wait_for(asyncio.gather(first, second), 5)
    # One batch holding both, closed 400 ms after the FIRST arrival, not 400 ms after the second.
    assert runner.sizes == [2]
    assert loop.time() - started < 0.65
    await batcher.close()


async def test_next_batch_waits_for_the_running_one_until_it_is_overdue() -> None:
    runner = GatedRunner(gated=True)
    batcher = make(runner, max_batch_size=4, max_inflight=2, overlap_after_ms=300)
    loop = asyncio.get_running_loop()
    running = await occupy_slot(batcher, runner)
    sent = loop.time()
    second = asyncio.ensure_future(batcher.submit(rows(1), within()))
    await asyncio.sleep(0.1)
    assert runner.sizes == [1], "a slot is free, but the running batch is not overdue yet"
    while len(runner.sizes) < 2:
        await asyncio.sleep(0.01)
    assert loop.time() - sent >= 0.29
    full = [asyncio.ensure_future(batcher.submit(rows(v), within())) for v in (2, 3, 4, 5)]
    await settle()
    assert runner.sizes == [1, 1], "no slot free"
    runner.gate.set()
    await asyncio.wait_for(asyncio.gather(running, second, *full), 5)
    await batcher.close()


async def test_full_batch_runs_beside_a_running_one_at_once() -> None:
    runner = GatedRunner(gated=True)
    batcher = make(runner, max_batch_size=4, max_inflight=2, overlap_after_ms=60_000)
    running = await occupy_slot(batcher, runner)
    full = [asyncio.ensure_future(batcher.submit(rows(v), within())) for v in (1, 2, 3, 4)]
    await settle()
    assert runner.sizes == [1, 4]
    runner.gate.set()
    await asyncio.wait_for(asyncio.gather(running, *full), 5)
    await batcher.close()


async def test_returning_batch_sends_everything_queued_behind_it() -> None:
    runner = GatedRunner(gated=True)
    batcher = make(runner, max_batch_size=8, max_inflight=2, overlap_after_ms=60_000)
    running = await occupy_slot(batcher, runner)
    queued = [asyncio.ensure_future(batcher.submit(rows(v), within())) for v in (1, 2, 3)]
    await settle()
    assert runner.sizes == [1]
    runner.gate.set()
    results = await asyncio.wait_for(asyncio.gather(running, *queued), 5)
    assert runner.sizes == [1, 3]
    assert [r.values for r in results[1:]] == [[10.0], [20.0], [30.0]]
    await batcher.close()


async def test_queue_larger_than_one_batch_is_drained_in_full_batches() -> None:
    runner = GatedRunner(gated=True)
    batcher = make(runner, max_batch_size=4, max_inflight=1)
    blocker = await occupy_slot(batcher, runner)
    waiting = [asyncio.ensure_future(batcher.submit(rows(i), within())) for i in range(10)]
    await settle()
    assert batcher.queue_depth == 10
    runner.gate.set()
    results = await asyncio.wait_for(asyncio.gather(blocker, *waiting), 5)
    assert runner.sizes == [1, 4, 4, 2]
    assert [r.values for r in results[1:]] == [[10.0 * i] for i in range(10)]
    await batcher.close()


async def test_request_split_across_batches_is_reassembled_in_order() -> None:
    runner = GatedRunner(gated=True)
    batcher = make(runner, max_batch_size=4)
    blocker = await occupy_slot(batcher, runner)
    small = asyncio.ensure_future(batcher.submit(rows(100), within()))
    big = asyncio.ensure_future(batcher.submit(rows(*range(9)), within()))
    await settle()
    runner.gate.set()
    await asyncio.wait_for(asyncio.gather(blocker, small, big), 5)
    assert runner.sizes == [1, 4, 4, 2]
    assert small.result().values == [1000.0]
    assert big.result().values == [10.0 * i for i in range(9)]
    assert big.result().compute_s == pytest.approx(3 * 0.002)
    await batcher.close()


async def test_cancelled_caller_is_skipped_while_batch_mates_resolve() -> None:
    runner = GatedRunner(gated=True)
    # Room for two: the cancelled caller must not take the place of a live one.
    batcher = make(runner, max_batch_size=2)
    blocker = await occupy_slot(batcher, runner)
    first, gone, last = (asyncio.ensure_future(batcher.submit(rows(v), within())) for v in (1, 2, 3))
    await settle()
    gone.cancel()
    await settle()
    runner.gate.set()
    await asyncio.wait_for(asyncio.gather(blocker, first, last), 5)
    assert gone.cancelled()
    assert runner.sizes == [1, 2]
    assert (first.result().values, last.result().values) == ([10.0], [30.0])
    await batcher.close()


async def test_caller_cancelled_while_its_batch_runs_does_not_break_batch_mates() -> None:
    runner = GatedRunner(gated=True)
    batcher = make(runner, max_batch_size=8)
    mates = [asyncio.ensure_future(batcher.submit(rows(v), within())) for v in (1, 2, 3)]
    await asyncio.wait_for(runner.started.wait(), 5)
    assert runner.sizes == [3]
    mates[1].cancel()
    runner.gate.set()
    done = await asyncio.wait_for(asyncio.gather(mates[0], mates[2]), 5)
    assert [r.values for r in done] == [[10.0], [30.0]]
    assert mates[1].cancelled()
    await batcher.close()


async def test_output_length_mismatch_fails_every_caller_of_that_batch() -> None:
    runner = GatedRunner(gated=True, output=lambda batch: batch[1:, 0])
    batcher = make(runner, max_batch_size=8)
    blocker = await occupy_slot(batcher, runner)
    mates = [asyncio.ensure_future(batcher.submit(rows(v), within())) for v in (1, 2)]
    await settle()
    runner.gate.set()
    outcomes = await asyncio.gather(blocker, *mates, return_exceptions=True)
    assert all(isinstance(o, PredictionFailed) for o in outcomes)
    assert "returned 1 outputs for 2 rows" in str(outcomes[1])
    await batcher.close()


async def test_failure_during_assembly_fails_only_its_batch() -> None:
    runner = GatedRunner(gated=True)
    batcher = make(runner, max_batch_size=8)
    blocker = await occupy_slot(batcher, runner)
    narrow = asyncio.ensure_future(batcher.submit([[0.0, 0.0]], within()))
    wide = asyncio.ensure_future(batcher.submit([[0.0, 0.0, 0.0]], within()))
    await settle()
    runner.gate.set()
    await blocker
    outcomes = await asyncio.gather(narrow, wide, return_exceptions=True)
    assert all(isinstance(o, ValueError) for o in outcomes), outcomes
    # The batcher survived: the next request is served.
    assert (await asyncio.wait_for(batcher.submit(rows(5), within()), 5)).values == [50.0]
    await batcher.close()


async def test_run_batch_error_fails_its_callers_and_the_batcher_survives() -> None:
    calls = 0

    async def flaky(batch: list[list[float]]) -> tuple[object, float]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise PredictionFailed("model exploded")
        return [row[0] for row in batch], 0.0

    batcher = Batcher(flaky, max_batch_size=4, max_delay_ms=0, max_queue=10, max_inflight=1)
    with pytest.raises(PredictionFailed, match="model exploded"):
        await batcher.submit(rows(1), within())
    assert (await asyncio.wait_for(batcher.submit(rows(2), within()), 5)).values == [2.0]
    await batcher.close()


async def test_close_with_pending_items_fails_them_and_finishes_running_batches() -> None:
    runner = GatedRunner(gated=True)
    batcher = make(runner, max_batch_size=8)
    running = await occupy_slot(batcher, runner)
    queued = [asyncio.ensure_future(batcher.submit(rows(v), within())) for v in (1, 2)]
    await settle()
    closing = asyncio.create_task(batcher.close())
    await settle()
    for task in queued:
        with pytest.raises(ShuttingDown):
            await task
    runner.gate.set()
    await asyncio.wait_for(closing, 5)
    assert running.result().values == [-10.0]
    with pytest.raises(ShuttingDown):
        await batcher.submit(rows(3), within())


async def test_full_queue_rejects_at_once() -> None:
    runner = GatedRunner(gated=True)
    batcher = make(runner, max_queue=2)
    blocker = await occupy_slot(batcher, runner)
    queued = [asyncio.ensure_future(batcher.submit(rows(v), within())) for v in (1, 2)]
    await settle()
    with pytest.raises(QueueFull):
        await batcher.submit(rows(3), within())
    runner.gate.set()
    await asyncio.wait_for(asyncio.gather(blocker, *queued), 5)
    await batcher.close()


async def test_deadline_passed_while_queued_is_dropped_before_the_batch_runs() -> None:
    runner = GatedRunner(gated=True)
    batcher = make(runner, max_batch_size=8)
    blocker = await occupy_slot(batcher, runner)
    doomed = asyncio.ensure_future(batcher.submit(rows(1), within(0.05)))
    kept = asyncio.ensure_future(batcher.submit(rows(2), within()))
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(doomed, 5)
    runner.gate.set()
    await asyncio.wait_for(asyncio.gather(blocker, kept), 5)
    assert runner.sizes == [1, 1]
    assert kept.result().values == [20.0]
    await batcher.close()


async def test_deadline_bounds_the_wait_while_the_batch_runs() -> None:
    runner = GatedRunner(gated=True)
    batcher = make(runner)
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(batcher.submit(rows(1), within(0.1)), 5)
    runner.gate.set()
    await asyncio.wait_for(batcher.submit(rows(2), within()), 5)
    await batcher.close()


async def test_earlier_deadline_behind_a_later_one_still_expires_on_time() -> None:
    runner = GatedRunner(gated=True)
    batcher = make(runner, max_batch_size=8)
    patient = asyncio.ensure_future(batcher.submit(rows(1), within(30)))
    hasty = asyncio.ensure_future(batcher.submit(rows(2), within(0.1)))
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(hasty, 2)
    runner.gate.set()
    assert (await asyncio.wait_for(patient, 5)).values == [10.0]
    await batcher.close()


async def test_batches_grow_with_load_and_each_caller_gets_its_own_row() -> None:
    runner = GatedRunner()
    batcher = make(runner, max_batch_size=64, max_inflight=2)

    async def client(offset: int) -> list[float]:
        return [(await batcher.submit(rows(offset * 100 + i), within())).values[0] for i in range(20)]

    answers = await asyncio.wait_for(asyncio.gather(*(client(c) for c in range(32))), 10)
    assert answers == [[10.0 * (c * 100 + i) for i in range(20)] for c in range(32)]
    assert max(runner.sizes) > 1
    assert sum(runner.sizes) == 32 * 20
    await batcher.close()


async def test_observers_hear_every_batch_and_each_request_once() -> None:
    runner = GatedRunner(gated=True)
    batch_rows: list[int] = []
    queue_times: list[float] = []
    batcher = Batcher(
        runner,
        max_batch_size=4,
        max_delay_ms=0,
        max_queue=10,
        max_inflight=1,
        on_batch=batch_rows.append,
        on_queued=queue_times.append,
    )
    blocker = await occupy_slot(batcher, runner)
    split = asyncio.ensure_future(batcher.submit(rows(*range(6)), within()))
    await asyncio.sleep(0.05)
    runner.gate.set()
    await asyncio.wait_for(asyncio.gather(blocker, split), 5)
    assert batch_rows == [1, 4, 2]
    assert len(queue_times) == 2, "a request split over two batches is one queued request"
    assert queue_times[1] >= 0.04
    await batcher.close()


async def test_deadline_holds_while_a_batch_collects_mates_and_then_runs() -> None:
    runner = GatedRunner(gated=True)
    batcher = make(runner, max_batch_size=100, max_delay_ms=10_000)
    # The batch waits for mates until this request's deadline, then runs and never returns: the
    # caller must still hear of its deadline, though its request was neither queued nor running
    # when the deadline passed.
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(batcher.submit(rows(1), within(0.1)), 2)
    runner.gate.set()
    await batcher.close()


async def test_close_while_a_batch_collects_mates_fails_its_requests() -> None:
    batcher = make(GatedRunner(), max_batch_size=100, max_delay_ms=10_000)
    waiting = asyncio.ensure_future(batcher.submit(rows(1), within()))
    await settle()
    await batcher.close()
    with pytest.raises(ShuttingDown):
        await asyncio.wait_for(waiting, 2)


async def test_drain_finishes_queued_and_running_requests_and_refuses_new_ones() -> None:
    """Unloading a version drains it: what was queued or running is answered, later calls are refused."""
    runner = GatedRunner(gated=True)
    batcher = make(runner, max_batch_size=2)
    running = await occupy_slot(batcher, runner)
    queued = [asyncio.ensure_future(batcher.submit(rows(x), within())) for x in (1, 2, 3)]
    await settle()
    drain = asyncio.ensure_future(batcher.drain(30.0, "v9 is being unloaded"))
    await settle()
    with pytest.raises(ShuttingDown, match="v9 is being unloaded"):
        batcher.submit(rows(4), within())
    assert not drain.done(), "the drain waits for the work it already had"
    runner.gate.set()
    await asyncio.wait_for(drain, 5)
    assert [r.values for r in await asyncio.gather(running, *queued)] == [[-10.0], [10.0], [20.0], [30.0]]
    assert runner.sizes == [1, 2, 1]


async def test_drain_that_times_out_fails_what_is_left() -> None:
    runner = GatedRunner(gated=True)
    batcher = make(runner)
    running = await occupy_slot(batcher, runner)
    queued = asyncio.ensure_future(batcher.submit(rows(1), within()))
    await settle()
    await asyncio.wait_for(batcher.drain(0.05, "going"), 5)
    with pytest.raises(ShuttingDown):
        await queued
    runner.gate.set()
    assert (await running).values == [-10.0], "a batch already running is not cut off"


async def test_drain_of_an_idle_batcher_returns_at_once() -> None:
    batcher = make(GatedRunner())
    await asyncio.wait_for(batcher.drain(30.0, "going"), 1)


class TimedRunner:
    """Answers ``10 * x[0]`` a row after ``batch_s``, whatever the batch's size."""

    def __init__(self, batch_s: float) -> None:
        self.batch_s = batch_s

    async def __call__(self, rows: list[list[float]]) -> tuple[object, float]:
        await asyncio.sleep(self.batch_s)
        return [row[0] * 10 for row in rows], self.batch_s


async def flood(admit_by_deadline: bool) -> tuple[list[Overloaded], list[asyncio.Future[BatchResult]]]:
    """Three calls one at a time (the batcher learns its rate), then 40 at once with 0.3 s deadlines to
    a model that answers two rows every 50 ms: the refusals, and the futures of the calls taken."""
    batcher = Batcher(TimedRunner(0.05), max_batch_size=2, max_delay_ms=0, max_queue=100, max_inflight=1,
                      admit_by_deadline=admit_by_deadline)
    for value in range(3):
        await batcher.submit(rows(value), within())
    refused: list[Overloaded] = []
    taken: list[asyncio.Future[BatchResult]] = []
    for value in range(40):
        try:
            taken.append(batcher.submit(rows(value), 0.3))
        except Overloaded as exc:
            refused.append(exc)
    await asyncio.wait(taken, timeout=5)
    await batcher.close()
    return refused, taken


async def test_a_request_that_would_miss_its_deadline_behind_the_queue_is_refused_at_once() -> None:
    refused, taken = await flood(admit_by_deadline=True)
    assert refused and taken, "some are taken, the rest refused"
    assert all(exc.retry_after_s >= 1 for exc in refused)
    assert "rows are queued ahead" in str(refused[0])
    assert [future.exception() for future in taken] == [None] * len(taken), "every call taken meets its deadline"
    assert [future.result().values for future in taken] == [[v * 10.0] for v in range(len(taken))]


async def test_with_queue_admission_the_same_flood_waits_and_times_out() -> None:
    refused, taken = await flood(admit_by_deadline=False)
    assert not refused
    assert any(isinstance(future.exception(), DeadlineExceeded) for future in taken)


async def test_batches_take_high_before_normal_before_low_whatever_the_arrival_order() -> None:
    runner = GatedRunner(gated=True)
    batcher = make(runner, max_batch_size=2)
    blocker = await occupy_slot(batcher, runner)
    arrivals = [(1, LOW), (2, NORMAL), (3, HIGH), (4, LOW), (5, HIGH), (6, NORMAL)]
    queued = [batcher.submit(rows(value), within(), None, level) for value, level in arrivals]
    assert batcher.queue_depth == 6
    runner.gate.set()
    await asyncio.wait_for(asyncio.gather(blocker, *queued), 5)
    assert [batch[:, 0].tolist() for batch in runner.batches[1:]] == [[3, 5], [2, 6], [1, 4]]
    assert [future.result().values for future in queued] == [[v * 10.0] for v, _ in arrivals]
    await batcher.close()


async def test_a_full_queue_evicts_the_newest_lower_priority_request_for_a_higher_one() -> None:
    runner = GatedRunner(gated=True)
    batcher = make(runner, max_queue=3)
    blocker = await occupy_slot(batcher, runner)
    low_old, low_new = (batcher.submit(rows(v), within(), None, LOW) for v in (1, 2))
    normal = batcher.submit(rows(3), within())
    high = batcher.submit(rows(4), within(), None, HIGH)  # full: the newest low request makes way
    assert isinstance(low_new.exception(), Overloaded) and low_new.exception().retry_after_s == 1
    assert "higher priority" in str(low_new.exception())
    with pytest.raises(QueueFull):
        batcher.submit(rows(5), within(), None, LOW)  # nothing below low to evict
    batcher.submit(rows(6), within()).cancel()  # a normal call evicts the last low one, then hangs up
    assert isinstance(low_old.exception(), Overloaded)
    runner.gate.set()
    await asyncio.wait_for(asyncio.gather(blocker, normal, high), 5)
    assert high.result().values == [40.0] and normal.result().values == [30.0]
    await batcher.close()


async def test_under_overload_admission_sheds_low_priority_and_takes_high() -> None:
    """The rows of lower priority queued ahead do not count against a higher one: it is taken (and
    answered in time) where a low one behind the same queue is refused."""
    batcher = Batcher(TimedRunner(0.05), max_batch_size=2, max_delay_ms=0, max_queue=100, max_inflight=1,
                      admit_by_deadline=True)
    for value in range(3):
        await batcher.submit(rows(value), within())
    low: list[asyncio.Future[BatchResult]] = []
    refused_low = 0
    for value in range(40):
        try:
            low.append(batcher.submit(rows(value), 0.3, None, LOW))
        except Overloaded:
            refused_low += 1
    high = [batcher.submit(rows(100 + value), 0.3, None, HIGH) for value in range(3)]
    with pytest.raises(Overloaded):
        batcher.submit(rows(99), 0.3, None, LOW)
    await asyncio.wait(high + low, timeout=5)
    assert refused_low and low, "some low calls are taken, the rest refused"
    assert [future.result().values for future in high] == [[(100 + v) * 10.0] for v in range(3)]
    await batcher.close()
