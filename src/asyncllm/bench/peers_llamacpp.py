"""The llama.cpp peer (``llama-cpp-python``, optional): single-stream decode of the same ``.gguf`` file.

It runs in its own measuring subprocess with ``n_threads = n_threads_batch =`` the torch thread count of
every other process, on the prompt token ids asyncllm gets. Decoding is greedy (``temp=0``: llama.cpp's
greedy sampler, penalties neutral) for exactly the asked number of tokens: ``Llama.generate`` never stops
on EOS by itself (only ``create_completion`` checks it), and the loop takes the asked count and closes the
generator. Each yielded token is stamped like one streamed output of asyncllm's ``timed_stream``; the
first yield comes after the prompt's evaluation, so ``stamped_timing``'s decode speed (tokens after the
first over the time from the first to the last) leaves prompt processing out, as on asyncllm's side.

The KV cache is emptied (``Llama.reset``) before every run, so no run reuses an earlier run's prefix.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from asyncllm.bench.workload import WARMUP_NEW_TOKENS, WorkloadSpec, stamped_timing

Result = dict[str, Any]

MODULE = "llama_cpp"
INSTALL_HINT = "pip install llama-cpp-python"
TASK = "llamacpp"
"""The llama.cpp measuring task with the library's defaults."""
TASK_NO_EXTRA_BUFFERS = "llamacpp_no_extra_bufts"
"""The same task with llama.cpp's extra weight buffer types (AMX, repacked CPU layouts) turned off: the
fallback when the default one dies of an illegal instruction (ggml's AMX path on some machines)."""
N_BATCH = 512
"""Prompt tokens per ``llama_decode`` call (llama-cpp-python's default)."""


def skip_reason(model: str) -> str | None:
    """Why the llama.cpp peer cannot run on ``model`` (``None`` when it can): the model must be a local
    ``.gguf`` file and ``llama_cpp`` importable (found without importing it)."""
    if Path(model).suffix != ".gguf":
        return "the model is not a .gguf file"
    if importlib.util.find_spec(MODULE) is None:
        return f"llama-cpp-python is not installed ({INSTALL_HINT})"
    return None


def skip_message(reason: str) -> str:
    return f"llama.cpp peer skipped: {reason}"


def context_tokens(prompt_lengths: Sequence[int], max_tokens: int) -> int:
    """``n_ctx`` that holds the longest prompt plus ``max_tokens``: a multiple of 256, at least ``N_BATCH``."""
    if not prompt_lengths or max_tokens <= 0:
        raise ValueError("prompt_lengths: need at least one prompt; max_tokens: must be positive")
    need = max(prompt_lengths) + max_tokens + 1
    return max(N_BATCH, -(-need // 256) * 256)


@contextmanager
def _model_params(**fields: Any) -> Iterator[None]:
    """Set ``llama_model_params`` fields that ``Llama(...)`` does not expose: its ``__init__`` starts from
    ``llama_cpp.llama_model_default_params()``, which is wrapped for the duration of the block."""
    import llama_cpp.llama as llama_module

    bindings = llama_module.llama_cpp
    default = bindings.llama_model_default_params

    def patched() -> Any:
        params = default()
        for name, value in fields.items():
            setattr(params, name, value)
        return params

    bindings.llama_model_default_params = patched
    try:
        yield
    finally:
        bindings.llama_model_default_params = default


def load_llama(model: str, *, threads: int, n_ctx: int, extra_buffers: bool = True) -> Any:
    """A ``llama_cpp.Llama`` on CPU for the ``.gguf`` file, quiet; ``extra_buffers=False`` keeps every
    weight in the plain CPU buffer type (no AMX, no repacking)."""
    import llama_cpp

    kwargs: dict[str, Any] = dict(model_path=model, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                                  n_batch=N_BATCH, n_gpu_layers=0, verbose=False)
    if extra_buffers:
        return llama_cpp.Llama(**kwargs)
    with _model_params(use_extra_bufts=False):
        return llama_cpp.Llama(**kwargs)


def greedy_stamps(llama: Any, ids: Sequence[int], max_tokens: int) -> tuple[float, list[tuple[float, int]]]:
    """Greedy-decode exactly ``max_tokens`` tokens after ``ids`` on an emptied KV cache; returns the start
    time and one ``(time, 1)`` stamp per token, taken as ``generate`` yields it."""
    if max_tokens <= 0:
        raise ValueError(f"max_tokens: must be positive, got {max_tokens}")
    llama.reset()
    stamps: list[tuple[float, int]] = []
    start = time.perf_counter()
    tokens = llama.generate(list(ids), temp=0.0, repeat_penalty=1.0, reset=True)
    try:
        for _ in tokens:
            stamps.append((time.perf_counter(), 1))
            if len(stamps) == max_tokens:
                break
    finally:
        tokens.close()
    if len(stamps) != max_tokens:
        raise RuntimeError(f"llama.cpp generated {len(stamps)} tokens, asked for {max_tokens}")
    return start, stamps


def timed_decode(llama: Any, ids: Sequence[int], max_tokens: int) -> Result:
    """One timed single-stream run, in the fields asyncllm's ``timed_stream`` reports."""
    start, stamps = greedy_stamps(llama, ids, max_tokens)
    return {"generated_tokens": len(stamps), **stamped_timing(start, stamps), "prompt_tokens": len(ids)}


def run_llamacpp(spec: WorkloadSpec, *, extra_buffers: bool = True) -> Result:
    """One round of the single-stream measurement: load, one untimed warm-up run, one timed run of
    ``spec.prompts[0]`` for ``spec.max_tokens`` tokens."""
    import llama_cpp

    prompt = spec.prompts[0]
    n_ctx = context_tokens([len(prompt), len(spec.warmup_prompt)], max(spec.max_tokens, WARMUP_NEW_TOKENS))
    start = time.perf_counter()
    llama = load_llama(spec.model, threads=spec.threads, n_ctx=n_ctx, extra_buffers=extra_buffers)
    load_s = time.perf_counter() - start
    try:
        greedy_stamps(llama, spec.warmup_prompt, WARMUP_NEW_TOKENS)
        single = timed_decode(llama, prompt, spec.max_tokens)
        return {
            "load_s": load_s,
            "threads": int(llama.context_params.n_threads),
            "threads_batch": int(llama.context_params.n_threads_batch),
            "n_ctx": int(llama.n_ctx()),
            "n_batch": N_BATCH,
            "extra_buffers": extra_buffers,
            "weight_bytes": int(llama_cpp.llama_model_size(llama.model)),
            "version": str(getattr(llama_cpp, "__version__", "unknown")),
            "single": single,
        }
    finally:
        llama.close()
