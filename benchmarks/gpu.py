"""asyncllm on a CUDA GPU against Hugging Face ``generate``, on random-weight Llama shapes (no download).

    python benchmarks/gpu.py                                   # TinyLlama-1.1B and Llama-3-8B shapes
    python benchmarks/gpu.py --models tinyllama-1.1b --batches 1,64 --skip-hf
    python benchmarks/gpu.py --json gpu.json
    python benchmarks/gpu.py --dry-run                         # a tiny model on CPU: checks the plumbing
    python benchmarks/gpu.py --quant-only                      # only the W4A16 linear rows (below)
    python benchmarks/gpu.py --w4a16-only --models llama-3-8b  # only the W4A16 model rows (below)

Each named shape is built twice from one random initialisation, directly on the device: the HF
``LlamaForCausalLM`` and asyncllm's model loaded from its state dict, so both serve the same weights.
asyncllm runs through ``AsyncEngine.from_model`` (CUDA graphs for decode when the kernels allow).

Measurements (greedy, EOS ignored, random prompt ids, prefix caching off):
- decode tok/s at each batch size. asyncllm: tokens streamed while all ``B`` requests are decoding (from the
  moment the last one got its first token to the moment the first one finished) over that window. HF: the
  time of ``generate`` with ``1 + D`` new tokens minus the time with 1, for ``B * D`` tokens.
- prefill tok/s: ``R`` prompts of ``L`` tokens, one new token each, prompt tokens over elapsed time.
- roofline: bytes one decode step reads (every weight except an untied embedding table, of which only the
  looked-up rows, plus the KV of ``B`` contexts at their mean length in the window) times steps per second,
  against the measured device-to-device copy bandwidth (bytes read plus written per second).
- ``--concurrent`` (64) requests end to end (prefill included): asyncllm against HF ``generate`` of the same
  batch,
  and against HF serving the requests one at a time.
- ``--quant`` / ``--quant-only`` (CUDA only): one Llama-3-8B decoder layer's four linears (qkv, o, gate_up,
  down) with random 4-bit codes in groups of 128, ``quant_linear_triton`` against bf16 ``F.linear`` (cuBLAS)
  on the same dequantized values, at batch 1 and 64: median time per layer over CUDA-graph replays (CUDA
  events), the speed-up (target at batch 1: >= 2.5x) and the weight bytes read per second.
- ``--w4a16`` / ``--w4a16-only``: per shape, asyncllm's model built twice from one random initialisation
  (HF's, as above), dense in ``--dtype`` and with every decoder linear (q, k, v, o, gate, up, down) quantized
  on the device by ``quant.rtn.quantize_rtn`` (asymmetric 4-bit min-max round-to-nearest, groups of 128)
  and loaded as packed codes through ``load_weights``; embeddings, norms and the LM head stay dense. Each
  model gets its own engine (CUDA graphs as above; the Triton W4A16 kernels on CUDA, the CPU bundle's
  quantized linear on CPU) and decodes at ``--w4a16-batches`` (1 and 64) with the decode tok/s above: W4A16
  against dense (target at batch 1: >= 2.5x), the weight bytes stored and read per step of each, and the
  W4A16 step's bandwidth against the copy roofline. ``--dry-run`` includes these rows (the tiny shape).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from asyncllm import AsyncEngine, EngineConfig, ModelConfig
from asyncllm.bench.report import render_table
from asyncllm.bench.results import REPORT_ONLY, Row, Target
from asyncllm.bench.roofline import kv_bytes_per_token, measure_copy_bandwidth, parameter_bytes
from asyncllm.kernels import get_kernel_ops
from asyncllm.models import CausalLM, build_model
from asyncllm.quant.config import WeightOnlyQuantization
from asyncllm.quant.layer_quant import LayerQuant
from asyncllm.quant.packed import PackedWeight
from asyncllm.quant.rtn import quantize_rtn
from asyncllm.tokenizer import Tokenizer

Result = dict[str, Any]

_COMMON: dict[str, Any] = {
    "rms_norm_eps": 1e-5,
    "initializer_range": 0.02,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
SHAPES: dict[str, dict[str, Any]] = {
    "tinyllama-1.1b": dict(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    ),
    "llama-3.2-1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
    "llama-3-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    ),
    "tiny": dict(  # every linear's input a multiple of QUANT_GROUP, so the dry run quantizes it too
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    ),
}
# Batch-1 decode bandwidth as a fraction of the measured copy bandwidth.
ROOFLINE_TARGETS = {"tinyllama-1.1b": 0.70, "llama-3.2-1b": 0.70}
CONCURRENT_TARGET = 10.0
AGREEMENT_TOKENS = 16
# One Llama-3-8B decoder layer's linears: (name, in_features K, out_features N).
QUANT_LAYER: tuple[tuple[str, int, int], ...] = (
    ("qkv", 4096, 6144),
    ("o", 4096, 4096),
    ("gate_up", 4096, 28672),
    ("down", 14336, 4096),
)
QUANT_BITS = 4
QUANT_GROUP = 128
QUANT_BATCHES = (1, 64)
QUANT_TARGET = 2.5  # batch-1 speed-up of W4A16 over bf16: the layer's linears and the whole model's decode
# Layer copies cycled through in the timed graphs: two layers of 4-bit weights (~250 MB) exceed any L2.
QUANT_COPIES = 2


@dataclass(frozen=True)
class GpuBenchSettings:
    models: tuple[str, ...] = ("tinyllama-1.1b", "llama-3-8b")
    batches: tuple[int, ...] = (1, 8, 64, 256)
    prompt_len: int = 128
    decode_tokens: int = 128
    prefill_requests: int = 8
    prefill_len: int = 1024
    dtype: str = "bfloat16"
    device: str = "cuda"
    bandwidth_mb: int = 1024
    concurrent: int = 64
    skip_hf: bool = False
    quant: bool = False
    quant_only: bool = False
    w4a16: bool = False
    w4a16_only: bool = False
    w4a16_batches: tuple[int, ...] = (1, 64)
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [m for m in self.models if m not in SHAPES]
        if unknown or not self.models:
            raise ValueError(f"models: unknown {unknown or 'none given'}; known {sorted(SHAPES)}")
        if not self.batches or any(b <= 0 for b in self.batches):
            raise ValueError(f"batches: must be positive, got {self.batches}")
        for name in ("prompt_len", "decode_tokens", "prefill_requests", "prefill_len", "bandwidth_mb"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.concurrent not in self.batches:
            raise ValueError(f"concurrent: {self.concurrent} must be one of batches {self.batches}")
        if self.decode_tokens < 4:
            raise ValueError(f"decode_tokens: needs at least 4 for a decode window, got {self.decode_tokens}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype: must be float32, float16 or bfloat16, got {self.dtype!r}")
        if self.quant_only and not self.quant:
            raise ValueError("quant_only: needs quant")
        if self.w4a16_only and not self.w4a16:
            raise ValueError("w4a16_only: needs w4a16")
        if not self.w4a16_batches or any(b <= 0 for b in self.w4a16_batches):
            raise ValueError(f"w4a16_batches: must be positive, got {self.w4a16_batches}")

    @property
    def run_shapes(self) -> bool:
        """Whether the per-shape rows against HF run (not with ``--quant-only`` / ``--w4a16-only``)."""
        return not (self.quant_only or self.w4a16_only)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


DRY_RUN = GpuBenchSettings(
    models=("tiny",),
    batches=(1, 4),
    prompt_len=8,
    decode_tokens=6,
    prefill_requests=2,
    prefill_len=16,
    dtype="float32",
    device="cpu",
    bandwidth_mb=16,
    concurrent=4,
    w4a16=True,
    w4a16_batches=(1, 4),
)


# -- models ------------------------------------------------------------------------------------
def build_pair(
    shape: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int
) -> tuple[nn.Module, CausalLM]:
    """The HF model with random weights, and asyncllm's model holding the same tensors' values."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(**_COMMON, **shape)
    torch.manual_seed(seed)
    with torch.device(device):
        hf = LlamaForCausalLM._from_config(hf_config, dtype=dtype).eval()
    config = ModelConfig.from_hf_config({**hf_config.to_dict(), "architectures": ["LlamaForCausalLM"]})
    ours = build_model(config, get_kernel_ops("auto", device), dtype=dtype, device=device)
    ours.load_weights(hf.state_dict().items())
    return hf, ours


def synthetic_tokenizer(vocab_size: int) -> Tokenizer:
    """A word-level vocabulary ``<0> .. <V-1>`` so every id decodes; prompts are given as ids."""
    import tokenizers
    from tokenizers.models import WordLevel

    backend = tokenizers.Tokenizer(WordLevel({f"<{i}>": i for i in range(vocab_size)}, unk_token="<0>"))
    return Tokenizer(backend)


def weight_bytes_read(model: nn.Module, config: ModelConfig, dtype: torch.dtype, batch: int) -> int:
    """Weight bytes one decode step of ``batch`` rows reads: every stored weight, except that an untied
    embedding table is read only at the ``batch`` looked-up rows."""
    total = parameter_bytes(model)
    if config.tie_word_embeddings:
        return total
    element = torch.empty((), dtype=dtype).element_size()
    return total - config.vocab_size * config.hidden_size * element + batch * config.hidden_size * element


# -- device ------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, megabytes: int, repeats: int = 10) -> float:
    """Best device-to-device copy rate, bytes read plus written per second."""
    if device.type != "cuda":
        return measure_copy_bandwidth(megabytes, repeats=repeats).bytes_per_second
    numel = megabytes * 2**20 // 4
    src = torch.ones(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * numel * 4 / best


# -- asyncllm ----------------------------------------------------------------------------------
def random_prompts(count: int, length: int, vocab: int, generator: torch.Generator) -> list[list[int]]:
    return torch.randint(3, vocab, (count, length), generator=generator).tolist()


async def stamped_batch(engine: AsyncEngine, prompts: Sequence[Sequence[int]], max_tokens: int) -> Result:
    """Submit all prompts at once; per request the time and size of every output carrying tokens."""
    start = time.perf_counter()

    async def one(ids: Sequence[int]) -> list[tuple[float, int]]:
        stamps = []
        async for out in engine.stream_detailed(
            list(ids), max_tokens=max_tokens, temperature=0.0, ignore_eos=True
        ):
            if out.token_ids:
                stamps.append((time.perf_counter(), len(out.token_ids)))
        return stamps

    stamps = await asyncio.gather(*(one(p) for p in prompts))
    end = max(s[-1][0] for s in stamps)
    return {"stamps": stamps, "elapsed_s": end - start, "tokens": sum(n for s in stamps for _, n in s)}


def decode_window(stamps: Sequence[Sequence[tuple[float, int]]]) -> tuple[float, int]:
    """``(seconds, tokens)`` of the window in which every request was decoding: after the last first token,
    up to the first final token."""
    begin = max(s[0][0] for s in stamps)
    end = min(s[-1][0] for s in stamps)
    tokens = sum(n for s in stamps for t, n in s if begin < t <= end)
    return end - begin, tokens


def engine_config(
    settings: GpuBenchSettings, shape: dict[str, Any], batches: Sequence[int] | None = None
) -> EngineConfig:
    """The engine for ``shape``, sized for decode at ``batches`` (default ``settings.batches``) and the
    prefill workload."""
    batches = tuple(batches or settings.batches)
    block = 16
    decode_blocks = max(batches) * -(-(settings.prompt_len + settings.decode_tokens + 2) // block)
    prefill_blocks = settings.prefill_requests * -(-(settings.prefill_len + 2) // block)
    return EngineConfig(
        device=settings.device,
        dtype=settings.dtype,
        block_size=block,
        num_kv_blocks=max(decode_blocks, prefill_blocks) + 16,
        max_num_seqs=max(*batches, settings.prefill_requests),
        max_num_batched_tokens=max(2048, settings.prefill_len),
        enable_prefix_caching=False,
        seed=settings.seed,
        max_model_len=min(
            shape["max_position_embeddings"],
            2 * max(settings.prefill_len, settings.prompt_len + settings.decode_tokens + 2),
        ),
    )


async def warm_up(
    engine: AsyncEngine, settings: GpuBenchSettings, batches: Sequence[int], vocab: int, generator: torch.Generator
) -> None:
    """Every batch size once, a few tokens each: compilation and first-use costs stay out of the timings."""
    for batch in sorted(set(batches)):
        await stamped_batch(engine, random_prompts(batch, settings.prompt_len, vocab, generator), 3)


async def decode_rates(
    engine: AsyncEngine, settings: GpuBenchSettings, batches: Sequence[int], vocab: int, generator: torch.Generator
) -> dict[int, Result]:
    """Per batch size: decode tok/s over the window in which every request was decoding (``decode_window``),
    and end to end."""
    out: dict[int, Result] = {}
    for batch in batches:
        run = await stamped_batch(
            engine, random_prompts(batch, settings.prompt_len, vocab, generator), settings.decode_tokens + 1
        )
        seconds, tokens = decode_window(run["stamps"])
        out[batch] = {
            "tokens_per_s": tokens / seconds if seconds > 0 else None,
            "window_s": seconds,
            "window_tokens": tokens,
            "end_to_end_tokens_per_s": run["tokens"] / run["elapsed_s"],
        }
    return out


def run_ours(
    engine: AsyncEngine, settings: GpuBenchSettings, vocab: int, agreement_prompt: list[int]
) -> Result:
    generator = torch.Generator().manual_seed(settings.seed + 1)

    async def main() -> Result:
        out: Result = {}
        async with engine:
            await warm_up(engine, settings, settings.batches, vocab, generator)
            # and the prefill shape, so that kernel compilation for long chunks stays out of the timings
            await stamped_batch(
                engine, random_prompts(settings.prefill_requests, settings.prefill_len, vocab, generator), 1
            )
            out["decode"] = await decode_rates(engine, settings, settings.batches, vocab, generator)
            prompts = random_prompts(settings.prefill_requests, settings.prefill_len, vocab, generator)
            run = await stamped_batch(engine, prompts, 1)
            out["prefill_tokens_per_s"] = sum(map(len, prompts)) / run["elapsed_s"]
            # min_tokens bans EOS as HF's min_new_tokens does, so both pick from the same candidates
            reply = await engine.generate(
                agreement_prompt, max_tokens=AGREEMENT_TOKENS, min_tokens=AGREEMENT_TOKENS, temperature=0.0
            )
            out["agreement_ids"] = list(reply.token_ids)
        return out

    return asyncio.run(main())


# -- Hugging Face --------------------------------------------------------------------------------
def hf_generate_seconds(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
    device = ids.device
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    sync(device)
    return time.perf_counter() - start, out[:, ids.shape[1] :]


def run_hf(
    model: nn.Module,
    settings: GpuBenchSettings,
    vocab: int,
    device: torch.device,
    agreement_prompt: list[int],
) -> Result:
    generator = torch.Generator().manual_seed(settings.seed + 2)

    def prompts(count: int, length: int) -> torch.Tensor:
        return torch.tensor(random_prompts(count, length, vocab, generator), device=device)

    hf_generate_seconds(model, prompts(2, settings.prompt_len), 3)  # warm-up, then the prefill shape
    hf_generate_seconds(model, prompts(settings.prefill_requests, settings.prefill_len), 1)
    out: Result = {"decode": {}}
    new_tokens = settings.decode_tokens + 1
    for batch in settings.batches:
        first, _ = hf_generate_seconds(model, prompts(batch, settings.prompt_len), 1)
        full, _ = hf_generate_seconds(model, prompts(batch, settings.prompt_len), new_tokens)
        decode = full - first
        out["decode"][batch] = {
            "tokens_per_s": batch * settings.decode_tokens / decode if decode > 0 else None,
            "end_to_end_tokens_per_s": batch * new_tokens / full,
        }
    seconds, _ = hf_generate_seconds(model, prompts(settings.prefill_requests, settings.prefill_len), 1)
    out["prefill_tokens_per_s"] = settings.prefill_requests * settings.prefill_len / seconds
    single, _ = hf_generate_seconds(model, prompts(1, settings.prompt_len), new_tokens)
    out["one_at_a_time_tokens_per_s"] = new_tokens / single
    _, ids = hf_generate_seconds(model, torch.tensor([agreement_prompt], device=device), AGREEMENT_TOKENS)
    out["agreement_ids"] = ids[0].tolist()
    return out


# -- one shape -----------------------------------------------------------------------------------
def bench_shape(name: str, settings: GpuBenchSettings, bandwidth: float) -> tuple[list[Row], Result]:
    device, dtype = torch.device(settings.device), settings.torch_dtype
    shape = SHAPES[name]
    start = time.perf_counter()
    hf, model = build_pair(shape, device, dtype, settings.seed)
    config = model.config
    engine = AsyncEngine.from_model(
        model, synthetic_tokenizer(config.vocab_size), config=engine_config(settings, shape)
    )
    build_s = time.perf_counter() - start
    agreement_prompt = random_prompts(
        1, settings.prompt_len, config.vocab_size, torch.Generator().manual_seed(settings.seed + 3)
    )[0]
    ours = run_ours(engine, settings, config.vocab_size, agreement_prompt)
    peer = None if settings.skip_hf else run_hf(hf, settings, config.vocab_size, device, agreement_prompt)
    rows = shape_rows(name, settings, model, ours, peer, bandwidth)
    raw = {
        "model": name,
        "build_s": build_s,
        "asyncllm": ours,
        "hf": peer,
        "weight_bytes": parameter_bytes(model) if isinstance(model, nn.Module) else None,
    }
    del engine, hf, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows, raw


def shape_rows(
    name: str,
    settings: GpuBenchSettings,
    model: CausalLM,
    ours: Result,
    peer: Result | None,
    bandwidth: float,
) -> list[Row]:
    config, dtype = model.config, settings.torch_dtype
    hf_label = "HF generate, same batch" if peer is not None else "skipped (--skip-hf)"
    rows: list[Row] = []
    context = settings.prompt_len + settings.decode_tokens / 2
    for batch in settings.batches:
        mine = ours["decode"][batch]["tokens_per_s"]
        theirs = peer["decode"][batch]["tokens_per_s"] if peer else None
        rows.append(
            Row(name, f"decode tok/s, batch {batch}", "tok/s", mine, theirs, True, REPORT_ONLY, hf_label)
        )
        nbytes = weight_bytes_read(model, config, dtype, batch) if isinstance(model, nn.Module) else None
        if nbytes is None or mine is None:
            continue
        nbytes += batch * kv_bytes_per_token(config, dtype) * context
        achieved = nbytes * mine / batch
        target = (
            Target("ratio_at_least", ROOFLINE_TARGETS[name])
            if batch == 1 and name in ROOFLINE_TARGETS
            else REPORT_ONLY
        )
        rows.append(
            Row(
                name, f"bytes read per step, batch {batch}", "GB", nbytes / 1e9, None, False, REPORT_ONLY, "-"
            )
        )
        rows.append(
            Row(
                name,
                f"decode bandwidth, batch {batch}",
                "GB/s",
                achieved / 1e9,
                bandwidth / 1e9,
                True,
                target,
                "device copy bandwidth (ratio = roofline fraction)",
            )
        )
    rows.append(
        Row(
            name,
            "prefill tok/s",
            "tok/s",
            ours["prefill_tokens_per_s"],
            peer["prefill_tokens_per_s"] if peer else None,
            True,
            REPORT_ONLY,
            hf_label,
        )
    )
    concurrent = settings.concurrent
    mine = ours["decode"][concurrent]["end_to_end_tokens_per_s"]
    rows.append(
        Row(
            name,
            f"{concurrent} concurrent, end to end",
            "tok/s",
            mine,
            peer["decode"][concurrent]["end_to_end_tokens_per_s"] if peer else None,
            True,
            Target("ratio_at_least", CONCURRENT_TARGET),
            hf_label,
        )
    )
    rows.append(
        Row(
            name,
            f"{concurrent} concurrent, end to end",
            "tok/s",
            mine,
            peer["one_at_a_time_tokens_per_s"] if peer else None,
            True,
            REPORT_ONLY,
            "HF generate, one request at a time",
        )
    )
    if peer is not None:
        same = 0
        for a, b in zip(ours["agreement_ids"], peer["agreement_ids"], strict=False):
            if a != b:
                break
            same += 1
        rows.append(
            Row(
                name,
                f"greedy tokens equal to HF (of {AGREEMENT_TOKENS})",
                "",
                float(same),
                None,
                True,
                REPORT_ONLY,
                "low-precision numerics may diverge",
            )
        )
    return rows


# -- weight-only quantized linears ------------------------------------------------------------------
def random_packed_weight(n: int, k: int, device: torch.device, generator: torch.Generator) -> PackedWeight:
    """A ``PackedWeight`` ``[n, k]`` of random 4-bit codes, groups of ``QUANT_GROUP``, symmetric around 8."""
    qweight = torch.randint(0, 256, (n, k * QUANT_BITS // 8), dtype=torch.uint8, device=device, generator=generator)
    scales = torch.rand((n, k // QUANT_GROUP), device=device, generator=generator) * 2e-3 + 1e-3
    return PackedWeight(qweight, scales, -8 * scales, QUANT_BITS, QUANT_GROUP, k)


def graph_time_us(fn: Callable[[int], object], reps: int = 20, replays: int = 50) -> float:
    """Median time of one ``fn(i)`` in microseconds: ``fn(0) .. fn(reps - 1)`` recorded in one CUDA graph,
    each replay timed with CUDA events."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture: Triton compilation, cuBLAS workspaces
        for i in range(reps):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fn(i)
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    del graph
    return statistics.median(times)


def bench_quant_layer(device: torch.device, seed: int) -> tuple[list[Row], Result]:
    """One Llama-3-8B layer's four linears, W4A16 (``quant_linear_triton``) against bf16 ``F.linear``."""
    from asyncllm.kernels.triton_quant import default_path, dequantize_triton, quant_linear_triton

    generator = torch.Generator(device=device).manual_seed(seed)
    layers = [
        [random_packed_weight(n, k, device, generator) for _, k, n in QUANT_LAYER] for _ in range(QUANT_COPIES)
    ]
    dense = [[dequantize_triton(w, torch.bfloat16) for w in layer] for layer in layers]
    quant_bytes = sum(w.nbytes for w in layers[0])
    dense_bytes = sum(w.numel() * w.element_size() for w in dense[0])
    rows: list[Row] = []
    raw: Result = {"model": "llama-3-8b layer linears, W4A16", "quant_bytes": quant_bytes,
                   "dense_bytes": dense_bytes, "batches": {}}
    label = f"llama-3-8b layer, W{QUANT_BITS}A16 g{QUANT_GROUP}"
    for batch in QUANT_BATCHES:
        inputs = {k: torch.randn((batch, k), device=device, generator=generator).to(torch.bfloat16)
                  for k in {k for _, k, _ in QUANT_LAYER}}

        def quant_layer(i: int, inputs: dict[int, torch.Tensor] = inputs) -> None:
            for w in layers[i % QUANT_COPIES]:
                quant_linear_triton(inputs[w.in_features], w)

        def dense_layer(i: int, inputs: dict[int, torch.Tensor] = inputs) -> None:
            for w in dense[i % QUANT_COPIES]:
                torch.nn.functional.linear(inputs[w.shape[1]], w)

        quant_us, dense_us = graph_time_us(quant_layer), graph_time_us(dense_layer)
        # the same weight values either way: how far the two outputs drift apart (bf16 rounding)
        drift = 0.0
        for w, d in zip(layers[0], dense[0], strict=True):
            x = inputs[w.in_features]
            want = torch.nn.functional.linear(x, d).float()
            got = quant_linear_triton(x, w).float()
            drift = max(drift, ((got - want).abs().max() / want.abs().max()).item())
        act_bytes = sum(batch * (k + n) * 2 for _, k, n in QUANT_LAYER)
        raw["batches"][batch] = {"quant_us": quant_us, "dense_us": dense_us, "max_relative_difference": drift,
                                 "path": default_path(batch)}
        target = Target("ratio_at_least", QUANT_TARGET) if batch == 1 else REPORT_ONLY
        metric = f"{len(QUANT_LAYER)} linears, batch {batch} ({default_path(batch)})"
        rows.append(Row(label, metric, "us", quant_us, dense_us, False, target, "bf16 F.linear (cuBLAS), CUDA graph"))
        rows.append(Row(label, f"bytes read per s, batch {batch}", "GB/s", (quant_bytes + act_bytes) / quant_us / 1e3,
                        (dense_bytes + act_bytes) / dense_us / 1e3, True, REPORT_ONLY, "bf16 F.linear"))
        rows.append(Row(label, f"max relative difference to bf16, batch {batch}", "", drift, None, False,
                        REPORT_ONLY, "-"))
    return rows, raw


# -- the whole model with W4A16 weights ---------------------------------------------------------------
def rtn_checkpoint(
    state: Mapping[str, torch.Tensor], bits: int, group_size: int
) -> tuple[WeightOnlyQuantization, Iterator[tuple[str, torch.Tensor]]]:
    """A Llama state dict as a weight-only quantized checkpoint: every decoder linear
    (``model.layers.*_proj.weight``) as asymmetric min-max round-to-nearest codes (``quantize_rtn``) under
    the loaders' canonical names (``<prefix>.codes``, ``.code_scales``, ``.code_zeros``, ``.code_mins``), every
    other tensor (embeddings, norms, the LM head) as it is. The tensors are computed lazily, one linear at a
    time on its own device, as ``load_weights`` consumes them."""
    prefixes = [
        name.removesuffix(".weight")
        for name in state
        if name.startswith("model.layers.") and name.endswith("_proj.weight")
    ]
    quantization = WeightOnlyQuantization(
        f"rtn-w{bits}g{group_size}", {prefix: LayerQuant(bits=bits, group_size=group_size) for prefix in prefixes}
    )

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in state.items():
            prefix = name.removesuffix(".weight")
            if prefix not in quantization.layers:
                yield name, tensor
                continue
            codes = quantize_rtn(tensor, bits, group_size)
            yield f"{prefix}.codes", codes.codes
            yield f"{prefix}.code_scales", codes.scales
            yield f"{prefix}.code_zeros", codes.zeros
            yield f"{prefix}.code_mins", codes.mins

    return quantization, tensors()


def run_decode(engine: AsyncEngine, settings: GpuBenchSettings, batches: Sequence[int], vocab: int) -> Result:
    """Decode rates at ``batches`` after a warm-up (the prompts depend on the seed only, so two engines
    measured this way see the same prompts)."""
    generator = torch.Generator().manual_seed(settings.seed + 1)

    async def main() -> Result:
        async with engine:
            await warm_up(engine, settings, batches, vocab, generator)
            return {"decode": await decode_rates(engine, settings, batches, vocab, generator)}

    return asyncio.run(main())


def bench_w4a16(name: str, settings: GpuBenchSettings, bandwidth: float) -> tuple[list[Row], Result]:
    """asyncllm's model of shape ``name`` twice from one random initialisation, dense in ``settings.dtype``
    and with every decoder linear W4A16 (RTN, ``QUANT_BITS`` bits, groups of ``QUANT_GROUP``), each served by
    its own engine: decode tok/s at ``settings.w4a16_batches`` and the weight bytes of each."""
    device, dtype = torch.device(settings.device), settings.torch_dtype
    shape, batches = SHAPES[name], settings.w4a16_batches
    start = time.perf_counter()
    hf, dense = build_pair(shape, device, dtype, settings.seed)
    config = dense.config
    quantization, tensors = rtn_checkpoint(hf.state_dict(), QUANT_BITS, QUANT_GROUP)
    packed = build_model(config, get_kernel_ops("auto", device), dtype=dtype, device=device,
                         quantization=quantization)
    packed.load_weights(tensors)
    del hf, tensors
    sync(device)
    build_s = time.perf_counter() - start
    tokenizer = synthetic_tokenizer(config.vocab_size)
    models = {"dense": dense, "w4a16": packed}
    measured: dict[str, Result] = {}
    for kind, model in models.items():
        engine = AsyncEngine.from_model(model, tokenizer, config=engine_config(settings, shape, batches))
        measured[kind] = run_decode(engine, settings, batches, config.vocab_size)
        del engine
        if device.type == "cuda":
            torch.cuda.empty_cache()
    stored = {kind: parameter_bytes(model) for kind, model in models.items()}
    read = {kind: weight_bytes_read(model, config, dtype, batches[0]) for kind, model in models.items()}
    label = f"{name}, W{QUANT_BITS}A16 g{QUANT_GROUP} (RTN)"
    peer_label = f"asyncllm {settings.dtype}, the same weights unquantized"
    rows: list[Row] = []
    for batch in batches:
        target = Target("ratio_at_least", QUANT_TARGET) if batch == 1 else REPORT_ONLY
        ours, peer = (measured[kind]["decode"][batch]["tokens_per_s"] for kind in ("w4a16", "dense"))
        rows.append(Row(label, f"decode tok/s, batch {batch}", "tok/s", ours, peer, True, target, peer_label))
    rows.append(Row(label, "weight bytes", "GB", stored["w4a16"] / 1e9, stored["dense"] / 1e9, False, REPORT_ONLY,
                    peer_label))
    bound = f"{peer_label} (ratio: the speed-up if steps only streamed weights)"
    rows.append(Row(label, f"weight bytes read per step, batch {batches[0]}", "GB", read["w4a16"] / 1e9,
                    read["dense"] / 1e9, False, REPORT_ONLY, bound))
    rate = measured["w4a16"]["decode"][batches[0]]["tokens_per_s"]
    if rate is not None:
        context = settings.prompt_len + settings.decode_tokens / 2
        step_bytes = read["w4a16"] + batches[0] * kv_bytes_per_token(config, dtype) * context
        rows.append(Row(label, f"decode bandwidth, batch {batches[0]}", "GB/s", step_bytes * rate / batches[0] / 1e9,
                        bandwidth / 1e9, True, REPORT_ONLY, "device copy bandwidth (ratio = roofline fraction)"))
    raw: Result = {
        "model": f"{name}, W{QUANT_BITS}A16",
        "build_s": build_s,
        "bits": QUANT_BITS,
        "group_size": QUANT_GROUP,
        "quantized_linears": len(quantization.layers),
        "dense": measured["dense"],
        "w4a16": measured["w4a16"],
        "weight_bytes": stored,
        "weight_bytes_read": read,
    }
    del dense, packed, models
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows, raw


# -- entry point -----------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> tuple[GpuBenchSettings, Path | None, bool]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = GpuBenchSettings()
    parser.add_argument(
        "--models", default=",".join(defaults.models), help=f"comma-separated: {sorted(SHAPES)}"
    )
    parser.add_argument("--batches", default=",".join(map(str, defaults.batches)))
    parser.add_argument(
        "--concurrent",
        type=int,
        default=defaults.concurrent,
        help="the batch compared end to end with HF (one of --batches)",
    )
    parser.add_argument("--prompt-len", type=int, default=defaults.prompt_len)
    parser.add_argument("--decode-tokens", type=int, default=defaults.decode_tokens)
    parser.add_argument("--prefill-requests", type=int, default=defaults.prefill_requests)
    parser.add_argument("--prefill-len", type=int, default=defaults.prefill_len)
    parser.add_argument("--dtype", default=defaults.dtype, choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--skip-hf", action="store_true", help="measure asyncllm only")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows and raw results here")
    parser.add_argument("--quant", action="store_true",
                        help="also time one Llama-3-8B layer's linears, W4A16 against bf16 (CUDA only)")
    parser.add_argument("--quant-only", action="store_true", help="only the --quant rows, no model shapes")
    parser.add_argument("--w4a16", action="store_true",
                        help="also decode each --models shape with every decoder linear W4A16 (RTN) against the "
                             "same model unquantized, at --w4a16-batches")
    parser.add_argument("--w4a16-only", action="store_true",
                        help="only the --w4a16 rows (and --quant's if given), no HF comparison")
    parser.add_argument("--w4a16-batches", default=",".join(map(str, defaults.w4a16_batches)))
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="a tiny model on CPU with a few tokens: checks the script, measures nothing useful",
    )
    args = parser.parse_args(argv)
    quant = args.quant or args.quant_only
    w4a16 = args.w4a16 or args.w4a16_only
    if args.dry_run:
        # every section that runs on CPU, the W4A16 model rows included, unless only the --quant rows are asked
        w4a16 = w4a16 or not args.quant_only
        dry = replace(DRY_RUN, skip_hf=args.skip_hf, quant=quant, quant_only=args.quant_only, w4a16=w4a16,
                      w4a16_only=args.w4a16_only)
        return dry, args.json, True
    settings = GpuBenchSettings(
        models=tuple(m.strip() for m in args.models.split(",") if m.strip()),
        batches=tuple(int(b) for b in args.batches.split(",") if b.strip()),
        prompt_len=args.prompt_len,
        decode_tokens=args.decode_tokens,
        prefill_requests=args.prefill_requests,
        prefill_len=args.prefill_len,
        dtype=args.dtype,
        skip_hf=args.skip_hf,
        concurrent=args.concurrent,
        quant=quant,
        quant_only=args.quant_only,
        w4a16=w4a16,
        w4a16_only=args.w4a16_only,
        w4a16_batches=tuple(int(b) for b in args.w4a16_batches.split(",") if b.strip()),
    )
    return settings, args.json, False


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings, json_path, dry_run = parse_args(argv)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not dry_run and not torch.cuda.is_available():
        print(
            "benchmarks/gpu.py needs an NVIDIA GPU: torch.cuda.is_available() is False on this machine "
            f"(torch {torch.__version__}). Run with --dry-run to check the script on CPU.",
            file=sys.stderr,
        )
        return 2
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    device = torch.device(settings.device)
    bandwidth = copy_bandwidth(device, settings.bandwidth_mb)
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else "CPU (dry run: figures are meaningless)"
    )
    print(
        f"asyncllm GPU benchmark on {where}; torch {torch.__version__}; {settings.dtype}; "
        f"copy bandwidth {bandwidth / 1e9:.1f} GB/s"
    )
    print(
        f"workload: prompts of {settings.prompt_len} random ids, {settings.decode_tokens + 1} new tokens, "
        f"greedy; prefill {settings.prefill_requests} x {settings.prefill_len}",
        flush=True,
    )
    rows: list[Row] = []
    raw: list[Result] = []

    def record() -> None:
        if json_path is not None:
            text = {
                "settings": asdict(settings),
                "copy_bandwidth_bytes_per_s": bandwidth,
                "device": where,
                "rows": [row.to_dict() for row in rows],
                "raw": raw,
            }
            json_path.write_text(json.dumps(text, indent=2, default=str))

    # Each table as soon as it is measured, so a run cut short still reports what it finished.
    for name in settings.models:
        if settings.run_shapes:
            shape_rows_, shape_raw = bench_shape(name, settings, bandwidth)
            rows += shape_rows_
            raw.append(shape_raw)
            print(f"\n{name} (built in {shape_raw['build_s']:.1f} s):", flush=True)
            print(render_table(shape_rows_), flush=True)
            record()
        if settings.w4a16:
            w4a16_rows, w4a16_raw = bench_w4a16(name, settings, bandwidth)
            rows += w4a16_rows
            raw.append(w4a16_raw)
            print(f"\n{name}, every decoder linear W{QUANT_BITS}A16 against {settings.dtype} (both built in "
                  f"{w4a16_raw['build_s']:.1f} s, {w4a16_raw['quantized_linears']} linears quantized):", flush=True)
            print(render_table(w4a16_rows), flush=True)
            record()
    if settings.quant and device.type != "cuda":
        print("\nquantized linears (--quant): skipped, the Triton kernels need a CUDA device", flush=True)
    elif settings.quant:
        quant_rows, quant_raw = bench_quant_layer(device, settings.seed)
        rows += quant_rows
        raw.append(quant_raw)
        torch.cuda.empty_cache()
        print(f"\n{quant_raw['model']}: {QUANT_COPIES} layers cycled in CUDA graphs, median per layer:", flush=True)
        print(render_table(quant_rows), flush=True)
        record()
    record()
    print(
        "\nratio = ours / peer (peer / ours for times: the speed-up); for the decode bandwidth rows it is the "
        "fraction of the measured copy roofline."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
