"""Facts about the machine a benchmark ran on, and the process's own peak memory."""

from __future__ import annotations

import os
import platform
import resource
import sys
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """The CPU's marketing name from ``/proc/cpuinfo`` (Linux), else ``platform.processor()``."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


@dataclass(frozen=True)
class MachineInfo:
    cpu_model: str
    logical_cpus: int
    usable_cpus: int
    torch_threads: int
    torch_version: str
    transformers_version: str
    python_version: str
    platform: str
    native_kernels: str  # "on", or "off: <why>" (asyncllm's C decode kernels; torch ops otherwise)

    def describe(self) -> str:
        return (
            f"machine: {self.cpu_model}, {self.logical_cpus} logical CPUs ({self.usable_cpus} usable); "
            f"torch {self.torch_version} with {self.torch_threads} threads; "
            f"transformers {self.transformers_version}; Python {self.python_version}; {self.platform}; "
            f"native CPU kernels {self.native_kernels}"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def collect_machine(torch_threads: int) -> MachineInfo:
    """``torch_threads`` is the intra-op thread count every measuring process was given. Checking the
    native kernels builds them here if this machine has not yet, so no measuring process pays for it."""
    import torch

    from asyncllm.kernels.native_build import native_kernels_status

    return MachineInfo(
        cpu_model=cpu_model(),
        logical_cpus=os.cpu_count() or 1,
        usable_cpus=usable_cores(),
        torch_threads=torch_threads,
        torch_version=str(torch.__version__),
        transformers_version=_version("transformers"),
        python_version=platform.python_version(),
        platform=f"{sys.platform} {platform.machine()}",
        native_kernels=native_kernels_status(),
    )


def peak_rss_bytes() -> int:
    """This process's peak resident set: ``VmHWM`` from ``/proc/self/status``, else ``ru_maxrss``."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss if sys.platform == "darwin" else maxrss * 1024)


def current_rss_bytes() -> int | None:
    """This process's resident set now (``VmRSS``), or ``None`` where ``/proc`` is missing."""
    status = Path("/proc/self/status")
    if not status.is_file():
        return None
    for line in status.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux ``clear_refs`` value 5); ``False`` where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True
