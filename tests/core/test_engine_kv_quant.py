"""The engine over an int8 / int4 / k8v4 KV cache: what it reports, how much a memory budget holds, and the
engine behaviours that touch the cache (preemption and recompute, chunked prefill, prefix caching,
sessions, cancellation) holding with quantized blocks as they do with plain ones."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from asyncllm import EngineConfig

from . import test_engine

EngineTest = Callable[[Any], Awaitable[None]]


@pytest.fixture(params=["int8", "int4", "k8v4"])
def make_quantized_engine(make_tiny_engine: Any, request: pytest.FixtureRequest) -> Callable[..., Any]:
    def make(**overrides: Any) -> Any:
        return make_tiny_engine(kv_cache_dtype=request.param, **overrides)

    return make


@pytest.mark.parametrize("behaviour", [
    test_engine.test_concurrent_greedy_requests_match_running_alone,
    test_engine.test_preemption_keeps_greedy_output_identical,
    test_engine.test_chunked_prefill_matches_single_step_prefill,
    test_engine.test_prefix_cache_reports_cached_tokens_and_keeps_output,
    test_engine.test_session_turn_equals_stateless_generation_and_reuses_kv,
    test_engine.test_closing_a_session_mid_turn_leaks_nothing,
], ids=lambda test: test.__name__.removeprefix("test_"))
async def test_cache_behaviour_holds_on_a_quantized_cache(behaviour: EngineTest,
                                                          make_quantized_engine: Callable[..., Any]) -> None:
    await behaviour(make_quantized_engine)


@pytest.mark.parametrize(("kv_cache_dtype", "quant_policy", "name"), [
    ("auto", 0, "float32"), ("int8", 0, "int8"), ("auto", 8, "int8"), ("int4", 4, "int4"), ("k8v4", 0, "k8v4"),
])
async def test_stats_report_the_cache_and_a_budget_holds_more_quantized_tokens(
    make_tiny_engine: Any, kv_cache_dtype: str, quant_policy: int, name: str
) -> None:
    engine = make_tiny_engine(kv_cache_dtype=kv_cache_dtype, quant_policy=quant_policy, kv_cache_bytes=2**20)
    config = engine.model_config
    heads, dim, layers = config.num_key_value_heads, config.head_dim, config.num_hidden_layers
    # per token, layer, K and V: float32 values, or codes plus a float32 (scale, zero) pair per head; int4 keys
    # a pair per group of gcd(16, dim) dimensions and a float32 anchor row per block (16 tokens) and head
    key_groups = dim // math.gcd(16, dim)
    expected = {"float32": 2 * heads * dim * 4, "int8": 2 * heads * (dim + 8),
                "int4": heads * ((dim // 2 + 8 * key_groups) + (dim // 2 + 8) + dim * 4 // 16),
                "k8v4": heads * ((dim + 8) + (dim // 2 + 8))}
    async with engine:
        stats = engine.stats()
        assert stats.kv_cache_dtype == name
        assert stats.kv_bytes_per_token == layers * expected[name]
        assert stats.kv_capacity_tokens == 2**20 // (16 * stats.kv_bytes_per_token) * 16
        result = await engine.generate("Once upon a time", temperature=0.0, max_tokens=8, ignore_eos=True)
        assert len(result.token_ids) == 8 and engine.stats().kv_blocks_used == 0


async def test_quantized_cache_admits_more_concurrent_sequences(make_tiny_engine: Any) -> None:
    """At one memory budget, more long sequences run at once on int4 and k8v4 caches than on a float32 one."""
    prompts = [f"{i} " + "a long prompt that fills several blocks " * 6 for i in range(12)]

    async with make_tiny_engine() as probe:
        tokens = max(len(probe.tokenizer.encode(p)) for p in prompts) + 16
        budget = 3 * -(-tokens // 16) * 16 * probe.stats().kv_bytes_per_token  # three sequences in float32

    async def peak_running(**overrides: Any) -> int:
        engine = make_tiny_engine(kv_cache_bytes=budget, enable_prefix_caching=False, **overrides)
        peak = 0
        async with engine:
            tasks = [asyncio.ensure_future(engine.generate(p, temperature=0.0, max_tokens=16, ignore_eos=True))
                     for p in prompts]
            while not all(t.done() for t in tasks):
                peak = max(peak, engine.stats().running)
                await asyncio.sleep(0)
            await asyncio.gather(*tasks)
        return peak

    plain, int4 = await peak_running(), await peak_running(kv_cache_dtype="int4")
    k8v4 = await peak_running(kv_cache_dtype="k8v4")
    assert plain <= 3 < k8v4 <= int4


@pytest.mark.parametrize(("field", "overrides"), [
    ("kv_cache_dtype", {"kv_cache_dtype": "int3"}),
    ("kv_cache_dtype", {"kv_cache_dtype": "fp8"}),
    ("kv_cache_dtype", {"kv_cache_dtype": "k4v8"}),
    ("quant_policy", {"quant_policy": 5}),
    ("quant_policy", {"quant_policy": True}),
    ("quant_policy", {"quant_policy": 8, "kv_cache_dtype": "int4"}),
    ("quant_policy", {"quant_policy": 8, "kv_cache_dtype": "k8v4"}),
    ("quant_policy", {"quant_policy": 4, "kv_cache_dtype": "k8v4"}),
    ("kv_cache_bytes", {"kv_cache_bytes": 0}),
])
def test_bad_values_name_the_field(field: str, overrides: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=f"^{field}: "):
        EngineConfig(**overrides)


def test_a_budget_below_one_block_is_refused(make_tiny_engine: Any) -> None:
    with pytest.raises(ValueError, match="kv_cache_bytes: 100 bytes hold no block"):
        make_tiny_engine(kv_cache_bytes=100, kv_cache_dtype="int8")
