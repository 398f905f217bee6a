"""The native C kernels over anchored, grouped 4-bit keys (``kv_quant.key_scheme``): decode attention reads
codes, pairs and block anchors in place against the float64 reference, and the fused decode layer's write
(``store_kv_rows``) stores what the torch reference write (``write_kv_cache_reference``) stores."""

from __future__ import annotations

import copy
import ctypes

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncllm.kernels import KVCache
from asyncllm.kernels.cpu import paged_attention_cache_cpu
from asyncllm.kernels.cpu_native import NativeKernels
from asyncllm.kernels.kv_quant import key_scheme
from asyncllm.kernels.kv_write import write_kv_cache_reference
from asyncllm.kernels.metadata import AttentionMetadata, AttentionOptions
from asyncllm.kernels.native_attention import NativeDecodeAttention, native_cache_problem, paged_kv_arg
from asyncllm.kernels.native_build import load_native_library
from asyncllm.kernels.native_layer import bind_layer_functions

from ._kv_reference import _values, check_native_decode, expected_attention, quantized_batch
from ._paged_batch import PagedBatch, build_batch
from .native_support import require_native_kernels

HEADS = ((2, 2), (4, 2), (6, 2), (8, 1))
# channels with a large steady offset: what the anchors are for (a kernel that dropped them would be far off)
OFFSET_CHANNELS = (1, 5)
OFFSET = 40.0


@st.composite
def cases(draw: st.DrawFn) -> dict:
    block_size = draw(st.sampled_from([1, 4, 8, 16]))
    seqs = [(draw(st.integers(1, 4 * block_size + 5)), 1) for _ in range(draw(st.integers(1, 4)))]
    window = draw(st.one_of(st.just(0), st.integers(1, 20)))
    softcap = draw(st.one_of(st.none(), st.floats(0.5, 50.0)))
    return {"seqs": seqs, "heads": draw(st.sampled_from(HEADS)), "head_dim": draw(st.sampled_from([8, 16, 64])),
            "block_size": block_size, "bits": draw(st.sampled_from([4, (4, 8)])),
            "options": AttentionOptions(window=window, softcap=softcap), "seed": draw(st.integers(0, 2**31 - 1))}


def _case(case: dict) -> tuple[PagedBatch, KVCache]:
    heads, kv_heads = case["heads"]
    batch = build_batch(case["seqs"], heads, kv_heads, case["head_dim"], case["block_size"], torch.float32,
                        torch.device("cpu"), case["seed"])
    batch.k_cache[..., list(OFFSET_CHANNELS)] += OFFSET
    cache = quantized_batch(batch, case["bits"])
    assert cache.key_anchors is not None
    return batch, cache


def _close(got: torch.Tensor, expected: torch.Tensor, tol: float = 3e-5) -> None:
    torch.testing.assert_close(got.double(), expected, atol=tol, rtol=tol)


@settings(max_examples=80, deadline=None)
@given(case=cases(), threads=st.sampled_from([1, 2]))
def test_native_decode_over_anchored_keys_matches_float64(native_kernel: NativeDecodeAttention, case: dict,
                                                          threads: int) -> None:
    """Ragged lengths, GQA ratios, block sizes, groups of 16 (head_dim 16, 64) and 8 (head_dim 8), 4-bit
    or 8-bit values, sliding windows and soft-capping."""
    batch, cache = _case(case)
    check_native_decode(native_kernel, batch, cache, case["options"], threads, 3e-5)


def test_the_cpu_bundle_plans_native_attention_for_anchored_keys(native_kernel: NativeDecodeAttention) -> None:
    batch, cache = _case({"seqs": [(9, 1), (17, 1)], "heads": (4, 2), "head_dim": 16, "block_size": 4,
                          "bits": 4, "seed": 1})
    assert native_cache_problem(cache, (*cache.key.shape[:3], 16), cache.bits) is None
    meta = NativeKernels(4).plan_attention(batch.meta, cache, num_heads=4)
    assert meta.plan is not None
    _close(paged_attention_cache_cpu(batch.q, cache, meta, batch.scale), expected_attention(batch, cache))


def test_anchors_are_read_not_assumed(native_kernel: NativeDecodeAttention) -> None:
    """Moving a block's anchor moves every key of that block: the kernel follows the stored anchors."""
    batch, cache = _case({"seqs": [(11, 1)], "heads": (2, 1), "head_dim": 16, "block_size": 4, "bits": 4,
                          "seed": 2})
    assert cache.key_anchors is not None
    cache.key_anchors[batch.meta.block_tables[0, 1]] += 3.0
    meta = batch.meta
    plan = native_kernel.plan(meta.block_tables, meta.seq_lens, (*cache.shape[:3], 16), num_heads=2, threads=1,
                              bits=cache.bits)
    _close(plan.run(batch.q, cache, batch.scale).view(batch.q.shape), expected_attention(batch, cache))


def test_native_cache_problem_checks_the_key_pairs_and_anchors() -> None:
    cache = KVCache.allocate(3, 4, 2, 16, dtype=torch.float32, device=torch.device("cpu"), bits=4)
    shape = (3, 4, 2, 16)
    assert native_cache_problem(cache, shape, cache.bits) is None
    assert cache.key_anchors is not None and cache.key_scales is not None
    no_anchors = copy.copy(cache)
    object.__setattr__(no_anchors, "key_anchors", None)
    assert "anchors" in str(native_cache_problem(no_anchors, shape, cache.bits))
    row_pairs = copy.copy(cache)
    object.__setattr__(row_pairs, "key_scales", cache.value_scales)
    assert "key scales" in str(native_cache_problem(row_pairs, shape, cache.bits))
    arg = paged_kv_arg(cache)
    assert (arg.k_anchors, arg.k_group, arg.block_size) == (cache.key_anchors.data_ptr(), 16, 4)
    eight = KVCache.allocate(3, 4, 2, 16, dtype=torch.float32, device=torch.device("cpu"), bits=8)
    arg = paged_kv_arg(eight)
    assert (arg.k_anchors, arg.k_group) == (None, 16)


# -- the fused decode layer's write ----------------------------------------------------------------------


def _run_layer(cache: KVCache, slots: list[int], tables: torch.Tensor, lens: list[int], *, heads: int,
               seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One call of the C decode layer with random weights over ``cache`` (one row per slot); returns the keys
    and values ``[rows, Hk, D]`` it stored, read from its scratch (the rotated QKV rows ``store_kv_rows``
    received)."""
    library = load_native_library("decode_layer.c")
    assert library is not None
    dense = bind_layer_functions(library).dense
    gen = torch.Generator().manual_seed(seed)
    rows, kv_heads, head_dim, block_size = len(slots), cache.num_kv_heads, cache.head_dim, cache.block_size
    hidden, inter = 32, 24
    qkv_width = (heads + 2 * kv_heads) * head_dim
    max_len = max(lens)
    residual = torch.randn(rows, hidden, generator=gen)
    norm_in, norm_post = torch.rand(hidden, generator=gen) + 0.5, torch.rand(hidden, generator=gen) + 0.5
    w_qkv = torch.randn(hidden, qkv_width, generator=gen)
    for h in range(kv_heads):  # a key channel with a large steady offset per head
        w_qkv[:, (heads + h) * head_dim] += 5.0
    w_o = torch.randn(heads * head_dim, hidden, generator=gen) * 0.1
    w_gate_up = torch.randn(hidden, 2 * inter, generator=gen) * 0.1
    w_down = torch.randn(hidden, inter, generator=gen) * 0.1
    angle = torch.rand(rows, head_dim // 2, generator=gen) * 6.0
    cos = torch.cat((angle.cos(), angle.cos()), dim=1).contiguous()
    sin = torch.cat((-angle.sin(), angle.sin()), dim=1).contiguous()
    slot_t = torch.tensor(slots, dtype=torch.int64)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    work = torch.zeros(rows * (hidden + qkv_width + heads * head_dim + 3 * inter) + rows * heads * max_len)
    kv = paged_kv_arg(cache)
    dense(residual.data_ptr(), work.data_ptr(), norm_in.data_ptr(), norm_post.data_ptr(), 1e-6,
          w_qkv.data_ptr(), None, w_o.data_ptr(), None, w_gate_up.data_ptr(), None, w_down.data_ptr(), None,
          cos.data_ptr(), sin.data_ptr(), slot_t.data_ptr(), ctypes.byref(kv), tables.data_ptr(), lens_t.data_ptr(),
          tables.shape[1], block_size, max_len, rows, hidden, heads, kv_heads, head_dim, inter, head_dim**-0.5, 1)
    qkv = work[rows * hidden: rows * (hidden + qkv_width)].view(rows, qkv_width)
    k = qkv[:, heads * head_dim: (heads + kv_heads) * head_dim].reshape(rows, kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim:].reshape(rows, kv_heads, head_dim)
    return k.clone(), v.clone()


def _assert_same_cache(got: KVCache, ref: KVCache) -> None:
    """The same anchors, pairs and (up to a value on a rounding boundary) codes."""
    assert got.key_anchors is not None and ref.key_anchors is not None
    assert got.key_scales is not None and ref.key_scales is not None
    assert got.value_scales is not None and ref.value_scales is not None
    assert torch.equal(got.key_anchors, ref.key_anchors)
    torch.testing.assert_close(got.key_scales, ref.key_scales, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.value_scales, ref.value_scales, rtol=1e-6, atol=1e-6)
    bits = got.bits
    assert bits is not None
    for codes, scales, ref_codes, width, anchors in ((got.key, got.key_scales, ref.key, bits.key, got.key_anchors),
                                                     (got.value, got.value_scales, ref.value, bits.value, None)):
        step = float(scales[..., 0].abs().max())
        torch.testing.assert_close(_values(codes, scales, width, anchors), _values(ref_codes, scales, width, anchors),
                                   rtol=0, atol=step * 1.001)
        assert (codes != ref_codes).float().mean() < 0.02


@pytest.mark.parametrize("head_dim", [8, 16, 64])
@pytest.mark.parametrize("bits", [4, (4, 8)], ids=["int4", "k4v8"])
def test_fused_layer_writes_anchored_keys_as_the_reference(head_dim: int, bits: int | tuple[int, int]) -> None:
    """Step 1: row 0 opens a block (its keys become the anchor, residual 0), row 1 writes into a block whose
    anchor the reference wrote, row 2 lands mid-block; step 2: the token after row 0's, against the anchor
    the C layer wrote."""
    require_native_kernels()
    block_size, kv_heads, heads = 4, 2, 4
    cache = KVCache.allocate(8, block_size, kv_heads, head_dim, dtype=torch.float32, device=torch.device("cpu"),
                             bits=bits)
    assert cache.key_anchors is not None
    assert cache.key_scales is not None and cache.key_scales.shape[-2] == key_scheme(head_dim, 4).groups(head_dim)
    gen = torch.Generator().manual_seed(head_dim)
    # earlier tokens, written by the reference: sequence 1 has 6 in blocks 3, 5; sequence 2 has 2 in block 6
    history = [3 * block_size + i for i in range(4)] + [5 * block_size, 5 * block_size + 1] + [24, 25]
    k_hist = torch.randn(len(history), kv_heads, head_dim, generator=gen) * 3 + 10
    v_hist = torch.randn(len(history), kv_heads, head_dim, generator=gen)
    write_kv_cache_reference(k_hist, v_hist, cache, torch.tensor(history))
    # sequence 0 opens block 2 at its first token; sequence 1's 7th token: block 5, offset 2; sequence 2: block 6
    tables = torch.tensor([[2, 0], [3, 5], [6, 0]], dtype=torch.int32)
    slots, lens = [2 * block_size, 5 * block_size + 2, 6 * block_size + 2], [1, 7, 3]
    ref = copy.deepcopy(cache)
    k, v = _run_layer(cache, slots, tables, lens, heads=heads, seed=1)
    write_kv_cache_reference(k, v, ref, torch.tensor(slots))
    _assert_same_cache(cache, ref)
    assert torch.equal(cache.key_anchors[2], k[0])
    assert not bool(cache.key[2, 0].any()) and not bool(cache.key_scales[2, 0].any())  # the anchor's residual: 0
    # step 2: sequence 0's second token, residual against the anchor the C layer stored
    k2, v2 = _run_layer(cache, [2 * block_size + 1], tables[:1], [2], heads=heads, seed=2)
    write_kv_cache_reference(k2, v2, ref, torch.tensor([2 * block_size + 1]))
    _assert_same_cache(cache, ref)
    assert bool(cache.key_scales[2, 1].any())
    got = cache.read_blocks(torch.tensor([2]))[0][0, 1]
    bound = float(cache.key_scales[2, 1, ..., 0].max()) / 2 + 1e-5
    torch.testing.assert_close(got, k2[0], rtol=0, atol=bound)


def test_keys_the_fused_layer_wrote_are_attended_as_float64() -> None:
    """Decode attention over a block the C layer extended (its anchor written by the reference) matches the
    float64 attention over what the cache stores."""
    require_native_kernels()
    cache = KVCache.allocate(6, 4, 1, 16, dtype=torch.float32, device=torch.device("cpu"), bits=4)
    gen = torch.Generator().manual_seed(7)
    write_kv_cache_reference(torch.randn(5, 1, 16, generator=gen) + 20, torch.randn(5, 1, 16, generator=gen), cache,
                             torch.tensor([4, 5, 6, 7, 12]))
    tables = torch.tensor([[1, 3]], dtype=torch.int32)
    _run_layer(cache, [13], tables, [6], heads=2, seed=3)
    meta = AttentionMetadata(slot_mapping=torch.tensor([13]), query_start_loc=torch.tensor([0, 1], dtype=torch.int32),
                             seq_lens=torch.tensor([6], dtype=torch.int32), block_tables=tables, query_lens_cpu=(1,),
                             seq_lens_cpu=(6,), max_query_len=1, max_seq_len=6)
    q = torch.randn(1, 2, 16, generator=gen)
    batch = PagedBatch(q, cache.key, cache.value, meta, 0.25)
    kernel = NativeDecodeAttention.load()
    assert kernel is not None
    plan = kernel.plan(tables, meta.seq_lens, (6, 4, 1, 16), num_heads=2, threads=1, bits=cache.bits)
    _close(plan.run(q, cache, 0.25).view(q.shape), expected_attention(batch, cache))
