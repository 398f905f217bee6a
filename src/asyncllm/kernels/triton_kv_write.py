"""Triton KV-cache write: scatter each token's keys and values to its flat slot; a quantized cache's codes
and ``(scale, zero)`` pairs are computed here, as they are written (``kernels.kv_quant``). Anchored 4-bit
keys take two launches: the tokens at a block's first slot write the block's anchor, then every token's
residual against its block's anchor is quantized in groups (the anchor may come from the same batch)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from asyncllm.kernels.kv_cache import KVCache
from asyncllm.kernels.kv_quant import key_scheme
from asyncllm.kernels.triton_launch import check_dtype, pow2_at_least


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_kcb, stride_kcs, stride_kch, stride_kcd,
    stride_vcb, stride_vcs, stride_vch, stride_vcd,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, H_PAD: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    offs_h = tl.arange(0, H_PAD)
    offs_d = tl.arange(0, D_PAD)
    # A padding slot (< 0) masks every head: the row limit drops to 0.
    heads_to_write = tl.where(slot >= 0, NUM_HEADS, 0)
    mask = (offs_h[:, None] < heads_to_write) & (offs_d[None, :] < HEAD_DIM)
    slot = tl.maximum(slot, 0)
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE

    k = tl.load(k_ptr + token * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :] * stride_kd,
                mask=mask)
    k_dst = (block * stride_kcb + offset * stride_kcs
             + offs_h[:, None] * stride_kch + offs_d[None, :] * stride_kcd)
    tl.store(k_cache_ptr + k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)

    v = tl.load(v_ptr + token * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :] * stride_vd,
                mask=mask)
    v_dst = (block * stride_vcb + offset * stride_vcs
             + offs_h[:, None] * stride_vch + offs_d[None, :] * stride_vcd)
    tl.store(v_cache_ptr + v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_triton(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """``write_kv_reference`` in place: token ``t`` goes to flat slot ``slot_mapping[t]`` (``< 0``: skipped).

    ``k``/``v`` may be strided views (e.g. slices of a fused QKV projection). Slots must be below
    ``num_blocks * block_size``; they are not checked on the host, which would need a device sync.
    """
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"k/v: expected matching [T, Hk, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(f"k_cache/v_cache: expected [num_blocks, block_size, {k.shape[1]}, {k.shape[2]}], "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] != k.shape[0]:
        raise ValueError(f"slot_mapping: expected [{k.shape[0]}], got {tuple(slot_mapping.shape)}")
    for name, tensor in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_dtype(name, tensor)
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(),
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, H_PAD=pow2_at_least(num_heads), D_PAD=pow2_at_least(head_dim),
        BLOCK_SIZE=k_cache.shape[1], num_warps=4 if num_heads * head_dim <= 2048 else 8,
    )


@triton.jit
def _row_range(x, mask):
    """Per-row minimum and maximum of ``x`` ``[H, D]`` over its unmasked entries."""
    return tl.min(tl.where(mask, x, float("inf")), 1), tl.max(tl.where(mask, x, float("-inf")), 1)


@triton.jit
def _codes(x, scale, zero, QMAX: tl.constexpr):
    positive = scale > 0.0
    code = tl.floor((x - zero[:, None]) / tl.where(positive, scale, 1.0)[:, None] + 0.5)
    code = tl.where(positive[:, None], code, 0.0)
    return tl.minimum(tl.maximum(code, 0.0), QMAX).to(tl.uint8)


@triton.jit
def _grouped_codes(x, scale, zero, QMAX: tl.constexpr):
    """``_codes`` with a pair per value (``scale`` / ``zero`` shaped like ``x``)."""
    positive = scale > 0.0
    code = tl.floor((x - zero) / tl.where(positive, scale, 1.0) + 0.5)
    code = tl.where(positive, code, 0.0)
    return tl.minimum(tl.maximum(code, 0.0), QMAX).to(tl.uint8)


@triton.jit
def _write_quantized_kernel(
    x_ptr, cache_ptr, scales_ptr, slot_ptr,
    stride_xt, stride_xh, stride_xd,
    stride_cb, stride_cs, stride_ch, stride_cd,
    stride_sb, stride_ss, stride_sh,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, H_PAD: tl.constexpr, HALF_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BITS: tl.constexpr,
):
    """One token's keys (or values) ``[Hk, D]`` quantized per head into codes and ``(scale, zero)`` pairs.
    Dimensions are taken as two halves (``i``, ``i + D / 2``), which int4 packs into byte ``i``."""
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    offs_h = tl.arange(0, H_PAD)
    offs_i = tl.arange(0, HALF_PAD)
    heads_to_write = tl.where(slot >= 0, NUM_HEADS, 0)
    mask = (offs_h[:, None] < heads_to_write) & (offs_i[None, :] < HEAD_DIM // 2)
    slot = tl.maximum(slot, 0)
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    rows = token * stride_xt + offs_h[:, None] * stride_xh
    HALF: tl.constexpr = HEAD_DIM // 2
    first = tl.load(x_ptr + rows + offs_i[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    second = tl.load(x_ptr + rows + (offs_i + HALF)[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    QMAX: tl.constexpr = (1 << BITS) - 1
    low_first, high_first = _row_range(first, mask)
    low_second, high_second = _row_range(second, mask)
    low, high = tl.minimum(low_first, low_second), tl.maximum(high_first, high_second)
    # the stored pair, rounded to the scales' dtype; codes are computed from the rounded values
    scale = ((high - low) / QMAX).to(scales_ptr.dtype.element_ty, fp_downcast_rounding="rtne").to(tl.float32)
    zero = low.to(scales_ptr.dtype.element_ty, fp_downcast_rounding="rtne").to(tl.float32)
    code_first = _codes(first, scale, zero, QMAX)
    code_second = _codes(second, scale, zero, QMAX)
    base = block * stride_cb + offset * stride_cs + offs_h[:, None] * stride_ch
    if BITS == 8:
        tl.store(cache_ptr + base + offs_i[None, :] * stride_cd, code_first, mask=mask)
        tl.store(cache_ptr + base + (offs_i + HALF)[None, :] * stride_cd, code_second, mask=mask)
    else:
        tl.store(cache_ptr + base + offs_i[None, :] * stride_cd, code_first | (code_second << 4), mask=mask)
    pair = block * stride_sb + offset * stride_ss + offs_h * stride_sh
    head_mask = offs_h < heads_to_write
    tl.store(scales_ptr + pair, scale.to(scales_ptr.dtype.element_ty), mask=head_mask)
    tl.store(scales_ptr + pair + 1, zero.to(scales_ptr.dtype.element_ty), mask=head_mask)


@triton.jit
def _write_anchors_kernel(
    k_ptr, anchors_ptr, slot_ptr,
    stride_kt, stride_kh, stride_kd,
    stride_ab, stride_ah,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, H_PAD: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """A token at a block's first slot stores its keys ``[Hk, D]`` as the block's anchor; other tokens and
    padding (slot ``< 0``) store nothing."""
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    offs_h = tl.arange(0, H_PAD)
    offs_d = tl.arange(0, D_PAD)
    heads_to_write = tl.where((slot >= 0) & (slot % BLOCK_SIZE == 0), NUM_HEADS, 0)
    mask = (offs_h[:, None] < heads_to_write) & (offs_d[None, :] < HEAD_DIM)
    block = tl.maximum(slot, 0) // BLOCK_SIZE
    k = tl.load(k_ptr + token * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :] * stride_kd,
                mask=mask, other=0.0).to(tl.float32)
    tl.store(anchors_ptr + block * stride_ab + offs_h[:, None] * stride_ah + offs_d[None, :],
             k.to(anchors_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)


@triton.jit
def _write_anchored_keys_kernel(
    k_ptr, cache_ptr, scales_ptr, anchors_ptr, slot_ptr,
    stride_kt, stride_kh, stride_kd,
    stride_cb, stride_cs, stride_ch, stride_cd,
    stride_sb, stride_ss, stride_sh, stride_sg,
    stride_ab, stride_ah,
    HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr, GROUP: tl.constexpr, GROUPS_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BITS: tl.constexpr,
):
    """One token's and KV head's key row: the residual ``key - anchor`` (float32) of its block's anchor,
    quantized in groups of ``GROUP`` consecutive dimensions, each with its ``(scale, zero)`` pair. Dimensions
    are taken as two halves (``i``, ``i + D / 2``), which int4 packs into byte ``i``; a group may span both."""
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    HALF: tl.constexpr = HEAD_DIM // 2
    GROUPS: tl.constexpr = HEAD_DIM // GROUP
    offs_i = tl.arange(0, HALF_PAD)
    offs_g = tl.arange(0, GROUPS_PAD)
    # a padding slot (< 0) masks every dimension and pair: the limits drop to 0
    mask = offs_i < tl.where(slot >= 0, HALF, 0)
    live = offs_g < GROUPS
    pair_mask = offs_g < tl.where(slot >= 0, GROUPS, 0)
    slot = tl.maximum(slot, 0)
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    row = k_ptr + token * stride_kt + head * stride_kh
    anchor = anchors_ptr + block * stride_ab + head * stride_ah
    first = (tl.load(row + offs_i * stride_kd, mask=mask, other=0.0).to(tl.float32)
             - tl.load(anchor + offs_i, mask=mask, other=0.0).to(tl.float32))
    second = (tl.load(row + (offs_i + HALF) * stride_kd, mask=mask, other=0.0).to(tl.float32)
              - tl.load(anchor + offs_i + HALF, mask=mask, other=0.0).to(tl.float32))
    # membership [GROUPS_PAD, HALF_PAD] of each half's dimensions in each group
    in_first = ((offs_i // GROUP)[None, :] == offs_g[:, None]) & mask[None, :]
    in_second = (((offs_i + HALF) // GROUP)[None, :] == offs_g[:, None]) & mask[None, :]
    low = tl.minimum(tl.min(tl.where(in_first, first[None, :], float("inf")), 1),
                     tl.min(tl.where(in_second, second[None, :], float("inf")), 1))
    high = tl.maximum(tl.max(tl.where(in_first, first[None, :], float("-inf")), 1),
                      tl.max(tl.where(in_second, second[None, :], float("-inf")), 1))
    low = tl.where(live, low, 0.0)
    high = tl.where(live, high, 0.0)
    QMAX: tl.constexpr = (1 << BITS) - 1
    # the stored pairs, rounded to the scales' dtype; codes are computed from the rounded values
    scale = ((high - low) / QMAX).to(scales_ptr.dtype.element_ty, fp_downcast_rounding="rtne").to(tl.float32)
    zero = low.to(scales_ptr.dtype.element_ty, fp_downcast_rounding="rtne").to(tl.float32)
    # each dimension's pair: the one group it belongs to (a sum of one term and zeros: exact)
    code_first = _grouped_codes(first, tl.sum(tl.where(in_first, scale[:, None], 0.0), 0),
                                tl.sum(tl.where(in_first, zero[:, None], 0.0), 0), QMAX)
    code_second = _grouped_codes(second, tl.sum(tl.where(in_second, scale[:, None], 0.0), 0),
                                 tl.sum(tl.where(in_second, zero[:, None], 0.0), 0), QMAX)
    base = cache_ptr + block * stride_cb + offset * stride_cs + head * stride_ch
    if BITS == 8:
        tl.store(base + offs_i * stride_cd, code_first, mask=mask)
        tl.store(base + (offs_i + HALF) * stride_cd, code_second, mask=mask)
    else:
        tl.store(base + offs_i * stride_cd, code_first | (code_second << 4), mask=mask)
    pair = scales_ptr + block * stride_sb + offset * stride_ss + head * stride_sh + offs_g * stride_sg
    tl.store(pair, scale.to(scales_ptr.dtype.element_ty), mask=pair_mask)
    tl.store(pair + 1, zero.to(scales_ptr.dtype.element_ty), mask=pair_mask)


def write_kv_cache_triton(k: torch.Tensor, v: torch.Tensor, cache: KVCache, slot_mapping: torch.Tensor) -> None:
    """``write_kv_cache_reference`` in Triton: each token's keys and values quantized per head, each at its
    own width, as they are written (codes and ``(scale, zero)`` pairs; padding slots ``< 0`` skipped); 4-bit
    keys anchored and grouped (``kv_quant.key_scheme``). No host synchronisation: graph-capturable. A
    plain cache goes to ``write_kv_triton``."""
    bits = cache.bits
    if bits is None or cache.key_scales is None or cache.value_scales is None:
        write_kv_triton(k, v, cache.key, cache.value, slot_mapping)
        return
    if k.dim() != 3 or v.shape != k.shape or (k.shape[1], k.shape[2]) != (cache.num_kv_heads, cache.head_dim):
        raise ValueError(f"k/v: expected matching [T, {cache.num_kv_heads}, {cache.head_dim}], got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] != k.shape[0]:
        raise ValueError(f"slot_mapping: expected [{k.shape[0]}], got {tuple(slot_mapping.shape)}")
    for name, tensor in (("k", k), ("v", v), ("key_scales", cache.key_scales)):
        check_dtype(name, tensor)
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    if head_dim % 2:
        raise ValueError(f"k: a quantized cache needs an even head_dim, got {head_dim}")
    for scales in (cache.key_scales, cache.value_scales):
        if scales.stride(-1) != 1:
            raise ValueError("scales: the (scale, zero) pairs must be contiguous")
    scheme = key_scheme(head_dim, bits.key)
    anchors = cache.key_anchors
    rows = [(v, cache.value, cache.value_scales, bits.value)]
    if not scheme.anchored:
        rows.insert(0, (k, cache.key, cache.key_scales, bits.key))
    elif anchors is None or anchors.stride(-1) != 1:
        raise ValueError("key_anchors: a cache with 4-bit keys needs its anchors, with unit stride last")
    else:
        # first the anchors of the blocks this batch starts, then every key's residual against its anchor
        _write_anchors_kernel[(num_tokens,)](
            k, anchors, slot_mapping, *k.stride(), *anchors.stride()[:2],
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, H_PAD=pow2_at_least(num_heads), D_PAD=pow2_at_least(head_dim),
            BLOCK_SIZE=cache.block_size, num_warps=4,
        )
        groups = scheme.groups(head_dim)
        _write_anchored_keys_kernel[(num_tokens, num_heads)](
            k, cache.key, cache.key_scales, anchors, slot_mapping, *k.stride(), *cache.key.stride(),
            *cache.key_scales.stride()[:4], *anchors.stride()[:2],
            HEAD_DIM=head_dim, HALF_PAD=pow2_at_least(head_dim // 2), GROUP=scheme.group_size,
            GROUPS_PAD=pow2_at_least(groups), BLOCK_SIZE=cache.block_size, BITS=bits.key, num_warps=2,
        )
    for x, codes, scales, width in rows:
        _write_quantized_kernel[(num_tokens,)](
            x, codes, scales, slot_mapping, *x.stride(), *codes.stride(), *scales.stride()[:3],
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, H_PAD=pow2_at_least(num_heads),
            HALF_PAD=pow2_at_least(head_dim // 2), BLOCK_SIZE=cache.block_size, BITS=width, num_warps=4,
        )
