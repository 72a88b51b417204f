"""The chaos suite: overload, faults and hostile input against real server processes.

Each scenario starts what it needs (``mlserve serve`` on a free loopback port serving
``benchmarks.chaosmodel``, whose capacity is set here rather than by the machine; a ``redis-server``
of its own), runs a bounded load through ``benchmarks.chaosload`` while it does something unkind to
the server, and returns a ``ScenarioResult``: status counts and latencies per time bucket, its
figures, and one check per criterion of the issue. ``make chaos`` runs the full form (``FULL``, the
issue's durations) and writes the report; ``tests/test_chaos.py`` runs the short form (``SHORT``)
and asserts the same checks.

Run: ``python -m benchmarks.chaos [--short] [--out-dir DIR] [--only NAME,...]``.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import datetime
import functools
import itertools
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import chaosreport, openloop, promtext, servers
from benchmarks.chaosload import (
    CROWD_DONE, CROWD_OPEN, HUNG, LOST, REFUSED, RESET, ClosedLoop, Outcome, Pool, Recorder, Traffic, closed_loop,
    offer, steady_gc,
)
from benchmarks.chaosmodel import HANG, HOG, MODEL, VERSION, write_repository
from benchmarks.chaosreport import Check, ScenarioResult, ms, percentile, status_counts
from benchmarks.redisserver import RedisServer

RESULTS_DIR = Path(__file__).resolve().parent / "results" / "chaos"
WORKERS = 2
CLIENTS = 64
OPEN_CONNECTIONS = 512
"""The open-loop generator's connections: enough for every accepted request in flight at 10x."""
MODEL_ROW_S = 0.01
"""The served model's cost a row: two workers answer about 200 rows a second, and ten times that is what
the front end can refuse beside the load generator on two cores. A refusal costs the front end about as
much as an answer (aiohttp's request handling and the socket write dominate), so with a faster model the
overload would measure whether one core keeps up rather than the admission."""
MAX_BATCH = 16
SETTLE_S = 5.0
"""Past its deadline, how long a request may stay unanswered before it counts as hung."""
WORKERS_BACK_S = 30.0
WARMUP_S = 0.5
"""The start of each closed-loop phase that is not measured: connections and batches settle."""
FAILED = {LOST, RESET, REFUSED, HUNG}


@dataclass(frozen=True)
class Profile:
    """How long each scenario runs, and the one timing criterion the short form relaxes."""

    capacity_s: float
    overload_s: float
    recovery_s: float
    priority_s: float
    kill_s: float
    kill_every_s: float
    redis_phase_s: float
    crowd_phase_s: float
    sigterm_load_s: float
    bucket_s: float
    refusal_p99_ms: float
    """The issue's 5 ms. The short form's few seconds hold too few refusals for a p99 that one
    scheduler hiccup on a busy 2-core machine cannot move, so it allows 25 ms: still far below
    the deadline, so a refusal that waited in the queue fails it."""


FULL = Profile(capacity_s=4, overload_s=20, recovery_s=3, priority_s=15, kill_s=30, kill_every_s=2,
               redis_phase_s=6, crowd_phase_s=12, sigterm_load_s=3, bucket_s=0.5, refusal_p99_ms=5)
SHORT = Profile(capacity_s=2, overload_s=4, recovery_s=2, priority_s=4, kill_s=6, kill_every_s=1,
                redis_phase_s=2, crowd_phase_s=3, sigterm_load_s=1.5, bucket_s=0.25, refusal_p99_ms=25)


# -- the server and its processes -----------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """``/proc/PID/stat`` after the command name (field 3 first), or None for a process gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


def session_pids(sid: int) -> list[int]:
    """Live processes of session ``sid``: a server started in a session of its own, and its workers."""
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        fields = _stat(int(entry.name))
        if fields is not None and fields[0] != "Z" and int(fields[3]) == sid:
            pids.append(int(entry.name))
    return sorted(pids)


def rss_kib(pids: Iterable[int]) -> int:
    """Resident memory of ``pids`` (from ``statm``: cheap enough to read under load)."""
    page_kib = os.sysconf("SC_PAGE_SIZE") // 1024
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page_kib
    return total


class Target:
    """A running ``mlserve serve`` for one scenario."""

    def __init__(self, server: servers.Server, deadline_ms: float) -> None:
        self.server = server
        self.deadline_ms = deadline_ms

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def pid(self) -> int:
        assert self.server.proc is not None
        return self.server.proc.pid

    def traffic(self, kind: str, headers: Mapping[str, str] | None = None, distinct: int = 4096) -> Traffic:
        """``POST /predict`` requests for the served model over ``distinct`` different rows."""
        bodies = openloop.iris_bodies(MODEL, VERSION, distinct)
        return Traffic(kind, f"{self.server.base_url}/predict", bodies, headers or {})

    def worker_pids(self) -> list[int]:
        """The model workers: the server's processes started by multiprocessing's spawn."""
        def is_worker(pid: int) -> bool:
            with contextlib.suppress(OSError):
                return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
            return False

        return [pid for pid in session_pids(self.pid) if pid != self.pid and is_worker(pid)]

    async def metric(self, name: str, **labels: str) -> float:
        """The sum of ``name`` over the samples whose labels include ``labels``."""
        status, body = await asyncio.to_thread(servers.http_get, f"{self.server.base_url}/metrics")
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}")
        return sum(value for sample, have, value in promtext.parse_samples(body.decode())
                   if sample == name and all(have.get(k) == v for k, v in labels.items()))

    def log_figures(self) -> dict[str, int]:
        levels = servers.count_log_levels(self.server.log_path)
        return {key: int(levels[key]) for key in ("warning", "error", "traceback")}  # type: ignore[call-overload]


@contextlib.asynccontextmanager
async def mlserve(
    workdir: Path, *, deadline_ms: float, row_s: float = MODEL_ROW_S, env: Mapping[str, str] | None = None,
    open_files: int | None = None, frontends: int = 1,
) -> AsyncIterator[Target]:
    """A ready server with two workers on a repository of the chaos model (split between ``frontends``
    front ends); always stopped afterwards.

    ``open_files`` starts it with that soft limit of open files (``prlimit``), the hard one unchanged.
    """
    models = write_repository(workdir / "models", row_s, MAX_BATCH)
    port = servers.free_port()
    limit = ["prlimit", f"--nofile={open_files}:"] if open_files else []
    server = servers.Server(
        name="chaos",
        argv=servers.mlserve_argv([*limit, sys.executable, "-m", "mlserve"], port, models, WORKERS, frontends),
        port=port,
        log_path=workdir / "server.log",
        # The workers unpickle benchmarks.chaosmodel, so the repository root goes on their path.
        env=servers.clean_env({"PYTHONPATH": str(servers.REPO_ROOT),
                               "MLSERVE_REQUEST_TIMEOUT_MS": f"{deadline_ms:g}", **(env or {})}),
    )
    server.start()
    try:
        await asyncio.to_thread(server.wait_ready)
        yield Target(server, deadline_ms)
    finally:
        await asyncio.to_thread(server.stop)


# -- measuring --------------------------------------------------------------------------------------


def of_kind(recorder: Recorder, *kinds: str) -> list[Outcome]:
    return [o for o in recorder.outcomes if o.kind in kinds]


def answered_between(outcomes: Iterable[Outcome], start: float, end: float, status: int = 200) -> list[float]:
    """When each answer with ``status`` came, for those that came between ``start`` and ``end``."""
    return sorted(o.due + o.latency for o in outcomes if o.status == status and start <= o.due + o.latency <= end)


def failed(outcomes: Iterable[Outcome]) -> dict[str, int]:
    """Requests lost, reset on a new connection, refused at connect or hung, by which."""
    counts = status_counts(o for o in outcomes if o.status in FAILED)
    return {key: counts.get(key, 0) for key in ("lost", "reset", "refused", "hung")}


async def clients_phase(target: Target, recorder: Recorder, kind: str, seconds: float) -> tuple[float, float]:
    """``CLIENTS`` closed-loop clients on fresh connections for ``seconds``, then wait for their last
    answers; returns the window measured (the first ``WARMUP_S`` is not)."""
    pool = Pool(recorder, target.port, CLIENTS)
    await pool.open()
    start = recorder.now()
    await closed_loop(pool, target.traffic(kind), CLIENTS, seconds)
    end = recorder.now()
    await pool.settle(target.deadline_ms / 1000 + SETTLE_S)
    return start + WARMUP_S, end


async def measure_capacity(target: Target, recorder: Recorder, seconds: float) -> float:
    """Answers a second at ``CLIENTS`` closed-loop clients: what the server can do, measured here."""
    start, end = await clients_phase(target, recorder, "capacity", seconds)
    return len(answered_between(of_kind(recorder, "capacity"), start, end)) / (end - start)


class RssSampler:
    """The server's resident memory every quarter second, in the background: front end and all
    processes, idle size and peak. Reads ``statm`` of pids found once, so it never blocks the load."""

    def __init__(self, target: Target) -> None:
        self.pids = session_pids(target.pid)
        self.front_pid = target.pid
        self.idle = self.sample()
        self.peak = self.idle
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> tuple[int, int]:
        return rss_kib([self.front_pid]), rss_kib(self.pids)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            front, total = self.sample()
            self.peak = (max(self.peak[0], front), max(self.peak[1], total))
            await asyncio.sleep(0.25)

    def figures(self) -> dict[str, float]:
        (idle_front, idle_all), (peak_front, peak_all) = self.idle, self.peak
        return {"rss_front_idle_mib": round(idle_front / 1024, 1), "rss_front_peak_mib": round(peak_front / 1024, 1),
                "rss_all_idle_mib": round(idle_all / 1024, 1), "rss_all_peak_mib": round(peak_all / 1024, 1)}

    def within(self, factor: float) -> bool:
        return all(peak <= factor * idle for idle, peak in zip(self.idle, self.peak, strict=True))


def recovery_s(
    answers: Sequence[float], after: float, rate: float, horizon_s: float, window_s: float = 0.5
) -> float | None:
    """From ``after`` to the start of the first ``window_s`` in which answers came at 90% of ``rate``
    (``answers``: sorted times), in 0.1 s steps; None if that never happened within ``horizon_s``."""
    need = 0.9 * rate * window_s
    for step in range(int((horizon_s - window_s) / 0.1) + 1):
        start = after + 0.1 * step
        if bisect.bisect_right(answers, start + window_s) - bisect.bisect_left(answers, start) >= need:
            return round(0.1 * step, 1)
    return None


def result(name: str, title: str, target: Target, recorder: Recorder, profile: Profile,
           figures: Mapping[str, Any], checks: list[Check]) -> ScenarioResult:
    return ScenarioResult(
        name=name, title=title, deadline_ms=target.deadline_ms, bucket_s=profile.bucket_s,
        figures={**figures, "statuses": status_counts(recorder.outcomes), "server_log": target.log_figures()},
        checks=checks, series=chaosreport.series(recorder.outcomes, profile.bucket_s),
        events=[(round(at, 3), what) for at, what in recorder.events],
    )


def load_check(rate: float, wanted: float, capacity: float, factor: int) -> Check:
    return Check("load", f"offered {factor}x the measured capacity",
                 f"{rate:.0f} req/s offered of {wanted:.0f} (capacity {capacity:.0f} req/s)", rate >= 0.9 * wanted)


def answered_check(outcomes: Sequence[Outcome], allowed: set[int]) -> Check:
    counts = status_counts(outcomes)
    names = ", ".join(str(s) for s in sorted(allowed))
    return Check("answered", f"no request lost or hung; statuses {names} only", counts_text(counts),
                 all(o.status in allowed for o in outcomes))


def lost_check(lost: Mapping[str, int]) -> Check:
    return Check("hung", "zero hung or lost requests", ", ".join(f"{n} {k}" for k, n in lost.items()),
                 not any(lost.values()))


def counts_text(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{n} {status}" for status, n in counts.items()) or "no requests"


# -- the scenarios ----------------------------------------------------------------------------------

Scenario = Callable[[Profile, Path], Awaitable[ScenarioResult]]


def scenario(run: Scenario) -> Scenario:
    """A scenario as the suite runs it: timed, with this process's garbage collector kept quiet."""

    @functools.wraps(run)
    async def timed(profile: Profile, workdir: Path) -> ScenarioResult:
        started = time.monotonic()
        with steady_gc():
            outcome = await run(profile, workdir)
        outcome.wall_s = round(time.monotonic() - started, 1)
        return outcome

    return timed


OVERLOAD_DEADLINE_MS = 500.0
OVERLOAD_FACTOR = 10
RSS_FACTOR = 1.5
TRANSPORT_ALLOWANCE = 0.05
"""The server's deadline starts once it has read a request, and a 200 means it answered within it; the
client's clock also holds the loopback hops and both event loops, so a 200 is taken as in time up to
5% past the deadline (25 ms at 500 ms). A 504 never is."""
RECOVERY_LIMIT_S = 1.0


@scenario
async def overload(profile: Profile, workdir: Path) -> ScenarioResult:
    """Ten times the measured capacity, open loop: the accepted meet their deadline, the rest are refused
    at once with Retry-After, memory stays put, and full throughput is back within a second after."""
    return await _overload(profile, workdir, frontends=1)


@scenario
async def overload_frontends(profile: Profile, workdir: Path) -> ScenarioResult:
    """The same against ``--frontends 2``: a refusal waits behind one front end's share of the burst,
    not all of it. Its "front end" RSS is the supervisor's; "all processes" holds the front ends."""
    return await _overload(profile, workdir, frontends=2)


async def _overload(profile: Profile, workdir: Path, frontends: int) -> ScenarioResult:
    async with mlserve(workdir, deadline_ms=OVERLOAD_DEADLINE_MS, frontends=frontends) as target:
        recorder = Recorder()
        capacity = await measure_capacity(target, recorder, profile.capacity_s)
        await asyncio.sleep(0.5)
        rss = RssSampler(target)
        burst = Pool(recorder, target.port, OPEN_CONNECTIONS)
        await burst.open()
        rss.start()
        recorder.event("burst")
        wanted = OVERLOAD_FACTOR * capacity
        schedule = await offer(burst, [target.traffic("burst")], wanted, profile.overload_s)
        burst_end = recorder.event("burst ends")
        recovery = Pool(recorder, target.port, CLIENTS)  # connected now: an idle one would be closed mid-burst
        await recovery.open()
        await closed_loop(recovery, target.traffic("recovery"), CLIENTS, profile.recovery_s)
        await asyncio.gather(*(pool.settle(target.deadline_ms / 1000 + SETTLE_S) for pool in (burst, recovery)))
        rss.stop()
        sent = of_kind(recorder, "burst")
        refusals = [o for o in sent if o.status in (429, 503)]
        accepted = [o for o in sent if o.status not in (429, 503)]
        met = sum(o.status == 200 and o.latency <= (1 + TRANSPORT_ALLOWANCE) * target.deadline_ms / 1000
                  for o in accepted)
        back = recovery_s(answered_between(of_kind(recorder, "recovery"), burst_end, recorder.now()),
                          burst_end, capacity, profile.recovery_s)
        with_retry = sum(o.retry_after for o in refusals)
        refusal_p99 = ms(percentile([o.latency for o in refusals], 0.99))
        accepted_p99 = ms(percentile([o.latency for o in accepted], 0.99))
        figures = {
            "capacity_rps": round(capacity), "target_rps": round(wanted), "offered_rps": round(schedule.rate),
            "generator_lag_p99_ms": schedule.lag_p99_ms, "waited_for_connection": burst.queued,
            "answered_200_rps": round(sum(o.status == 200 for o in sent) / profile.overload_s),
            "refusals": len(refusals), "refusal_p50_ms": ms(percentile([o.latency for o in refusals], 0.5)),
            "refusal_p99_ms": refusal_p99, "accepted": len(accepted), "accepted_met_deadline": met,
            "accepted_504": sum(o.status == 504 for o in accepted), "accepted_p99_ms": accepted_p99,
            "deadline_ms": target.deadline_ms, **rss.figures(), "recovery_s": back,
        }
        checks = [
            load_check(schedule.rate, wanted, capacity, OVERLOAD_FACTOR),
            Check("accepted_p99", "accepted requests meet their deadline at p99",
                  f"{met} of {len(accepted)} ({100 * met / max(1, len(accepted)):.1f}%) answered 200 within "
                  f"{target.deadline_ms:g} ms (+{TRANSPORT_ALLOWANCE:.0%}); p99 {accepted_p99:g} ms",
                  bool(accepted) and met >= 0.99 * len(accepted)),
            Check("refusal_p99", f"refusals arrive within {profile.refusal_p99_ms:g} ms at p99",
                  f"p99 {refusal_p99:g} ms of {len(refusals)} refusals",
                  bool(refusals) and refusal_p99 <= profile.refusal_p99_ms),
            Check("retry_after", "every refusal carries Retry-After", f"{with_retry} of {len(refusals)}",
                  with_retry == len(refusals)),
            Check("rss", f"server RSS within {RSS_FACTOR}x its idle size",
                  "front end {rss_front_idle_mib} -> {rss_front_peak_mib} MiB, all processes {rss_all_idle_mib} -> "
                  "{rss_all_peak_mib} MiB".format(**rss.figures()), rss.within(RSS_FACTOR)),
            Check("recovery", f"full throughput back within {RECOVERY_LIMIT_S:g} s after the burst",
                  "never" if back is None else f"{back:g} s to 90% of capacity",
                  back is not None and back <= RECOVERY_LIMIT_S),
            answered_check(of_kind(recorder, "burst", "recovery"), {200, 429, 503, 504}),
        ]
        name, title = ("overload", "10x overload") if frontends == 1 else (
            f"overload-{frontends}-frontends", f"10x overload, {frontends} front ends")
        return result(name, title, target, recorder, profile, figures, checks)


PRIORITY_FACTOR = 3
HIGH_SHARE = 6
"""One request in six is high priority: half the capacity, so all of it can be answered."""


@scenario
async def priorities(profile: Profile, workdir: Path) -> ScenarioResult:
    """Three times capacity, one request in six ``X-Priority: high``, the rest low: every high one is
    answered within its deadline, and the low ones are shed."""
    async with mlserve(workdir, deadline_ms=OVERLOAD_DEADLINE_MS) as target:
        recorder = Recorder()
        capacity = await measure_capacity(target, recorder, profile.capacity_s)
        pool = Pool(recorder, target.port, OPEN_CONNECTIONS)
        await pool.open()
        high = target.traffic("high", {"X-Priority": "high"})
        low = target.traffic("low", {"X-Priority": "low"})
        recorder.event("overload")
        wanted = PRIORITY_FACTOR * capacity
        schedule = await offer(pool, [high] + [low] * (HIGH_SHARE - 1), wanted, profile.priority_s)
        recorder.event("overload ends")
        await pool.settle(target.deadline_ms / 1000 + SETTLE_S)
        highs, lows = of_kind(recorder, "high"), of_kind(recorder, "low")
        high_ok = sum(o.status == 200 for o in highs)
        high_p99 = ms(percentile([o.latency for o in highs if o.status > 0], 0.99))
        shed = [o for o in lows if o.status == 429]
        figures = {
            "capacity_rps": round(capacity), "target_rps": round(wanted), "offered_rps": round(schedule.rate),
            "high": len(highs), "high_statuses": status_counts(highs), "high_p99_ms": high_p99,
            "high_max_ms": ms(max((o.latency for o in highs), default=0.0)),
            "low": len(lows), "low_statuses": status_counts(lows),
        }
        checks = [
            load_check(schedule.rate, wanted, capacity, PRIORITY_FACTOR),
            Check("high_answered", "every high-priority request answered (200)",
                  f"{high_ok} of {len(highs)}: {counts_text(status_counts(highs))}",
                  bool(highs) and high_ok == len(highs)),
            Check("high_deadline", "high-priority requests within their deadline (p99)",
                  f"p99 {high_p99:g} ms, deadline {target.deadline_ms:g} ms", high_p99 <= target.deadline_ms),
            Check("low_shed", "low-priority requests are shed (most refused 429 with Retry-After)",
                  f"{len(shed)} of {len(lows)} refused, {sum(o.retry_after for o in shed)} with Retry-After",
                  len(shed) >= len(lows) / 2 and all(o.retry_after for o in shed)),
            answered_check(highs + lows, {200, 429, 503, 504}),
        ]
        return result("priorities", "priorities at 3x", target, recorder, profile, figures, checks)


KILL_DEADLINE_MS = 2000.0


async def workers_back(target: Target, timeout_s: float) -> float | None:
    """Seconds until every worker is live again (processes and ``mlserve_workers_live``), or None."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        pids = await asyncio.to_thread(target.worker_pids)
        if len(pids) == WORKERS and await target.metric("mlserve_workers_live") == WORKERS:
            return round(time.monotonic() - started, 2)
        await asyncio.sleep(0.1)
    return None


async def kill_workers(target: Target, recorder: Recorder, rounds: int, every_s: float) -> int:
    """SIGKILL a random worker every ``every_s``, first at half that, ``rounds`` times; the load runs
    on half a period after the last. Returns the kills made (none when no worker was up to kill)."""
    chooser = random.Random(2)
    kills = 0
    await asyncio.sleep(every_s / 2)
    for n in range(rounds):
        victims = await asyncio.to_thread(target.worker_pids)
        if victims:
            victim = chooser.choice(victims)
            os.kill(victim, signal.SIGKILL)
            recorder.event(f"SIGKILL worker {victim}")
            kills += 1
        await asyncio.sleep(every_s if n + 1 < rounds else every_s / 2)
    return kills


@scenario
async def worker_kills(profile: Profile, workdir: Path) -> ScenarioResult:
    """A random worker SIGKILLed every 2 s for 30 s under 64 clients: nothing hangs, every answer is
    200, 503 or 504, and all workers are back at the end."""
    async with mlserve(workdir, deadline_ms=KILL_DEADLINE_MS) as target:
        recorder = Recorder()
        pool = Pool(recorder, target.port, CLIENTS)
        await pool.open()
        clients = ClosedLoop(pool, target.traffic("clients"), CLIENTS)
        clients.start()
        rounds = round(profile.kill_s / profile.kill_every_s)
        kills = await kill_workers(target, recorder, rounds, profile.kill_every_s)
        clients.stop()
        await pool.settle(target.deadline_ms / 1000 + SETTLE_S)
        back = await workers_back(target, WORKERS_BACK_S)
        restarts = await target.metric("mlserve_worker_restarts")
        outcomes = recorder.outcomes
        lost = failed(outcomes)
        figures = {
            "kills": kills, "worker_restarts": restarts, "workers_back_s": back,
            "answered_200_rps": round(sum(o.status == 200 for o in outcomes) / profile.kill_s),
            "p99_ms": ms(percentile([o.latency for o in outcomes if o.status > 0], 0.99)), **lost,
        }
        checks = [
            Check("kills", f"a worker SIGKILLed every {profile.kill_every_s:g} s for {profile.kill_s:g} s",
                  f"{kills} kills, {restarts:g} restarts", kills == rounds),
            lost_check(lost),
            answered_check(outcomes, {200, 503, 504}),
            Check("workers_back", "all workers back at the end",
                  f"not within {WORKERS_BACK_S:g} s" if back is None else f"{WORKERS} live {back:g} s after the load",
                  back is not None),
        ]
        return result("worker-kills", "worker SIGKILL", target, recorder, profile, figures, checks)


FAULTS_DEADLINE_MS = 5000.0
MAX_COMPUTE_S = 1.0
WORKER_MEMORY_MB = 1024
FAULT_SLACK_S = 1.0
"""How long past ``max_compute_s`` a hanging batch may take to fail: the watchdog looks four times a second."""
FAULT_EVERY_S = 2.0
"""A hanging row, then a memory-hungry one a second later, every two seconds: a hang holds its worker for
``max_compute_s``, so more often would keep both workers stuck and measure nothing else."""


@scenario
async def model_faults(profile: Profile, workdir: Path) -> ScenarioResult:
    """A model that hangs on some rows and exhausts memory on others, one of each every 2 s under 64
    clients: a hanging batch fails with 504 once it has run ``max_compute_s`` and its worker is replaced;
    a batch over ``worker_max_memory_mb`` fails with 500 and its worker serves on. Nothing hangs; the
    clients' calls are answered: 504 or 500 when they shared a batch with a faulty row, 503 when their batch
    was queued on a hung worker and then on another one killed too."""
    env = {"MLSERVE_BATCHING__MAX_COMPUTE_S": f"{MAX_COMPUTE_S:g}", "MLSERVE_WORKER_MAX_MEMORY_MB": str(WORKER_MEMORY_MB)}
    async with mlserve(workdir, deadline_ms=FAULTS_DEADLINE_MS, env=env) as target:
        recorder = Recorder()
        pool = Pool(recorder, target.port, CLIENTS)
        await pool.open()
        faults = Pool(recorder, target.port, 4)
        await faults.open()
        url = f"{target.server.base_url}/predict"
        hang, hog = (Traffic(kind, url, [(b"application/json", json.dumps(
            {"features": [value, 0, 0, 0], "model": MODEL, "model_version": VERSION}).encode())])
            for kind, value in (("hang", HANG), ("hog", HOG)))
        clients = ClosedLoop(pool, target.traffic("clients"), CLIENTS)
        clients.start()
        recorder.event("faulty rows")
        await offer(faults, [hang, hog], 2 / FAULT_EVERY_S, profile.kill_s)
        clients.stop()
        await asyncio.gather(*(p.settle(target.deadline_ms / 1000 + SETTLE_S) for p in (pool, faults)))
        back = await workers_back(target, WORKERS_BACK_S)
        hung_workers = await target.metric("mlserve_workers_hung")
        restarts = await target.metric("mlserve_worker_restarts")
        hangs, hogs, calls = (of_kind(recorder, kind) for kind in ("hang", "hog", "clients"))
        hang_max = max((o.latency for o in hangs), default=0.0)
        lost = failed(recorder.outcomes)
        figures = {
            "hangs": len(hangs), "hang_statuses": status_counts(hangs), "hang_max_ms": ms(hang_max),
            "hogs": len(hogs), "hog_statuses": status_counts(hogs), "workers_hung": hung_workers,
            "worker_restarts": restarts, "workers_back_s": back, "clients": status_counts(calls),
            "answered_200_rps": round(sum(o.status == 200 for o in calls) / profile.kill_s), **lost,
        }
        checks = [
            Check("hang_504", f"a batch that hangs fails with 504 within max_compute_s ({MAX_COMPUTE_S:g} s) + "
                  f"{FAULT_SLACK_S:g} s", f"{counts_text(status_counts(hangs))}; slowest {ms(hang_max):g} ms",
                  bool(hangs) and all(o.status == 504 for o in hangs) and hang_max <= MAX_COMPUTE_S + FAULT_SLACK_S),
            Check("hung_replaced", "each hung worker killed and replaced; all workers back",
                  f"{hung_workers:g} killed, {restarts:g} restarts, "
                  + ("not back" if back is None else f"{WORKERS} live {back:g} s after"),
                  hung_workers == len(hangs) == restarts and back is not None),
            Check("hog_500", f"a batch over worker_max_memory_mb ({WORKER_MEMORY_MB}) fails alone with 500",
                  counts_text(status_counts(hogs)), bool(hogs) and all(o.status == 500 for o in hogs)),
            lost_check(lost),
            answered_check(calls, {200, 500, 503, 504}),
        ]
        return result("model-faults", "a hanging and a memory-hungry model", target, recorder, profile, figures,
                      checks)


REDIS_DEADLINE_MS = 1000.0
REDIS_ROW_S = 0.002
STALL_LIMIT_S = 0.5


@scenario
async def redis_faults(profile: Profile, workdir: Path) -> ScenarioResult:
    """Redis (the state store and the prediction cache, no in-process cache in front) paused with SIGSTOP,
    resumed, killed and restarted under 64 clients: answers never stop or fail, and hits come back."""
    redis = RedisServer()
    await asyncio.to_thread(redis.start)
    assert redis.proc is not None
    env = {"MLSERVE_REDIS_URL": redis.url, "MLSERVE_CACHE__ENABLED": "true", "MLSERVE_CACHE__L1_ENTRIES": "0"}
    phases: list[tuple[str, Callable[[], object]]] = [
        ("Redis up", lambda: None),
        ("SIGSTOP Redis", lambda: os.kill(redis.proc.pid, signal.SIGSTOP)),  # type: ignore[union-attr]
        ("SIGCONT Redis", lambda: os.kill(redis.proc.pid, signal.SIGCONT)),  # type: ignore[union-attr]
        ("SIGKILL Redis", redis.kill),
        ("Redis restarted", redis.start),
    ]
    try:
        async with mlserve(workdir, deadline_ms=REDIS_DEADLINE_MS, row_s=REDIS_ROW_S, env=env) as target:
            recorder = Recorder()
            pool = Pool(recorder, target.port, CLIENTS)
            await pool.open()
            clients = ClosedLoop(pool, target.traffic("clients", distinct=256), CLIENTS)
            clients.start()
            hits = []
            for what, act in phases:
                await asyncio.to_thread(act)
                before = await target.metric("mlserve_cache_requests_total", layer="redis", result="hit")
                start = recorder.event(what)
                await asyncio.sleep(profile.redis_phase_s)
                after = await target.metric("mlserve_cache_requests_total", layer="redis", result="hit")
                hits.append((what, start, recorder.now(), int(after - before)))
            clients.stop()
            await pool.settle(target.deadline_ms / 1000 + SETTLE_S)
            return _redis_result(target, recorder, profile, hits)
    finally:
        redis.close()


def _redis_result(target: Target, recorder: Recorder, profile: Profile,
                  phases: Sequence[tuple[str, float, float, int]]) -> ScenarioResult:
    outcomes = recorder.outcomes
    answers = sorted(o.due + o.latency for o in outcomes if o.status > 0)
    longest_gap = max((b - a for a, b in itertools.pairwise(answers)), default=0.0)
    p99s = {what: ms(percentile([o.latency for o in outcomes if start <= o.due < end and o.status > 0], 0.99))
            for what, start, end, _ in phases}
    hits = {what: n for what, _, _, n in phases}
    figures = {"p99_ms_by_phase": p99s, "redis_hits_by_phase": hits, "longest_gap_s": round(longest_gap, 3),
               "answered_rps_by_phase": {what: round(len(answered_between(outcomes, start, end)) / (end - start))
                                         for what, start, end, _ in phases}, **failed(outcomes)}
    resumed = hits.get("SIGCONT Redis", 0) > 0 and hits.get("Redis restarted", 0) > 0
    checks = [
        answered_check(outcomes, {200}),
        Check("stall", f"answers never pause for more than {STALL_LIMIT_S:g} s", f"longest pause {longest_gap:.3f} s",
              longest_gap <= STALL_LIMIT_S),
        Check("p99", "p99 within the deadline in every phase",
              ", ".join(f"{what} {p99:g} ms" for what, p99 in p99s.items()),
              all(0 < p99 <= target.deadline_ms for p99 in p99s.values())),
        Check("hits_back", "cache hits resume after SIGCONT and after the restart",
              ", ".join(f"{what} {n}" for what, n in hits.items()), resumed),
    ]
    return result("redis", "Redis paused and killed", target, recorder, profile, figures, checks)


CROWD_IDLE = 2000
CROWD_SLOWLORIS = 200
CROWD_DEADLINE_MS = 2000.0
CROWD_P99_FACTOR = 2.0
CROWD_SERVER_OPEN_FILES = 1024
"""The soft limit the crowd's server starts with: the usual default (a login shell, systemd), which
2,200 connections exceed unless the server raises its own."""


async def marked_line(process: asyncio.subprocess.Process, marker: str, timeout_s: float) -> dict[str, Any]:
    """The JSON after ``marker`` on the next line of ``process``'s output that starts with it."""
    assert process.stdout is not None
    while True:
        line = (await asyncio.wait_for(process.stdout.readline(), timeout_s)).decode()
        if not line:
            code = await process.wait()
            raise RuntimeError(f"the crowd process ended (code {code}) before printing {marker.strip()}")
        if line.startswith(marker):
            return dict(json.loads(line[len(marker):]))


@contextlib.asynccontextmanager
async def crowd_process(port: int, hold_s: float) -> AsyncIterator[asyncio.subprocess.Process]:
    """``CROWD_IDLE`` idle and ``CROWD_SLOWLORIS`` slowloris connections held by a process of their own,
    open when this enters; always ended afterwards."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.chaosload", str(port), f"--idle={CROWD_IDLE}",
        f"--slowloris={CROWD_SLOWLORIS}", f"--seconds={hold_s:g}", stdout=asyncio.subprocess.PIPE,
        cwd=servers.REPO_ROOT,
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@scenario
async def crowd(profile: Profile, workdir: Path) -> ScenarioResult:
    """64 clients on a cheap model (so their latency is the front end's), then again on new connections
    beside 2,000 idle and 200 slowloris ones: their p99 stays within 2x, and every request is answered.
    The server starts with the usual soft limit of 1,024 open files."""
    async with mlserve(workdir, deadline_ms=CROWD_DEADLINE_MS, row_s=0.0, open_files=CROWD_SERVER_OPEN_FILES) as target:
        recorder = Recorder()
        alone = await clients_phase(target, recorder, "alone", profile.crowd_phase_s)
        recorder.event("crowd connects")
        async with crowd_process(target.port, profile.crowd_phase_s + WORKERS_BACK_S) as hostile:
            opened = await marked_line(hostile, CROWD_OPEN, WORKERS_BACK_S)
            recorder.event("crowd connected")
            beside = await clients_phase(target, recorder, "beside", profile.crowd_phase_s)
            hostile.terminate()
            counts = await marked_line(hostile, CROWD_DONE, WORKERS_BACK_S)
        p99 = {}
        for kind, (start, end) in (("alone", alone), ("beside", beside)):
            p99[kind] = ms(percentile([o.latency for o in of_kind(recorder, kind) if start <= o.due <= end], 0.99))
        ratio = p99["beside"] / p99["alone"] if p99["alone"] else float("inf")
        figures = {"p99_alone_ms": p99["alone"], "p99_beside_ms": p99["beside"], "p99_ratio": round(ratio, 2),
                   "crowd_opened": opened, **counts, **failed(recorder.outcomes)}
        checks = [
            Check("p99", f"clients' p99 within {CROWD_P99_FACTOR:g}x of its value without the crowd",
                  f"{p99['alone']:g} ms alone, {p99['beside']:g} ms beside the crowd ({ratio:.2f}x)",
                  ratio <= CROWD_P99_FACTOR),
            answered_check(recorder.outcomes, {200}),
        ]
        return result("crowd", "idle + slowloris", target, recorder, profile, figures, checks)


SIGTERM_DEADLINE_MS = 2000.0
DRAIN_DELAY_S = 0.5
SHUTDOWN_TIMEOUT_S = 10.0


def logged_statuses(path: Path) -> dict[int, int]:
    """Request id -> status, from the server's prediction log (only the ids this suite sent: numbers)."""
    statuses = {}
    with contextlib.suppress(OSError), path.open() as lines:
        for line in lines:
            record = json.loads(line)
            if str(record["request_id"]).isdigit():
                statuses[int(record["request_id"])] = int(record["status"])
    return statuses


@scenario
async def sigterm(profile: Profile, workdir: Path) -> ScenarioResult:
    """SIGTERM to the server under 64 closed-loop clients: every request it accepted gets its answer, and
    it exits 0 within its shutdown timeout, leaving no process behind.

    A closed-loop client's connection is never idle, so a request it writes on a connection the server
    has answered on and not announced it will close (``Connection: close``) is a request the server
    accepted, whether or not its handler ever ran: losing one (``LOST``) is a failure, not a keep-alive
    race. A new connection reset under its first request (``RESET``) was never taken up: the listener
    closed with it in its backlog; that fails only if the server's prediction log, which names every
    request its handlers took, holds it.
    """
    log_path = workdir / "predictions.jsonl"
    env = {"MLSERVE_PREDICTION_LOG__ENABLED": "true", "MLSERVE_PREDICTION_LOG__PATH": str(log_path),
           "MLSERVE_DRAIN_DELAY_S": f"{DRAIN_DELAY_S:g}", "MLSERVE_SHUTDOWN_TIMEOUT_S": f"{SHUTDOWN_TIMEOUT_S:g}"}
    async with mlserve(workdir, deadline_ms=SIGTERM_DEADLINE_MS, env=env) as target:
        recorder = Recorder()
        pool = Pool(recorder, target.port, CLIENTS)
        await pool.open()
        clients = ClosedLoop(pool, target.traffic("clients"), CLIENTS)
        clients.start()
        await asyncio.sleep(profile.sigterm_load_s)
        signalled = recorder.event("SIGTERM")
        target.server.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        limit_s = DRAIN_DELAY_S + SHUTDOWN_TIMEOUT_S + 5.0
        try:
            code: int | None = await asyncio.to_thread(target.server.proc.wait, limit_s)  # type: ignore[union-attr]
        except subprocess.TimeoutExpired:
            code = None
        exited = recorder.event("exited")
        await asyncio.sleep(0.3)
        clients.stop()
        await pool.settle(target.deadline_ms / 1000 + SETTLE_S)
        left = await asyncio.to_thread(session_pids, target.pid)
        figures = {"exit_code": code, "exit_s": round(exited - signalled, 2), "processes_left": len(left),
                   "told_to_close": pool.told_to_close}
        return _sigterm_result(target, recorder, profile, signalled, logged_statuses(log_path), figures)


def _sigterm_result(target: Target, recorder: Recorder, profile: Profile, signalled: float,
                    logged: Mapping[int, int], figures: Mapping[str, Any]) -> ScenarioResult:
    outcomes = recorder.outcomes
    client_status = {o.rid: o.status for o in outcomes}
    unanswered = sorted(rid for rid, status in logged.items() if status == 499 or client_status.get(rid, HUNG) <= 0)
    unlogged = [o.rid for o in outcomes if o.status > 0 and o.rid not in logged]
    lost = [o for o in outcomes if o.status in (LOST, HUNG) or (o.status == RESET and o.rid in logged)]
    answers = [o for o in outcomes if o.status > 0]
    in_flight = [o for o in outcomes if o.due < signalled < o.due + o.latency]
    figures = {**figures, "in_flight_at_sigterm": len(in_flight),
               "answered_of_those": sum(o.status > 0 for o in in_flight),
               "answered_after_sigterm": sum(o.due >= signalled for o in answers),
               "handled_by_server": len(logged), "handled_unanswered": len(unanswered),
               "answered_not_logged": len(unlogged), **failed(outcomes)}
    checks = [
        Check("in_flight", "SIGTERM comes with requests in flight",
              f"{len(in_flight)}, {figures['answered_of_those']} of them answered", bool(in_flight)),
        Check("accepted_answered", "every request the server accepted gets its answer",
              f"{len(lost)} sent on connections it served got none (its handlers had taken "
              f"{sum(o.rid in logged for o in lost)} of them); {len(unanswered)} of {len(logged)} handled unanswered; "
              f"{figures['reset']} reset on new connections it never took up",
              not lost and not unanswered),
        Check("log_complete", "the server's log of handled requests holds every answer the clients got",
              f"{len(unlogged)} answers missing from it", not unlogged),
        Check("answered", "answers are 200 or 503 only", counts_text(status_counts(answers)),
              all(o.status in (200, 503) for o in answers)),
        Check("exit", "exits 0 within its shutdown timeout, no process left",
              f"exit code {figures['exit_code']} after {figures['exit_s']} s, {figures['processes_left']} left",
              figures["exit_code"] == 0 and not figures["processes_left"]),
    ]
    return result("sigterm", "SIGTERM under load", target, recorder, profile, figures, checks)


SCENARIOS: dict[str, Scenario] = {
    "overload": overload,
    "overload-frontends": overload_frontends,
    "priorities": priorities,
    "worker-kills": worker_kills,
    "model-faults": model_faults,
    "redis": redis_faults,
    "crowd": crowd,
    "sigterm": sigterm,
}


async def run_all(names: Sequence[str], profile: Profile) -> list[ScenarioResult]:
    """Each scenario in a scratch directory of its own, one after the other, its verdict printed as it ends."""
    results = []
    for name in names:
        print(f"chaos: {name} ...", flush=True)
        with tempfile.TemporaryDirectory(prefix=f"mlserve-chaos-{name}-") as scratch:
            outcome = await SCENARIOS[name](profile, Path(scratch))
        for check in outcome.checks:
            print(f"  {'ok  ' if check.passed else 'FAIL'} {check.criterion}: {check.figure}", flush=True)
        results.append(outcome)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="a few seconds a scenario (the form `make test` runs)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help=f"the report's folder ({RESULTS_DIR})")
    parser.add_argument("--only", default=None, help="comma-separated scenarios: " + ", ".join(SCENARIOS))
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(SCENARIOS)
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    started = time.monotonic()
    results = asyncio.run(run_all(names, SHORT if args.short else FULL))
    run = {"date": datetime.date.today().isoformat(), "cpus": os.cpu_count(), "python": platform.python_version(),
           "short": args.short, "wall_s": round(time.monotonic() - started, 1)}
    paths = chaosreport.write_all(run, results, args.out_dir)
    verdict = "all passed" if all(r.passed for r in results) else "FAILED: " + ", ".join(
        r.name for r in results if not r.passed)
    print(f"chaos: {verdict} in {run['wall_s']:.0f} s; report in {paths['markdown']} and {paths['png']}")
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
