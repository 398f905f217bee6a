"""Triton norm, rotary, SiLU-and-mul and KV-write kernels against their torch references."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from asyncllm.kernels.activation import silu_and_mul_reference
from asyncllm.kernels.kv_write import write_kv_reference
from asyncllm.kernels.norm import add_rms_norm_reference, rms_norm_reference
from asyncllm.kernels.rotary import rotary_reference
from asyncllm.kernels.triton_activation import silu_and_mul_triton
from asyncllm.kernels.triton_kv_write import write_kv_triton
from asyncllm.kernels.triton_norm import add_rms_norm_triton, rms_norm_triton
from asyncllm.kernels.triton_rotary import rotary_triton

Matcher = Callable[[torch.Tensor, torch.Tensor], None]
DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
SEEDS = st.integers(0, 2**31 - 1)


def randn(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)


@settings(max_examples=10, deadline=None)
@given(dtype=DTYPES, lead=st.sampled_from([(1,), (5,), (2, 3)]), hidden=st.sampled_from([64, 100, 576]),
       eps=st.sampled_from([1e-6, 1e-5]), seed=SEEDS)
def test_rms_norm(device: torch.device, assert_matches: Matcher, dtype: torch.dtype, lead: tuple[int, ...],
                  hidden: int, eps: float, seed: int) -> None:
    x = randn((*lead, hidden), dtype, device, seed) * 3
    weight = randn((hidden,), dtype, device, seed + 1)
    before = x.clone()
    out = rms_norm_triton(x, weight, eps)
    assert out.shape == x.shape
    assert_matches(out, rms_norm_reference(x, weight, eps))
    assert torch.equal(x, before)


@settings(max_examples=10, deadline=None)
@given(dtype=DTYPES, rows=st.integers(1, 6), hidden=st.sampled_from([64, 100, 576]),
       strided=st.booleans(), seed=SEEDS)
def test_add_rms_norm(device: torch.device, assert_matches: Matcher, dtype: torch.dtype, rows: int,
                      hidden: int, strided: bool, seed: int) -> None:
    x = randn((rows, hidden), dtype, device, seed)
    residual = randn((rows, hidden), dtype, device, seed + 1) * 4
    if strided:  # a column slice: row stride larger than the hidden size
        x = randn((rows, hidden + 8), dtype, device, seed)[:, 8:]
    weight = randn((hidden,), dtype, device, seed + 2)
    x_before, residual_before = x.clone(), residual.clone()
    normed, summed = add_rms_norm_triton(x, residual, weight, 1e-6)
    ref_normed, ref_summed = add_rms_norm_reference(x, residual, weight, 1e-6)
    assert_matches(summed, ref_summed)
    assert_matches(normed, ref_normed)
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)


@settings(max_examples=10, deadline=None)
@given(dtype=DTYPES, tokens=st.integers(1, 6), heads=st.sampled_from([(2, 2), (9, 3), (8, 1)]),
       head_dim=st.sampled_from([64, 128]), rotary_fraction=st.sampled_from([1.0, 0.5, 0.25]),
       cache_dtype=st.sampled_from([torch.float32, None]), seed=SEEDS)
def test_rotary(device: torch.device, assert_matches: Matcher, dtype: torch.dtype, tokens: int,
                heads: tuple[int, int], head_dim: int, rotary_fraction: float,
                cache_dtype: torch.dtype | None, seed: int) -> None:
    num_q, num_k = heads
    rotary_dim = int(head_dim * rotary_fraction)
    max_positions = 64
    # q and k as views into one fused projection output, like a model's QKV split.
    fused = randn((tokens, (num_q + 2 * num_k) * head_dim), dtype, device, seed)
    q = fused[:, : num_q * head_dim].view(tokens, num_q, head_dim)
    k = fused[:, num_q * head_dim : (num_q + num_k) * head_dim].view(tokens, num_k, head_dim)
    freqs = 1.0 / 10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = torch.arange(max_positions, dtype=torch.float64)[:, None] * freqs[None, :]
    cos_sin = torch.cat((angles.cos(), angles.sin()), dim=-1).to(cache_dtype or dtype).to(device)
    positions = torch.randint(0, max_positions, (tokens,), generator=torch.Generator().manual_seed(seed))
    positions = positions.to(device)
    ref_q, ref_k = rotary_reference(q.clone(), k.clone(), positions, cos_sin)
    v_before = fused[:, (num_q + num_k) * head_dim :].clone()
    out_q, out_k = rotary_triton(q, k, positions, cos_sin)
    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()  # documented: in place
    assert_matches(out_q, ref_q)
    assert_matches(out_k, ref_k)
    assert torch.equal(fused[:, (num_q + num_k) * head_dim :], v_before)


@settings(max_examples=6, deadline=None)
@given(dtype=DTYPES, lead=st.sampled_from([(1,), (7,), (2, 3)]), inter=st.sampled_from([1, 100, 1536]),
       seed=SEEDS)
def test_silu_and_mul(device: torch.device, assert_matches: Matcher, dtype: torch.dtype,
                      lead: tuple[int, ...], inter: int, seed: int) -> None:
    x = randn((*lead, 2 * inter), dtype, device, seed) * 3
    out = silu_and_mul_triton(x)
    assert out.shape == (*lead, inter)
    assert_matches(out, silu_and_mul_reference(x))


@settings(max_examples=10, deadline=None)
@given(dtype=DTYPES, cache_dtype=DTYPES, tokens=st.integers(1, 8), num_kv_heads=st.sampled_from([1, 3]),
       head_dim=st.sampled_from([64, 128]), block_size=st.sampled_from([8, 16]), data=st.data())
def test_write_kv(device: torch.device, assert_matches: Matcher, dtype: torch.dtype, cache_dtype: torch.dtype,
                  tokens: int, num_kv_heads: int, head_dim: int, block_size: int,
                  data: st.DataObject) -> None:
    num_blocks = 4
    seed = data.draw(SEEDS)
    slots = data.draw(st.lists(st.integers(0, num_blocks * block_size - 1), min_size=tokens, max_size=tokens,
                               unique=True))
    padding = data.draw(st.lists(st.booleans(), min_size=tokens, max_size=tokens))
    slot_mapping = torch.tensor([-1 if pad else s for s, pad in zip(slots, padding, strict=True)],
                                dtype=torch.int64, device=device)
    # k and v as views into one fused projection output (strided rows).
    fused = randn((tokens, 3 * num_kv_heads * head_dim), dtype, device, seed)
    k = fused[:, num_kv_heads * head_dim : 2 * num_kv_heads * head_dim].view(tokens, num_kv_heads, head_dim)
    v = fused[:, 2 * num_kv_heads * head_dim :].view(tokens, num_kv_heads, head_dim)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = randn(shape, cache_dtype, device, seed + 1)
    v_cache = randn(shape, cache_dtype, device, seed + 2)
    ref_k_cache, ref_v_cache = k_cache.clone(), v_cache.clone()
    write_kv_reference(k, v, ref_k_cache, ref_v_cache, slot_mapping)
    write_kv_triton(k, v, k_cache, v_cache, slot_mapping)
    if dtype == cache_dtype:  # a pure copy: bit-exact
        assert torch.equal(k_cache, ref_k_cache)
        assert torch.equal(v_cache, ref_v_cache)
    else:  # the CPU interpreter truncates fp32 -> bf16 where torch and GPUs round to nearest
        assert_matches(k_cache, ref_k_cache)
        assert_matches(v_cache, ref_v_cache)


def test_rejects_bad_shapes(device: torch.device) -> None:
    x = torch.randn(2, 8, device=device)
    with pytest.raises(ValueError, match="weight"):
        rms_norm_triton(x, torch.ones(4, device=device), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        add_rms_norm_triton(x, torch.randn(2, 4, device=device), torch.ones(8, device=device), 1e-6)
    with pytest.raises(ValueError, match="x:"):
        silu_and_mul_triton(torch.randn(2, 7, device=device))
    q, k = torch.randn(3, 2, 8, device=device), torch.randn(3, 1, 8, device=device)
    with pytest.raises(ValueError, match="cos_sin_cache"):
        positions = torch.zeros(3, dtype=torch.int64, device=device)
        rotary_triton(q, k, positions, torch.randn(4, 10, device=device))
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv_triton(k, k, torch.zeros(2, 4, 1, 8, device=device), torch.zeros(2, 4, 1, 8, device=device),
                        torch.zeros(2, dtype=torch.int64, device=device))
