"""``ThreadGovernor``: the thread count follows the CPUs other processes leave free (fake ``/proc``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from asyncllm.config import EngineConfig
from asyncllm.thread_governor import ThreadGovernor, cpu_busy_ticks, process_ticks

STAT_LINE = "cpu{n} {user} 0 {system} {idle} 5 0 0 {steal} 0 0"


class FakeProc:
    """``/proc/stat`` and ``/proc/self/stat`` of a machine whose CPUs and this process we advance by hand."""

    def __init__(self, root: Path, cpus: int) -> None:
        self.root, self.cpus = root, cpus
        self.busy = [0] * cpus
        self.idle = [0] * cpus
        self.steal = [0] * cpus
        self.ours = 0
        (root / "self").mkdir(parents=True)
        self.write()

    def advance(self, seconds: float, *, ours_cpus: float, others_cpus: float, steal_cpus: float = 0.0) -> None:
        ticks = 100 * seconds  # USER_HZ
        for cpu in range(self.cpus):
            share_ours, share_others = ours_cpus / self.cpus, others_cpus / self.cpus
            share_steal = steal_cpus / self.cpus
            self.busy[cpu] += round(ticks * (share_ours + share_others))
            self.steal[cpu] += round(ticks * share_steal)
            self.idle[cpu] += round(ticks * (1 - share_ours - share_others - share_steal))
        self.ours += round(ticks * ours_cpus)
        self.write()

    def write(self) -> None:
        lines = ["cpu  0 0 0 0 0 0 0 0 0 0"] + [
            STAT_LINE.format(n=n, user=self.busy[n], system=0, idle=self.idle[n], steal=self.steal[n])
            for n in range(self.cpus)]
        (self.root / "stat").write_text("\n".join(lines) + "\nintr 1 2 3\n")
        (self.root / "self" / "stat").write_text(
            f"42 (py thon) R 1 1 1 0 -1 0 0 0 0 0 {self.ours} 0 0 0 20 0 3 0 1 1 1\n")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_parsers_read_busy_ticks_and_process_ticks() -> None:
    stat = ("cpu  9 9 9 9 9 9 9 9 0 0\ncpu0 10 1 2 50 5 1 1 3 0 0\ncpu1 20 0 0 70 0 0 0 0 0 0\n"
            "cpu2 99 0 0 0 0 0 0 0 0 0\n")
    assert cpu_busy_ticks(stat, [0, 1]) == (10 + 1 + 2 + 1 + 1 + 3) + 20
    assert process_ticks("7 (a (b) c) S 1 1 1 0 -1 0 0 0 0 0 12 30 0 0\n") == 42


def test_threads_drop_under_contention_and_come_back(tmp_path: Path) -> None:
    proc, clock, threads = FakeProc(tmp_path, cpus=2), Clock(), [2]
    governor = ThreadGovernor(2, [0, 1], proc_root=tmp_path, interval_s=0.5, clock=clock,
                              set_threads=lambda n: threads.append(n), get_threads=lambda: threads[-1])

    clock.now += 1.0
    proc.advance(1.0, ours_cpus=1.9, others_cpus=0.05)
    governor.before_step()
    assert threads == [2]  # quiet: all the threads

    clock.now += 1.0
    proc.advance(1.0, ours_cpus=0.8, others_cpus=1.2)
    governor.before_step()
    assert threads[-1] == 1  # a busy process holds more than one CPU's worth

    clock.now += 0.2
    proc.advance(0.2, ours_cpus=1.0, others_cpus=0.0)
    governor.before_step()
    assert threads[-1] == 1  # within the interval nothing is re-measured

    clock.now += 1.0
    proc.advance(1.0, ours_cpus=1.0, others_cpus=0.1)
    governor.before_step()
    assert threads[-1] == 2  # the competitor is gone

    clock.now += 1.0
    proc.advance(1.0, ours_cpus=1.0, others_cpus=0.0, steal_cpus=1.0)
    governor.before_step()
    assert threads[-1] == 1  # the hypervisor's steal time counts as contention


def test_never_above_the_configured_threads_nor_below_one(tmp_path: Path) -> None:
    proc, clock, threads = FakeProc(tmp_path, cpus=8), Clock(), [4]
    governor = ThreadGovernor(4, range(8), proc_root=tmp_path, clock=clock,
                              set_threads=lambda n: threads.append(n), get_threads=lambda: threads[-1])
    clock.now += 1.0
    proc.advance(1.0, ours_cpus=4.0, others_cpus=0.0)
    governor.before_step()
    assert threads == [4]
    clock.now += 1.0
    proc.advance(1.0, ours_cpus=0.0, others_cpus=8.0)
    governor.before_step()
    assert threads[-1] == 1
    with pytest.raises(ValueError, match=r"^max_threads"):
        ThreadGovernor(0, [0], proc_root=tmp_path)


def test_create_is_none_without_proc(tmp_path: Path) -> None:
    assert ThreadGovernor.create(2, [0, 1], proc_root=tmp_path / "absent") is None
    FakeProc(tmp_path, cpus=2)
    assert isinstance(ThreadGovernor.create(2, [0, 1], proc_root=tmp_path), ThreadGovernor)


def test_engine_config_adaptive_threads_validates() -> None:
    assert EngineConfig().adaptive_threads
    with pytest.raises(ValueError, match=r"^adaptive_threads"):
        EngineConfig(adaptive_threads=1)  # type: ignore[arg-type]


def test_cpu_engine_runs_the_governor_unless_told_not_to(make_tiny_engine: object) -> None:
    import os

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: nothing to govern")
    governed = make_tiny_engine(num_threads=2)  # type: ignore[operator]
    assert isinstance(governed._governor, ThreadGovernor) and governed._governor.max_threads == 2
    assert make_tiny_engine(num_threads=2, adaptive_threads=False)._governor is None  # type: ignore[operator]
    assert make_tiny_engine(num_threads=1)._governor is None  # type: ignore[operator]
