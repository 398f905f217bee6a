"""Run one measuring task in a fresh Python process and read back its JSON result.

A fresh process per task keeps imports, allocator caches and peak-RSS counters of one library from
favouring or burdening the other. The child runs in an empty temporary directory, offline, with the
same torch thread count as every other child.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_CHILD_SOURCE = Path(__file__).with_name("child.py")


@dataclass(frozen=True)
class ChildOutcome:
    """``result`` when the task finished, else ``error`` (with the tail of the child's stderr).

    ``returncode`` is the child's exit status (negative: killed by that signal), ``None`` when it timed out.
    """

    task: str
    wall_s: float
    result: dict[str, Any] | None
    error: str | None
    returncode: int | None = None

    @property
    def ok(self) -> bool:
        return self.result is not None


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_VERBOSITY": "error",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TQDM_DISABLE": "1",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def run_child(task: str, spec: dict[str, Any], *, timeout_s: float, source: str | None = None,
              env: Mapping[str, str] | None = None) -> ChildOutcome:
    """Run ``task`` with ``spec`` (the JSON-able job) in a new interpreter; never raises for a failed
    child, which comes back as an outcome with ``error`` set.

    ``source`` replaces the child program (default: ``child.py``; any program taking the same
    ``JOB_JSON RESULT_JSON`` arguments); ``env`` entries are set on top of the child's environment (for
    example ``PYTHONPATH``, to choose which source tree ``import asyncllm`` loads).
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s: must be positive, got {timeout_s}")
    if source is None:
        source = _CHILD_SOURCE.read_text()
    child_env = _child_env()
    if env:
        child_env.update(env)
    with tempfile.TemporaryDirectory(prefix="asyncllm-bench-") as tmp:
        job_path = Path(tmp) / "job.json"
        result_path = Path(tmp) / "result.json"
        job_path.write_text(json.dumps({"task": task, "spec": spec}))
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, "-c", source, str(job_path), str(result_path)],
                cwd=tmp, env=child_env, capture_output=True, text=True, timeout=timeout_s, check=False,
            )
        except subprocess.TimeoutExpired:
            return ChildOutcome(task, time.perf_counter() - start, None, f"timed out after {timeout_s:.0f} s")
        wall = time.perf_counter() - start
        stderr_tail = proc.stderr[-3000:]
        if not result_path.is_file():
            return ChildOutcome(task, wall, None,
                                f"exited with status {proc.returncode} and no result; stderr:\n{stderr_tail}",
                                proc.returncode)
        payload = json.loads(result_path.read_text())
    if not payload.get("ok"):
        error = payload.get("error", "unknown error")
        return ChildOutcome(task, wall, None, f"{error}\nstderr:\n{stderr_tail}", proc.returncode)
    return ChildOutcome(task, wall, dict(payload["result"]), None, proc.returncode)
