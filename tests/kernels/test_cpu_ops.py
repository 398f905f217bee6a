"""CPU fast-path ops against their torch references (the spec)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncllm.kernels import TORCH_OPS, KVCache, cpu_ops, get_kernel_ops
from asyncllm.kernels.activation import silu_and_mul_reference
from asyncllm.kernels.attention import paged_attention_reference
from asyncllm.kernels.cpu import (
    CPU_OPS,
    add_rms_norm_cpu,
    linear_cpu,
    paged_attention_cpu,
    rms_norm_cpu,
    rotary_cpu,
    silu_and_mul_cpu,
    write_kv_cpu,
)
from asyncllm.kernels.kv_write import write_kv_reference
from asyncllm.kernels.native_attention import NativeDecodeAttention
from asyncllm.kernels.norm import add_rms_norm_reference, rms_norm_reference
from asyncllm.kernels.rotary import rotary_reference

from ._paged_batch import build_batch

TOL = 2e-5


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=TOL, rtol=TOL)


def test_auto_on_cpu_picks_the_cpu_ops() -> None:
    auto = get_kernel_ops("auto", torch.device("cpu"))
    assert auto.linear is linear_cpu and auto.fused_decode is not None and not auto.graph_safe
    plain = get_kernel_ops("auto", torch.device("cpu"), native_kernels=False)
    assert plain.linear is linear_cpu and plain.plan_attention is TORCH_OPS.plan_attention
    assert cpu_ops(native=False, fused_layers=False).fused_decode is None
    assert get_kernel_ops("torch", torch.device("cpu")) is TORCH_OPS
    with pytest.raises(ValueError, match="kernel_backend"):
        get_kernel_ops("cuda-magic", torch.device("cpu"))


@settings(max_examples=20, deadline=None)
@given(tokens=st.integers(1, 9), hidden=st.sampled_from([8, 64, 576]), seed=st.integers(0, 99))
def test_norms_match_reference(tokens: int, hidden: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x, res = torch.randn(tokens, hidden, generator=gen), torch.randn(tokens, hidden, generator=gen)
    w = torch.randn(hidden, generator=gen)
    close(rms_norm_cpu(x, w, 1e-5), rms_norm_reference(x, w, 1e-5))
    for got, want in zip(add_rms_norm_cpu(x, res, w, 1e-5), add_rms_norm_reference(x, res, w, 1e-5), strict=True):
        close(got, want)


@settings(max_examples=20, deadline=None)
@given(tokens=st.integers(1, 9), inter=st.integers(1, 40), seed=st.integers(0, 99))
def test_silu_and_mul_matches_reference(tokens: int, inter: int, seed: int) -> None:
    x = torch.randn(tokens, 2 * inter, generator=torch.Generator().manual_seed(seed))
    close(silu_and_mul_cpu(x), silu_and_mul_reference(x))


@settings(max_examples=20, deadline=None)
@given(
    tokens=st.integers(1, 7), heads=st.sampled_from([(9, 3), (4, 4), (8, 1)]), head_dim=st.sampled_from([16, 64]),
    partial=st.booleans(), seed=st.integers(0, 99),
)
def test_rotary_matches_reference_on_fused_qkv_views(
    tokens: int, heads: tuple[int, int], head_dim: int, partial: bool, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    hq, hk = heads
    qkv = torch.randn(tokens, (hq + 2 * hk) * head_dim, generator=gen)
    q = qkv[:, : hq * head_dim].view(tokens, hq, head_dim)
    k = qkv[:, hq * head_dim : (hq + hk) * head_dim].view(tokens, hk, head_dim)
    rot = head_dim // 2 if partial else head_dim
    cache = torch.randn(50, rot, generator=gen)
    positions = torch.randint(0, 50, (tokens,), generator=gen)
    want = rotary_reference(q.clone(), k.clone(), positions, cache)
    got = rotary_cpu(q, k, positions, cache)
    close(got[0], want[0])
    close(got[1], want[1])


def test_write_kv_matches_reference_and_skips_padding() -> None:
    gen = torch.Generator().manual_seed(0)
    k, v = torch.randn(5, 3, 8, generator=gen), torch.randn(5, 3, 8, generator=gen)
    slots = torch.tensor([7, -1, 0, 12, -1])
    caches = [torch.zeros(4, 4, 3, 8) for _ in range(4)]
    write_kv_cpu(k, v, caches[0], caches[1], slots)
    write_kv_reference(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


@settings(max_examples=25, deadline=None)
@given(
    seqs=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 40)), min_size=1, max_size=4),
    decode=st.booleans(),
    heads=st.sampled_from([(2, 2), (3, 1), (9, 3), (8, 1)]),
    head_dim=st.sampled_from([16, 64]),
    block_size=st.sampled_from([4, 16]),
    seed=st.integers(0, 999),
)
def test_paged_attention_matches_reference(
    seqs: list[tuple[int, int]], decode: bool, heads: tuple[int, int], head_dim: int, block_size: int, seed: int
) -> None:
    """Mixed prefill/extend batches and decode-only batches, shuffled blocks, block-boundary lengths."""
    cases = [(length, 1 if decode else min(new, length)) for length, new in seqs]
    batch = build_batch(cases, heads[0], heads[1], head_dim, block_size, torch.float32, torch.device("cpu"), seed)
    # the CPU path relies on every slot being finite (the engine's pool starts zeroed)
    k_cache = torch.nan_to_num(batch.k_cache, nan=1e4)
    v_cache = torch.nan_to_num(batch.v_cache, nan=-1e4)
    want = paged_attention_reference(batch.q, k_cache, v_cache, batch.meta, batch.scale)
    got = paged_attention_cpu(batch.q, k_cache, v_cache, batch.meta, batch.scale)
    close(got, want)
    # through the bundle, with its per-step native plan on decode steps (where the kernel builds)
    cache = KVCache(k_cache, v_cache)
    meta = CPU_OPS.plan_attention(batch.meta, cache, heads[0])
    assert (meta.plan is not None) == (batch.meta.is_decode_only and NativeDecodeAttention.load() is not None)
    close(CPU_OPS.paged_attention(batch.q, cache, meta, batch.scale), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_norm_and_rotary(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(3, 64, generator=gen).to(dtype), torch.randn(64, generator=gen).to(dtype)
    torch.testing.assert_close(rms_norm_cpu(x, w, 1e-5), rms_norm_reference(x, w, 1e-5), atol=2e-2, rtol=2e-2)


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(1, 40), shape=st.sampled_from([(8, 3), (576, 960), (64, 49)]), bias=st.booleans(),
       seed=st.integers(0, 99))
def test_linear_matches_f_linear(rows: int, shape: tuple[int, int], bias: bool, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    inp, out = shape
    x = torch.randn(rows, inp, generator=gen)
    w = torch.randn(out, inp, generator=gen)
    b = torch.randn(out, generator=gen) if bias else None
    torch.testing.assert_close(linear_cpu(x, w, b), torch.nn.functional.linear(x, w, b), atol=1e-4, rtol=1e-4)
    # non-contiguous input (a slice of a fused projection) and a 3-D input take the same result
    wide = torch.randn(rows, 2 * inp, generator=gen)
    torch.testing.assert_close(linear_cpu(wide[:, :inp], w, b), torch.nn.functional.linear(wide[:, :inp], w, b),
                               atol=1e-4, rtol=1e-4)
