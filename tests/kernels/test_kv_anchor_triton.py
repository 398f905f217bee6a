"""Anchored, grouped 4-bit keys (``kv_quant.key_scheme``) in the Triton kernels: the write stores each block's
anchor and every key's grouped residual as the torch reference does, decode and prefill attention read them
in place, against the float64 attention over what the stored codes, pairs and anchors stand for."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncllm.kernels.kv_cache import KVCache
from asyncllm.kernels.kv_quant import KVBits, key_scheme, quantization_error_bound
from asyncllm.kernels.kv_write import write_kv_cache_reference
from asyncllm.kernels.metadata import AttentionMetadata
from asyncllm.kernels.triton_attention import paged_attention_cache_triton
from asyncllm.kernels.triton_decode import DecodeLaunch, paged_decode_attention
from asyncllm.kernels.triton_kv_write import write_kv_cache_triton
from asyncllm.kernels.triton_launch import check_paged_inputs
from asyncllm.kernels.triton_prefill import PrefillLaunch, paged_prefill_attention

from ._kv_reference import _values, expected_attention, quantized_batch
from ._paged_batch import PagedBatch, build_batch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
HEAD_DIMS = (8, 16, 24, 32, 64)  # groups of gcd(16, head_dim): 8 / 16 / 8 (three) / 16 (two) / 16 (four)
INT4 = KVBits(4, 4)


def _close(got: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    torch.testing.assert_close(got.double().cpu(), expected, atol=tol, rtol=tol)


def _on(cache: KVCache, device: torch.device) -> KVCache:
    return dataclasses.replace(cache, **{name: getattr(cache, name).to(device) for name in (
        "key", "value", "key_scales", "value_scales", "key_anchors") if getattr(cache, name) is not None})


def _meta_on(meta: AttentionMetadata, device: torch.device) -> AttentionMetadata:
    return dataclasses.replace(meta, slot_mapping=meta.slot_mapping.to(device),
                               query_start_loc=meta.query_start_loc.to(device), seq_lens=meta.seq_lens.to(device),
                               block_tables=meta.block_tables.to(device))


# -- the write --------------------------------------------------------------------------------------------


def _chunks(draw: st.DrawFn, block_size: int, num_blocks: int) -> tuple[int, list[list[int]]]:
    """A sequence of ``length`` tokens in shuffled blocks, written in two calls (a prefill chunk, then the
    rest: the first call holds a block's first slot beside later ones, the second may continue a block
    whose anchor the first wrote), each with padding slots (``-1``) mixed in."""
    length = draw(st.integers(2, 3 * block_size))
    blocks = draw(st.permutations(range(num_blocks)))
    slots = [blocks[t // block_size] * block_size + t % block_size for t in range(length)]
    cut = draw(st.integers(1, length - 1))
    calls = []
    for part in (slots[:cut], slots[cut:]):
        pads = draw(st.lists(st.integers(0, len(part)), max_size=2))
        part = list(part)
        for at in sorted(pads, reverse=True):
            part.insert(at, -1)
        calls.append(part)
    return length, calls


@st.composite
def write_cases(draw: st.DrawFn) -> dict:
    block_size = draw(st.sampled_from([4, 8, 16]))
    num_blocks = 4
    _, calls = _chunks(draw, block_size, num_blocks)
    return {"block_size": block_size, "num_blocks": num_blocks, "calls": calls,
            "heads": draw(st.sampled_from([1, 2, 3])), "head_dim": draw(st.sampled_from(HEAD_DIMS)),
            "dtype": draw(st.sampled_from(DTYPES)), "seed": draw(st.integers(0, 2**31 - 1))}


@settings(max_examples=8, deadline=None)
@given(case=write_cases())
def test_write_stores_anchors_and_grouped_residuals_like_the_reference(device: torch.device, case: dict) -> None:
    block_size, heads, head_dim, dtype = case["block_size"], case["heads"], case["head_dim"], case["dtype"]
    scheme = key_scheme(head_dim, 4)
    gen = torch.Generator().manual_seed(case["seed"])
    shape = (case["num_blocks"], block_size, heads, head_dim)
    expected = KVCache.allocate(*shape, dtype=dtype, device=torch.device("cpu"), bits=4)
    got = KVCache.allocate(*shape, dtype=dtype, device=device, bits=4)
    written, originals = [], []
    for call in case["calls"]:
        slots = torch.tensor(call)
        # keys with a few large, steady channels (what anchoring is for), as strided views of a fused output
        fused = torch.randn(len(call), 3 * heads, head_dim, generator=gen) * 2
        fused[..., ::5] += 20
        fused = fused.to(dtype)
        k, v = fused[:, :heads], fused[:, heads : 2 * heads]
        write_kv_cache_reference(k, v, expected, slots)
        write_kv_cache_triton(k.to(device), v.to(device), got, slots.to(device))
        written.append(slots[slots >= 0])
        originals.append(k[slots >= 0])
    assert got.key_anchors is not None and expected.key_anchors is not None
    assert got.key_scales is not None and expected.key_scales is not None
    assert got.value_scales is not None and expected.value_scales is not None
    # the anchors are the blocks' first tokens' keys, exactly
    anchors = got.key_anchors.cpu()
    assert torch.equal(anchors, expected.key_anchors)
    # the grouped pairs are the scheme's (the interpreter may round bfloat16 toward zero: one step)
    assert got.key_scales.shape[-2:] == (scheme.groups(head_dim), 2)
    torch.testing.assert_close(got.key_scales.cpu(), expected.key_scales)
    torch.testing.assert_close(got.value_scales.cpu(), expected.value_scales)
    # each key read back (code * scale + zero + anchor, float64) lies within the grouped bound of its residual
    slots, original = torch.cat(written), torch.cat(originals).double()
    stored = _values(got.key.cpu(), got.key_scales.cpu(), 4, anchors).flatten(0, 1)[slots]
    residual = original.float() - anchors.float()[torch.div(slots, block_size, rounding_mode="floor")]
    bound = quantization_error_bound(residual, 4, dtype, scheme.group_size).double()
    assert bool(((stored - original).abs() <= bound).all())
    # an anchor token reads back exactly: residual 0, codes 0, pair (0, 0)
    first = slots[slots % block_size == 0]
    flat_scales = got.key_scales.cpu().flatten(0, 1)
    assert not bool(got.key.cpu().flatten(0, 1)[first].any()) and not bool(flat_scales[first].any())
    # nothing else was touched
    untouched = torch.ones(shape[0] * block_size, dtype=torch.bool)
    untouched[slots] = False
    assert not bool(got.key.cpu().flatten(0, 1)[untouched].any()) and not bool(flat_scales[untouched].any())
    if dtype != torch.bfloat16:  # the reference's codes, up to a value on a rounding boundary
        assert (got.key.cpu() != expected.key).float().mean() < 0.01


def test_a_block_continued_later_keeps_the_anchor_of_its_first_write(device: torch.device) -> None:
    """Block 1's first token (slot 4) is written alone; the next call quantizes slots 5 and 6 against it."""
    cache = KVCache.allocate(3, 4, 1, 16, dtype=torch.float32, device=device, bits=4)
    first = torch.full((1, 1, 16), 7.0) + torch.arange(16.0)
    write_kv_cache_triton(first.to(device), first.to(device), cache, torch.tensor([4], device=device))
    later = first + torch.linspace(-0.5, 0.5, 16)  # small residuals: the anchor soaks up the offsets
    keys = torch.cat((later, first + 0.25))
    write_kv_cache_triton(keys.to(device), keys.to(device), cache, torch.tensor([5, 6], device=device))
    assert cache.key_anchors is not None and cache.key_scales is not None
    assert torch.equal(cache.key_anchors.cpu()[1], first[0])
    stored = _values(cache.key.cpu(), cache.key_scales.cpu(), 4, cache.key_anchors.cpu()).flatten(0, 1)
    assert torch.equal(stored[4], first[0].double())
    # residuals spanning 1.0 in a group of 16: 16 levels, half a step of error at most
    assert float((stored[5] - later[0].double()).abs().max()) <= 0.5 / 15 + 1e-6
    assert torch.allclose(stored[6], (first[0] + 0.25).double(), atol=1e-6)


# -- attention over anchored caches ---------------------------------------------------------------------


@st.composite
def attention_cases(draw: st.DrawFn) -> dict:
    block_size = draw(st.sampled_from([4, 8, 16]))
    is_decode = draw(st.booleans())
    seqs = []
    for _ in range(draw(st.integers(1, 3))):
        length = draw(st.one_of(st.sampled_from([1, block_size, block_size + 1]), st.integers(1, 2 * block_size + 3)))
        seqs.append((length, 1 if is_decode else draw(st.integers(1, length))))
    return {"seqs": seqs, "heads": draw(st.sampled_from([(2, 2), (4, 2), (3, 1), (8, 1)])),
            "head_dim": draw(st.sampled_from(HEAD_DIMS)), "block_size": block_size,
            "dtype": draw(st.sampled_from(DTYPES)), "small": draw(st.booleans()),
            "seed": draw(st.integers(0, 2**31 - 1))}


def _anchored_batch(case: dict, device: torch.device) -> tuple[PagedBatch, KVCache]:
    """The case's batch with its queries and metadata on ``device`` and its cache quantized by the scheme (on
    the CPU, where the float64 reference reads it)."""
    heads, kv_heads = case["heads"]
    batch = build_batch(case["seqs"], heads, kv_heads, case["head_dim"], case["block_size"], case["dtype"],
                        torch.device("cpu"), case["seed"])
    cache = quantized_batch(batch, INT4)
    assert cache.key_anchors is not None and cache.key_scheme == key_scheme(case["head_dim"], 4)
    return dataclasses.replace(batch, q=batch.q.to(device), meta=_meta_on(batch.meta, device)), cache


@settings(max_examples=10, deadline=None)
@given(case=attention_cases())
def test_decode_and_prefill_read_anchored_keys_in_place(device: torch.device, case: dict) -> None:
    batch, cache = _anchored_batch(case, device)
    expected = expected_attention(batch, cache)
    moved = _on(cache, device)
    tol = TOLERANCE[case["dtype"]]
    got = paged_attention_cache_triton(batch.q, moved, batch.meta, batch.scale)
    assert got.dtype == case["dtype"]
    _close(got.float(), expected, tol)
    if case["small"]:  # small tiles: several tiles and splits per sequence, prefill over decode rows too
        scales = (moved.key_scales, moved.value_scales)
        kwargs = {"scales": scales, "bits": INT4, "anchors": moved.key_anchors}
        if batch.meta.is_decode_only:
            got = paged_decode_attention(batch.q, moved.key, moved.value, batch.meta, batch.scale,
                                         DecodeLaunch(block_n=16, num_splits=3), **kwargs)  # type: ignore[arg-type]
            _close(got.float(), expected, tol)
        got = paged_prefill_attention(batch.q, moved.key, moved.value, batch.meta, batch.scale,
                                      PrefillLaunch(block_m=16, block_n=16), **kwargs)  # type: ignore[arg-type]
        _close(got.float(), expected, tol)


@settings(max_examples=4, deadline=None)
@given(head_dim=st.sampled_from(HEAD_DIMS), block_size=st.sampled_from([4, 8, 16]), seed=st.integers(0, 2**31 - 1))
def test_prefill_chunks_written_then_attended(device: torch.device, head_dim: int, block_size: int,
                                              seed: int) -> None:
    """A sequence written by the Triton write in two prefill chunks (the second continues a block the first
    anchored) and attended by the Triton prefill: the float64 attention over what the cache stores."""
    gen = torch.Generator().manual_seed(seed)
    length, cut, heads, kv_heads = 2 * block_size + 3, block_size + 2, 4, 2
    table = torch.tensor([[3, 1, 4, 0]], dtype=torch.int32)
    slots = (table[0, torch.arange(length) // block_size].long() * block_size + torch.arange(length) % block_size)
    cache = KVCache.allocate(5, block_size, kv_heads, head_dim, dtype=torch.float32, device=device, bits=4)
    offsets = torch.randn(1, kv_heads, head_dim, generator=gen) * 8  # steady per-channel offsets
    keys = torch.randn(length, kv_heads, head_dim, generator=gen) + offsets
    values = torch.randn(length, kv_heads, head_dim, generator=gen)
    for part in (slice(0, cut), slice(cut, length)):
        write_kv_cache_triton(keys[part].to(device), values[part].to(device), cache, slots[part].to(device))
    new = length - cut
    meta = AttentionMetadata(slot_mapping=slots[cut:].to(device),
                             query_start_loc=torch.tensor([0, new], dtype=torch.int32, device=device),
                             seq_lens=torch.tensor([length], dtype=torch.int32, device=device),
                             block_tables=table.to(device), query_lens_cpu=(new,), seq_lens_cpu=(length,),
                             max_query_len=new, max_seq_len=length)
    q = torch.randn(new, heads, head_dim, generator=gen)
    batch = PagedBatch(q.to(device), cache.key, cache.value, meta, head_dim**-0.5)
    got = paged_attention_cache_triton(batch.q, cache, meta, batch.scale)
    _close(got.float(), expected_attention(batch, _on(cache, torch.device("cpu"))), 2e-5)


# -- input checks -----------------------------------------------------------------------------------------


def test_entry_points_check_anchors_and_grouped_pairs() -> None:
    batch = build_batch([(5, 1), (9, 1)], 4, 2, 32, 4, torch.float32, torch.device("cpu"), seed=1)
    cache = quantized_batch(batch, INT4)
    assert cache.key_scales is not None and cache.value_scales is not None and cache.key_anchors is not None
    scales, anchors = (cache.key_scales, cache.value_scales), cache.key_anchors
    assert cache.key_scales.shape[-2:] == (2, 2)
    assert check_paged_inputs(batch.q, cache.key, cache.value, batch.meta, scales, INT4, anchors) == (4, 2, 32)
    flat = cache.key_scales[..., 0, :]  # one pair per row: not the anchored scheme's
    for field, args in [
        ("key_anchors", (scales, None)),
        ("key_anchors", (scales, anchors[:, :1])),
        ("key_anchors", (scales, anchors.half())),
        ("key_anchors", (scales, anchors.transpose(1, 2).contiguous().transpose(1, 2))),
        ("key_scales", ((flat, cache.value_scales), anchors)),
        ("value_scales", ((cache.key_scales, cache.key_scales), anchors)),
    ]:
        with pytest.raises(ValueError, match=field):
            check_paged_inputs(batch.q, cache.key, cache.value, batch.meta, args[0], INT4, args[1])
    int8 = quantized_batch(batch, 8)
    assert int8.key_scales is not None and int8.value_scales is not None
    with pytest.raises(ValueError, match="key_anchors"):
        check_paged_inputs(batch.q, int8.key, int8.value, batch.meta, (int8.key_scales, int8.value_scales),
                           KVBits(8, 8), anchors)
    with pytest.raises(ValueError, match="key_anchors"):
        check_paged_inputs(batch.q, batch.k_cache, batch.v_cache, batch.meta, anchors=anchors)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_anchored_write_and_attention_do_not_sync_device() -> None:
    device = torch.device("cuda")
    batch = build_batch([(300, 40), (7, 1)], 8, 2, 64, 16, torch.float16, device, seed=5)
    cache = KVCache.allocate(batch.k_cache.shape[0], 16, 2, 64, dtype=torch.float16, device=device, bits=4)
    k = torch.randn(batch.q.shape[0], 2, 64, device=device, dtype=torch.float16)

    def run() -> torch.Tensor:
        write_kv_cache_triton(k, k, cache, batch.meta.slot_mapping)
        return paged_attention_cache_triton(batch.q, cache, batch.meta, batch.scale)

    run()  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert bool(out.isfinite().all())
