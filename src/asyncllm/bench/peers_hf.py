"""The Hugging Face transformers peer: the same model and token ids, measured the same way.

The model is loaded with ``AutoModelForCausalLM.from_pretrained`` (``gguf_file=`` for a ``.gguf``) in
float32. Continuous batching uses ``model.generate_batch``; one-at-a-time decoding uses ``model.generate``.
EOS never ends a request: ``eos_token_id=-1`` for continuous batching, ``min_new_tokens`` for ``generate``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.generation.streamers import BaseStreamer

from asyncllm.bench.roofline import parameter_bytes
from asyncllm.bench.workload import (
    WARMUP_NEW_TOKENS,
    WorkloadSpec,
    stamped_timing,
)

Result = dict[str, Any]


def load_hf_model(model: str) -> nn.Module:
    """The HF causal LM for a ``.gguf`` file or an HF model directory, float32, in eval mode."""
    from transformers import AutoModelForCausalLM

    path = Path(model)
    if path.suffix == ".gguf":
        loaded = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32)
    else:
        loaded = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return loaded.eval()


def hf_kv_bytes_per_token(model: nn.Module) -> int:
    """K and V bytes one cached token occupies across all layers of the HF model (float32)."""
    config: Any = model.config
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    return 2 * int(config.num_hidden_layers) * kv_heads * head_dim * 4


def batch_generate(model: Any, prompts: Sequence[Sequence[int]], max_tokens: int,
                   warmup_prompt: Sequence[int]) -> Result:
    """``generate_batch`` over all prompts after a small untimed warm-up call.

    Timing uses the library's own per-request stamps: the window runs from the earliest request's
    creation to the latest finish (the manager's start-up and shut-down are outside it; the whole call's
    wall time is reported separately). TTFT is each request's first-token stamp minus its creation.
    """
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=-1)
    warm = GenerationConfig(max_new_tokens=WARMUP_NEW_TOKENS, do_sample=False, eos_token_id=-1)
    model.generate_batch([list(warmup_prompt), list(warmup_prompt)[::-1]], generation_config=warm,
                         warmup=False)
    call_start = time.perf_counter()
    outputs = model.generate_batch([list(p) for p in prompts], generation_config=config,
                                   record_timestamps=True, warmup=False)
    call_s = time.perf_counter() - call_start
    results = list(outputs.values())
    errors = [r.error for r in results if r.error is not None]
    if errors or len(results) != len(prompts):
        raise RuntimeError(
            f"generate_batch: {len(results)} of {len(prompts)} requests returned; errors {errors[:3]}")
    start = min(r.created_time for r in results)
    end = max(r.lifespan[1] for r in results)
    ttfts = [r.timestamps[0] - r.created_time for r in results if r.timestamps]
    tokens = sum(len(r.generated_tokens) for r in results)
    return {
        "requests": len(prompts),
        "max_tokens": max_tokens,
        "prompt_tokens": sum(len(p) for p in prompts),
        "tokens_per_request": [len(r.generated_tokens) for r in results],
        "generated_tokens": tokens,
        "elapsed_s": end - start,
        "call_s": call_s,
        "tokens_per_s": tokens / (end - start),
        "ttft_s": ttfts,
        "ttft_mean_s": statistics.fmean(ttfts) if ttfts else None,
        "ttft_p50_s": statistics.median(ttfts) if ttfts else None,
    }


class _StampingStreamer(BaseStreamer):
    """A ``generate`` streamer that stamps every ``put`` after the first (the prompt)."""

    def __init__(self) -> None:
        super().__init__()
        self.stamps: list[tuple[float, int]] = []
        self._seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        self.stamps.append((time.perf_counter(), int(value.numel())))

    def end(self) -> None:
        pass


def _generate(
    model: Any, ids: Sequence[int], max_tokens: int, streamer: _StampingStreamer | None = None
) -> int:
    """Greedy ``generate`` of exactly ``max_tokens`` tokens for one prompt; returns the count generated."""
    input_ids = torch.tensor([list(ids)], dtype=torch.long)
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_tokens,
            min_new_tokens=max_tokens, do_sample=False, pad_token_id=0, streamer=streamer,
        )
    return int(out.shape[1] - input_ids.shape[1])


def sequential_generate(model: Any, prompts: Sequence[Sequence[int]], max_tokens: int,
                        warmup_prompt: Sequence[int]) -> Result:
    """``generate`` one request after another; aggregate tokens over the whole loop's time."""
    _generate(model, warmup_prompt, WARMUP_NEW_TOKENS)
    start = time.perf_counter()
    counts = [_generate(model, ids, max_tokens) for ids in prompts]
    elapsed = time.perf_counter() - start
    return {
        "requests": len(prompts),
        "max_tokens": max_tokens,
        "tokens_per_request": counts,
        "generated_tokens": sum(counts),
        "elapsed_s": elapsed,
        "tokens_per_s": sum(counts) / elapsed,
    }


def single_generate(
    model: Any, ids: Sequence[int], max_tokens: int, warmup_prompt: Sequence[int]
) -> Result:
    """One timed ``generate`` at batch 1 after a warm-up (decode speed excludes the first token, as on
    asyncllm's side)."""
    _generate(model, warmup_prompt, WARMUP_NEW_TOKENS)
    return _timed_generate(model, ids, max_tokens)


def _timed_generate(model: Any, ids: Sequence[int], max_tokens: int) -> Result:
    streamer = _StampingStreamer()
    start = time.perf_counter()
    total = _generate(model, ids, max_tokens, streamer)
    if not streamer.stamps:
        raise RuntimeError("generate streamed no tokens")
    return {"generated_tokens": total, **stamped_timing(start, streamer.stamps), "prompt_tokens": len(ids)}


def run_hf(spec: WorkloadSpec) -> Result:
    """The HF measurements named in ``spec.jobs`` (``throughput``, ``issue``, ``single``: one round of the
    single-stream measurement) on one load."""
    known = ("throughput", "issue", "single")
    unknown = [job for job in spec.jobs if job not in known]
    if unknown:
        raise ValueError(f"jobs: unknown {unknown}; known {list(known)}")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(spec.threads)
    start = time.perf_counter()
    model = load_hf_model(spec.model)
    out: Result = {
        "load_s": time.perf_counter() - start,
        "threads": torch.get_num_threads(),
        "weight_bytes": parameter_bytes(model),
        "kv_bytes_per_token": hf_kv_bytes_per_token(model),
        "attn_implementation": str(getattr(model.config, "_attn_implementation", "unknown")),
    }
    if "throughput" in spec.jobs:
        out["throughput"] = batch_generate(model, spec.prompts, spec.max_tokens, spec.warmup_prompt)
    if "issue" in spec.jobs:
        out["issue"] = sequential_generate(model, spec.prompts[: spec.issue_requests], spec.max_tokens,
                                           spec.warmup_prompt)
    if "single" in spec.jobs:
        out["single"] = single_generate(model, spec.prompts[0], spec.max_tokens, spec.warmup_prompt)
    return out
