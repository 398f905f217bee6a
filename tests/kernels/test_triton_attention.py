"""Triton paged attention (split-KV decode, varlen prefill/extend) against ``paged_attention_reference``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from asyncllm.kernels.attention import paged_attention_reference
from asyncllm.kernels.triton_attention import paged_attention_triton
from asyncllm.kernels.triton_decode import (
    MAX_SPLITS,
    DecodeLaunch,
    paged_decode_attention,
    plan_splits,
)
from asyncllm.kernels.triton_prefill import PrefillLaunch, paged_prefill_attention

from ._paged_batch import PagedBatch, build_batch

Matcher = Callable[[torch.Tensor, torch.Tensor], None]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (query heads, KV heads): GQA ratios 1, 3 and 8, and SmolLM2's 9/3.
HEADS = ((2, 2), (3, 1), (9, 3), (8, 1), (16, 2))
def reference(batch: PagedBatch) -> torch.Tensor:
    return paged_attention_reference(batch.q, batch.k_cache, batch.v_cache, batch.meta, batch.scale)


@st.composite
def context_lengths(draw: st.DrawFn, block_size: int) -> int:
    """Block boundaries (1, block_size, block_size + 1, ...) as often as arbitrary lengths."""
    edges = st.sampled_from([1, block_size - 1, block_size, block_size + 1, 2 * block_size + 1])
    return draw(st.one_of(edges, st.integers(1, 3 * block_size + 2)))


@st.composite
def decode_cases(draw: st.DrawFn) -> dict:
    block_size = draw(st.sampled_from([8, 16]))
    lengths = draw(st.lists(context_lengths(block_size), min_size=1, max_size=3))
    return {
        "seqs": [(length, 1) for length in lengths],
        "heads": draw(st.sampled_from(HEADS)),
        "head_dim": draw(st.sampled_from([64, 128])),
        "block_size": block_size,
        "dtype": draw(st.sampled_from(DTYPES)),
        "seed": draw(st.integers(0, 2**31 - 1)),
        "launch": draw(st.one_of(st.none(), st.builds(DecodeLaunch, block_n=st.just(16),
                                                       num_splits=st.integers(1, 4)))),
    }


@st.composite
def prefill_cases(draw: st.DrawFn) -> dict:
    """Cached prefixes around tile and block boundaries, then 1 or more new tokens."""
    block_size = draw(st.sampled_from([8, 16]))
    prefixes = st.one_of(st.sampled_from([0, 1, block_size, block_size + 1, 14, 15, 16, 17, 31, 32, 33]),
                         st.integers(0, 3 * block_size))
    seqs = []
    for prefix in draw(st.lists(prefixes, min_size=1, max_size=3)):
        new = draw(st.one_of(st.just(1), st.integers(1, 2 * block_size + 2)))
        seqs.append((prefix + new, new))
    return {
        "seqs": seqs,
        "heads": draw(st.sampled_from(HEADS)),
        "head_dim": draw(st.sampled_from([64, 128])),
        "block_size": block_size,
        "dtype": draw(st.sampled_from(DTYPES)),
        "seed": draw(st.integers(0, 2**31 - 1)),
        "launch": draw(st.sampled_from([None, PrefillLaunch(block_m=16, block_n=16)])),
    }


def _batch(case: dict, device: torch.device) -> PagedBatch:
    num_heads, num_kv_heads = case["heads"]
    return build_batch(case["seqs"], num_heads, num_kv_heads, case["head_dim"], case["block_size"],
                       case["dtype"], device, case["seed"])


@settings(max_examples=40, deadline=None)
@given(case=decode_cases())
def test_decode_matches_reference(device: torch.device, assert_matches: Matcher, case: dict) -> None:
    batch = _batch(case, device)
    out = paged_decode_attention(batch.q, batch.k_cache, batch.v_cache, batch.meta, batch.scale,
                                 case["launch"])
    assert_matches(out, reference(batch))


@settings(max_examples=40, deadline=None)
@given(case=prefill_cases())
def test_prefill_matches_reference(device: torch.device, assert_matches: Matcher, case: dict) -> None:
    batch = _batch(case, device)
    out = paged_prefill_attention(batch.q, batch.k_cache, batch.v_cache, batch.meta, batch.scale,
                                  case["launch"])
    assert_matches(out, reference(batch))


@pytest.mark.parametrize(
    "seqs",
    [
        [(1, 1), (17, 1), (40, 1)],  # decode only: split-KV path
        [(17, 17), (1, 1), (40, 5), (33, 1)],  # prefill, decode rows and an extend over cached blocks
    ],
)
def test_entry_point_matches_reference(
    device: torch.device, assert_matches: Matcher, seqs: list[tuple[int, int]]
) -> None:
    batch = build_batch(seqs, 9, 3, 64, 16, torch.float32, device, seed=7)
    out = paged_attention_triton(batch.q, batch.k_cache, batch.v_cache, batch.meta, batch.scale)
    assert_matches(out, reference(batch))


@pytest.mark.parametrize("prefix", [14, 15, 16, 17])
def test_prefill_tile_edges(device: torch.device, assert_matches: Matcher, prefix: int) -> None:
    """New tokens starting right around a 16-key tile boundary, where the unmasked sweep ends."""
    batch = build_batch([(prefix + 3, 3), (prefix + 1, 1)], 3, 1, 64, 8, torch.float32, device, seed=prefix)
    out = paged_prefill_attention(batch.q, batch.k_cache, batch.v_cache, batch.meta, batch.scale,
                                  PrefillLaunch(block_m=16, block_n=16))
    assert_matches(out, reference(batch))


@pytest.mark.parametrize("decode", [True, False])
def test_metadata_bounds_may_exceed_true_lengths(
    device: torch.device, assert_matches: Matcher, decode: bool
) -> None:
    """Launches sized for larger ``max_seq_len``/``max_query_len`` (as a captured graph would be)."""
    seqs = [(3, 1), (20, 1)] if decode else [(3, 2), (20, 6)]
    batch = build_batch(seqs, 6, 2, 64, 8, torch.float32, device, seed=13)
    loose = dataclasses.replace(batch.meta, max_seq_len=300,
                                max_query_len=batch.meta.max_query_len if decode else 40)
    out = paged_attention_triton(batch.q, batch.k_cache, batch.v_cache, loose, batch.scale)
    assert_matches(out, reference(batch))


@pytest.mark.parametrize("decode", [True, False])
def test_head_dim_not_power_of_two(device: torch.device, assert_matches: Matcher, decode: bool) -> None:
    seqs = [(9, 1), (21, 1)] if decode else [(9, 4), (21, 21)]
    batch = build_batch(seqs, 4, 2, 80, 8, torch.float32, device, seed=3)
    out = paged_attention_triton(batch.q, batch.k_cache, batch.v_cache, batch.meta, batch.scale)
    assert_matches(out, reference(batch))


def test_strided_query_view(device: torch.device, assert_matches: Matcher) -> None:
    """``q`` sliced out of a fused QKV projection (row stride larger than ``Hq * D``)."""
    batch = build_batch([(12, 12), (5, 1)], 6, 2, 64, 8, torch.float16, device, seed=11)
    fused = torch.zeros(batch.q.shape[0], 10, 64, dtype=batch.q.dtype, device=device)
    fused[:, :6] = batch.q
    q_view = fused[:, :6]
    out = paged_attention_triton(q_view, batch.k_cache, batch.v_cache, batch.meta, batch.scale)
    assert_matches(out, reference(batch))


@settings(max_examples=200, deadline=None)
@given(
    num_seqs=st.integers(1, 512), num_kv_heads=st.integers(1, 16), max_seq_len=st.integers(1, 100_000),
    block_n=st.sampled_from([16, 32, 64]), target=st.integers(1, 1024),
    forced=st.one_of(st.none(), st.integers(1, MAX_SPLITS)),
)
def test_plan_splits_covers_every_token(
    num_seqs: int, num_kv_heads: int, max_seq_len: int, block_n: int, target: int, forced: int | None
) -> None:
    num_splits, split_len = plan_splits(num_seqs, num_kv_heads, max_seq_len, block_n, target, forced)
    assert 1 <= num_splits <= MAX_SPLITS
    assert split_len % block_n == 0
    assert (num_splits - 1) * split_len < max_seq_len <= num_splits * split_len
    if forced is None and num_seqs * num_kv_heads >= target:
        assert num_splits == 1


def test_rejects_mismatched_inputs(device: torch.device) -> None:
    batch = build_batch([(5, 1)], 4, 2, 64, 8, torch.float32, device, seed=0)
    with pytest.raises(ValueError, match="q:"):
        paged_attention_triton(batch.q[:, :3], batch.k_cache, batch.v_cache, batch.meta, batch.scale)
    with pytest.raises(ValueError, match="k_cache/v_cache"):
        paged_attention_triton(batch.q, batch.k_cache.half(), batch.v_cache.half(), batch.meta, batch.scale)
    prefill = build_batch([(5, 3)], 4, 2, 64, 8, torch.float32, device, seed=0)
    with pytest.raises(ValueError, match="q:"):
        paged_decode_attention(prefill.q, prefill.k_cache, prefill.v_cache, prefill.meta, prefill.scale)
    with pytest.raises(ValueError, match="num_splits"):
        DecodeLaunch(num_splits=0)
    with pytest.raises(ValueError, match="block_m"):
        PrefillLaunch(block_m=24)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("seqs", [[(300, 1), (7, 1)], [(300, 40), (7, 1)]])
def test_attention_does_not_sync_device(seqs: list[tuple[int, int]]) -> None:
    device = torch.device("cuda")
    batch = build_batch(seqs, 9, 3, 64, 16, torch.float16, device, seed=5)
    args = (batch.q, batch.k_cache, batch.v_cache, batch.meta, batch.scale)
    paged_attention_triton(*args)  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = paged_attention_triton(*args)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(out.float(), reference(batch).float(), atol=4e-3, rtol=4e-3)
