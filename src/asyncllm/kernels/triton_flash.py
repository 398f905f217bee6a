"""Device-side building blocks shared by the paged attention kernels.

``load_kv_tile`` reads a tile of keys or values through a block table (token ``t`` lives in block
``table[t // BLOCK_SIZE]`` at slot ``t % BLOCK_SIZE``; masked tokens resolve to block 0 and read 0),
dequantizing an int8 / int4 cache's codes in registers (``kernels.kv_quant``; 4-bit keys with their
grouped pairs and their block's anchor). ``attend_tile`` is one
step of the online ("flash") softmax. Scores live in the log2 domain: callers fold ``log2(e)`` into
the softmax scale and use ``exp2``. Running state per query row: ``m`` (max score seen, -inf before
any key), ``l`` (sum of ``exp2(score - m)``) and ``acc`` (the matching weighted sum of values, fp32).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_kv_tile(cache_ptr, scales_ptr, anchors_ptr, table_row_ptr, offs_n, mask_n, offs_d, mask_d, head,
                 stride_cb, stride_cs, stride_ch, stride_cd, stride_sb, stride_ss, stride_sh, stride_sg,
                 stride_ab, stride_ah,
                 BLOCK_SIZE: tl.constexpr, BITS: tl.constexpr, HALF: tl.constexpr, GROUP: tl.constexpr,
                 ANCHORED: tl.constexpr):
    """Tile ``[N, D]`` of one KV head's keys or values for tokens ``offs_n`` (masked rows and dims read 0).

    ``BITS`` (the width of this tensor's codes: a cache's keys and values may differ) 0: the cache's own
    values. 8 / 4: ``uint8`` codes (int4: dimension ``d`` in byte ``d % HALF``, low
    nibble for ``d < HALF``, high nibble after; ``HALF`` = head_dim / 2) read back as ``code * scale + zero``
    with each token's pair from ``scales_ptr``, in float32. ``GROUP``: dimensions per ``(scale, zero)``
    pair, ``head_dim`` (``2 * HALF``) for one pair per row; fewer: dimension ``d`` takes pair ``d // GROUP``,
    ``stride_sg`` apart. ``ANCHORED`` (4-bit keys): each value adds ``anchors[block, head, d]`` of its token's
    block (``anchors_ptr`` ``[num_blocks, Hk, D]``, unit stride last).
    """
    block = tl.load(table_row_ptr + offs_n // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)
    slot = (offs_n % BLOCK_SIZE).to(tl.int64)
    mask = mask_n[:, None] & mask_d[None, :]
    base = block * stride_cb + slot * stride_cs + head * stride_ch
    if BITS == 0:
        tile = tl.load(cache_ptr + base[:, None] + offs_d[None, :] * stride_cd, mask=mask, other=0.0)
    else:
        if BITS == 8:
            codes = tl.load(cache_ptr + base[:, None] + offs_d[None, :] * stride_cd, mask=mask, other=0)
        else:
            packed = tl.load(cache_ptr + base[:, None] + (offs_d % HALF)[None, :] * stride_cd, mask=mask, other=0)
            codes = (packed.to(tl.int32) >> ((offs_d // HALF) * 4)[None, :]) & 15
        pair = block * stride_sb + slot * stride_ss + head * stride_sh
        if GROUP >= 2 * HALF:
            scale = tl.load(scales_ptr + pair, mask=mask_n, other=0.0).to(tl.float32)
            zero = tl.load(scales_ptr + pair + 1, mask=mask_n, other=0.0).to(tl.float32)
            tile = codes.to(tl.float32) * scale[:, None] + zero[:, None]
        else:
            pairs = pair[:, None] + (offs_d // GROUP)[None, :] * stride_sg
            scale = tl.load(scales_ptr + pairs, mask=mask, other=0.0).to(tl.float32)
            zero = tl.load(scales_ptr + pairs + 1, mask=mask, other=0.0).to(tl.float32)
            tile = codes.to(tl.float32) * scale + zero
        if ANCHORED:
            anchor = tl.load(anchors_ptr + (block * stride_ab + head * stride_ah)[:, None] + offs_d[None, :],
                             mask=mask, other=0.0)
            tile = tile + anchor.to(tl.float32)
        tile = tl.where(mask, tile, 0.0)
    return tile


@triton.jit
def attend_tile(q, k, v, valid, m_i, l_i, acc, qk_scale, softcap,
                PRECISION: tl.constexpr, UPCAST: tl.constexpr, SOFTCAP: tl.constexpr):
    """Fold one KV tile into the running softmax state of every query row.

    ``q`` ``[M, D]``, ``k``/``v`` ``[N, D]``, ``valid`` ``[M, N]`` (which keys each row may see).
    A row that has seen no valid key keeps ``m = -inf``, ``l = 0``, ``acc = 0`` (never NaN).
    With ``SOFTCAP``, scores are soft-capped: ``softcap`` is the cap times ``log2(e)`` (the log2 domain), and
    a score ``s`` becomes ``softcap * tanh(s / softcap)``.
    """
    if UPCAST:
        q = q.to(tl.float32)
        k = k.to(tl.float32)
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if SOFTCAP:
        # tanh(x) = 1 - 2 / (exp(2x) + 1): saturates to +-1 without overflow trouble
        scores = softcap * (1.0 - 2.0 / (tl.math.exp2(scores * (2.0 * 1.4426950408889634 / softcap)) + 1.0))
    scores = tl.where(valid, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_ref)
    p = tl.math.exp2(scores - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    p = p.to(v.dtype)
    if UPCAST:
        p = p.to(tl.float32)
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
    return m_new, l_i, acc
