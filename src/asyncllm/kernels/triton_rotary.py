"""Triton rotary embedding ("rotate half" layout), applied in place to ``q`` and ``k``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from asyncllm.kernels.triton_launch import check_dtype, pow2_at_least


@triton.jit
def _rotate_heads(x_ptr, stride_h, stride_d, cos, sin, offs_f, mask_f,
                  NUM_HEADS: tl.constexpr, H_PAD: tl.constexpr, HALF: tl.constexpr):
    """Rotate pairs ``(i, i + HALF)`` of every head of one token; dims past ``2 * HALF`` are untouched."""
    offs_h = tl.arange(0, H_PAD)
    mask = (offs_h[:, None] < NUM_HEADS) & mask_f[None, :]
    first = x_ptr + offs_h[:, None] * stride_h + offs_f[None, :] * stride_d
    second = first + HALF * stride_d
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(second, mask=mask, other=0.0).to(tl.float32)
    tl.store(first, (x1 * cos[None, :] - x2 * sin[None, :]).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(second, (x2 * cos[None, :] + x1 * sin[None, :]).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, positions_ptr, cos_sin_ptr,
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_cp, stride_cr,
    NUM_Q: tl.constexpr, NUM_K: tl.constexpr, Q_PAD: tl.constexpr, K_PAD: tl.constexpr,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    offs_f = tl.arange(0, HALF_PAD)
    mask_f = offs_f < HALF
    row = cos_sin_ptr + position * stride_cp
    cos = tl.load(row + offs_f * stride_cr, mask=mask_f, other=1.0).to(tl.float32)
    sin = tl.load(row + (HALF + offs_f) * stride_cr, mask=mask_f, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr + token * stride_qt, stride_qh, stride_qd, cos, sin, offs_f, mask_f,
                  NUM_Q, Q_PAD, HALF)
    _rotate_heads(k_ptr + token * stride_kt, stride_kh, stride_kd, cos, sin, offs_f, mask_f,
                  NUM_K, K_PAD, HALF)


def rotary_triton(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rotary_reference`` computed in place: rotates ``q`` ``[T, Hq, D]`` and ``k`` ``[T, Hk, D]`` (which
    may be strided views, e.g. of a fused QKV output) and returns them.

    ``positions`` must index rows of ``cos_sin_cache``; that is not checked on the host, which would
    need a device sync.
    """
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q/k: expected [T, Hq, D] and [T, Hk, D] (same T and D), "
                         f"got {tuple(q.shape)} and {tuple(k.shape)}")
    if positions.dim() != 1 or positions.shape[0] != q.shape[0]:
        raise ValueError(f"positions: expected [{q.shape[0]}], got {tuple(positions.shape)}")
    if cos_sin_cache.dim() != 2:
        raise ValueError(f"cos_sin_cache: expected [max_positions, R], got {tuple(cos_sin_cache.shape)}")
    rotary_dim = cos_sin_cache.shape[1]
    if rotary_dim % 2 or not 0 < rotary_dim <= q.shape[2]:
        raise ValueError(f"cos_sin_cache: R={rotary_dim} must be even and in (0, head_dim={q.shape[2]}]")
    for name, tensor in (("q", q), ("k", k), ("cos_sin_cache", cos_sin_cache)):
        check_dtype(name, tensor)
    if q.shape[0] == 0:
        return q, k
    half = rotary_dim // 2
    _rotary_kernel[(q.shape[0],)](
        q, k, positions, cos_sin_cache, *q.stride(), *k.stride(), *cos_sin_cache.stride(),
        NUM_Q=q.shape[1], NUM_K=k.shape[1], Q_PAD=pow2_at_least(q.shape[1]), K_PAD=pow2_at_least(k.shape[1]),
        HALF=half, HALF_PAD=pow2_at_least(half), num_warps=4,
    )
    return q, k
