"""Paged decode attention in Triton: split-KV ("flash decoding") plus a log-sum-exp merge.

One program serves one (sequence, KV head, split): the ``Hq // Hk`` query heads that share the KV head
are packed as the rows of one tile (padded to a power of two ``>= 16`` so ``tl.dot`` applies), so each
key/value tile is read from the cache once per KV head, not once per query head. A split covers
``split_len`` consecutive tokens (a multiple of the tile size); it writes its normalised partial output
and the log2-sum-exp of its scores, and the merge kernel combines the splits of each head. With a single
split the first kernel writes the final output directly and no merge runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from asyncllm.kernels.kv_quant import KVBits
from asyncllm.kernels.metadata import AttentionMetadata, AttentionOptions
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

MAX_SPLITS = 64
# Programs to aim for when sizing splits off-GPU (interpreter): few, since each runs serially.
CPU_TARGET_PROGRAMS = 8


@dataclass(frozen=True)
class DecodeLaunch:
    """Tile and split sizes of one decode launch.

    ``block_n``: tokens per KV tile (power of two, >= 16). ``num_splits``: splits per sequence, or
    ``None`` to size them from the batch (``plan_splits``). ``num_warps``/``num_stages``: Triton's.
    """

    block_n: int = 64
    num_splits: int | None = None
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        if self.block_n < MIN_DOT_DIM or self.block_n & (self.block_n - 1):
            raise ValueError(f"block_n: must be a power of two >= {MIN_DOT_DIM}, got {self.block_n}")
        if self.num_splits is not None and not 1 <= self.num_splits <= MAX_SPLITS:
            raise ValueError(f"num_splits: must be in [1, {MAX_SPLITS}], got {self.num_splits}")


def default_decode_launch(head_dim: int, dtype: torch.dtype) -> DecodeLaunch:
    """64-token tiles; 32 where fp32 or very wide heads would crowd shared memory."""
    wide = pow2_at_least(head_dim) >= 256 or (dtype == torch.float32 and head_dim > 64)
    return DecodeLaunch(block_n=32 if wide else 64)


def plan_splits(
    num_seqs: int, num_kv_heads: int, max_seq_len: int, block_n: int, target_programs: int,
    num_splits: int | None = None,
) -> tuple[int, int]:
    """Return ``(num_splits, split_len)`` covering ``max_seq_len`` tokens.

    Splits are added until ``num_seqs * num_kv_heads * num_splits`` reaches ``target_programs``, never
    more than one per tile nor more than ``MAX_SPLITS``. ``split_len`` is a multiple of ``block_n`` and
    ``num_splits * split_len >= max_seq_len`` with no split left empty for the longest sequence.
    """
    tiles = -(-max(max_seq_len, 1) // block_n)
    if num_splits is None:
        num_splits = -(-target_programs // max(num_seqs * num_kv_heads, 1))
    num_splits = max(1, min(num_splits, tiles, MAX_SPLITS))
    split_len = -(-tiles // num_splits) * block_n
    return -(-max(max_seq_len, 1) // split_len), split_len


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, k_scales_ptr, v_scales_ptr, k_anchors_ptr, block_tables_ptr, seq_lens_ptr,
    out_ptr, part_out_ptr, part_lse_ptr,
    qk_scale, softcap, window, split_len,
    stride_qt, stride_qh, stride_qd,
    stride_cb, stride_cs, stride_ch, stride_cd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ksb, stride_kss, stride_ksh, stride_ksg,
    stride_vsb, stride_vss, stride_vsh,
    stride_ab, stride_ah,
    stride_bt,
    stride_ot, stride_oh, stride_od,
    stride_pb, stride_ph, stride_ps,
    GROUPS: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, DIRECT: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr,
    K_GROUP: tl.constexpr, K_ANCHORED: tl.constexpr,
    SOFTCAP: tl.constexpr, WINDOW: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)
    if WINDOW:
        # the query sits at seq_len - 1 and sees the last `window` keys: skip what lies before them
        start = tl.maximum(start, seq_len - window)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, D_PAD)
    mask_g = offs_g < GROUPS
    mask_d = offs_d < HEAD_DIM
    heads = kv_head * GROUPS + offs_g
    q = tl.load(
        q_ptr + seq.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=mask_g[:, None] & mask_d[None, :], other=0.0,
    )

    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    kv_head64 = kv_head.to(tl.int64)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    for tile in range(start, end, BLOCK_N):
        offs_n = tile + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        k = load_kv_tile(k_cache_ptr, k_scales_ptr, k_anchors_ptr, table_row, offs_n, mask_n, offs_d, mask_d,
                         kv_head64, stride_cb, stride_cs, stride_ch, stride_cd,
                         stride_ksb, stride_kss, stride_ksh, stride_ksg, stride_ab, stride_ah,
                         BLOCK_SIZE, K_BITS, HEAD_DIM // 2, K_GROUP, K_ANCHORED).to(q_ptr.dtype.element_ty)
        v = load_kv_tile(v_cache_ptr, v_scales_ptr, v_scales_ptr, table_row, offs_n, mask_n, offs_d, mask_d,
                         kv_head64, stride_vb, stride_vs, stride_vh, stride_vd,
                         stride_vsb, stride_vss, stride_vsh, 0, 0, 0,
                         BLOCK_SIZE, V_BITS, HEAD_DIM // 2, HEAD_DIM, False).to(q_ptr.dtype.element_ty)
        valid = (offs_g[:, None] >= 0) & mask_n[None, :]
        m_i, l_i, acc = attend_tile(q, k, v, valid, m_i, l_i, acc, qk_scale, softcap, PRECISION, UPCAST, SOFTCAP)

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    if DIRECT:
        tl.store(
            out_ptr + seq.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
            out.to(out_ptr.dtype.element_ty), mask=mask_g[:, None] & mask_d[None, :],
        )
    else:
        part = seq.to(tl.int64) * stride_pb + heads * stride_ph + split * stride_ps
        tl.store(part_out_ptr + part[:, None] * D_PAD + offs_d[None, :], out, mask=mask_g[:, None])
        lse = tl.where(has_keys, m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=mask_g)


@triton.jit
def _decode_merge_kernel(
    part_out_ptr, part_lse_ptr, seq_lens_ptr, out_ptr,
    split_len, num_splits,
    stride_pb, stride_ph, stride_ps,
    stride_ot, stride_oh, stride_od,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, D_PAD)
    live = (offs_s < num_splits) & (offs_s * split_len < seq_len)
    part = seq.to(tl.int64) * stride_pb + head * stride_ph + offs_s * stride_ps
    lse = tl.load(part_lse_ptr + part, mask=live, other=float("-inf"))
    weights = tl.math.exp2(lse - tl.max(lse, 0))
    weights = tl.where(live, weights, 0.0)
    parts = tl.load(part_out_ptr + part[:, None] * D_PAD + offs_d[None, :], mask=live[:, None], other=0.0)
    out = tl.sum(parts * weights[:, None], 0) / tl.sum(weights, 0)
    tl.store(
        out_ptr + seq.to(tl.int64) * stride_ot + head * stride_oh + offs_d * stride_od,
        out.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM,
    )


def softcap_log2(options: AttentionOptions | None) -> float:
    """The soft-capping bound in the kernels' log2 score domain, 0.0 for none."""
    return 0.0 if options is None or options.softcap is None else options.softcap * LOG2E


def window_of(options: AttentionOptions | None) -> int:
    return 0 if options is None else options.sliding_window


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return CPU_TARGET_PROGRAMS


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    launch: DecodeLaunch | None = None,
    *,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    bits: KVBits | None = None,
    anchors: torch.Tensor | None = None,
    options: AttentionOptions | None = None,
) -> torch.Tensor:
    """``paged_attention_reference`` for a decode-only batch (row ``i`` of ``q`` is sequence ``i``'s
    single new token). Grids come from host ints in ``meta``; the device is never synchronised. A
    quantized cache passes its ``bits`` (key and value widths), (key, value) ``scales`` and, with 4-bit
    keys, the blocks' key ``anchors`` (see ``check_paged_inputs``).

    ``meta.max_seq_len`` only has to bound the true lengths in ``meta.seq_lens`` (splits past a
    sequence's end are empty and weigh nothing in the merge), so a launch sized for a maximum length,
    as a captured CUDA graph is, stays correct for any shorter batch. ``options``: a sliding window (splits
    start no earlier than the window's first key; wholly older ones are empty) and soft-capping.
    """
    num_heads, num_kv_heads, head_dim = check_paged_inputs(q, k_cache, v_cache, meta, scales, bits, anchors)
    if not meta.is_decode_only or q.shape[0] != meta.num_seqs:
        raise ValueError(f"q: decode needs one row per sequence ({meta.num_seqs}), got {q.shape[0]} rows "
                         f"with max_query_len={meta.max_query_len}")
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if meta.num_seqs == 0:
        return out
    launch = launch or default_decode_launch(head_dim, q.dtype)
    groups = num_heads // num_kv_heads
    d_pad = pow2_at_least(head_dim, MIN_DOT_DIM)
    num_splits, split_len = plan_splits(meta.num_seqs, num_kv_heads, meta.max_seq_len, launch.block_n,
                                        _target_programs(q.device), launch.num_splits)
    direct = num_splits == 1
    if direct:
        part_out = part_lse = out  # unused by the kernel when DIRECT
    else:
        part_out = torch.empty((meta.num_seqs, num_heads, num_splits, d_pad), dtype=torch.float32,
                               device=q.device)
        part_lse = torch.empty((meta.num_seqs, num_heads, num_splits), dtype=torch.float32, device=q.device)
    part_strides = (num_heads * num_splits, num_splits, 1)
    pointers, scale_strides, key_scheme = cache_operands(k_cache, v_cache, scales, bits, anchors, head_dim)
    _decode_split_kernel[(meta.num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, *pointers, meta.block_tables, meta.seq_lens, out, part_out, part_lse,
        scale * LOG2E, softcap_log2(options), window_of(options), split_len,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *scale_strides,
        meta.block_tables.stride(0), *out.stride(),
        *part_strides,
        GROUPS=groups, GROUP_PAD=pow2_at_least(groups, MIN_DOT_DIM), HEAD_DIM=head_dim, D_PAD=d_pad,
        BLOCK_N=launch.block_n, BLOCK_SIZE=k_cache.shape[1], DIRECT=direct,
        PRECISION=dot_precision(q.dtype), UPCAST=upcast_dot(q.dtype),
        K_BITS=0 if bits is None else bits.key, V_BITS=0 if bits is None else bits.value,
        **key_scheme,
        SOFTCAP=softcap_log2(options) > 0, WINDOW=window_of(options) > 0,
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )
    if not direct:
        _decode_merge_kernel[(meta.num_seqs, num_heads)](
            part_out, part_lse, meta.seq_lens, out, split_len, num_splits, *part_strides, *out.stride(),
            HEAD_DIM=head_dim, D_PAD=d_pad, SPLITS_PAD=pow2_at_least(num_splits, 2), num_warps=4,
        )
    return out
