/* The paged KV cache as the CPU kernels see it, and decode attention of one (sequence, KV head) pair over it.
 *
 * A cache (paged_kv) holds, per layer, keys and values [num_blocks, block_size, kv_heads, head_dim], each
 * stored at its own width (k_bits for keys, v_bits for values; both 0 or both quantized):
 *   bits == 0   float32 values;
 *   bits == 8   uint8 codes, one per value;
 *   bits == 4   uint8 bytes of two codes each: dimension i in the low nibble, i + head_dim / 2 in the high
 *               one (a row is head_dim / 2 bytes);
 * and, when quantized, k_scales / v_scales [num_blocks, block_size, kv_heads, 2] float32 holding each token's
 * and head's (scale, zero): value = code * scale + zero. Codes are written by store_kv_rows (asymmetric,
 * per token and head: zero = the row minimum, scale = (max - min) / (2^bits - 1), code = round((x - zero) /
 * scale) clamped to [0, 2^bits - 1]) and read in place by attend_pair: never dequantized into a copy.
 *
 * attend_pair:
 * q_pair     the pair's groups query rows (heads / kv_heads), head_dim floats each, contiguous
 * table      the sequence's block ids; len: context length (>= 1)
 * weights    groups * max_len floats of scratch (max_len >= len)
 * out_pair   the pair's groups output rows, overwritten
 * window     sliding window: the query (at position len - 1) sees only the last `window` tokens (0: all)
 * softcap    attention-logit soft-capping: each scaled score s becomes softcap * tanh(s / softcap) (0: none)
 *
 * Scores each cached token once per query row, normalises with the row maximum subtracted, then
 * accumulates V rows in token order. Over codes, each token's row is read back once into floats
 * (dequantize_kv_row: in registers and a stack row, never a copy of the cache) and used by every query row of
 * the group. Indices are trusted: callers validate them.
 */
#ifndef ASYNCLLM_PAGED_ATTENTION_H
#define ASYNCLLM_PAGED_ATTENTION_H

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    void *k;
    void *v;
    float *k_scales;
    float *v_scales;
    int64_t k_bits;
    int64_t v_bits;
} paged_kv;

/* Bytes of one token's row of one KV head stored at `bits` (0: float32). */
static inline int64_t kv_row_bytes(int64_t bits, int64_t head_dim)
{
    return bits == 0 ? head_dim * (int64_t)sizeof(float) : (bits == 8 ? head_dim : head_dim / 2);
}

/* One token's row of codes read back as floats, code * scale + zero: int8 one code per byte, int4 the low
 * nibbles as the first half of the row and the high nibbles as the second (contiguous passes: they vectorise). */
static inline void dequantize_kv_row(const uint8_t *codes, const float *scale_zero, int64_t head_dim, int64_t bits,
                                     float *out)
{
    const float scale = scale_zero[0], zero = scale_zero[1];
    if (bits == 8) {
#pragma omp simd
        for (int64_t d = 0; d < head_dim; ++d) out[d] = (float)codes[d] * scale + zero;
        return;
    }
    const int64_t half = head_dim / 2;
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) out[i] = (float)(codes[i] & 15) * scale + zero;
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) out[half + i] = (float)(codes[i] >> 4) * scale + zero;
}

/* Quantize one head's row x [head_dim] into codes and its (scale, zero) pair (see the header comment). */
static inline void quantize_kv_row(const float *x, int64_t head_dim, int64_t bits, uint8_t *codes, float *scale_zero)
{
    float lo = x[0], hi = x[0];
    for (int64_t d = 1; d < head_dim; ++d) {
        lo = x[d] < lo ? x[d] : lo;
        hi = x[d] > hi ? x[d] : hi;
    }
    const float qmax = (float)((1 << bits) - 1);
    const float scale = (hi - lo) / qmax;
    scale_zero[0] = scale;
    scale_zero[1] = lo;
    uint8_t c[512];
    for (int64_t d = 0; d < head_dim; ++d) {
        float code = scale > 0.f ? floorf((x[d] - lo) / scale + 0.5f) : 0.f;
        code = code < 0.f ? 0.f : (code > qmax ? qmax : code);
        c[d] = (uint8_t)code;
    }
    if (bits == 8) {
        memcpy(codes, c, (size_t)head_dim);
    } else {
        for (int64_t i = 0; i < head_dim / 2; ++i) codes[i] = (uint8_t)(c[i] | (c[head_dim / 2 + i] << 4));
    }
}

/* Write one token's keys and values [kv_heads * head_dim] (floats) to cache slot `slot`; head_dim <= 512. */
static inline void store_kv_rows(const paged_kv *kv, int64_t slot, const float *k_row, const float *v_row,
                                 int64_t kv_heads, int64_t head_dim)
{
    if (kv->k_bits == 0) {
        const int64_t width = kv_heads * head_dim;
        memcpy((float *)kv->k + slot * width, k_row, (size_t)width * sizeof(float));
        memcpy((float *)kv->v + slot * width, v_row, (size_t)width * sizeof(float));
        return;
    }
    const int64_t k_row_bytes = kv_row_bytes(kv->k_bits, head_dim), v_row_bytes = kv_row_bytes(kv->v_bits, head_dim);
    for (int64_t h = 0; h < kv_heads; ++h) {
        const int64_t at = slot * kv_heads + h;
        quantize_kv_row(k_row + h * head_dim, head_dim, kv->k_bits, (uint8_t *)kv->k + at * k_row_bytes,
                        kv->k_scales + 2 * at);
        quantize_kv_row(v_row + h * head_dim, head_dim, kv->v_bits, (uint8_t *)kv->v + at * v_row_bytes,
                        kv->v_scales + 2 * at);
    }
}

static inline float capped_score(float dot, float scale, float softcap)
{
    return softcap > 0.f ? softcap * tanhf(dot * scale / softcap) : dot * scale;
}

static void attend_pair(const float *q_pair, const paged_kv *kv, const int32_t *table, int64_t len, int64_t h,
                        int64_t groups, int64_t kv_heads, int64_t head_dim, int64_t block_size, int64_t max_len,
                        float scale, int64_t window, float softcap, float *weights, float *out_pair)
{
    const int64_t first = (window > 0 && len > window) ? len - window : 0;
    const int64_t first_block_start = (first / block_size) * block_size;
    const int64_t k_bits = kv->k_bits, v_bits = kv->v_bits;
    const int64_t k_row_bytes = kv_row_bytes(k_bits, head_dim), v_row_bytes = kv_row_bytes(v_bits, head_dim);
    const int64_t k_token_stride = kv_heads * k_row_bytes, k_block_stride = block_size * k_token_stride;
    const int64_t v_token_stride = kv_heads * v_row_bytes, v_block_stride = block_size * v_token_stride;
    float row[512];  /* one token's keys or values read back from codes (quantized caches: head_dim <= 512) */
    for (int64_t start = first_block_start; start < len; start += block_size) {
        const int64_t block = (int64_t)table[start / block_size];
        const char *k_block = (const char *)kv->k + block * k_block_stride + h * k_row_bytes;
        const int64_t n = len - start < block_size ? len - start : block_size;
        const int64_t j0 = first > start ? first - start : 0;
        if (k_bits != 0) {  /* each token's row read back once, then scored by every query row of the group */
            for (int64_t j = j0; j < n; ++j) {
                dequantize_kv_row((const uint8_t *)(k_block + j * k_token_stride),
                                  kv->k_scales + 2 * ((block * block_size + j) * kv_heads + h), head_dim, k_bits,
                                  row);
                for (int64_t g = 0; g < groups; ++g) {
                    const float *qg = q_pair + g * head_dim;
                    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
                    for (int64_t d = 0; d < head_dim; ++d) dot += qg[d] * row[d];
                    weights[g * max_len + start + j] = capped_score(dot, scale, softcap);
                }
            }
            continue;
        }
        for (int64_t g = 0; g < groups; ++g) {
            const float *qg = q_pair + g * head_dim;
            float *s = weights + g * max_len + start;
            for (int64_t j = j0; j < n; ++j) {
                const float *k = (const float *)(k_block + j * k_token_stride);
                float dot = 0.f;
#pragma omp simd reduction(+ : dot)
                for (int64_t d = 0; d < head_dim; ++d) dot += qg[d] * k[d];
                s[j] = capped_score(dot, scale, softcap);
            }
        }
    }
    for (int64_t g = 0; g < groups; ++g) {
        float *s = weights + g * max_len;
        float top = -FLT_MAX;
        for (int64_t j = first; j < len; ++j) top = s[j] > top ? s[j] : top;
        float total = 0.f;
#pragma omp simd reduction(+ : total)
        for (int64_t j = first; j < len; ++j) {
            s[j] = expf(s[j] - top);
            total += s[j];
        }
        const float inv = 1.f / total;
#pragma omp simd
        for (int64_t j = first; j < len; ++j) s[j] *= inv;
        memset(out_pair + g * head_dim, 0, (size_t)head_dim * sizeof(float));
    }
    for (int64_t start = first_block_start; start < len; start += block_size) {
        const int64_t block = (int64_t)table[start / block_size];
        const char *v_block = (const char *)kv->v + block * v_block_stride + h * v_row_bytes;
        const int64_t n = len - start < block_size ? len - start : block_size;
        const int64_t j0 = first > start ? first - start : 0;
        if (v_bits != 0) {
            for (int64_t j = j0; j < n; ++j) {
                dequantize_kv_row((const uint8_t *)(v_block + j * v_token_stride),
                                  kv->v_scales + 2 * ((block * block_size + j) * kv_heads + h), head_dim, v_bits,
                                  row);
                for (int64_t g = 0; g < groups; ++g) {
                    const float w = weights[g * max_len + start + j];
                    float *o = out_pair + g * head_dim;
#pragma omp simd
                    for (int64_t d = 0; d < head_dim; ++d) o[d] += w * row[d];
                }
            }
            continue;
        }
        for (int64_t g = 0; g < groups; ++g) {
            const float *s = weights + g * max_len + start;
            float *o = out_pair + g * head_dim;
            for (int64_t j = j0; j < n; ++j) {
                const float *v = (const float *)(v_block + j * v_token_stride);
                const float w = s[j];
#pragma omp simd
                for (int64_t d = 0; d < head_dim; ++d) o[d] += w * v[d];
            }
        }
    }
}

#endif
