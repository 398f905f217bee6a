/* Paged decode attention on CPU: one query token per sequence over its cached context, read in place
 * through the block table (no gathered copy of K/V).
 *
 * Layouts (C-contiguous):
 *   q        [batch, heads, head_dim] float32    already rotated; rows of one sequence contiguous, sequences
 *                                                q_stride floats apart (a slice of a fused QKV output)
 *   kv       the layer's paged cache (paged_kv, paged_attention.h: float32, or int8 / int4 codes with scales)
 *   tables   [batch, width] int32                block ids, only the first ceil(len / block_size) read
 *   lens     [batch] int32                       context length of each sequence, 1 <= len <= width * block_size
 *   out      [batch, heads, head_dim] float32
 *   scratch  [batch * kv_heads, heads / kv_heads, max_len] float32 (softmax weights)
 *
 * window and softcap: a sliding window (the last `window` tokens, 0: all) and attention-logit soft-capping
 * (0: none), as attend_pair reads them.
 *
 * Query head j reads KV head j / (heads / kv_heads) (grouped-query attention). Work is split over
 * (sequence, KV head) pairs with OpenMP (attend_pair, paged_attention.h). The caller validates every
 * shape and index: this code trusts them.
 */
#include <stdint.h>

#include "paged_attention.h"

void asyncllm_paged_decode_attention(const float *q, const paged_kv *kv, const int32_t *tables, const int32_t *lens,
                                     float *out, float *scratch, int64_t batch, int64_t heads, int64_t kv_heads,
                                     int64_t head_dim, int64_t block_size, int64_t width, int64_t max_len,
                                     int64_t q_stride, float scale, int64_t window, float softcap,
                                     int32_t threads)
{
    const int64_t groups = heads / kv_heads;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t pair = 0; pair < batch * kv_heads; ++pair) {
        const int64_t b = pair / kv_heads, h = pair % kv_heads;
        attend_pair(q + b * q_stride + h * groups * head_dim, kv, tables + b * width, lens[b], h, groups, kv_heads,
                    head_dim, block_size, max_len, scale, window, softcap, scratch + pair * groups * max_len,
                    out + (b * heads + h * groups) * head_dim);
    }
}
