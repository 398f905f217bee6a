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
 * Anchored keys (k_anchors not NULL: 4-bit keys, kernels/kv_quant.py): k_anchors [num_blocks, kv_heads,
 * head_dim] float32 holds the keys of each block's first token (offset 0, written by store_kv_rows when that
 * token is); every token stores its residual key - anchor, quantized as above but in groups of k_group
 * consecutive dimensions (head_dim / k_group pairs per row: k_scales [num_blocks, block_size, kv_heads,
 * head_dim / k_group, 2]). A key reads back as code * scale[d / k_group] + zero[d / k_group] + anchor[d];
 * attend_pair scores q . anchor once per block and query row and adds it to q . residual. Without anchors,
 * k_group is head_dim (one pair per row) and ignored for float32 caches.
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
    float *k_anchors;   /* [num_blocks, kv_heads, head_dim] or NULL (see the header comment) */
    int64_t k_group;    /* key dimensions per (scale, zero) pair: head_dim unless anchored */
    int64_t block_size; /* tokens per block (store_kv_rows finds each block's first slot with it) */
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

/* An anchored key row's residual read back from int4 codes with a (scale, zero) pair per `group` dimensions
 * (scale_zero [head_dim / group, 2]): the codes unpacked as in dequantize_kv_row, then each group scaled in
 * place (a constant 16-wide inner loop where group == 16, the usual case: it vectorises). */
static inline void dequantize_grouped_row(const uint8_t *codes, const float *scale_zero, int64_t head_dim,
                                          int64_t group, float *out)
{
    const int64_t half = head_dim / 2;
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) out[i] = (float)(codes[i] & 15);
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) out[half + i] = (float)(codes[i] >> 4);
    if (group == 16) {
        for (int64_t g = 0; g < head_dim / 16; ++g) {
            const float scale = scale_zero[2 * g], zero = scale_zero[2 * g + 1];
            float *o = out + 16 * g;
#pragma omp simd
            for (int64_t i = 0; i < 16; ++i) o[i] = o[i] * scale + zero;
        }
        return;
    }
    for (int64_t g = 0; g < head_dim / group; ++g) {
        const float scale = scale_zero[2 * g], zero = scale_zero[2 * g + 1];
        float *o = out + group * g;
        for (int64_t i = 0; i < group; ++i) o[i] = o[i] * scale + zero;
    }
}

/* Quantize one head's row x [head_dim] into codes and a (scale, zero) pair per `group` consecutive dimensions
 * (scale_zero [head_dim / group, 2]; group == head_dim: the row's one pair; see the header comment). */
static inline void quantize_kv_row(const float *x, int64_t head_dim, int64_t bits, int64_t group, uint8_t *codes,
                                   float *scale_zero)
{
    const float qmax = (float)((1 << bits) - 1);
    uint8_t c[512];
    for (int64_t begin = 0; begin < head_dim; begin += group, scale_zero += 2) {
        const float *xg = x + begin;
        float lo = xg[0], hi = xg[0];
        for (int64_t d = 1; d < group; ++d) {
            lo = xg[d] < lo ? xg[d] : lo;
            hi = xg[d] > hi ? xg[d] : hi;
        }
        const float scale = (hi - lo) / qmax;
        scale_zero[0] = scale;
        scale_zero[1] = lo;
        for (int64_t d = 0; d < group; ++d) {
            float code = scale > 0.f ? floorf((xg[d] - lo) / scale + 0.5f) : 0.f;
            code = code < 0.f ? 0.f : (code > qmax ? qmax : code);
            c[begin + d] = (uint8_t)code;
        }
    }
    if (bits == 8) {
        memcpy(codes, c, (size_t)head_dim);
    } else {
        for (int64_t i = 0; i < head_dim / 2; ++i) codes[i] = (uint8_t)(c[i] | (c[head_dim / 2 + i] << 4));
    }
}

/* Write one token's keys and values [kv_heads * head_dim] (floats) to cache slot `slot`; head_dim <= 512.
 * Anchored keys: a token at its block's first slot first becomes the block's anchor; every token then stores
 * its residual against its block's anchor (so tokens of one block must be written first slot first, as
 * decoding does). */
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
    const int64_t k_group = kv->k_group, k_pairs = head_dim / k_group;
    float *anchors = NULL;
    if (kv->k_anchors != NULL) {
        anchors = kv->k_anchors + (slot / kv->block_size) * kv_heads * head_dim;
        if (slot % kv->block_size == 0) memcpy(anchors, k_row, (size_t)(kv_heads * head_dim) * sizeof(float));
    }
    float residual[512];
    for (int64_t h = 0; h < kv_heads; ++h) {
        const int64_t at = slot * kv_heads + h;
        const float *k = k_row + h * head_dim;
        if (anchors != NULL) {
            const float *a = anchors + h * head_dim;
            for (int64_t d = 0; d < head_dim; ++d) residual[d] = k[d] - a[d];
            k = residual;
        }
        quantize_kv_row(k, head_dim, kv->k_bits, k_group, (uint8_t *)kv->k + at * k_row_bytes,
                        kv->k_scales + 2 * k_pairs * at);
        quantize_kv_row(v_row + h * head_dim, head_dim, kv->v_bits, head_dim, (uint8_t *)kv->v + at * v_row_bytes,
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
        if (kv->k_anchors != NULL) {  /* residual rows read back once each; q . anchor once per block */
            const int64_t k_pairs = head_dim / kv->k_group;
            for (int64_t j = j0; j < n; ++j) {
                dequantize_grouped_row((const uint8_t *)(k_block + j * k_token_stride),
                                       kv->k_scales + 2 * k_pairs * ((block * block_size + j) * kv_heads + h),
                                       head_dim, kv->k_group, row);
                for (int64_t g = 0; g < groups; ++g) {
                    const float *qg = q_pair + g * head_dim;
                    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
                    for (int64_t d = 0; d < head_dim; ++d) dot += qg[d] * row[d];
                    weights[g * max_len + start + j] = dot;
                }
            }
            const float *anchor = kv->k_anchors + (block * kv_heads + h) * head_dim;
            for (int64_t g = 0; g < groups; ++g) {
                const float *qg = q_pair + g * head_dim;
                float base = 0.f;
#pragma omp simd reduction(+ : base)
                for (int64_t d = 0; d < head_dim; ++d) base += qg[d] * anchor[d];
                float *s = weights + g * max_len + start;
                for (int64_t j = j0; j < n; ++j) s[j] = capped_score(s[j] + base, scale, softcap);
            }
            continue;
        }
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
