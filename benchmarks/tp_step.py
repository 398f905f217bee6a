"""One tensor-parallel rank's step time for a model shape, with the collectives stubbed out.

    python benchmarks/tp_step.py --device cpu                          # tiny shape: checks the plumbing
    python benchmarks/tp_step.py --device cuda --preset llama-8b       # Llama-3-8B's shape, N = 1, 2, 4, 8
    python benchmarks/tp_step.py --device cuda --preset llama-70b --sizes 4,8 --batches 1,32

For each split N the model of rank 0 is built exactly as a tensor-parallel rank builds it (its heads, its
share of the intermediate features, its vocabulary rows, its slice of the KV pool), with random weights,
on one device. Its all-reduce and all-gather are replaced by a stub that returns at once (the gather
repeats the rank's logits to the full width, so the sampler-side shapes stay real). What is timed is
therefore the per-rank *compute* of a step; a step on N real devices adds two all-reduces per layer and
one gather (of ``hidden`` and ``vocab / N`` values per token) over the interconnect.

Rows: N, the rank's resident weight bytes, the median time of a decode step at each ``--batches`` size
(each sequence at ``--context`` tokens of context) and of one ``--prefill``-token prefill, and the
projected speed-up of the compute over N = 1. Timings run eagerly (no CUDA graphs: the tensor-parallel
path runs eagerly too), after warm-up, synchronised on CUDA.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from asyncllm.config import ModelConfig
from asyncllm.distributed.parallel_state import TensorParallel, head_partition
from asyncllm.kernels import get_kernel_ops
from asyncllm.layers.weights import parameter_bytes
from asyncllm.models import build_model
from asyncllm.runner import KVCacheSpec, ModelRunner
from asyncllm.scheduler import ScheduledChunk
from asyncllm.sequence import SequenceState

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=1000),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256),
    "llama-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, vocab_size=128256),
}


@dataclass(frozen=True)
class StubParallel(TensorParallel):
    """Rank ``rank`` of ``size`` whose collectives do no communication (see the module docstring)."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat(*([1] * (x.dim() - 1)), self.size)

    def all_reduce_min(self, value: int, device: torch.device) -> int:
        return value


def model_config(preset: str) -> ModelConfig:
    hf = dict(PRESETS[preset], architectures=["LlamaForCausalLM"], model_type="llama", max_position_embeddings=8192,
              rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False, hidden_act="silu")
    return ModelConfig.from_hf_config(hf)


def rank_runner(config: ModelConfig, size: int, *, device: torch.device, dtype: torch.dtype, tokens: int,
                block_size: int) -> ModelRunner:
    """Rank 0 of ``size``: its model with random weights and a KV pool of ``tokens`` tokens."""
    parallel = StubParallel(0, size)
    ops = get_kernel_ops("auto", device, native_kernels=device.type == "cpu", native_layer_max_rows=0)
    model = build_model(config, ops, dtype=dtype, device=device, parallel=parallel)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():  # type: ignore[attr-defined]
            param.normal_(0.0, 0.02, generator=generator)
    for module in model.modules():  # type: ignore[attr-defined]
        process = getattr(module, "process_weights_after_loading", None)
        if process is not None and module is not model:
            process()
    heads = head_partition(config.num_attention_heads, config.num_key_value_heads, parallel)
    spec = KVCacheSpec.for_model(config, num_blocks=-(-tokens // block_size) + 1, block_size=block_size, dtype=dtype,
                                 num_kv_heads=heads.num_kv_heads)
    return ModelRunner(model, spec, device=device, max_model_len=min(8192, spec.num_blocks * block_size))


def _chunks(lengths: list[int], new: int, block_size: int) -> list[ScheduledChunk]:
    """One chunk per sequence: its last ``new`` tokens of ``length`` (blocks laid out one after another)."""
    chunks, next_block = [], 0
    for i, length in enumerate(lengths):
        seq = SequenceState(f"s{i}", [1] * length, None, max_total_tokens=length)
        blocks = -(-length // block_size)
        seq.block_table = list(range(next_block, next_block + blocks))
        next_block += blocks
        chunks.append(ScheduledChunk(seq, length - new, new))
    return chunks


def time_step(runner: ModelRunner, chunks: list[ScheduledChunk], repeats: int) -> float:
    """Median seconds of ``runner.forward_logits(chunks)`` after two warm-up runs."""
    sync = torch.cuda.synchronize if runner.device.type == "cuda" else (lambda: None)
    times = []
    for i in range(repeats + 2):
        sync()
        start = time.perf_counter()
        runner.forward_logits(chunks)
        sync()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help="model shape (default: tiny on CPU, llama-8b on CUDA)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--sizes", default="1,2,4,8", help="tensor-parallel sizes N (default: %(default)s)")
    parser.add_argument("--batches", default="1,32", help="decode batch sizes (default: %(default)s)")
    parser.add_argument("--context", type=int, default=None, help="context per decoding sequence "
                        "(default: 64 on CPU, 1024 on CUDA)")
    parser.add_argument("--prefill", type=int, default=None, help="prefill tokens (default: 64 CPU, 2048 CUDA)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per step (default: 5 CPU, 20 CUDA)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    preset = args.preset or ("llama-8b" if cuda else "tiny")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    context = args.context or (1024 if cuda else 64)
    prefill = args.prefill or (2048 if cuda else 64)
    repeats = args.repeats or (20 if cuda else 5)
    sizes = [int(s) for s in args.sizes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    config = model_config(preset)
    block_size = 16
    tokens = max(max(batches) * (context + block_size), prefill + block_size)

    header = ["N", "weights/rank", *(f"decode b={b} ms" for b in batches), f"prefill {prefill} ms",
              f"decode b={batches[0]} speed-up", "prefill speed-up"]
    print(f"preset {preset}, {dtype}, {device}, context {context}, collectives stubbed (compute only)")
    rows: list[list[str]] = []
    base: tuple[float, float] | None = None
    for size in sizes:
        try:
            runner = rank_runner(config, size, device=device, dtype=dtype, tokens=tokens, block_size=block_size)
        except ValueError as error:
            rows.append([str(size), f"refused: {error}"])
            continue
        except torch.OutOfMemoryError:
            rows.append([str(size), "out of memory"])
            continue
        decode = [time_step(runner, _chunks([context + 1] * b, 1, block_size), repeats) for b in batches]
        whole = time_step(runner, _chunks([prefill], prefill, block_size), repeats)
        base = base or (decode[0], whole)
        rows.append([str(size), f"{parameter_bytes(runner.model) / 2**20:.1f} MiB",  # type: ignore[arg-type]
                     *(f"{t * 1e3:.3f}" for t in decode), f"{whole * 1e3:.3f}",
                     f"{base[0] / decode[0]:.2f}x", f"{base[1] / whole:.2f}x"])
        del runner
        if cuda:
            torch.cuda.empty_cache()
    widths = [max(len(header[i]), *(len(row[i]) for row in rows if len(row) > i)) for i in range(len(header))]
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
