"""``cpu_threads``: the default thread count from fake sysfs / cgroup trees, and the OpenMP wait default."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from asyncllm.config import EngineConfig
from asyncllm.cpu_threads import (
    OPENMP_SPIN_COUNT,
    cgroup_cpu_limit,
    default_num_threads,
    parse_cpu_list,
    physical_cores,
    set_openmp_wait_defaults,
)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def _smt_sysfs(root: Path, cores: int, threads_per_core: int) -> Path:
    """CPUs numbered like Linux on x86: core c's siblings are c, c + cores, ..."""
    for core in range(cores):
        siblings = [core + k * cores for k in range(threads_per_core)]
        for cpu in siblings:
            topology = root / f"cpu{cpu}" / "topology"
            _write(topology / "thread_siblings_list", ",".join(map(str, siblings)))
            _write(topology / "core_id", str(core))
    return root


def test_parse_cpu_list_reads_ranges_and_singles() -> None:
    assert parse_cpu_list("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11}
    assert parse_cpu_list("5") == {5}
    with pytest.raises(ValueError):
        parse_cpu_list("a-b")


def test_physical_cores_count_smt_siblings_once(tmp_path: Path) -> None:
    sysfs = _smt_sysfs(tmp_path / "cpu", cores=4, threads_per_core=2)
    assert physical_cores(range(8), sysfs) == 4
    assert physical_cores({0, 4}, sysfs) == 1  # two hyper-threads of core 0
    assert physical_cores({0, 1}, sysfs) == 2


def test_physical_cores_fall_back_to_core_id_and_give_up_without_topology(tmp_path: Path) -> None:
    for cpu, (package, core) in enumerate([(0, 0), (0, 0), (0, 1), (1, 0)]):
        _write(tmp_path / "cpu" / f"cpu{cpu}" / "topology" / "core_id", str(core))
        _write(tmp_path / "cpu" / f"cpu{cpu}" / "topology" / "physical_package_id", str(package))
    assert physical_cores(range(4), tmp_path / "cpu") == 3
    assert physical_cores(range(2), tmp_path / "missing") is None


def test_cgroup_v2_quota_in_own_cgroup_then_root(tmp_path: Path) -> None:
    root, proc = tmp_path / "cgroup", tmp_path / "proc_cgroup"
    _write(proc, "0::/job/worker")
    _write(root / "job" / "worker" / "cpu.max", "150000 100000")
    assert cgroup_cpu_limit(root, proc) == 1.5
    _write(root / "job" / "worker" / "cpu.max", "max 100000")
    assert cgroup_cpu_limit(root, proc) is None
    (root / "job" / "worker" / "cpu.max").unlink()
    _write(root / "cpu.max", "300000 100000")
    assert cgroup_cpu_limit(root, proc) == 3.0


def test_cgroup_v1_quota_and_no_quota(tmp_path: Path) -> None:
    root, proc = tmp_path / "cgroup", tmp_path / "absent"
    _write(root / "cpu" / "cpu.cfs_quota_us", "200000")
    _write(root / "cpu" / "cpu.cfs_period_us", "100000")
    assert cgroup_cpu_limit(root, proc) == 2.0
    _write(root / "cpu" / "cpu.cfs_quota_us", "-1")
    assert cgroup_cpu_limit(root, proc) is None
    assert cgroup_cpu_limit(tmp_path / "nothing", proc) is None


def test_default_is_the_least_of_affinity_quota_and_cores(tmp_path: Path) -> None:
    sysfs = _smt_sysfs(tmp_path / "cpu", cores=8, threads_per_core=2)
    root, proc = tmp_path / "cgroup", tmp_path / "absent"
    kwargs = {"cgroup_root": root, "proc_cgroup": proc, "sysfs_cpu_root": sysfs}
    assert default_num_threads(range(16), **kwargs) == 8  # physical cores
    assert default_num_threads({0, 1, 2}, **kwargs) == 3  # affinity, no siblings among them
    assert default_num_threads({0, 8}, **kwargs) == 1  # one core's two hyper-threads
    _write(root / "cpu.max", "250000 100000")
    assert default_num_threads(range(16), **kwargs) == 2  # quota 2.5 CPUs, rounded down
    _write(root / "cpu.max", "50000 100000")
    assert default_num_threads(range(16), **kwargs) == 1  # at least one


def test_default_on_this_machine_is_positive_and_within_affinity() -> None:
    import os

    assert 1 <= default_num_threads() <= len(os.sched_getaffinity(0))


def test_openmp_wait_default_never_overrides_the_user() -> None:
    env: dict[str, str] = {}
    assert set_openmp_wait_defaults(env) and env == {"GOMP_SPINCOUNT": OPENMP_SPIN_COUNT}
    for user in ({"GOMP_SPINCOUNT": "0"}, {"OMP_WAIT_POLICY": "ACTIVE"}):
        env = dict(user)
        assert not set_openmp_wait_defaults(env) and env == user


def test_importing_asyncllm_sets_the_spin_count_before_torch_loads() -> None:
    import subprocess
    import sys

    code = ("import os, sys; import asyncllm; "
            "print(os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules)")
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src"), "PATH": ""}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                          check=True)
    assert done.stdout.split() == [OPENMP_SPIN_COUNT, "True"]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**env, "OMP_WAIT_POLICY": "ACTIVE"}, timeout=120, check=True)
    assert done.stdout.split() == ["None", "True"]


def test_engine_config_num_threads_validates_and_resolves() -> None:
    assert EngineConfig(num_threads=3).resolved_num_threads() == 3
    assert EngineConfig().resolved_num_threads() == default_num_threads()
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match=r"^num_threads"):
            EngineConfig(num_threads=bad)  # type: ignore[arg-type]


def test_engine_sets_torch_threads_on_its_model_thread(make_tiny_engine: Any) -> None:
    async def threads_of(engine: Any) -> int:
        async with engine:
            return int(await engine.run_on_model_thread(torch.get_num_threads))

    assert asyncio.run(threads_of(make_tiny_engine(num_threads=1))) == 1
    assert asyncio.run(threads_of(make_tiny_engine())) == default_num_threads()
