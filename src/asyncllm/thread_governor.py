"""Fewer CPU threads while other processes keep the CPUs busy, the configured count again once they stop.

A decode step splits its work evenly over an OpenMP team and ends when the slowest thread does. When
another process shares the cores, the kernel deschedules a team thread for a whole time slice and the
step waits for it: on a 2-core machine beside busy processes, a 2-thread decode fell to 6 tokens/s where
1 thread kept 36. ``ThreadGovernor.before_step`` runs on the engine's model thread before each step; at
most every ``interval_s`` it reads how much CPU time the allowed CPUs spent busy (``/proc/stat``, steal
time included) and how much of it was this process's (``/proc/self/stat``), and sets torch's threads
(which the native kernels follow, per step) to the CPUs the others left free, rounded, between 1 and the
engine's ``num_threads``. Linux only: elsewhere ``ThreadGovernor.create`` returns ``None``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

PROC_ROOT = Path("/proc")
INTERVAL_S = 0.5
FREE_CPU_ROUNDING = 0.25
"""Added to the free CPUs before rounding down: 1.8 free CPUs give 2 threads, 1.7 give 1."""


def cpu_busy_ticks(stat_text: str, cpus: Iterable[int]) -> int:
    """Busy clock ticks (all but idle and iowait; steal counts as busy) of ``cpus`` in ``/proc/stat``."""
    wanted = {f"cpu{cpu}" for cpu in cpus}
    busy = 0
    for line in stat_text.splitlines():
        fields = line.split()
        if fields and fields[0] in wanted:
            ticks = [int(value) for value in fields[1:9]]
            busy += sum(ticks) - ticks[3] - ticks[4]
    return busy


def process_ticks(self_stat_text: str) -> int:
    """User + system clock ticks of the process whose ``/proc/<pid>/stat`` this is."""
    fields = self_stat_text.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


class ThreadGovernor:
    """See the module docstring. ``set_threads`` / ``get_threads`` default to torch's; tests pass fakes."""

    def __init__(
        self,
        max_threads: int,
        cpus: Iterable[int],
        *,
        proc_root: Path = PROC_ROOT,
        interval_s: float = INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        set_threads: Callable[[int], None] = torch.set_num_threads,
        get_threads: Callable[[], int] = torch.get_num_threads,
    ) -> None:
        if max_threads < 1:
            raise ValueError(f"max_threads: must be >= 1, got {max_threads}")
        self.max_threads = max_threads
        self._cpus = sorted(set(cpus))
        self._proc_root = proc_root
        self._interval_s = interval_s
        self._clock = clock
        self._set_threads = set_threads
        self._get_threads = get_threads
        self._ticks_per_s = float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") else 100.0
        self._last = self._sample()

    @classmethod
    def create(cls, max_threads: int, cpus: Iterable[int], *, proc_root: Path = PROC_ROOT) -> ThreadGovernor | None:
        """A governor for this machine, or ``None`` where ``/proc`` cannot be read (not Linux)."""
        try:
            return cls(max_threads, cpus, proc_root=proc_root)
        except (OSError, ValueError, IndexError):
            return None

    def _sample(self) -> tuple[float, int, int]:
        busy = cpu_busy_ticks((self._proc_root / "stat").read_text(), self._cpus)
        ours = process_ticks((self._proc_root / "self" / "stat").read_text())
        return self._clock(), busy, ours

    def others_cpus(self, previous: tuple[float, int, int], current: tuple[float, int, int]) -> float:
        """CPUs' worth of time that other processes kept the allowed CPUs busy between two samples."""
        elapsed = current[0] - previous[0]
        if elapsed <= 0:
            return 0.0
        others = (current[1] - previous[1]) - (current[2] - previous[2])
        return max(0.0, others / self._ticks_per_s / elapsed)

    def threads_for(self, others: float) -> int:
        free = len(self._cpus) - others
        return max(1, min(self.max_threads, math.floor(free + FREE_CPU_ROUNDING)))

    def before_step(self) -> None:
        """Re-measure when ``interval_s`` has passed since the last sample, and set the thread count."""
        if self._clock() - self._last[0] < self._interval_s:
            return
        try:
            current = self._sample()
        except (OSError, ValueError, IndexError):
            return
        threads = self.threads_for(self.others_cpus(self._last, current))
        self._last = current
        if threads != self._get_threads():
            self._set_threads(threads)
