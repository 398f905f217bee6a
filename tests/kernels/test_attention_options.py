"""Sliding-window attention and attention-logit soft-capping (``AttentionOptions``) in every paged attention
path: the torch reference, the CPU torch ops, the native C decode kernel and the Triton decode/prefill kernels
(under the interpreter off-GPU), over plain float32 caches and int8 / int4 quantized ones, against a float64
attention written here."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncllm.kernels import TORCH_OPS, KVCache, cpu_ops
from asyncllm.kernels.attention import paged_attention_cache_reference
from asyncllm.kernels.cpu import paged_attention_cache_cpu
from asyncllm.kernels.metadata import AttentionOptions
from asyncllm.kernels.native_attention import NativeDecodeAttention
from asyncllm.kernels.triton_attention import paged_attention_cache_triton
from asyncllm.kernels.triton_decode import DecodeLaunch, paged_decode_attention
from asyncllm.kernels.triton_prefill import PrefillLaunch, paged_prefill_attention

from ._kv_reference import check_native_decode, expected_attention, quantized_batch
from ._paged_batch import PagedBatch, build_batch

HEADS = ((2, 2), (4, 2), (3, 1))


@st.composite
def cases(draw: st.DrawFn, *, decode: bool | None = None, triton: bool = False) -> dict:
    block_size = draw(st.sampled_from([4, 8, 16]))
    is_decode = draw(st.booleans()) if decode is None else decode
    seqs = []
    for _ in range(draw(st.integers(1, 3))):
        length = draw(st.integers(1, (2 if triton else 3) * block_size + 3))
        seqs.append((length, 1 if is_decode else draw(st.integers(1, length))))
    window = draw(st.one_of(st.just(0), st.integers(1, 12)))
    softcap = draw(st.one_of(st.none(), st.floats(0.5, 50.0)))
    return {"seqs": seqs, "heads": draw(st.sampled_from(HEADS)), "head_dim": draw(st.sampled_from([16, 32])),
            "block_size": block_size, "bits": draw(st.sampled_from([None, 8, 4, (8, 4)])),
            "options": AttentionOptions(window=window, softcap=softcap), "seed": draw(st.integers(0, 2**31 - 1))}


def _case(case: dict) -> tuple[PagedBatch, KVCache]:
    heads, kv_heads = case["heads"]
    batch = build_batch(case["seqs"], heads, kv_heads, case["head_dim"], case["block_size"], torch.float32,
                        torch.device("cpu"), case["seed"])
    cache = KVCache(batch.k_cache, batch.v_cache) if case["bits"] is None else quantized_batch(batch, case["bits"])
    # scores of a few units, so that soft-capping bites
    return dataclasses.replace(batch, scale=2.0 * batch.scale), cache


def _close(got: torch.Tensor, expected: torch.Tensor, tol: float = 2e-5) -> None:
    torch.testing.assert_close(got.double().cpu(), expected, atol=tol, rtol=tol)


@settings(max_examples=60, deadline=None)
@given(case=cases())
def test_reference_and_cpu_paths_match_float64(case: dict) -> None:
    batch, cache = _case(case)
    options = case["options"]
    expected = expected_attention(batch, cache, options)
    _close(paged_attention_cache_reference(batch.q, cache, batch.meta, batch.scale, options), expected)
    _close(paged_attention_cache_cpu(batch.q, cache, batch.meta, batch.scale, options), expected)
    # through the bundles' members, as a model layer calls them
    _close(TORCH_OPS.paged_attention(batch.q, cache, batch.meta, batch.scale, options), expected)
    _close(cpu_ops(native=False).paged_attention(batch.q, cache, batch.meta, batch.scale, options), expected)


def test_plain_options_are_plain_causal_attention() -> None:
    batch, cache = _case({"seqs": [(9, 3), (5, 5)], "heads": (4, 2), "head_dim": 16, "block_size": 4,
                          "bits": None, "seed": 3})
    plain = paged_attention_cache_reference(batch.q, cache, batch.meta, batch.scale)
    for options in (AttentionOptions(), AttentionOptions(window=0), AttentionOptions(window=9)):
        assert torch.equal(paged_attention_cache_reference(batch.q, cache, batch.meta, batch.scale, options), plain)
    with pytest.raises(ValueError, match="window"):
        AttentionOptions(window=-1)
    with pytest.raises(ValueError, match="softcap"):
        AttentionOptions(softcap=0.0)


@settings(max_examples=60, deadline=None)
@given(case=cases(decode=True), threads=st.sampled_from([1, 2]))
def test_native_decode_matches_float64(native_kernel: NativeDecodeAttention, case: dict, threads: int) -> None:
    batch, cache = _case(case)
    check_native_decode(native_kernel, batch, cache, case["options"], threads, 2e-5)


def test_native_decode_skips_blocks_before_the_window(native_kernel: NativeDecodeAttention) -> None:
    """Blocks wholly before the window are never read: NaN there leaves the output finite and exact."""
    batch, cache = _case({"seqs": [(23, 1)], "heads": (4, 2), "head_dim": 16, "block_size": 4, "bits": None,
                          "seed": 5})
    options = AttentionOptions(window=6)
    expected = expected_attention(batch, cache, options)
    for block in batch.meta.block_tables[0, :4].tolist():  # tokens 0..15; the window is tokens 17..22
        cache.key[block] = cache.value[block] = float("nan")
    meta = batch.meta
    plan = native_kernel.plan(meta.block_tables, meta.seq_lens, cache.shape, num_heads=4, threads=1)
    _close(plan.run(batch.q, cache, batch.scale, options).view(batch.q.shape), expected)


@settings(max_examples=25, deadline=None)
@given(case=cases(triton=True), launch=st.sampled_from(["default", "small"]))
def test_triton_matches_float64(device: torch.device, case: dict, launch: str) -> None:
    batch, cache = _case(case)
    options, meta = case["options"], batch.meta
    expected = expected_attention(batch, cache, options)
    moved = KVCache(*(None if t is None else t.to(device)
                      for t in (cache.key, cache.value, cache.key_scales, cache.value_scales)),
                    key_bits=cache.key_bits, value_bits=cache.value_bits,
                    key_anchors=None if cache.key_anchors is None else cache.key_anchors.to(device))
    dev_meta = dataclasses.replace(meta, slot_mapping=meta.slot_mapping.to(device),
                                   query_start_loc=meta.query_start_loc.to(device),
                                   seq_lens=meta.seq_lens.to(device), block_tables=meta.block_tables.to(device))
    q = batch.q.to(device)
    _close(paged_attention_cache_triton(q, moved, dev_meta, batch.scale, options), expected)
    if launch == "small":
        scales = None if cache.bits is None else (moved.key_scales, moved.value_scales)
        bits = cache.bits
        if meta.is_decode_only:
            got = paged_decode_attention(q, moved.key, moved.value, dev_meta, batch.scale,
                                         DecodeLaunch(block_n=16, num_splits=3), scales=scales, bits=bits,
                                         anchors=moved.key_anchors, options=options)
        else:
            got = paged_prefill_attention(q, moved.key, moved.value, dev_meta, batch.scale,
                                          PrefillLaunch(block_m=16, block_n=16), scales=scales, bits=bits,
                                          anchors=moved.key_anchors, options=options)
        _close(got, expected)
