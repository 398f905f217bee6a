"""How many CPU threads the engine should use, and how OpenMP threads should wait.

``default_num_threads`` is the default of ``EngineConfig.num_threads``: the CPUs this process may use,
the minimum of

- the CPUs in its affinity mask (``os.sched_getaffinity``; ``taskset``, cpusets),
- its cgroup CPU quota, rounded down (``cpu.max`` on cgroup v2; ``cpu.cfs_quota_us`` /
  ``cpu.cfs_period_us`` on v1), so that a container limited to 1.5 CPUs is not throttled, and
- the physical cores among those CPUs: SMT siblings (hyper-threads) share one core's execution units,
  and a second decode thread on a sibling mostly waits for the first,

and at least 1. Sources that cannot be read on this machine are left out of the minimum.

``set_openmp_wait_defaults`` bounds how long idle OpenMP threads spin. torch's CPU ops and the native C
kernels run on GCC's OpenMP runtime, whose idle threads by default spin for a long while before they
sleep. When another process competes for the cores, a spinning thread holds a core the thread doing the
work needs, and a step waits for threads the kernel has descheduled: on a 2-core machine beside two
busy processes, single-stream decode fell from ~70 to 1-3 tokens/s. A short spin keeps the quiet speed
and degrades gracefully under contention (see the README's CPU section for the measurements).

Nothing here imports torch: ``set_openmp_wait_defaults`` must run before torch loads the OpenMP runtime.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, MutableMapping
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
SYSFS_CPU_ROOT = Path("/sys/devices/system/cpu")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")

OPENMP_SPIN_COUNT = "20000"
"""``GOMP_SPINCOUNT`` set when the user has set neither it nor ``OMP_WAIT_POLICY``: an idle OpenMP thread
spins this many times (libgomp's default: 300000) before it sleeps, short enough that the cores are
handed over quickly to a competing process, long enough to keep the quiet decode speed
(``OMP_WAIT_POLICY=PASSIVE``, no spinning at all, cost about 5% of it on a 2-core machine)."""


def affinity_cpus() -> set[int]:
    """The CPU ids this process may run on (all of ``os.cpu_count()`` where affinity is unsupported)."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def parse_cpu_list(text: str) -> set[int]:
    """A sysfs CPU list such as ``0-3,8,10-11`` as a set of ids (``ValueError`` on a malformed list)."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        first, dash, last = part.partition("-")
        cpus.update(range(int(first), int(last) + 1) if dash else (int(first),))
    return cpus


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _own_cgroup_v2_dir(cgroup_root: Path, proc_cgroup: Path) -> Path | None:
    """This process's cgroup v2 directory (``0::/path`` in ``/proc/self/cgroup``), where it exists."""
    text = _read(proc_cgroup)
    for line in (text or "").splitlines():
        if line.startswith("0::"):
            candidate = cgroup_root / line[3:].lstrip("/")
            return candidate if candidate.is_dir() else None
    return None


def cgroup_cpu_limit(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP) -> float | None:
    """The cgroup CPU quota in CPUs (``quota / period``), or ``None`` when there is none or it cannot be
    read. Looks at cgroup v2's ``cpu.max`` (this process's own cgroup, then the root as mounted in a
    container), then v1's ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (``-1``: no quota)."""
    v2_dirs = [d for d in (_own_cgroup_v2_dir(cgroup_root, proc_cgroup), cgroup_root) if d is not None]
    for directory in v2_dirs:
        text = _read(directory / "cpu.max")
        if text is None:
            continue
        quota, _, period = text.partition(" ")
        if quota == "max":
            return None
        return int(quota) / int(period or "100000")
    for directory in (cgroup_root / "cpu", cgroup_root / "cpu,cpuacct", cgroup_root):
        quota_text = _read(directory / "cpu.cfs_quota_us")
        period_text = _read(directory / "cpu.cfs_period_us")
        if quota_text is None or period_text is None:
            continue
        quota, period = int(quota_text), int(period_text)
        return None if quota <= 0 or period <= 0 else quota / period
    return None


def physical_cores(cpus: Iterable[int], sysfs_cpu_root: Path = SYSFS_CPU_ROOT) -> int | None:
    """How many physical cores ``cpus`` span: CPUs listed as each other's ``thread_siblings_list`` (or
    sharing a package and ``core_id``) count once. ``None`` when the topology cannot be read."""
    cores: set[object] = set()
    for cpu in cpus:
        topology = sysfs_cpu_root / f"cpu{cpu}" / "topology"
        siblings = _read(topology / "thread_siblings_list")
        if siblings is not None:
            cores.add(frozenset(parse_cpu_list(siblings)))
            continue
        core_id, package = _read(topology / "core_id"), _read(topology / "physical_package_id")
        if core_id is None:
            return None
        cores.add((package, core_id))
    return len(cores) or None


def default_num_threads(
    cpus: Iterable[int] | None = None,
    *,
    cgroup_root: Path = CGROUP_ROOT,
    proc_cgroup: Path = PROC_SELF_CGROUP,
    sysfs_cpu_root: Path = SYSFS_CPU_ROOT,
) -> int:
    """The CPU threads the engine uses by default: the minimum of the CPUs in ``cpus`` (default: this
    process's affinity), the cgroup quota rounded down and the physical cores among ``cpus``; at least 1.
    The roots are parameters so that tests can point them at fake ``/sys`` and ``/proc`` trees."""
    allowed = affinity_cpus() if cpus is None else set(cpus)
    counts = [len(allowed)]
    quota = cgroup_cpu_limit(cgroup_root, proc_cgroup)
    if quota is not None:
        counts.append(math.floor(quota))
    cores = physical_cores(allowed, sysfs_cpu_root)
    if cores is not None:
        counts.append(cores)
    return max(1, min(counts))


def split_cpus(cpus: Iterable[int], parts: int) -> list[tuple[int, ...]] | None:
    """``cpus`` (sorted) cut into ``parts`` contiguous, disjoint sets as even as possible (each rank of a
    CPU tensor-parallel group runs on its own, so the ranks' OpenMP teams do not compete for cores), or
    ``None`` when there are fewer CPUs than parts. ``ValueError`` unless ``parts >= 1``."""
    if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
        raise ValueError(f"parts: must be an int >= 1, got {parts!r}")
    ordered = sorted(set(cpus))
    if len(ordered) < parts:
        return None
    base, extra = divmod(len(ordered), parts)
    out, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        out.append(tuple(ordered[start:start + size]))
        start += size
    return out


def set_openmp_wait_defaults(environ: MutableMapping[str, str] | None = None) -> bool:
    """Set ``GOMP_SPINCOUNT`` to ``OPENMP_SPIN_COUNT`` in ``environ`` (default ``os.environ``) unless the
    user has set it or ``OMP_WAIT_POLICY``; ``True`` when it was set. Takes effect only if it runs before
    the OpenMP runtime loads, i.e. before ``import torch``; child processes inherit it."""
    env = os.environ if environ is None else environ
    if "GOMP_SPINCOUNT" in env or "OMP_WAIT_POLICY" in env:
        return False
    env["GOMP_SPINCOUNT"] = OPENMP_SPIN_COUNT
    return True
