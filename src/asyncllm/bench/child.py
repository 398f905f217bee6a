"""Entry point of one measuring subprocess: ``python -c <this file's source> JOB_JSON RESULT_JSON``.

Run as source text (not ``-m``) so the process starts with only the standard library imported: the
cold-start tasks time ``import asyncllm`` / ``import transformers`` from ``_T0``, taken right after the
standard-library imports below. The job file holds ``{"task": name, "spec": WorkloadSpec fields}``; the
result file receives ``{"ok": true, "result": {...}}`` or ``{"ok": false, "error": "..."}``.
"""

import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

_T0 = time.perf_counter()


def cold_asyncllm(spec: dict[str, Any]) -> dict[str, Any]:
    """Import asyncllm, load the model, and produce the first token of a short prompt."""
    import asyncio

    import torch

    from asyncllm import AsyncEngine

    torch.set_num_threads(int(spec["threads"]))
    imported = time.perf_counter()
    engine = AsyncEngine.from_pretrained(spec["model"], device="cpu", num_threads=int(spec["threads"]),
                                         adaptive_threads=False)
    loaded = time.perf_counter()

    async def first_token() -> float:
        async with engine:
            async for out in engine.stream_detailed(list(spec["cold_prompt"]), max_tokens=1, temperature=0.0,
                                                    ignore_eos=True):
                if out.token_ids:
                    return time.perf_counter()
        raise RuntimeError("no token produced")

    first = asyncio.run(first_token())
    return _cold_result(imported, loaded, first, torch.get_num_threads())


def cold_hf(spec: dict[str, Any]) -> dict[str, Any]:
    """Import transformers, load the model with ``from_pretrained``, and produce the first token."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(int(spec["threads"]))
    imported = time.perf_counter()
    path = Path(spec["model"])
    if path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    loaded = time.perf_counter()
    ids = torch.tensor([list(spec["cold_prompt"])], dtype=torch.long)
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, min_new_tokens=1,
                       do_sample=False, pad_token_id=0)
    first = time.perf_counter()
    return _cold_result(imported, loaded, first, torch.get_num_threads())


def _cold_result(imported: float, loaded: float, first: float, threads: int) -> dict[str, Any]:
    return {
        "import_s": imported - _T0,
        "load_s": loaded - imported,
        "first_token_s": first - loaded,
        "total_s": first - _T0,
        "threads": threads,
    }


def run(task: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Dispatch one task; the library's own modules are imported only for the non-cold tasks."""
    if task == "cold_asyncllm":
        return cold_asyncllm(spec)
    if task == "cold_hf":
        return cold_hf(spec)
    from asyncllm.bench.workload import WorkloadSpec

    workload = WorkloadSpec(**spec)
    if task in ("ours_throughput", "ours_throughput_dense"):
        from asyncllm.bench.ours import run_throughput

        return run_throughput(workload, dequantize_weights=task.endswith("_dense"))
    if task == "ours_weights_dense":
        from asyncllm.bench.ours import run_load

        return run_load(workload, dequantize_weights=True)
    if task == "ours_misc":
        from asyncllm.bench.ours import run_misc

        return run_misc(workload)
    if task == "ours_kvcache":
        from asyncllm.bench.ours_kvcache import run_kvcache

        return run_kvcache(workload)
    if task == "ours_single":
        from asyncllm.bench.ours import run_single

        return run_single(workload)
    if task == "ours_contention":
        from asyncllm.bench.ours import run_contention

        return run_contention(workload)
    if task == "hf":
        from asyncllm.bench.peers_hf import run_hf

        return run_hf(workload)
    if task in ("llamacpp", "llamacpp_no_extra_bufts"):
        from asyncllm.bench.peers_llamacpp import run_llamacpp

        return run_llamacpp(workload, extra_buffers=task == "llamacpp")
    raise ValueError(f"task: unknown {task!r}")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        raise SystemExit("usage: child JOB_JSON RESULT_JSON")
    job = json.loads(Path(argv[0]).read_text())
    result_path = Path(argv[1])
    try:
        result = run(str(job["task"]), dict(job["spec"]))
    except Exception as exc:
        result_path.write_text(json.dumps({"ok": False, "error": f"{exc!r}\n{traceback.format_exc()}"}))
        return 1
    result_path.write_text(json.dumps({"ok": True, "result": result}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
