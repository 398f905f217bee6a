"""``asyncllm bench``: asyncllm against Hugging Face transformers (and, for the single stream on a ``.gguf``
model, llama.cpp through the optional ``llama-cpp-python``) on the same model, machine and inputs.

Every measurement runs in fresh subprocesses (one per library) with equal thread counts; the report
prints only measured values, with ``n/a`` wherever a value could not be measured.
"""

from asyncllm.bench.harness import add_bench_command, build_parser, main, run_bench
from asyncllm.bench.settings import MEASUREMENTS, BenchSettings

__all__ = ["MEASUREMENTS", "BenchSettings", "add_bench_command", "build_parser", "main", "run_bench"]
