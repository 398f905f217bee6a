"""Two builds of asyncllm side by side: single-stream decode and 32x128 aggregate throughput, measured
alternately (baseline, candidate, baseline, ...) in fresh processes in one run.

    git worktree add /tmp/asyncllm-base <old-commit>
    python benchmarks/compare_builds.py --baseline /tmp/asyncllm-base --candidate .
    python benchmarks/compare_builds.py --baseline /tmp/asyncllm-base --candidate . --quick
    python benchmarks/compare_builds.py --baseline A --candidate B --rounds 7 --json ab.json --fail-below 0.95

Each measuring process imports asyncllm from its tree's ``src`` (through ``PYTHONPATH``) and uses only
the public API; the comparison logic is ``asyncllm.bench.compare`` from this checkout. See ``--help``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This checkout's driver, whichever asyncllm the interpreter has installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from asyncllm.bench.compare import main

if __name__ == "__main__":
    raise SystemExit(main())
