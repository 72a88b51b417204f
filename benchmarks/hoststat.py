"""Whole-host CPU accounting from /proc/stat, to flag noisy measurements.

Why: on a shared 2-core machine other work (a test suite, a build) steals
CPU from the server or from wrk mid-point.  Measuring host-wide busy CPU
around each point and subtracting what the server and wrk used gives an
"other processes" figure, so a suspicious dip can be told apart from a
server regression without re-running.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CpuSample:
    """Aggregate jiffies from the first ``cpu`` line of /proc/stat."""

    busy: int
    steal: int

    def busy_seconds_since(self, before: CpuSample) -> float:
        return (self.busy - before.busy) / _CLK_TCK

    def steal_seconds_since(self, before: CpuSample) -> float:
        return (self.steal - before.steal) / _CLK_TCK


def sample() -> CpuSample:
    """Busy = user+nice+system+steal.

    irq/softirq are left out on purpose: loopback TCP at 20k req/s spends a
    lot of softirq time that belongs to the benchmark itself, not to noise.
    """
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = fh.readline().split()[1:]
    except OSError:
        return CpuSample(0, 0)
    values = [int(v) for v in fields] + [0] * 10
    user, nice, system, _idle, _iowait, _irq, _softirq, steal = values[:8]
    return CpuSample(user + nice + system + steal, steal)


def loadavg() -> list[float]:
    """1/5/15-minute load averages (empty if unavailable)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []
