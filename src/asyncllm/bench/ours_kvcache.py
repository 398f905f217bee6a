"""Measurement ``kvcache``: the KV cache's dtype at one fixed memory budget, asyncllm against itself.

Each process loads the engine with ``kv_cache_bytes`` = the budget and one ``kv_cache_dtype`` (its job),
submits ``kv_sequences`` requests at once, each a distinct prompt of ``kv_sequence_tokens - kv_new_tokens``
tokens generating ``kv_new_tokens`` (so every sequence reaches ``kv_sequence_tokens``), and reports the most
sequences that ran together (what the budget admitted), the aggregate generated tok/s, and then the
single-stream decode speed of one short request (``max_tokens`` tokens). Prefix caching is off, so no
sequence reuses another's blocks; the thread governor is off, so every process runs on ``spec.threads``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import torch

from asyncllm.bench.ours import Result, _warm_up, timed_batch, timed_stream
from asyncllm.bench.settings import KV_CACHE_DTYPES
from asyncllm.bench.workload import WorkloadSpec
from asyncllm.engine import AsyncEngine


def long_prompts(spec: WorkloadSpec) -> list[list[int]]:
    """``kv_sequences`` distinct prompts of ``kv_sequence_tokens - kv_new_tokens`` tokens: the warm-up text,
    rotated by a different offset for each."""
    length = spec.kv_sequence_tokens - spec.kv_new_tokens
    base = spec.warmup_prompt
    text = (base * (2 * length // max(len(base), 1) + 2))
    return [text[7 * i + 1 : 7 * i + 1 + length] for i in range(spec.kv_sequences)]


def run_kvcache(spec: WorkloadSpec) -> Result:
    (dtype,) = spec.jobs
    if dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"jobs: expected one of {KV_CACHE_DTYPES}, got {dtype!r}")
    torch.set_num_threads(spec.threads)
    start = time.perf_counter()
    engine = AsyncEngine.from_pretrained(spec.model, device="cpu", kv_cache_bytes=spec.kv_budget_bytes,
                                         kv_cache_dtype=dtype, enable_prefix_caching=False,
                                         max_num_seqs=max(spec.kv_sequences, 1), adaptive_threads=False)
    load_s = time.perf_counter() - start
    prompts = long_prompts(spec)

    async def main() -> Result:
        async with engine:
            await _warm_up(engine, spec)
            peak = 0
            stop = asyncio.Event()

            async def watch() -> None:
                nonlocal peak
                while not stop.is_set():
                    peak = max(peak, engine.stats().running)
                    await asyncio.sleep(0.005)

            watcher = asyncio.ensure_future(watch())
            batch = await timed_batch(engine, prompts, spec.kv_new_tokens)
            stop.set()
            await watcher
            batch["peak_running"] = peak
            batch["num_preemptions"] = engine.stats().num_preemptions
            single = await timed_stream(lambda: engine.stream_detailed(
                list(spec.prompts[0]), max_tokens=spec.max_tokens, temperature=0.0, ignore_eos=True))
            return {"batch": batch, "single": single}

    measured = asyncio.run(main())
    stats = engine.stats()
    info: dict[str, Any] = {
        "kv_cache_dtype": stats.kv_cache_dtype,
        "kv_bytes_per_token": stats.kv_bytes_per_token,
        "kv_capacity_tokens": stats.kv_capacity_tokens,
        "budget_bytes": spec.kv_budget_bytes,
    }
    return {"load_s": load_s, "threads": torch.get_num_threads(), **info, **measured}
