"""Padded decode over static buffers (``DecodeGraphs``): bucketing, settings, equality with the plain runner,
no KV writes from padding, eager fallbacks; real CUDA graph capture where a GPU exists; the GPU benchmark's
plumbing on CPU.

The reference for every padded step is the plain runner (exactly sized batch, exact context lengths) run
over the same sequences on its own KV pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import io
import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncllm import AsyncEngine, EngineConfig, ModelConfig
from asyncllm.builder import max_model_len_for
from asyncllm.cuda_graphs import DEFAULT_BATCH_SIZES, DecodeGraphSettings, bucket_size, resolve_decode_graphs
from asyncllm.kernels import CPU_OPS, TORCH_OPS, KernelOps, get_kernel_ops
from asyncllm.models import CausalLM, build_model
from asyncllm.runner import KVCacheSpec, ModelRunner
from asyncllm.scheduler import ScheduledChunk
from asyncllm.sequence import SequenceState
from tests.conftest import tiny_llama_state

BLOCK = 8
NUM_BLOCKS = 40
MAX_POSITIONS = 96
VOCAB = 200
needs_gpu = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


@pytest.fixture(scope="module")
def tiny_state() -> tuple[dict[str, Any], dict]:
    return tiny_llama_state(
        VOCAB,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        num_hidden_layers=2,
        max_position_embeddings=MAX_POSITIONS,
    )


def make_model(
    state: tuple[dict[str, Any], dict],
    ops: KernelOps,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> CausalLM:
    hf_config, weights = state
    model = build_model(ModelConfig.from_hf_config(hf_config), ops, dtype=dtype, device=torch.device(device))
    model.load_weights((name, tensor.to(dtype)) for name, tensor in weights.items())
    return model


def make_runner(
    model: CausalLM,
    decode_graphs: Any,
    *,
    device: str = "cpu",
    sentinel: float = float("nan"),
    dtype: torch.dtype = torch.float32,
    max_model_len: int | None = None,
) -> ModelRunner:
    """A runner over a ``NUM_BLOCKS`` pool; ``decode_graphs`` is resolved as the engine's builder does."""
    spec = KVCacheSpec.for_model(model.config, num_blocks=NUM_BLOCKS, block_size=BLOCK, dtype=dtype)
    runner = ModelRunner(
        model, spec, device=torch.device(device), max_model_len=max_model_len_for(model, spec, max_model_len),
        decode_graphs=resolve_decode_graphs(model, torch.device(device), decode_graphs),
    )
    for cache in runner.kv_caches:
        cache.key.fill_(sentinel)
        cache.value.fill_(sentinel)
    return runner


class Batch:
    """Sequences with disjoint, shuffled blocks (block 0 never handed out, so padded rows read an unused
    block), greedy-extended by the plain runner's choices."""

    def __init__(self, prompt_lens: list[int], room: int, seed: int = 0) -> None:
        rng = random.Random(seed)
        free = list(range(1, NUM_BLOCKS))
        rng.shuffle(free)
        self.seqs: list[SequenceState] = []
        for i, length in enumerate(prompt_lens):
            seq = SequenceState(f"r{i}", [rng.randrange(VOCAB) for _ in range(length)], None, length + room)
            seq.block_table = [free.pop() for _ in range(-(-(length + room) // BLOCK))]
            self.seqs.append(seq)

    def prefill(self, index: int) -> list[ScheduledChunk]:
        seq = self.seqs[index]
        return [ScheduledChunk(seq, 0, len(seq.token_ids))]

    def decode(self, indices: list[int]) -> list[ScheduledChunk]:
        return [ScheduledChunk(self.seqs[i], len(self.seqs[i].token_ids) - 1, 1) for i in indices]

    def written_slots(self) -> set[int]:
        """Slots holding computed KV: every position but each sequence's last (sampled, not yet run)."""
        return {
            seq.block_table[p // BLOCK] * BLOCK + p % BLOCK
            for seq in self.seqs
            for p in range(len(seq.token_ids) - 1)
        }


def run_both(plain: ModelRunner, padded: ModelRunner, chunks: list[ScheduledChunk]) -> torch.Tensor:
    """Run one step on both runners, check their logits agree, append each sampling chunk's greedy token."""
    expected = plain.forward_logits(chunks).clone()
    actual = padded.forward_logits(chunks).clone()
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), atol=2e-5, rtol=2e-5)
    assert torch.equal(actual.argmax(-1), expected.argmax(-1))
    tokens = expected.argmax(-1).tolist()
    for chunk, token in zip([c for c in chunks if c.samples], tokens, strict=True):
        chunk.seq.token_ids.append(token)
    return actual


def assert_untouched_outside(runner: ModelRunner, written: set[int], sentinel: float) -> None:
    for kv_cache in runner.kv_caches:
        for cache in (kv_cache.key, kv_cache.value):
            flat = cache.float().cpu().reshape(NUM_BLOCKS * BLOCK, -1)
            is_sentinel = flat.isnan() if sentinel != sentinel else flat == sentinel
            untouched = is_sentinel.all(dim=1)
            expected = torch.ones(NUM_BLOCKS * BLOCK, dtype=torch.bool)
            expected[sorted(written)] = False
            assert torch.equal(untouched, expected)


# -- bucketing and settings ----------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 300), min_size=1, max_size=10, unique=True), st.integers(1, 400))
def test_bucket_is_the_smallest_size_that_holds_the_batch(sizes: list[int], num_seqs: int) -> None:
    ordered = DecodeGraphSettings(batch_sizes=tuple(sizes), capture=False).batch_sizes
    assert list(ordered) == sorted(sizes)
    fitting = [b for b in sizes if b >= num_seqs]
    assert bucket_size(num_seqs, ordered) == (min(fitting) if fitting else None)


def test_settings_and_engine_config_reject_bad_values_by_name() -> None:
    for bad in ((), (0, 1), (1, 1), (True,), (2.0,)):
        with pytest.raises(ValueError, match=r"^batch_sizes"):
            DecodeGraphSettings(batch_sizes=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"^cuda_graph_batch_sizes"):
            EngineConfig(cuda_graph_batch_sizes=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^enforce_eager"):
        EngineConfig(enforce_eager=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^num_seqs"):
        bucket_size(0, (1, 2))
    assert EngineConfig().cuda_graph_batch_sizes == DEFAULT_BATCH_SIZES


def test_engine_config_sizes_are_trimmed_to_what_max_num_seqs_can_use() -> None:
    def sizes(**overrides: Any) -> tuple[int, ...] | None:
        chosen = DecodeGraphSettings.from_engine_config(EngineConfig(**overrides))
        return None if chosen is None else chosen.batch_sizes

    assert sizes(max_num_seqs=64) == (1, 2, 4, 8, 16, 32, 64)
    assert sizes(max_num_seqs=100) == (1, 2, 4, 8, 16, 32, 64, 128)
    assert sizes(max_num_seqs=1000) == DEFAULT_BATCH_SIZES
    assert sizes(max_num_seqs=3, cuda_graph_batch_sizes=(8, 1)) == (1, 8)
    assert sizes(enforce_eager=True) is None


def test_cpu_runner_defaults_to_eager_and_refuses_capture(tiny_state: tuple[dict[str, Any], dict]) -> None:
    model = make_model(tiny_state, CPU_OPS)
    assert make_runner(model, "auto").graphs is None
    assert resolve_decode_graphs(model, torch.device("cpu"), config=EngineConfig()) is None
    with pytest.raises(ValueError, match=r"^decode_graphs: capture needs a CUDA device"):
        make_runner(model, DecodeGraphSettings(batch_sizes=(1, 2)))
    with pytest.raises(ValueError, match=r"^decode_graphs"):
        make_runner(model, "always")


def test_one_max_model_len_bounds_the_engine_and_the_padded_steps(
    tiny_state: tuple[dict[str, Any], dict], tiny_model_parts: Any
) -> None:
    tokenizer, hf_config, state = tiny_model_parts
    model = make_model((hf_config, state), CPU_OPS)  # max_position_embeddings 2048
    spec = KVCacheSpec.for_model(model.config, num_blocks=NUM_BLOCKS, block_size=BLOCK, dtype=torch.float32)
    assert max_model_len_for(model, spec) == NUM_BLOCKS * BLOCK  # the pool is smaller than the positions
    assert max_model_len_for(model, spec, 77) == 77
    assert max_model_len_for(make_model(tiny_state, CPU_OPS), spec) == MAX_POSITIONS  # fewer positions than slots
    config = EngineConfig(device="cpu", num_kv_blocks=NUM_BLOCKS, block_size=BLOCK, max_model_len=77)
    engine = AsyncEngine.from_model(model, tokenizer, config=config)
    assert engine.max_model_len == engine._runner.max_model_len == 77
    settings = DecodeGraphSettings(batch_sizes=(1, 2), capture=False)
    padded = ModelRunner(model, spec, device=torch.device("cpu"), max_model_len=77, decode_graphs=settings)
    assert padded.graphs is not None and padded.graphs.max_model_len == 77
    with pytest.raises(ValueError, match=r"^max_model_len"):
        ModelRunner(model, spec, device=torch.device("cpu"), max_model_len=0)
    with pytest.raises(ValueError, match=r"^decode_graphs"):
        ModelRunner(model, spec, device=torch.device("cpu"), max_model_len=77, decode_graphs="auto")  # type: ignore[arg-type]


# -- padded decode on CPU (capture disabled: the same static buffers, run eagerly) -------------------------
def _padded_decode_scenario(state: tuple[dict[str, Any], dict], ops: KernelOps, sentinel: float) -> None:
    model = make_model(state, ops)
    plain = make_runner(model, None, sentinel=sentinel)
    padded = make_runner(
        model, DecodeGraphSettings(batch_sizes=(1, 2, 4, 8), capture=False), sentinel=sentinel
    )
    graphs = padded.graphs
    assert (
        graphs is not None
        and graphs.max_model_len == MAX_POSITIONS
        and graphs.max_blocks == MAX_POSITIONS // BLOCK
    )
    batch = Batch([3, 8, 13, 1, 20], room=12)
    for i in range(len(batch.seqs)):
        run_both(plain, padded, batch.prefill(i))
    # prefills run eagerly, except the one-token prompt: a one-token step is a decode step
    assert graphs.stats.runs == {1: 1, 2: 0, 4: 0, 8: 0}
    for indices in ([0, 1, 2, 3, 4], [0, 2, 4], [3], [1, 4], [0, 1, 2, 3, 4], [4, 2, 0, 1, 3]):
        run_both(plain, padded, batch.decode(indices))  # padded to 8, 4, 1, 2, 8, 8 rows
    assert graphs.stats.runs == {1: 2, 2: 1, 4: 1, 8: 3}
    written = batch.written_slots()
    assert_untouched_outside(padded, written, sentinel)
    assert_untouched_outside(plain, written, sentinel)
    for p_cache, q_cache in zip(plain.kv_caches, padded.kv_caches, strict=True):
        pk, pv, qk, qv = p_cache.key, p_cache.value, q_cache.key, q_cache.value
        index = torch.tensor(sorted(written))
        for a, b in ((pk, qk), (pv, qv)):
            torch.testing.assert_close(b.flatten(0, 1)[index], a.flatten(0, 1)[index], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(
    ("ops", "sentinel"), [(TORCH_OPS, float("nan")), (CPU_OPS, 777.0)], ids=["torch", "cpu"]
)
def test_padded_decode_matches_plain_runner_and_padding_writes_nothing(
    tiny_state: tuple[dict[str, Any], dict], ops: KernelOps, sentinel: float
) -> None:
    """Unused KV starts as a sentinel (NaN where the ops mask unread slots, a finite marker where they
    multiply them by zero): after prefills and padded decodes only the sequences' own slots changed."""
    _padded_decode_scenario(tiny_state, ops, sentinel)


def test_padded_decode_with_triton_kernels_matches(tiny_state: tuple[dict[str, Any], dict]) -> None:
    """The Triton decode kernel (interpreter on CPU) with the upper-bound ``max_seq_len`` of the padded
    step agrees with the plain runner."""
    _padded_decode_scenario(tiny_state, get_kernel_ops("triton", torch.device("cpu")), float("nan"))


def test_non_sampling_rows_are_dropped_and_other_steps_fall_back(
    tiny_state: tuple[dict[str, Any], dict],
) -> None:
    model = make_model(tiny_state, CPU_OPS)
    plain = make_runner(model, None, sentinel=0.0)
    padded = make_runner(
        model, DecodeGraphSettings(batch_sizes=(2, 4), capture=False), sentinel=0.0, max_model_len=24
    )
    graphs = padded.graphs
    assert graphs is not None and graphs.max_model_len == 24
    batch = Batch([5, 9, 4, 6, 30], room=6, seed=3)
    for i in range(4):
        run_both(plain, padded, batch.prefill(i))
    batch.seqs[1].flush_only = True  # runs, writes its KV, but does not sample
    logits = run_both(plain, padded, batch.decode([0, 1, 2]))
    assert logits.shape[0] == 2 and graphs.stats.runs == {2: 0, 4: 1}
    batch.seqs[1].flush_only = False
    run_both(plain, padded, batch.decode([0, 1, 2, 3]) + batch.prefill(4))  # mixed step: eager
    run_both(plain, padded, batch.decode([0, 1, 2, 3, 4]))  # 5 rows > largest size 4: eager
    run_both(plain, padded, batch.decode([4, 0]))  # sequence 4's context (31) exceeds max_model_len 24: eager
    assert graphs.stats.runs == {2: 0, 4: 1}
    run_both(plain, padded, batch.decode([0, 3]))
    assert graphs.stats.runs == {2: 1, 4: 1}
    with pytest.raises(ValueError, match=r"^chunks"):
        padded.forward_logits([])


async def test_engine_with_padded_decode_generates_like_plain_engine(tiny_model_parts: Any) -> None:
    """Through the scheduler (prefills, mixed and decode steps, requests finishing at different times)."""
    tokenizer, hf_config, state = tiny_model_parts
    model = make_model((hf_config, state), CPU_OPS)
    config = EngineConfig(device="cpu", num_kv_blocks=64, block_size=16, max_num_seqs=6)
    prompts = [
        "Once upon a time",
        "Hello",
        "The quick brown fox jumps over the lazy dog",
        "1, 2, 3,",
        "A",
        "Why?",
    ]

    def engine(decode_graphs: Any) -> tuple[AsyncEngine, ModelRunner]:
        spec = KVCacheSpec.for_model(model.config, num_blocks=64, block_size=16, dtype=torch.float32)
        runner = ModelRunner(model, spec, device=torch.device("cpu"), max_model_len=max_model_len_for(model, spec),
                             decode_graphs=decode_graphs)
        return AsyncEngine(runner, tokenizer, model.config, config), runner

    async def run(target: AsyncEngine) -> list[list[int]]:
        async with target:
            results = await asyncio.gather(
                *(
                    target.generate(p, temperature=0.0, max_tokens=4 + 3 * i, ignore_eos=True)
                    for i, p in enumerate(prompts)
                )
            )
        return [r.token_ids for r in results]

    plain_engine, _ = engine(None)
    padded_engine, padded_runner = engine(DecodeGraphSettings(batch_sizes=(1, 2, 4, 8), capture=False))
    assert await run(padded_engine) == await run(plain_engine)
    assert padded_runner.graphs is not None and sum(padded_runner.graphs.stats.runs.values()) > 5


# -- real capture on a GPU ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_captured_graphs_match_eager_runner_on_gpu(
    tiny_state: tuple[dict[str, Any], dict], dtype: torch.dtype
) -> None:
    ops = get_kernel_ops("triton", torch.device("cuda"))
    model = make_model(tiny_state, ops, "cuda", dtype)
    plain = make_runner(model, None, device="cuda", dtype=dtype)
    captured = make_runner(model, DecodeGraphSettings(batch_sizes=(1, 2, 4, 8)), device="cuda", dtype=dtype)
    graphs = captured.graphs
    assert graphs is not None and graphs.captured and graphs.stats.capture_seconds > 0
    batch = Batch([3, 8, 13, 1, 20], room=12)
    tol = {torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype]
    for i in range(len(batch.seqs)):
        plain.forward_logits(batch.prefill(i))
        captured.forward_logits(batch.prefill(i))
    for step, indices in enumerate(([0, 1, 2, 3, 4], [0, 2, 4], [3], [1, 4], [0, 1, 2, 3, 4])):
        chunks = batch.decode(indices)
        expected = plain.forward_logits(chunks).clone()
        actual = captured.forward_logits(chunks).clone()
        torch.testing.assert_close(actual, expected, atol=tol, rtol=tol, msg=f"step {step}")
        for chunk, token in zip(chunks, expected.argmax(-1).tolist(), strict=True):
            chunk.seq.token_ids.append(token)
    assert graphs.stats.runs == {1: 2, 2: 1, 4: 1, 8: 2}
    assert_untouched_outside(captured, batch.written_slots(), float("nan"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_gpu_auto_mode_captures_for_triton_and_refuses_reference_ops(
    tiny_state: tuple[dict[str, Any], dict],
) -> None:
    triton_model = make_model(
        tiny_state, get_kernel_ops("auto", torch.device("cuda")), "cuda", torch.bfloat16
    )
    runner = make_runner(triton_model, "auto", device="cuda", dtype=torch.bfloat16, sentinel=0.0)
    assert runner.graphs is not None and runner.graphs.captured
    assert runner.graphs.batch_sizes == DEFAULT_BATCH_SIZES
    eager_settings = resolve_decode_graphs(triton_model, torch.device("cuda"), config=EngineConfig(enforce_eager=True))
    assert eager_settings is None
    reference_model = make_model(tiny_state, TORCH_OPS, "cuda", torch.bfloat16)
    assert make_runner(reference_model, "auto", device="cuda", dtype=torch.bfloat16).graphs is None
    with pytest.raises(ValueError, match=r"^decode_graphs: capture needs graph-safe kernels"):
        make_runner(
            reference_model, DecodeGraphSettings(batch_sizes=(1,)), device="cuda", dtype=torch.bfloat16
        )


# -- the GPU benchmark script ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    """``benchmarks/gpu.py`` imported as a module (it is a script, not part of the package)."""
    name = "asyncllm_gpu_benchmark"
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[name]


@contextlib.contextmanager
def _captured_output() -> Iterator[tuple[io.StringIO, io.StringIO]]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        yield out, err


def test_gpu_benchmark_dry_run_reports_every_row(bench: ModuleType, tmp_path: Path) -> None:
    record = tmp_path / "gpu.json"
    with _captured_output() as (out, _):
        assert bench.main(["--dry-run", "--json", str(record)]) == 0
    text = out.getvalue()
    for metric in (
        "decode tok/s, batch 1",
        "decode tok/s, batch 4",
        "decode bandwidth, batch 1",
        "prefill tok/s",
        "4 concurrent, end to end",
        "greedy tokens equal to HF",
    ):
        assert metric in text
    written = json.loads(record.read_text())
    rows = {(row["measurement"], row["metric"]): row for row in written["rows"]}
    # fp32 on CPU: asyncllm and HF run the same weights, so greedy ids agree token for token
    assert rows["tiny", "greedy tokens equal to HF (of 16)"]["asyncllm"] == 16
    assert all(rows["tiny", f"decode tok/s, batch {b}"]["asyncllm"] > 0 for b in (1, 4))
    # the W4A16 model rows: both models decoded, the packed one holds fewer bytes
    quant = f"tiny, W{bench.QUANT_BITS}A16 g{bench.QUANT_GROUP} (RTN)"
    assert "every decoder linear W4A16 against float32" in text
    for batch in (1, 4):
        row = rows[quant, f"decode tok/s, batch {batch}"]
        assert row["asyncllm"] > 0 and row["peer"] > 0
        assert row["target"]["threshold"] == (bench.QUANT_TARGET if batch == 1 else 0.0)
    assert rows[quant, "weight bytes"]["asyncllm"] < rows[quant, "weight bytes"]["peer"]
    assert rows[quant, "weight bytes read per step, batch 1"]["ratio"] > 1
    assert rows[quant, "decode bandwidth, batch 1"]["asyncllm"] > 0
    raw = next(r for r in written["raw"] if r["model"] == "tiny, W4A16")
    assert raw["quantized_linears"] == 7 * bench.SHAPES["tiny"]["num_hidden_layers"]


def test_gpu_benchmark_w4a16_only_skips_the_hf_rows(bench: ModuleType) -> None:
    with _captured_output() as (out, _):
        assert bench.main(["--dry-run", "--w4a16-only"]) == 0
    text = out.getvalue()
    assert "W4A16 g128 (RTN) | decode tok/s, batch 4" in text and "HF generate" not in text
    assert "quantized linears (--quant)" not in text


def test_gpu_benchmark_w4a16_settings_are_checked(bench: ModuleType) -> None:
    settings, _, dry = bench.parse_args(["--w4a16-only", "--w4a16-batches", "1,32", "--models", "llama-3-8b"])
    assert not dry and settings.w4a16 and not settings.run_shapes and settings.w4a16_batches == (1, 32)
    assert not bench.parse_args(["--dry-run", "--quant-only"])[0].w4a16
    with pytest.raises(ValueError, match=r"^w4a16_only"):
        bench.GpuBenchSettings(w4a16_only=True)
    with pytest.raises(ValueError, match=r"^w4a16_batches"):
        bench.GpuBenchSettings(w4a16_batches=(0,))


def test_rtn_checkpoint_quantizes_exactly_the_decoder_linears(
    bench: ModuleType, tiny_state: tuple[dict[str, Any], dict]
) -> None:
    from asyncllm.quant.packed_linear import packed_weight
    from asyncllm.quant.rtn import quantize_rtn

    hf_config, weights = tiny_state
    quantization, tensors = bench.rtn_checkpoint(weights, 4, 32)
    linears = {name.removesuffix(".weight") for name in weights if name.endswith("_proj.weight")}
    assert set(quantization.layers) == linears and len(linears) == 14
    model = build_model(ModelConfig.from_hf_config(hf_config), CPU_OPS, dtype=torch.float32,
                        device=torch.device("cpu"), quantization=quantization)
    model.load_weights(tensors)
    down = model.model.layers[1].mlp.down_proj
    packed = packed_weight(down)
    assert packed is not None and packed.bits == 4 and packed.group_size == 32
    expected = quantize_rtn(weights["model.layers.1.mlp.down_proj.weight"], 4, 32).dequantize()
    torch.testing.assert_close(packed.dequantize(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_gpu_benchmark_quant_rows_are_skipped_off_cuda(bench: ModuleType) -> None:
    with _captured_output() as (out, _):
        assert bench.main(["--dry-run", "--quant-only"]) == 0
    text = out.getvalue()
    assert "quantized linears (--quant): skipped" in text and "decode tok/s" not in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_gpu_benchmark_without_gpu_exits_with_a_clear_message(bench: ModuleType) -> None:
    with _captured_output() as (_, err):
        assert bench.main(["--models", "tinyllama-1.1b"]) == 2
    assert "needs an NVIDIA GPU" in err.getvalue() and "--dry-run" in err.getvalue()


def test_weight_bytes_read_skips_an_untied_embedding_table(
    bench: ModuleType, tiny_state: tuple[dict[str, Any], dict]
) -> None:
    model = make_model(tiny_state, CPU_OPS)
    config = model.config
    per_layer = (
        config.hidden_size * (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
        + config.num_attention_heads * config.head_dim * config.hidden_size
        + 3 * config.hidden_size * config.intermediate_size
        + 2 * config.hidden_size
    )
    stored = (
        config.num_hidden_layers * per_layer + config.hidden_size + 2 * config.vocab_size * config.hidden_size
    )
    read = stored - config.vocab_size * config.hidden_size + 3 * config.hidden_size
    assert bench.weight_bytes_read(model, config, torch.float32, 3) == 4 * read
