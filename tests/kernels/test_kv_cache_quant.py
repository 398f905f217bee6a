"""The quantized KV cache (int8 / int4 / k8v4): the scheme's error bound and layout, and every attention
path (torch reference, CPU torch ops, native C plan, Triton decode/prefill) and write against a float64
attention over the values the stored codes and scales stand for, for every (key_bits, value_bits) pair the
engine offers."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncllm.kernels.attention import paged_attention_cache_reference
from asyncllm.kernels.cpu import paged_attention_cache_cpu
from asyncllm.kernels.kv_cache import KVCache
from asyncllm.kernels.kv_quant import KVBits, dequantize_kv, key_scheme, quantization_error_bound, quantize_kv
from asyncllm.kernels.kv_write import write_kv_cache_reference
from asyncllm.kernels.native_attention import NativeDecodeAttention

from ._kv_reference import _values, expected_attention, quantized_batch
from ._paged_batch import PagedBatch, build_batch

SCALE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HEADS = ((2, 2), (3, 1), (9, 3), (8, 1))
BIT_PAIRS = pytest.mark.parametrize("bits", [KVBits(8, 8), KVBits(4, 4), KVBits(8, 4)], ids=lambda b: b.name)
"""(key_bits, value_bits): int8, int4 and k8v4 (keys int8, values int4)."""


# -- the scheme ---------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([8, 4]), scale_dtype=st.sampled_from(SCALE_DTYPES),
       head_dim=st.sampled_from([2, 8, 64, 128]), offset=st.floats(-50, 50), spread=st.floats(1e-3, 30),
       seed=st.integers(0, 2**31 - 1))
def test_round_trip_stays_within_the_scheme_bound(bits: int, scale_dtype: torch.dtype, head_dim: int,
                                                  offset: float, spread: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 3, head_dim, generator=gen) * spread + offset
    codes, scales = quantize_kv(x, bits, scale_dtype)
    assert codes.dtype == torch.uint8 and codes.shape == (5, 3, head_dim if bits == 8 else head_dim // 2)
    assert scales.dtype == scale_dtype and scales.shape == (5, 3, 2)
    error = (dequantize_kv(codes, scales, bits, torch.float64) - x.double()).abs()
    assert bool((error <= quantization_error_bound(x, bits, scale_dtype).double()).all())


def test_float32_pairs_are_the_row_range_and_codes_span_it() -> None:
    x = torch.tensor([[-1.0, 0.5, 3.0, 2.0]])
    for bits, qmax in ((8, 255), (4, 15)):
        codes, scales = quantize_kv(x, bits, torch.float32)
        torch.testing.assert_close(scales, torch.tensor([[4.0 / qmax, -1.0]]))
        unpacked = codes if bits == 8 else torch.cat((codes & 15, codes >> 4), -1)
        assert unpacked[0, 0] == 0 and unpacked[0, 2] == qmax
        # 0.5 sits at 1.5 / 4 of the range: round(0.375 * qmax)
        assert unpacked[0, 1] == int(0.375 * qmax + 0.5)


def test_int4_packs_dimension_i_low_and_i_plus_half_high() -> None:
    x = torch.arange(16, dtype=torch.float32)[None]  # scale 1, zero 0: codes equal the values
    codes, _ = quantize_kv(x, 4, torch.float32)
    assert codes[0].tolist() == [i | ((i + 8) << 4) for i in range(8)]


def test_constant_rows_read_back_exactly() -> None:
    x = torch.full((2, 8), 3.25)
    for bits in (8, 4):
        codes, scales = quantize_kv(x, bits, torch.float32)
        assert bool((codes == 0).all())
        torch.testing.assert_close(dequantize_kv(codes, scales, bits, torch.float32), x)


def test_cache_layout_and_size() -> None:
    cpu = torch.device("cpu")
    int4 = KVCache.allocate(3, 16, 2, 64, dtype=torch.bfloat16, device=cpu, bits=4)
    assert int4.key.shape == (3, 16, 2, 32) and int4.key.dtype == torch.uint8 and int4.head_dim == 64
    # 4-bit keys: a pair per 16 dimensions, an anchor row per block and head; values a pair per row
    assert int4.key_scales is not None and int4.key_scales.shape == (3, 16, 2, 4, 2)
    assert int4.value_scales is not None and int4.value_scales.shape == (3, 16, 2, 2)
    assert int4.key_anchors is not None and int4.key_anchors.shape == (3, 2, 64)
    assert int4.key_anchors.dtype == torch.bfloat16 and int4.compute_dtype == torch.bfloat16
    # per token and layer, K and V: bf16 2 * 2 * 64 * 2 = 512; int8 2 * 2 * (64 + 4) = 272; int4 per head keys
    # 32 + 4 pairs * 4 + the anchor 64 * 2 / 16 tokens, values 32 + 4: 2 * (56 + 36) = 184
    assert KVCache.bytes_per_token(2, 64, dtype=torch.bfloat16) == 512
    assert KVCache.bytes_per_token(2, 64, dtype=torch.bfloat16, bits=8) == 272
    assert KVCache.bytes_per_token(2, 64, dtype=torch.bfloat16, bits=4) == 184
    assert KVCache.bytes_per_block(2, 64, 16, dtype=torch.bfloat16, bits=4) == 16 * 184
    stored = sum(t.numel() * t.element_size() for t in (int4.key, int4.value, int4.key_scales, int4.value_scales,
                                                          int4.key_anchors))
    assert stored == 3 * KVCache.bytes_per_block(2, 64, 16, dtype=torch.bfloat16, bits=4)
    # a block of 32 tokens shares its anchors over twice the tokens; 8-dim heads take one pair per row
    assert KVCache.bytes_per_token(2, 64, dtype=torch.bfloat16, bits=4, block_size=32) == 2 * (52 + 36)
    assert KVCache.bytes_per_token(1, 8, dtype=torch.float32, bits=4, block_size=64) == (4 + 8) + (4 + 8) + 0.5
    with pytest.raises(ValueError, match="key_anchors"):
        KVCache(int4.key, int4.value, int4.key_scales, int4.value_scales, key_bits=4, value_bits=4)
    with pytest.raises(ValueError, match="key_scales"):
        KVCache(int4.key, int4.value, int4.value_scales, int4.value_scales, key_bits=4, value_bits=4,
                key_anchors=int4.key_anchors)
    with pytest.raises(ValueError, match="bits"):
        KVCache.allocate(3, 16, 2, 64, dtype=torch.float32, device=cpu, bits=3)
    with pytest.raises(ValueError, match="head_dim"):
        KVCache.allocate(3, 16, 2, 7, dtype=torch.float32, device=cpu, bits=4)
    with pytest.raises(ValueError, match="bits"):
        KVCache(int4.key, int4.value)
    with pytest.raises(ValueError, match="key_bits/value_bits"):
        KVCache(int4.key, int4.value, int4.key_scales, int4.value_scales, key_bits=4)


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_k8v4_sizes_keys_and_values_by_their_own_width(scale_dtype: torch.dtype, head_dim: int) -> None:
    """Keys take ``head_dim`` bytes, values ``head_dim / 2``, each with its ``(scale, zero)`` pair."""
    s = torch.empty((), dtype=scale_dtype).element_size()
    per_head = (head_dim + 2 * s) + (head_dim // 2 + 2 * s)
    assert KVCache.bytes_per_token(3, head_dim, dtype=scale_dtype, bits=(8, 4)) == 3 * per_head
    cache = KVCache.allocate(5, 16, 3, head_dim, dtype=scale_dtype, device=torch.device("cpu"), bits=(8, 4))
    assert cache.key.shape == (5, 16, 3, head_dim) and cache.value.shape == (5, 16, 3, head_dim // 2)
    assert cache.bits == KVBits(8, 4) and cache.bits.name == "k8v4" and cache.head_dim == head_dim
    stored = sum(t.numel() * t.element_size() for t in (cache.key, cache.value, cache.key_scales, cache.value_scales)
                 if t is not None)
    assert stored == 5 * 16 * 3 * per_head
    with pytest.raises(ValueError, match="value"):  # values as wide as int8 codes in a k8v4 cache
        KVCache(cache.key, cache.key.clone(), cache.key_scales, cache.value_scales, key_bits=8, value_bits=4)


# -- attention over a quantized cache -------------------------------------------------------------------


@st.composite
def cases(draw: st.DrawFn, *, decode: bool | None = None) -> dict:
    block_size = draw(st.sampled_from([4, 8, 16]))
    count = draw(st.integers(1, 3))
    is_decode = draw(st.booleans()) if decode is None else decode
    seqs = []
    for _ in range(count):
        length = draw(st.one_of(st.sampled_from([1, block_size, block_size + 1]), st.integers(1, 3 * block_size)))
        new = 1 if is_decode else draw(st.integers(1, length))
        seqs.append((length, new))
    return {"seqs": seqs, "heads": draw(st.sampled_from(HEADS)), "head_dim": draw(st.sampled_from([16, 32, 64])),
            "block_size": block_size, "seed": draw(st.integers(0, 2**31 - 1))}


def _case_batch(case: dict, bits: KVBits, dtype: torch.dtype = torch.float32,
                device: torch.device | None = None) -> tuple[PagedBatch, KVCache]:
    heads, kv_heads = case["heads"]
    batch = build_batch(case["seqs"], heads, kv_heads, case["head_dim"], case["block_size"], dtype,
                        device or torch.device("cpu"), case["seed"])
    return batch, quantized_batch(batch, bits)


def _close(got: torch.Tensor, expected: torch.Tensor, tol: float = 2e-5) -> None:
    torch.testing.assert_close(got.double().cpu(), expected, atol=tol, rtol=tol)


@BIT_PAIRS
@settings(max_examples=20, deadline=None)
@given(case=cases())
def test_reference_and_cpu_paths_match_float64(bits: KVBits, case: dict) -> None:
    batch, cache = _case_batch(case, bits)
    assert cache.bits == bits
    expected = expected_attention(batch, cache)
    _close(paged_attention_cache_reference(batch.q, cache, batch.meta, batch.scale), expected)
    _close(paged_attention_cache_cpu(batch.q, cache, batch.meta, batch.scale), expected)


@BIT_PAIRS
@settings(max_examples=20, deadline=None)
@given(case=cases(decode=True), threads=st.sampled_from([1, 2]))
def test_native_decode_reads_codes_in_place(native_kernel: NativeDecodeAttention, bits: KVBits, case: dict,
                                            threads: int) -> None:
    batch, cache = _case_batch(case, bits)
    meta = batch.meta
    shape = (cache.num_blocks, cache.block_size, cache.num_kv_heads, cache.head_dim)
    plan = native_kernel.plan(meta.block_tables, meta.seq_lens, shape, num_heads=batch.q.shape[1],
                              threads=threads, bits=cache.bits)
    got = plan.run(batch.q, cache, batch.scale).view(batch.q.shape)
    _close(got, expected_attention(batch, cache))
    # through the CPU bundle's entry point, with the plan attached
    routed = paged_attention_cache_cpu(batch.q, cache, dataclasses.replace(meta, plan=plan), batch.scale)
    _close(routed, expected_attention(batch, cache))


@pytest.mark.parametrize("bits", [KVBits(8, 8), KVBits(8, 4)], ids=lambda b: b.name)
def test_writes_store_what_the_scheme_says(bits: KVBits) -> None:
    """The reference write (the CPU bundle's) puts each token's codes and pairs at its slot, keys and values
    each at their own width, and skips padding."""
    cache = KVCache.allocate(4, 4, 2, 8, dtype=torch.float32, device=torch.device("cpu"), bits=bits)
    k, v = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    write_kv_cache_reference(k, v, cache, torch.tensor([5, -1, 12]))
    assert cache.key_scales is not None and cache.value_scales is not None and cache.key_anchors is None
    for token, slot in ((0, 5), (2, 12)):
        block, offset = divmod(slot, 4)
        codes, scales = quantize_kv(v[token], bits.value, torch.float32)
        assert torch.equal(cache.value[block, offset], codes)
        torch.testing.assert_close(cache.value_scales[block, offset], scales)
        key_codes, key_scales = quantize_kv(k[token], bits.key, torch.float32)
        assert torch.equal(cache.key[block, offset], key_codes)
        torch.testing.assert_close(cache.key_scales[block, offset], key_scales)
    written = {(1, 1), (3, 0)}
    for block in range(4):
        for offset in range(4):
            if (block, offset) not in written:
                assert not bool(cache.key[block, offset].any()) and not bool(cache.key_scales[block, offset].any())


@pytest.mark.parametrize("head_dim", [8, 32, 48])
def test_int4_keys_are_anchored_on_their_block_and_grouped(head_dim: int) -> None:
    """4-bit keys: the token at a block's first slot becomes the block's anchor (read back exactly); every
    token's residual against its block's anchor is stored in groups of gcd(16, head_dim) dimensions, whether
    the anchor came in the same write (a prefill chunk) or an earlier one (decode); values per row."""
    group = 8 if head_dim == 8 else 16
    cache = KVCache.allocate(4, 4, 2, head_dim, dtype=torch.float32, device=torch.device("cpu"), bits=4)
    gen = torch.Generator().manual_seed(3)
    k = torch.randn(6, 2, head_dim, generator=gen) * 2 + torch.linspace(-20, 20, head_dim)  # steady offsets
    v = torch.randn(6, 2, head_dim, generator=gen)
    write_kv_cache_reference(k[:4], v[:4], cache, torch.tensor([4, 5, -1, 12]))  # block 1 slots 0-1, block 3 slot 0
    write_kv_cache_reference(k[4:], v[4:], cache, torch.tensor([6, 13]))  # later tokens of blocks 1 and 3
    assert cache.key_anchors is not None and cache.key_scales is not None and cache.value_scales is not None
    assert cache.key_scales.shape[-2:] == (head_dim // group, 2)
    torch.testing.assert_close(cache.key_anchors[1], k[0])
    torch.testing.assert_close(cache.key_anchors[3], k[3])
    assert not bool(cache.key_anchors[0].any()) and not bool(cache.key_anchors[2].any())
    keys, _ = cache.read_blocks(torch.tensor([1, 3]))
    for token, anchor_token, (block, offset) in ((0, 0, (1, 0)), (1, 0, (1, 1)), (4, 0, (1, 2)),
                                                  (3, 3, (3, 0)), (5, 3, (3, 1))):
        residual = k[token] - k[anchor_token]
        codes, pairs = quantize_kv(residual, 4, torch.float32, group)
        assert torch.equal(cache.key[block, offset], codes)
        torch.testing.assert_close(cache.key_scales[block, offset], pairs)
        value_codes, _ = quantize_kv(v[token], 4, torch.float32)
        assert torch.equal(cache.value[block, offset], value_codes)
        got = _values(cache.key[block, offset], cache.key_scales[block, offset], 4) + k[anchor_token].double()
        assert bool(((got - k[token].double()).abs()
                     <= quantization_error_bound(residual, 4, torch.float32, group).double()).all())
        torch.testing.assert_close(keys[[1, 3].index(block), offset].double(), got, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(keys[0, 0], k[0])  # the anchor token reads back exactly
    # groups bound the error by their own range: a group far from the others keeps its fine steps
    assert bool((quantization_error_bound(k[1] - k[0], 4, torch.float32, group)
                 <= quantization_error_bound(k[1] - k[0], 4, torch.float32).expand(2, head_dim) + 1e-6).all())


@settings(max_examples=40, deadline=None)
@given(scale_dtype=st.sampled_from(SCALE_DTYPES), group=st.sampled_from([2, 8, 16]),
       offset=st.floats(-50, 50), spread=st.floats(1e-3, 30), seed=st.integers(0, 2**31 - 1))
def test_grouped_round_trip_stays_within_each_groups_bound(scale_dtype: torch.dtype, group: int, offset: float,
                                                           spread: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 3, 64, generator=gen) * spread + offset * torch.linspace(-1, 1, 64)
    codes, scales = quantize_kv(x, 4, scale_dtype, group)
    assert codes.shape == (5, 3, 32) and scales.shape == (5, 3, 64 // group, 2) and scales.dtype == scale_dtype
    error = (dequantize_kv(codes, scales, 4, torch.float64) - x.double()).abs()
    bound = quantization_error_bound(x, 4, scale_dtype, group).double()
    assert bound.shape == x.shape and bool((error <= bound).all())
    torch.testing.assert_close(dequantize_kv(codes, scales, 4, torch.float64), _values(codes, scales, 4),
                               atol=1e-5 * (1 + x.abs().max().item()), rtol=1e-6)
    with pytest.raises(ValueError, match="group_size"):
        quantize_kv(x, 4, scale_dtype, 24)


# -- Triton (the interpreter on CPU; compiled on a GPU) ------------------------------------------------

TRITON_TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module")
def triton_attention() -> object:
    pytest.importorskip("triton")
    from asyncllm.kernels import triton_attention

    return triton_attention


@BIT_PAIRS
@settings(max_examples=6, deadline=None)
@given(case=cases(), dtype=st.sampled_from(SCALE_DTYPES))
def test_triton_attention_reads_codes_in_place(device: torch.device, triton_attention: object, bits: KVBits,
                                               case: dict, dtype: torch.dtype) -> None:
    batch, cache = _case_batch(case, bits, dtype, device)
    cache = dataclasses.replace(cache, **{name: getattr(cache, name).to(device)
                                          for name in ("key", "value", "key_scales", "value_scales", "key_anchors")
                                          if getattr(cache, name) is not None})
    got = triton_attention.paged_attention_cache_triton(batch.q, cache, batch.meta, batch.scale)  # type: ignore[attr-defined]
    assert got.dtype == dtype
    _close(got.float(), expected_attention(batch, cache), TRITON_TOLERANCE[dtype])


@BIT_PAIRS
@settings(max_examples=5, deadline=None)
@given(dtype=st.sampled_from(SCALE_DTYPES), heads=st.sampled_from([1, 2, 3]),
       head_dim=st.sampled_from([16, 64]), seed=st.integers(0, 2**31 - 1))
def test_triton_write_quantizes_like_the_reference(device: torch.device, bits: KVBits, dtype: torch.dtype,
                                                   heads: int, head_dim: int, seed: int) -> None:
    pytest.importorskip("triton")
    from asyncllm.kernels.triton_kv_write import write_kv_cache_triton

    gen = torch.Generator().manual_seed(seed)
    fused = (torch.randn(5, 3 * heads, head_dim, generator=gen) * 3 + 1).to(dtype)
    k, v = fused[:, :heads], fused[:, heads : 2 * heads]  # strided views, as a fused QKV output gives
    slots = torch.tensor([9, -1, 0, 31, 17])
    expected = KVCache.allocate(4, 8, heads, head_dim, dtype=dtype, device=torch.device("cpu"), bits=bits)
    write_kv_cache_reference(k, v, expected, slots)
    got = KVCache.allocate(4, 8, heads, head_dim, dtype=dtype, device=device, bits=bits)
    write_kv_cache_triton(k.to(device), v.to(device), got, slots.to(device))
    assert got.key_scales is not None and expected.key_scales is not None
    assert got.value_scales is not None and expected.value_scales is not None
    written = slots[slots >= 0]
    scheme = key_scheme(head_dim, bits.key)
    anchors = None
    if scheme.anchored:  # the blocks' anchors are the reference's (block 0's from slot 0, the rest unwritten)
        assert got.key_anchors is not None and expected.key_anchors is not None
        assert torch.equal(got.key_anchors.cpu(), expected.key_anchors)
        anchors = got.key_anchors.cpu()
    for x, codes, pairs, want_pairs, width, base, group in (
            (k, got.key, got.key_scales, expected.key_scales, bits.key, anchors, scheme.pair_group),
            (v, got.value, got.value_scales, expected.value_scales, bits.value, None, None)):
        # the pairs are the scheme's (the interpreter may round bfloat16 toward zero: within one of its steps)
        torch.testing.assert_close(pairs.cpu(), want_pairs)
        # and the codes, read back with the pairs stored beside them (and the anchors), stay within the
        # scheme's bound of what was quantized (the residual against the anchor)
        stored = _values(codes.cpu(), pairs.cpu(), width, base).flatten(0, 1)[written]
        original = x[slots >= 0].double()
        quantized = original.float()
        if base is not None:
            quantized = original.float() - base.float()[torch.div(written, 8, rounding_mode="floor")]
        bound = quantization_error_bound(quantized, width, dtype, group).double()
        assert bool(((stored - original).abs() <= bound).all())
        untouched = torch.ones(codes.shape[0] * codes.shape[1], dtype=torch.bool)
        untouched[written] = False
        assert not bool(codes.cpu().flatten(0, 1)[untouched].any())
    if dtype != torch.bfloat16:  # exactly the reference's codes, up to a value on a rounding boundary
        assert (got.key.cpu() != expected.key).float().mean() < 0.01
        assert (got.value.cpu() != expected.value).float().mean() < 0.01


def test_triton_entry_points_refuse_caches_they_cannot_read() -> None:
    pytest.importorskip("triton")
    from asyncllm.kernels.triton_launch import check_paged_inputs

    batch = build_batch([(5, 1), (9, 1)], 4, 2, 16, 4, torch.float32, torch.device("cpu"), seed=1)
    cache = quantized_batch(batch, 4)
    assert cache.key_scales is not None and cache.value_scales is not None
    scales = (cache.key_scales, cache.value_scales)
    int4 = KVBits(4, 4)
    anchors = cache.key_anchors
    assert check_paged_inputs(batch.q, cache.key, cache.value, batch.meta, scales, int4, anchors) == (4, 2, 16)
    cases = [
        ("key_bits", dict(bits=KVBits(3, 4))),
        ("value_bits", dict(bits=KVBits(4, 3))),
        ("scales", dict(scales=None)),
        ("k_cache", dict(bits=KVBits(8, 4))),  # int4 codes are half as wide as int8 ones
        ("v_cache", dict(bits=KVBits(4, 8))),
        ("key_scales", dict(scales=(cache.key_scales.half(), cache.value_scales))),
        ("v_cache", dict(v=cache.value[:, :2])),
    ]
    for field, change in cases:
        args = {"v": cache.value, "scales": scales, "bits": int4, **change}
        with pytest.raises(ValueError, match=field):
            check_paged_inputs(batch.q, cache.key, args["v"], batch.meta, args["scales"], args["bits"], anchors)
