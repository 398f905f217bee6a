"""asyncllm vs Hugging Face transformers: throughput, decode roofline, session reuse, cold start, memory.

    python benchmarks/throughput.py                    # full run (32 x 128, all measurements)
    python benchmarks/throughput.py --requests 2 --tokens 8 --only throughput,single --skip-peer
    python benchmarks/throughput.py --json results.json

Same options as ``asyncllm bench``; see ``--help``.
"""

from __future__ import annotations

from asyncllm.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
