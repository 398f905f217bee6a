"""Entry point of one measuring subprocess of ``benchmarks/compare_builds.py``:
``python -c <this file's source> JOB_JSON RESULT_JSON``.

The comparison runs this same program against two source trees, choosing the tree through
``PYTHONPATH``; it therefore uses asyncllm's public API only (``AsyncEngine.from_pretrained``,
``stream_detailed``), never the benchmark's internal modules, which a refactor may move or change. It
reads ``{"task": "warm" | "single" | "throughput", "spec": {...}}`` and writes ``{"ok": true, "result":
{...}}`` or ``{"ok": false, "error": "..."}``. The measurements follow ``asyncllm bench``'s: the same
warm-up (two requests of ``WARMUP_NEW_TOKENS`` tokens), greedy decoding with EOS ignored, and the same
definitions of single-stream decode speed and aggregate throughput.
"""

import asyncio
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

WARMUP_NEW_TOKENS = 8
WARM_BUILD_TOKENS = 4


def _load(spec: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The engine on CPU with the spec's threads and KV pool, and where ``asyncllm`` was imported from
    (checked against ``spec["expect_src"]``, so a stray install can never stand in for a tree)."""
    import torch

    torch.set_num_threads(int(spec["threads"]))
    import asyncllm
    from asyncllm import AsyncEngine

    origin = Path(asyncllm.__file__).resolve()
    expected = Path(spec["expect_src"]).resolve()
    if expected not in origin.parents:
        raise RuntimeError(f"asyncllm was imported from {origin}, not from {expected}")
    threads: dict[str, int] = {}
    fields = getattr(getattr(asyncllm, "EngineConfig", None), "__dataclass_fields__", {})
    if "num_threads" in fields:  # trees that set threads
        threads["num_threads"] = int(spec["threads"])
    if "adaptive_threads" in fields:  # both trees on the same fixed thread count
        threads["adaptive_threads"] = False
    start = time.perf_counter()
    engine = AsyncEngine.from_pretrained(spec["model"], device="cpu", kv_cache_tokens=int(spec["kv_cache_tokens"]),
                                         **threads)
    info = {
        "asyncllm_file": str(origin),
        "asyncllm_version": str(getattr(asyncllm, "__version__", "unknown")),
        "load_s": time.perf_counter() - start,
        "threads": torch.get_num_threads(),
    }
    return engine, info


async def _stream(engine: Any, ids: list[int], max_tokens: int) -> list[tuple[float, int]]:
    """``(time, tokens)`` of each output of one greedy request that carries tokens."""
    stamps: list[tuple[float, int]] = []
    async for out in engine.stream_detailed(list(ids), max_tokens=max_tokens, temperature=0.0, ignore_eos=True):
        if out.token_ids:
            stamps.append((time.perf_counter(), len(out.token_ids)))
    if not stamps:
        raise RuntimeError("a request produced no tokens")
    return stamps


async def _batch(engine: Any, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    """Every prompt submitted at once; elapsed from submission to the last request's final output."""
    start = time.perf_counter()
    done = await asyncio.gather(*(_stream(engine, ids, max_tokens) for ids in prompts))
    elapsed = max(stamps[-1][0] for stamps in done) - start
    tokens = sum(n for stamps in done for _, n in stamps)
    ttfts = [stamps[0][0] - start for stamps in done]
    return {
        "requests": len(prompts),
        "generated_tokens": tokens,
        "elapsed_s": elapsed,
        "tokens_per_s": tokens / elapsed,
        "ttft_mean_s": sum(ttfts) / len(ttfts),
    }


async def _warm_up(engine: Any, spec: dict[str, Any]) -> None:
    warm = list(spec["warmup_prompt"])
    await _batch(engine, [warm, warm[::-1]], WARMUP_NEW_TOKENS)


def warm(spec: dict[str, Any]) -> dict[str, Any]:
    """Run every shape the timed tasks run, briefly, so that whatever this build compiles and caches on
    first use (native CPU kernels) is ready before any timing; report the native kernels' state when the
    build can tell."""
    engine, info = _load(spec)

    async def main() -> None:
        async with engine:
            await _warm_up(engine, spec)
            await _batch(engine, [list(p) for p in spec["prompts"]], WARM_BUILD_TOKENS)
            await _stream(engine, list(spec["prompts"][0]), WARM_BUILD_TOKENS)

    asyncio.run(main())
    try:
        from asyncllm.kernels.native_build import native_kernels_status

        info["native_kernels"] = native_kernels_status()
    except Exception as exc:  # a build without this helper, or with another one: not an error here
        info["native_kernels"] = f"unknown ({type(exc).__name__})"
    return info


def single(spec: dict[str, Any]) -> dict[str, Any]:
    """One request's decode speed: the tokens after the first over the time from the first output to the
    last (prefill and the first token excluded), as ``asyncllm bench`` measures it."""
    engine, info = _load(spec)

    async def main() -> list[tuple[float, int]]:
        async with engine:
            await _warm_up(engine, spec)
            return await _stream(engine, list(spec["prompts"][0]), int(spec["max_tokens"]))

    start = time.perf_counter()
    stamps = asyncio.run(main())
    decode_tokens = sum(n for _, n in stamps) - stamps[0][1]
    decode_s = stamps[-1][0] - stamps[0][0]
    return {
        **info,
        "generated_tokens": sum(n for _, n in stamps),
        "decode_tokens": decode_tokens,
        "decode_s": decode_s,
        "tokens_per_s": decode_tokens / decode_s if decode_s > 0 else None,
        "process_s": time.perf_counter() - start,
    }


def throughput(spec: dict[str, Any]) -> dict[str, Any]:
    """Aggregate throughput: every prompt submitted at once, all streamed tokens over the elapsed time."""
    engine, info = _load(spec)

    async def main() -> dict[str, Any]:
        async with engine:
            await _warm_up(engine, spec)
            return await _batch(engine, [list(p) for p in spec["prompts"]], int(spec["max_tokens"]))

    return {**info, **asyncio.run(main())}


TASKS = {"warm": warm, "single": single, "throughput": throughput}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        raise SystemExit("usage: compare_child JOB_JSON RESULT_JSON")
    job = json.loads(Path(argv[0]).read_text())
    result_path = Path(argv[1])
    try:
        task = TASKS.get(str(job["task"]))
        if task is None:
            raise ValueError(f"task: unknown {job['task']!r}; known {sorted(TASKS)}")
        result = task(dict(job["spec"]))
    except Exception as exc:
        result_path.write_text(json.dumps({"ok": False, "error": f"{exc!r}\n{traceback.format_exc()}"}))
        return 1
    result_path.write_text(json.dumps({"ok": True, "result": result}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
