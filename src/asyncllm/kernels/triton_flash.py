"""Device-side building blocks shared by the paged attention kernels.

``paged_rows`` turns token indices into cache offsets through a block table; ``attend_tile`` is one
step of the online ("flash") softmax. Scores live in the log2 domain: callers fold ``log2(e)`` into
the softmax scale and use ``exp2``. Running state per query row: ``m`` (max score seen, -inf before
any key), ``l`` (sum of ``exp2(score - m)``) and ``acc`` (the matching weighted sum of values, fp32).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def paged_rows(table_row_ptr, offs_n, mask_n, stride_block, stride_slot, BLOCK_SIZE: tl.constexpr):
    """Offset (in elements) of token ``offs_n``'s row in a ``[num_blocks, block_size, Hk, D]`` cache.

    Token ``t`` lives in block ``table[t // BLOCK_SIZE]`` at slot ``t % BLOCK_SIZE``. Masked tokens
    resolve to block 0 and must stay masked when the row is loaded.
    """
    block = tl.load(table_row_ptr + offs_n // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)
    return block * stride_block + (offs_n % BLOCK_SIZE).to(tl.int64) * stride_slot


@triton.jit
def attend_tile(q, k, v, valid, m_i, l_i, acc, qk_scale,
                PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Fold one KV tile into the running softmax state of every query row.

    ``q`` ``[M, D]``, ``k``/``v`` ``[N, D]``, ``valid`` ``[M, N]`` (which keys each row may see).
    A row that has seen no valid key keeps ``m = -inf``, ``l = 0``, ``acc = 0`` (never NaN).
    """
    if UPCAST:
        q = q.to(tl.float32)
        k = k.to(tl.float32)
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
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
