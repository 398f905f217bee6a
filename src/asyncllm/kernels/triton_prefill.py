"""Paged prefill/extend attention in Triton: varlen, causal, over cached prefix blocks.

Sequence ``i`` has ``n`` new tokens (rows ``query_start_loc[i]:query_start_loc[i+1]`` of ``q``) at
positions ``L - n .. L - 1`` of its context of ``L = seq_lens[i]`` tokens, all already in the cache.
One program serves ``BLOCK_M`` rows of the flattened ``(token, query head in group)`` space of one
(sequence, KV head): row ``r`` is token ``r // G`` and query head ``kv_head * G + r % G`` for
``G = Hq // Hk``, so each key/value tile is read once for the whole group. Keys visible to every row
of the program are swept without a causal mask; the remaining tiles up to the last row's position are
masked per row (key ``<=`` the row's position).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from asyncllm.kernels.kv_quant import KVBits
from asyncllm.kernels.metadata import AttentionMetadata, AttentionOptions
from asyncllm.kernels.triton_decode import softcap_log2, window_of
from asyncllm.kernels.triton_flash import attend_tile, load_kv_tile
from asyncllm.kernels.triton_launch import (
    LOG2E,
    MIN_DOT_DIM,
    cache_operands,
    check_paged_inputs,
    dot_precision,
    pow2_at_least,
    upcast_dot,
)


@dataclass(frozen=True)
class PrefillLaunch:
    """Tile sizes of one prefill launch: ``block_m`` query rows by ``block_n`` keys (powers of two >= 16)."""

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value < MIN_DOT_DIM or value & (value - 1):
                raise ValueError(f"{name}: must be a power of two >= {MIN_DOT_DIM}, got {value}")


def default_prefill_launch(head_dim: int, dtype: torch.dtype) -> PrefillLaunch:
    """64x64 tiles; 32-key tiles where fp32 or very wide heads would crowd shared memory."""
    wide = pow2_at_least(head_dim) >= 256 or (dtype == torch.float32 and head_dim > 64)
    return PrefillLaunch(block_m=64, block_n=32 if wide else 64)


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, k_scales_ptr, v_scales_ptr, k_anchors_ptr, block_tables_ptr, seq_lens_ptr,
    query_start_ptr, out_ptr,
    qk_scale, softcap, window,
    stride_qt, stride_qh, stride_qd,
    stride_cb, stride_cs, stride_ch, stride_cd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ksb, stride_kss, stride_ksh, stride_ksg,
    stride_vsb, stride_vss, stride_vsh,
    stride_ab, stride_ah,
    stride_bt,
    stride_ot, stride_oh, stride_od,
    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr,
    K_GROUP: tl.constexpr, K_ANCHORED: tl.constexpr,
    SOFTCAP: tl.constexpr, WINDOW: tl.constexpr,
):
    tile_m = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_ptr + seq)
    num_new = tl.load(query_start_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    first_row = tile_m * BLOCK_M
    if first_row >= num_new * GROUPS:
        return

    offs_m = first_row + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    mask_m = offs_m < num_new * GROUPS
    mask_d = offs_d < HEAD_DIM
    token = offs_m // GROUPS
    heads = kv_head * GROUPS + offs_m % GROUPS
    q_rows = (q_start + token).to(tl.int64) * stride_qt + heads * stride_qh
    q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :] * stride_qd,
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)

    context = seq_len - num_new
    positions = context + token
    first_pos = context + first_row // GROUPS
    last_pos = context + tl.minimum((first_row + BLOCK_M - 1) // GROUPS, num_new - 1)
    shared_end = ((first_pos + 1) // BLOCK_N) * BLOCK_N

    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    kv_head64 = kv_head.to(tl.int64)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    band_start = shared_end
    if WINDOW:
        # Sliding window: each row sees keys in (position - window, position]; no tile is shared by every
        # row, and the band starts at the tile holding the first row's oldest visible key.
        band_start = (tl.maximum(first_pos - window + 1, 0) // BLOCK_N) * BLOCK_N
        shared_end = band_start * 0
    # Whole tiles at or before the first row's position: every row sees every key.
    for tile in range(0, shared_end, BLOCK_N):
        offs_n = tile + tl.arange(0, BLOCK_N)
        all_n = offs_n >= 0
        k = load_kv_tile(k_cache_ptr, k_scales_ptr, k_anchors_ptr, table_row, offs_n, all_n, offs_d, mask_d,
                         kv_head64, stride_cb, stride_cs, stride_ch, stride_cd,
                         stride_ksb, stride_kss, stride_ksh, stride_ksg, stride_ab, stride_ah,
                         BLOCK_SIZE, K_BITS, HEAD_DIM // 2, K_GROUP, K_ANCHORED).to(q_ptr.dtype.element_ty)
        v = load_kv_tile(v_cache_ptr, v_scales_ptr, v_scales_ptr, table_row, offs_n, all_n, offs_d, mask_d,
                         kv_head64, stride_vb, stride_vs, stride_vh, stride_vd,
                         stride_vsb, stride_vss, stride_vsh, 0, 0, 0,
                         BLOCK_SIZE, V_BITS, HEAD_DIM // 2, HEAD_DIM, False).to(q_ptr.dtype.element_ty)
        valid = (offs_m[:, None] >= 0) & all_n[None, :]
        m_i, l_i, acc = attend_tile(q, k, v, valid, m_i, l_i, acc, qk_scale, softcap, PRECISION, UPCAST, SOFTCAP)
    # The diagonal band: key visible iff it is not after the row's position.
    for tile in range(band_start, last_pos + 1, BLOCK_N):
        offs_n = tile + tl.arange(0, BLOCK_N)
        mask_n = offs_n <= last_pos
        k = load_kv_tile(k_cache_ptr, k_scales_ptr, k_anchors_ptr, table_row, offs_n, mask_n, offs_d, mask_d,
                         kv_head64, stride_cb, stride_cs, stride_ch, stride_cd,
                         stride_ksb, stride_kss, stride_ksh, stride_ksg, stride_ab, stride_ah,
                         BLOCK_SIZE, K_BITS, HEAD_DIM // 2, K_GROUP, K_ANCHORED).to(q_ptr.dtype.element_ty)
        v = load_kv_tile(v_cache_ptr, v_scales_ptr, v_scales_ptr, table_row, offs_n, mask_n, offs_d, mask_d,
                         kv_head64, stride_vb, stride_vs, stride_vh, stride_vd,
                         stride_vsb, stride_vss, stride_vsh, 0, 0, 0,
                         BLOCK_SIZE, V_BITS, HEAD_DIM // 2, HEAD_DIM, False).to(q_ptr.dtype.element_ty)
        valid = (offs_n[None, :] <= positions[:, None]) & mask_n[None, :]
        if WINDOW:
            valid = valid & (offs_n[None, :] > positions[:, None] - window)
        m_i, l_i, acc = attend_tile(q, k, v, valid, m_i, l_i, acc, qk_scale, softcap, PRECISION, UPCAST, SOFTCAP)

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    o_rows = (q_start + token).to(tl.int64) * stride_ot + heads * stride_oh
    tl.store(out_ptr + o_rows[:, None] + offs_d[None, :] * stride_od, out.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    launch: PrefillLaunch | None = None,
    *,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    bits: KVBits | None = None,
    anchors: torch.Tensor | None = None,
    options: AttentionOptions | None = None,
) -> torch.Tensor:
    """``paged_attention_reference`` for any batch (prefill, extend, decode rows mixed in); a quantized
    cache passes its ``bits`` (key and value widths), (key, value) ``scales`` and, with 4-bit keys, the
    blocks' key ``anchors`` (see ``check_paged_inputs``).

    Grids come from host ints in ``meta``; the device is never synchronised. ``meta.max_query_len``
    only has to bound the true query lengths: programs past a sequence's rows exit at once. ``options``: a
    sliding window (tiles wholly before a program's window are skipped) and soft-capping.
    """
    num_heads, num_kv_heads, head_dim = check_paged_inputs(q, k_cache, v_cache, meta, scales, bits, anchors)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if meta.num_seqs == 0 or q.shape[0] == 0:
        return out
    launch = launch or default_prefill_launch(head_dim, q.dtype)
    groups = num_heads // num_kv_heads
    grid = (triton.cdiv(meta.max_query_len * groups, launch.block_m), meta.num_seqs, num_kv_heads)
    pointers, scale_strides, key_scheme = cache_operands(k_cache, v_cache, scales, bits, anchors, head_dim)
    _prefill_kernel[grid](
        q, k_cache, v_cache, *pointers, meta.block_tables, meta.seq_lens, meta.query_start_loc, out,
        scale * LOG2E, softcap_log2(options), window_of(options),
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *scale_strides,
        meta.block_tables.stride(0), *out.stride(),
        GROUPS=groups, HEAD_DIM=head_dim, D_PAD=pow2_at_least(head_dim, MIN_DOT_DIM),
        BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, BLOCK_SIZE=k_cache.shape[1],
        PRECISION=dot_precision(q.dtype), UPCAST=upcast_dot(q.dtype),
        K_BITS=0 if bits is None else bits.key, V_BITS=0 if bits is None else bits.value,
        **key_scheme,
        SOFTCAP=softcap_log2(options) > 0, WINDOW=window_of(options) > 0,
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )
    return out
