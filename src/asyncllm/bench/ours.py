"""asyncllm's side of each measurement; each entry point runs inside its own measuring subprocess.

Every timed request is greedy with EOS ignored unless stated, so each one generates exactly the asked
number of tokens; results count the tokens actually streamed, never the number asked for. Engines load
with the library's defaults (a weight-only quantized checkpoint stays packed) unless an entry point is
asked for ``dequantize_weights``, which decodes it to dense weights as ``EngineConfig`` describes. The
thread governor (``EngineConfig.adaptive_threads``) is off wherever asyncllm is compared with a peer, so that
both sides keep the same thread count; only the contention measurement runs with it, as by default.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from asyncllm.bench.machine import current_rss_bytes, peak_rss_bytes, reset_peak_rss
from asyncllm.bench.roofline import (
    Bandwidth,
    decode_flops_per_token,
    kv_bytes_per_token,
    measure_copy_bandwidth,
    parameter_bytes,
)
from asyncllm.bench.workload import (
    WARMUP_NEW_TOKENS,
    WorkloadSpec,
    stamped_timing,
)
from asyncllm.cpu_threads import affinity_cpus
from asyncllm.engine import AsyncEngine
from asyncllm.models import CausalLM
from asyncllm.runner import KVCacheSpec

Result = dict[str, Any]


def engine_model(engine: AsyncEngine) -> CausalLM:
    """The model an engine serves (its runner's), to count its stored weights or serve it again."""
    return engine.model


def stored_weight_bytes(engine: AsyncEngine) -> int:
    model = engine_model(engine)
    if not isinstance(model, nn.Module):
        raise TypeError(f"engine: expected an nn.Module model, got {type(model).__name__}")
    return parameter_bytes(model)


def load_engine(spec: WorkloadSpec, *, dequantize_weights: bool = False) -> tuple[AsyncEngine, float]:
    """The engine on CPU with the spec's KV pool, and the seconds its load took."""
    torch.set_num_threads(spec.threads)
    start = time.perf_counter()
    engine = AsyncEngine.from_pretrained(spec.model, device="cpu", kv_cache_tokens=spec.kv_cache_tokens,
                                         dequantize_weights=dequantize_weights, num_threads=spec.threads,
                                         adaptive_threads=False)
    return engine, time.perf_counter() - start


def engine_footprint(engine: AsyncEngine) -> Result:
    """Stored weight bytes, KV pool bytes, the KV bytes one token occupies, and decode FLOPs per token as
    ``ctx0 + per_context_token * context``."""
    dtype = engine.config.resolved_dtype()
    per_block = KVCacheSpec.for_model(engine.model_config, num_blocks=1, block_size=engine.config.block_size,
                                      dtype=dtype).bytes_per_block
    return {
        "weight_bytes": stored_weight_bytes(engine),
        "kv_pool_bytes": engine.stats().kv_blocks_total * per_block,
        "kv_pool_tokens": engine.stats().kv_blocks_total * engine.config.block_size,
        "kv_bytes_per_token": kv_bytes_per_token(engine.model_config, dtype),
        "dtype": str(dtype).removeprefix("torch."),
        "decode_flops_per_token_ctx0": decode_flops_per_token(engine.model_config, 0),
        "decode_flops_per_context_token": decode_flops_per_token(engine.model_config, 1)
        - decode_flops_per_token(engine.model_config, 0),
    }


async def timed_batch(engine: AsyncEngine, prompts: Sequence[Sequence[int]], max_tokens: int) -> Result:
    """Submit every prompt at once; per request record when its first token arrived and how many came.

    ``elapsed_s`` runs from submission to the last request's final output; TTFTs are from submission.
    """
    start = time.perf_counter()

    async def one(ids: Sequence[int]) -> tuple[float, float, int]:
        first: float | None = None
        count = 0
        async for out in engine.stream_detailed(list(ids), max_tokens=max_tokens, temperature=0.0,
                                                ignore_eos=True):
            if out.token_ids:
                if first is None:
                    first = time.perf_counter()
                count += len(out.token_ids)
        end = time.perf_counter()
        return (first if first is not None else end), end, count

    done = await asyncio.gather(*(one(ids) for ids in prompts))
    elapsed = max(end for _, end, _ in done) - start
    ttfts = [first - start for first, _, _ in done]
    tokens = sum(count for _, _, count in done)
    return {
        "requests": len(prompts),
        "max_tokens": max_tokens,
        "prompt_tokens": sum(len(p) for p in prompts),
        "tokens_per_request": [count for _, _, count in done],
        "generated_tokens": tokens,
        "elapsed_s": elapsed,
        "tokens_per_s": tokens / elapsed,
        "ttft_s": ttfts,
        "ttft_mean_s": statistics.fmean(ttfts),
        "ttft_p50_s": statistics.median(ttfts),
    }


async def timed_stream(stream_factory: Callable[[], Any]) -> Result:
    """Consume one request's stream, stamping each output that carries tokens (see ``stamped_timing``)."""
    start = time.perf_counter()
    stamps: list[tuple[float, int]] = []
    stream = stream_factory()
    async for out in stream:
        if out.token_ids:
            stamps.append((time.perf_counter(), len(out.token_ids)))
    if not stamps:
        raise RuntimeError("the request produced no tokens")
    completion = stream.completion
    return {
        "generated_tokens": sum(n for _, n in stamps),
        **stamped_timing(start, stamps),
        "prompt_tokens": completion.usage.prompt_tokens if completion is not None else None,
        "cached_tokens": completion.usage.cached_tokens if completion is not None else None,
    }


async def _warm_up(engine: AsyncEngine, spec: WorkloadSpec) -> None:
    await timed_batch(engine, [spec.warmup_prompt, spec.warmup_prompt[::-1]], WARMUP_NEW_TOKENS)


def run_throughput(spec: WorkloadSpec, *, dequantize_weights: bool = False) -> Result:
    """Measurement 1 (and 5): ``len(spec.prompts)`` concurrent requests; this process's peak RSS."""
    engine, load_s = load_engine(spec, dequantize_weights=dequantize_weights)
    rss_after_load = current_rss_bytes()
    peak_after_load = peak_rss_bytes()
    reset_ok = reset_peak_rss()

    async def main() -> Result:
        async with engine:
            await _warm_up(engine, spec)
            result = await timed_batch(engine, spec.prompts, spec.max_tokens)
            result["num_preemptions"] = engine.stats().num_preemptions
            return result

    result = asyncio.run(main())
    peak_run = peak_rss_bytes()
    result.update(engine_footprint(engine))
    result.update({
        "load_s": load_s,
        "dequantize_weights": dequantize_weights,
        "threads": torch.get_num_threads(),
        "rss_after_load_bytes": rss_after_load,
        "peak_rss_load_bytes": peak_after_load,
        "peak_rss_run_bytes": peak_run if reset_ok else None,
        "peak_rss_bytes": max(peak_after_load, peak_run),
    })
    return result


def run_load(spec: WorkloadSpec, *, dequantize_weights: bool) -> Result:
    """Only load the engine (nothing runs on it): its footprint and load time, e.g. the weight bytes of
    the dequantized load for measurement 5 when no dequantized throughput process runs."""
    engine, load_s = load_engine(spec, dequantize_weights=dequantize_weights)
    return {"load_s": load_s, "dequantize_weights": dequantize_weights, "threads": torch.get_num_threads(),
            **engine_footprint(engine)}


def _session_reuse(engine: AsyncEngine, spec: WorkloadSpec) -> Result:
    """Measurement 3: last-turn TTFT inside a Session vs the same transcript, stateless, on an engine
    sharing the model but with prefix caching off. Replies are greedy and stop at EOS, as in a real chat."""
    reply = spec.session_reply_tokens

    async def in_session() -> tuple[Result, list[dict[str, Any]], list[int]]:
        async with engine:
            await _warm_up(engine, spec)
            async with engine.session(system=spec.session_system) as chat:
                history_tokens: list[int] = []
                for message in spec.session_messages[:-1]:
                    completion = await chat.send(message, max_tokens=reply, temperature=0.0)
                    history_tokens.append(completion.usage.prompt_tokens + completion.usage.completion_tokens)
                last = spec.session_messages[-1]
                transcript = [*chat.messages, {"role": "user", "content": last}]
                result = await timed_stream(
                    lambda: chat.stream_detailed(last, max_tokens=reply, temperature=0.0))
                return result, transcript, history_tokens

    session_result, transcript, history = asyncio.run(in_session())
    stateless_engine = AsyncEngine.from_model(
        engine_model(engine), engine.tokenizer, config=engine.config.replace(enable_prefix_caching=False),
    )

    async def stateless() -> Result:
        async with stateless_engine:
            await _warm_up(stateless_engine, spec)
            return await timed_stream(lambda: stateless_engine.stream_detailed(transcript, max_tokens=1,
                                                                               temperature=0.0))

    stateless_result = asyncio.run(stateless())
    return {
        "turns": len(spec.session_messages),
        "turn_tokens_before_last": history,
        "session": session_result,
        "stateless": stateless_result,
    }


def run_single(spec: WorkloadSpec) -> Result:
    """Measurement 2, one round: one request's decode speed on a freshly loaded engine, plus a copy
    bandwidth sample for the roofline right before and right after the timed run (on the engine's
    model thread, so that no second torch thread team is left behind to slow the engine)."""
    engine, load_s = load_engine(spec)
    prompt = spec.prompts[0]

    async def main() -> tuple[Result, list[Bandwidth]]:
        async with engine:
            await _warm_up(engine, spec)
            before = await engine.run_on_model_thread(measure_copy_bandwidth, spec.bandwidth_mb)
            run = await timed_stream(lambda: engine.stream_detailed(
                prompt, max_tokens=spec.max_tokens, temperature=0.0, ignore_eos=True))
            after = await engine.run_on_model_thread(measure_copy_bandwidth, spec.bandwidth_mb)
            return run, [before, after]

    run, samples = asyncio.run(main())
    return {
        "load_s": load_s,
        "threads": torch.get_num_threads(),
        **engine_footprint(engine),
        "single": run,
        "bandwidth_samples_bytes_per_s": [sample.bytes_per_second for sample in samples],
        "bandwidth_copy_bytes": samples[0].bytes_per_copy,
        "bandwidth_repeats": samples[0].repeats,
    }


def _issue(engine: AsyncEngine, spec: WorkloadSpec) -> Result:
    """The small concurrent batch compared with HF ``generate`` run one request after another."""

    async def main() -> Result:
        async with engine:
            await _warm_up(engine, spec)
            return await timed_batch(engine, spec.prompts[: spec.issue_requests], spec.max_tokens)

    return asyncio.run(main())


_MISC_JOBS: dict[str, Callable[[AsyncEngine, WorkloadSpec], Result]] = {
    "issue": _issue,
    "session": _session_reuse,
}


def run_misc(spec: WorkloadSpec) -> Result:
    """The smaller asyncllm measurements named in ``spec.jobs``, each on a freshly loaded engine (an engine
    is bound to the event loop it first ran in, and each keeps all its torch work on its own model thread).
    """
    unknown = [job for job in spec.jobs if job not in _MISC_JOBS]
    if unknown:
        raise ValueError(f"jobs: unknown {unknown}; known {sorted(_MISC_JOBS)}")
    first, load_s = load_engine(spec)
    out: Result = {"load_s": load_s, "threads": torch.get_num_threads(), **engine_footprint(first)}
    for index, job in enumerate(spec.jobs):
        engine = first if index == 0 else load_engine(spec)[0]
        out[job] = _MISC_JOBS[job](engine, spec)
    return out


def busy_processes(count: int) -> list[subprocess.Popen[bytes]]:
    """``count`` CPU-bound competitors: Python processes spinning in an endless loop (kill them after)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def _single_decode(spec: WorkloadSpec, threads: int, competitors: int) -> Result:
    """One greedy request of ``spec.max_tokens`` tokens on a freshly loaded engine with ``threads`` threads,
    after a warm-up, beside ``competitors`` busy processes started just before the timed request."""
    engine = AsyncEngine.from_pretrained(spec.model, device="cpu", kv_cache_tokens=spec.kv_cache_tokens,
                                         num_threads=threads)

    async def main() -> Result:
        async with engine:
            await _warm_up(engine, spec)
            others = busy_processes(competitors)
            try:
                if others:
                    await asyncio.sleep(0.5)  # let the scheduler spread them over the cores
                run = await timed_stream(lambda: engine.stream_detailed(
                    spec.prompts[0], max_tokens=spec.max_tokens, temperature=0.0, ignore_eos=True))
                # the thread governor may have lowered the engine's threads during the run
                run["threads_at_end"] = await engine.run_on_model_thread(torch.get_num_threads)
                return run
            finally:
                for other in others:
                    other.kill()
                for other in others:
                    other.wait()

    return {"threads": threads, "competitors": competitors, **asyncio.run(main())}


def run_contention(spec: WorkloadSpec) -> Result:
    """Decode speed under CPU contention: one request quiet, then beside one busy process per CPU this
    process may use, both with ``spec.threads`` threads; then quiet on one thread, the comparison point a
    contended run should keep at least half of."""
    competitors = len(affinity_cpus())
    quiet = _single_decode(spec, spec.threads, 0)
    contended = _single_decode(spec, spec.threads, competitors)
    quiet_one = _single_decode(spec, 1, 0)
    torch.set_num_threads(spec.threads)  # report the measured setting, as the other processes do
    return {
        "threads": spec.threads,
        "competitors": competitors,
        "openmp_env": {name: os.environ[name] for name in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")
                       if name in os.environ},
        "quiet": quiet,
        "contended": contended,
        "quiet_one_thread": quiet_one,
    }
