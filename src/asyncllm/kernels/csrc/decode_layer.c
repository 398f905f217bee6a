/* One Llama decoder layer for a decode step of a few rows (sequences) on CPU, in one OpenMP region.
 *
 * At a few rows a layer is four weight-streaming GEMVs and ~20 small ops on a few hundred floats;
 * run as separate torch ops, the small ones cost more in dispatch than in arithmetic. Here the whole
 * layer is one call: residual += attention(rms_norm(residual)); residual += mlp(rms_norm(residual)).
 *
 * Layouts (float32, C-contiguous unless stated):
 *   residual   [rows, hidden]                  updated in place
 *   w_qkv      [hidden, (heads + 2 kv_heads) * head_dim]   K-major (input dimension first)
 *   w_o        [heads * head_dim, hidden]      K-major
 *   w_gate_up  [hidden, 2 * inter]             K-major, gate columns first
 *   w_down     [hidden, inter]                 row-major (output dimension first)
 *   biases     one per projection, length of its output, or NULL
 *   cos, sin   [rows, head_dim]: [cos | cos] and [-sin | sin] of each row's position (rotate-half)
 *   slots      [rows] int64: cache slot (block * block_size + offset) that receives this token's K/V
 *   kv         the layer's paged cache (paged_kv, paged_attention.h: float32, or int8 / int4 codes that
 *              store_kv_rows quantizes this token's K/V into); tables [rows, width] int32; lens [rows] int32
 *              (the context including this token)
 *   work       rows * (hidden + qkv_width + heads * head_dim + 3 * inter) + rows * heads * max_len floats
 *
 * Each GEMV splits its output columns into one contiguous range per thread, so every thread streams
 * its share of each weight row and no partial sums need combining. Phases are separated by barriers.
 * The caller validates shapes and indices: this code trusts them.
 *
 * asyncllm_decode_layer_quant is the same layer over weight-only quantized projections (PackedWeight
 * storage, see quant_gemv.h: output-major codes with per-group scales and biases, float32 or float16 per
 * projection as its half_scales says). Before each projection
 * the threads quantize its input rows to int8 blocks into the shared `prepared` buffer (at least
 * asyncllm_quant_prepared_bytes(rows, k, group_size) bytes for every projection's k and group size); after
 * a barrier each thread computes one contiguous range of the projection's output features.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "paged_attention.h"
#include "quant_gemv.h"

/* [lo, hi) of n columns for thread t of count, in multiples of 16 floats where possible. */
static void column_range(int64_t n, int t, int count, int64_t *lo, int64_t *hi)
{
    const int64_t units = (n + 15) / 16;
    const int64_t a = units * t / count, b = units * (t + 1) / count;
    *lo = a * 16 < n ? a * 16 : n;
    *hi = b * 16 < n ? b * 16 : n;
}

/* y[r, lo:hi] (+)= x[r, :] @ w[:, lo:hi] for a K-major w [k, n]; accumulate into y when add != 0. */
static void gemv_k_major(const float *x, const float *w, const float *bias, float *y, int64_t rows,
                         int64_t k, int64_t n, int64_t lo, int64_t hi, int add)
{
    for (int64_t r = 0; r < rows; ++r) {
        float *yr = y + r * n;
        if (!add) {
            if (bias) memcpy(yr + lo, bias + lo, (size_t)(hi - lo) * sizeof(float));
            else memset(yr + lo, 0, (size_t)(hi - lo) * sizeof(float));
        } else if (bias) {
            for (int64_t j = lo; j < hi; ++j) yr[j] += bias[j];
        }
    }
    int64_t i = 0;
    for (; i + 4 <= k; i += 4) {
        const float *w0 = w + i * n, *w1 = w0 + n, *w2 = w1 + n, *w3 = w2 + n;
        for (int64_t r = 0; r < rows; ++r) {
            const float *xr = x + r * k + i;
            const float a0 = xr[0], a1 = xr[1], a2 = xr[2], a3 = xr[3];
            float *yr = y + r * n;
#pragma omp simd
            for (int64_t j = lo; j < hi; ++j) yr[j] += a0 * w0[j] + a1 * w1[j] + a2 * w2[j] + a3 * w3[j];
        }
    }
    for (; i < k; ++i) {
        const float *wi = w + i * n;
        for (int64_t r = 0; r < rows; ++r) {
            const float a = x[r * k + i];
            float *yr = y + r * n;
#pragma omp simd
            for (int64_t j = lo; j < hi; ++j) yr[j] += a * wi[j];
        }
    }
}

/* y[r, lo:hi] += w[lo:hi, :] . x[r, :] (+ bias) for a row-major w [n, k]. */
static void gemv_row_major_add(const float *x, const float *w, const float *bias, float *y, int64_t rows,
                               int64_t k, int64_t n, int64_t lo, int64_t hi)
{
    for (int64_t j = lo; j < hi; ++j) {
        const float *wj = w + j * k;
        for (int64_t r = 0; r < rows; ++r) {
            const float *xr = x + r * k;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t i = 0; i < k; ++i) dot += wj[i] * xr[i];
            y[r * n + j] += dot + (bias ? bias[j] : 0.f);
        }
    }
}

static void rms_norm(const float *x, const float *weight, float *out, int64_t rows, int64_t hidden, float eps)
{
    for (int64_t r = 0; r < rows; ++r) {
        const float *xr = x + r * hidden;
        float squares = 0.f;
#pragma omp simd reduction(+ : squares)
        for (int64_t i = 0; i < hidden; ++i) squares += xr[i] * xr[i];
        const float inv = 1.f / sqrtf(squares / (float)hidden + eps);
#pragma omp simd
        for (int64_t i = 0; i < hidden; ++i) out[r * hidden + i] = xr[i] * inv * weight[i];
    }
}

/* Rotate-half rotary in place on count heads of x: x*cos + roll(x, D/2)*sin ([-sin | sin] layout). */
static void rotate(float *x, int64_t count, int64_t head_dim, const float *cos, const float *sin)
{
    const int64_t half = head_dim / 2;
    float tmp[512];
    for (int64_t h = 0; h < count; ++h) {
        float *v = x + h * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) tmp[d] = v[d] * cos[d] + v[(d + half) % head_dim] * sin[d];
        memcpy(v, tmp, (size_t)head_dim * sizeof(float));
    }
}

void asyncllm_decode_layer(float *residual, float *work, const float *input_norm, const float *post_norm,
                           float eps, const float *w_qkv, const float *b_qkv, const float *w_o, const float *b_o,
                           const float *w_gate_up, const float *b_gate_up, const float *w_down,
                           const float *b_down, const float *cos, const float *sin, const int64_t *slots,
                           const paged_kv *kv, const int32_t *tables, const int32_t *lens,
                           int64_t width, int64_t block_size, int64_t max_len, int64_t rows, int64_t hidden,
                           int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t inter, float scale,
                           int32_t threads)
{
    const int64_t groups = heads / kv_heads;
    const int64_t q_width = heads * head_dim, kv_width = kv_heads * head_dim;
    const int64_t qkv_width = q_width + 2 * kv_width;
    float *normed = work;
    float *qkv = normed + rows * hidden;
    float *attn = qkv + rows * qkv_width;
    float *gate_up = attn + rows * q_width;
    float *act = gate_up + rows * 2 * inter;
    float *scores = act + rows * inter;

#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), count = omp_get_num_threads();
        int64_t lo, hi;

#pragma omp single
        rms_norm(residual, input_norm, normed, rows, hidden, eps);

        column_range(qkv_width, t, count, &lo, &hi);
        gemv_k_major(normed, w_qkv, b_qkv, qkv, rows, hidden, qkv_width, lo, hi, 0);
#pragma omp barrier

#pragma omp single
        for (int64_t r = 0; r < rows; ++r) {
            float *row = qkv + r * qkv_width;
            rotate(row, heads + kv_heads, head_dim, cos + r * head_dim, sin + r * head_dim);
            store_kv_rows(kv, slots[r], row + q_width, row + q_width + kv_width, kv_heads, head_dim);
        }

#pragma omp for schedule(static)
        for (int64_t pair = 0; pair < rows * kv_heads; ++pair) {
            const int64_t b = pair / kv_heads, h = pair % kv_heads;
            attend_pair(qkv + b * qkv_width + h * groups * head_dim, kv, tables + b * width, lens[b],
                        h, groups, kv_heads, head_dim, block_size, max_len, scale, 0, 0.f,
                        scores + pair * groups * max_len,
                        attn + b * q_width + h * groups * head_dim);
        }

        column_range(hidden, t, count, &lo, &hi);
        gemv_k_major(attn, w_o, b_o, residual, rows, q_width, hidden, lo, hi, 1);
#pragma omp barrier

#pragma omp single
        rms_norm(residual, post_norm, normed, rows, hidden, eps);

        column_range(2 * inter, t, count, &lo, &hi);
        gemv_k_major(normed, w_gate_up, b_gate_up, gate_up, rows, hidden, 2 * inter, lo, hi, 0);
#pragma omp barrier

#pragma omp for schedule(static)
        for (int64_t i = 0; i < rows * inter; ++i) {
            const int64_t r = i / inter, j = i % inter;
            const float gate = gate_up[r * 2 * inter + j];
            act[i] = gate / (1.f + expf(-gate)) * gate_up[r * 2 * inter + inter + j];
        }

        column_range(hidden, t, count, &lo, &hi);
        gemv_row_major_add(act, w_down, b_down, residual, rows, inter, hidden, lo, hi);
    }
}

/* One weight-only quantized projection (a PackedWeight) and its optional float bias; scales and biases are
 * float16 when half_scales != 0, else float32. */
typedef struct {
    const uint8_t *qweight;
    const void *scales;
    const void *biases;
    const float *bias;
    int64_t bits;
    int64_t group_size;
    int64_t half_scales;
} packed_linear;

int64_t asyncllm_quant_prepared_bytes(int64_t rows, int64_t k, int64_t group_size)
{
    return qg_round_up(quant_prepared_bytes(rows, k, group_size), 64);
}

/* Quantize rows of x [rows, k] for p (this thread's share), then, after a barrier, output features
 * [lo, hi) of y [rows, n] (+)= x @ p^T. Must be called by every thread of the region. */
static void packed_projection(const float *x, int64_t rows, int64_t k, const packed_linear *p, void *prepared,
                              float *y, int64_t n, int add, int t, int count)
{
    quant_prepare_rows(x, k, rows * t / count, rows * (t + 1) / count, k, (int)p->bits, p->group_size, prepared);
#pragma omp barrier
    int64_t lo, hi;
    column_range(n, t, count, &lo, &hi);
    quant_gemv_rows(prepared, rows, k, (int)p->bits, p->group_size, p->qweight, p->scales, p->biases,
                    (int)p->half_scales, p->bias, y, n, lo, hi, add);
}

/* The layer of asyncllm_decode_layer with packed projections w[0..3] = qkv, o, gate_up, down (each
 * [n, k] output-major) and a `prepared` activation scratch (see the header comment). */
void asyncllm_decode_layer_quant(float *residual, float *work, void *prepared, const float *input_norm,
                                 const float *post_norm, float eps, const packed_linear *w, const float *cos,
                                 const float *sin, const int64_t *slots, const paged_kv *kv,
                                 const int32_t *tables, const int32_t *lens, int64_t width, int64_t block_size,
                                 int64_t max_len, int64_t rows, int64_t hidden, int64_t heads, int64_t kv_heads,
                                 int64_t head_dim, int64_t inter, float scale, int32_t threads)
{
    const int64_t groups = heads / kv_heads;
    const int64_t q_width = heads * head_dim, kv_width = kv_heads * head_dim;
    const int64_t qkv_width = q_width + 2 * kv_width;
    float *normed = work;
    float *qkv = normed + rows * hidden;
    float *attn = qkv + rows * qkv_width;
    float *gate_up = attn + rows * q_width;
    float *act = gate_up + rows * 2 * inter;
    float *scores = act + rows * inter;

#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), count = omp_get_num_threads();

#pragma omp single
        rms_norm(residual, input_norm, normed, rows, hidden, eps);

        packed_projection(normed, rows, hidden, &w[0], prepared, qkv, qkv_width, 0, t, count);
#pragma omp barrier

#pragma omp single
        for (int64_t r = 0; r < rows; ++r) {
            float *row = qkv + r * qkv_width;
            rotate(row, heads + kv_heads, head_dim, cos + r * head_dim, sin + r * head_dim);
            store_kv_rows(kv, slots[r], row + q_width, row + q_width + kv_width, kv_heads, head_dim);
        }

#pragma omp for schedule(static)
        for (int64_t pair = 0; pair < rows * kv_heads; ++pair) {
            const int64_t b = pair / kv_heads, h = pair % kv_heads;
            attend_pair(qkv + b * qkv_width + h * groups * head_dim, kv, tables + b * width, lens[b],
                        h, groups, kv_heads, head_dim, block_size, max_len, scale, 0, 0.f,
                        scores + pair * groups * max_len,
                        attn + b * q_width + h * groups * head_dim);
        }

        packed_projection(attn, rows, q_width, &w[1], prepared, residual, hidden, 1, t, count);
#pragma omp barrier

#pragma omp single
        rms_norm(residual, post_norm, normed, rows, hidden, eps);

        packed_projection(normed, rows, hidden, &w[2], prepared, gate_up, 2 * inter, 0, t, count);
#pragma omp barrier

#pragma omp for schedule(static)
        for (int64_t i = 0; i < rows * inter; ++i) {
            const int64_t r = i / inter, j = i % inter;
            const float gate = gate_up[r * 2 * inter + j];
            act[i] = gate / (1.f + expf(-gate)) * gate_up[r * 2 * inter + inter + j];
        }

        packed_projection(act, rows, inter, &w[3], prepared, residual, hidden, 1, t, count);
    }
}
