"""The chaos suite's short form: every scenario of ``benchmarks.chaos`` for a few seconds.

The same scenario functions ``make chaos`` runs at full length (real server processes, real Redis,
loopback only), with ``chaos.SHORT``'s lengths and the same checks. Each test names the checks its
scenario must report, so a scenario cannot pass by dropping one, and a failure lists every failed
check with its figure. One criterion is relaxed in the short form: refusals within 25 ms at p99
rather than 5 (``Profile.refusal_p99_ms`` says why).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchmarks import chaos
from benchmarks.chaosreport import ScenarioResult
from benchmarks.redisserver import RedisServer


def assert_holds(result: ScenarioResult, checks: set[str]) -> None:
    assert {check.key for check in result.checks} == checks, [check.key for check in result.checks]
    failures = result.failures()
    assert not failures, f"{result.title}:\n{failures}\nfigures: {result.figures}"


async def test_tenfold_overload_is_refused_at_once_and_the_accepted_meet_their_deadline(tmp_path: Path) -> None:
    """Ten times capacity, open loop: accepted p99 within the deadline, refusals fast and with
    Retry-After, RSS within 1.5x idle, full throughput within a second of the burst's end."""
    result = await chaos.overload(chaos.SHORT, tmp_path)
    assert_holds(result, {"load", "accepted_p99", "refusal_p99", "retry_after", "rss", "recovery", "answered"})


async def test_tenfold_overload_on_two_front_ends_holds_as_on_one(tmp_path: Path) -> None:
    """The same burst against ``--frontends 2``: each front end refuses its share, and together they
    hold every check one front end does."""
    result = await chaos.overload_frontends(chaos.SHORT, tmp_path)
    assert_holds(result, {"load", "accepted_p99", "refusal_p99", "retry_after", "rss", "recovery", "answered"})


async def test_high_priority_is_answered_in_time_while_low_priority_is_shed(tmp_path: Path) -> None:
    """Three times capacity, one call in six ``X-Priority: high``: every high one answered within its
    deadline, most low ones refused."""
    result = await chaos.priorities(chaos.SHORT, tmp_path)
    assert_holds(result, {"load", "high_answered", "high_deadline", "low_shed", "answered"})


async def test_killed_workers_leave_no_request_hanging_and_come_back(tmp_path: Path) -> None:
    """A worker SIGKILLed every second under 64 clients: nothing hangs or is lost, only 200, 503 or 504,
    and both workers are back at the end."""
    result = await chaos.worker_kills(chaos.SHORT, tmp_path)
    assert_holds(result, {"kills", "hung", "answered", "workers_back"})


@pytest.mark.skipif(not RedisServer.available() and not os.environ.get("CI"),
                    reason="needs redis-server (apt-get install redis-server); under CI its absence fails")
async def test_a_hanging_or_memory_hungry_model_fails_its_batches_and_the_server_serves_on(tmp_path: Path) -> None:
    """Rows that hang the model or exhaust a worker's memory, under 64 clients: 504 after max_compute_s
    and a replaced worker, 500 and the worker serving on; nothing hangs or is lost."""
    result = await chaos.model_faults(chaos.SHORT, tmp_path)
    assert_holds(result, {"hang_504", "hung_replaced", "hog_500", "hung", "answered"})


async def test_a_paused_or_killed_redis_costs_cache_hits_never_answers(tmp_path: Path) -> None:
    """Redis SIGSTOPped, resumed, killed and restarted under 64 clients: every call answered 200, no
    pause in the answers, p99 within the deadline, hits back after each outage."""
    result = await chaos.redis_faults(chaos.SHORT, tmp_path)
    assert_holds(result, {"answered", "stall", "p99", "hits_back"})


async def test_idle_and_slowloris_connections_do_not_slow_real_clients(tmp_path: Path) -> None:
    """2,000 idle and 200 slowloris connections beside 64 clients: their p99 within 2x of its value
    without them, every call answered."""
    result = await chaos.crowd(chaos.SHORT, tmp_path)
    assert_holds(result, {"p99", "answered"})


async def test_sigterm_under_load_answers_every_request_the_server_accepted(tmp_path: Path) -> None:
    """SIGTERM under 64 clients: the calls in flight are answered, no accepted call is dropped, exit 0
    with no process left."""
    result = await chaos.sigterm(chaos.SHORT, tmp_path)
    assert_holds(result, {"in_flight", "accepted_answered", "log_complete", "answered", "exit"})
