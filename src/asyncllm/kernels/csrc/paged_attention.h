/* Decode attention of one (sequence, KV head) pair over its paged context, shared by the CPU kernels.
 *
 * q_pair     the pair's groups query rows (heads / kv_heads), head_dim floats each, contiguous
 * k_cache    [num_blocks, block_size, kv_heads, head_dim] (v_cache the same); table: the sequence's block ids
 * len        context length (>= 1); weights: groups * max_len floats of scratch (max_len >= len)
 * out_pair   the pair's groups output rows, overwritten
 *
 * Scores each cached token once per query row, normalises with the row maximum subtracted, then
 * accumulates V rows in token order. Indices are trusted: callers validate them.
 */
#ifndef ASYNCLLM_PAGED_ATTENTION_H
#define ASYNCLLM_PAGED_ATTENTION_H

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

static void attend_pair(const float *q_pair, const float *k_cache, const float *v_cache, const int32_t *table,
                        int64_t len, int64_t h, int64_t groups, int64_t kv_heads, int64_t head_dim,
                        int64_t block_size, int64_t max_len, float scale, float *weights, float *out_pair)
{
    const int64_t token_stride = kv_heads * head_dim, block_stride = block_size * token_stride;
    for (int64_t start = 0; start < len; start += block_size) {
        const float *k_block = k_cache + (int64_t)table[start / block_size] * block_stride + h * head_dim;
        const int64_t n = len - start < block_size ? len - start : block_size;
        for (int64_t g = 0; g < groups; ++g) {
            const float *qg = q_pair + g * head_dim;
            float *s = weights + g * max_len + start;
            for (int64_t j = 0; j < n; ++j) {
                const float *k = k_block + j * token_stride;
                float dot = 0.f;
#pragma omp simd reduction(+ : dot)
                for (int64_t d = 0; d < head_dim; ++d) dot += qg[d] * k[d];
                s[j] = dot * scale;
            }
        }
    }
    for (int64_t g = 0; g < groups; ++g) {
        float *s = weights + g * max_len;
        float top = -FLT_MAX;
        for (int64_t j = 0; j < len; ++j) top = s[j] > top ? s[j] : top;
        float total = 0.f;
#pragma omp simd reduction(+ : total)
        for (int64_t j = 0; j < len; ++j) {
            s[j] = expf(s[j] - top);
            total += s[j];
        }
        const float inv = 1.f / total;
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) s[j] *= inv;
        memset(out_pair + g * head_dim, 0, (size_t)head_dim * sizeof(float));
    }
    for (int64_t start = 0; start < len; start += block_size) {
        const float *v_block = v_cache + (int64_t)table[start / block_size] * block_stride + h * head_dim;
        const int64_t n = len - start < block_size ? len - start : block_size;
        for (int64_t g = 0; g < groups; ++g) {
            const float *s = weights + g * max_len + start;
            float *o = out_pair + g * head_dim;
            for (int64_t j = 0; j < n; ++j) {
                const float *v = v_block + j * token_stride;
                const float w = s[j];
#pragma omp simd
                for (int64_t d = 0; d < head_dim; ++d) o[d] += w * v[d];
            }
        }
    }
}

#endif
