"""Triton KV-cache write: scatter each token's keys and values to its flat slot."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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
