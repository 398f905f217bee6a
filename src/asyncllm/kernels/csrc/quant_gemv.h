/* Weight-only quantized GEMV/GEMM pieces for one thread of an OpenMP region (no nested parallelism).
 *
 * Weights are a PackedWeight (asyncllm.quant.packed): qweight uint8 [n, k * bits / 8] with bits 4 (every
 * run of 32 values along a row is 16 bytes, byte i holding value i in its low nibble and value i + 16 in
 * its high nibble) or 8 (one code per byte); scales and biases [n, k / group_size], both float32 (half == 0)
 * or both IEEE float16 (half != 0, converted exactly to float32 as they are read); the weight is
 * w[j, i] = scales[j, g] * q[j, i] + biases[j, g] with g = i / group_size. group_size is a multiple of 16
 * dividing k; 4-bit storage needs k % 32 == 0.
 *
 * Scheme (llama.cpp's Q8_0 / Q8_1 activations): each activation row is quantized per block of 32 values
 * to int8 with d = max|x| / 127 and xq = round(x / d), so xhat = d * xq is within d / 2 of x. The kernel
 * computes y = xhat @ w^T, up to fp32 rounding, as
 *
 *   y[r, j] = sum_i scales[j, g(i)] * d[r, b(i)] * q[j, i] * xq[r, i]  +  sum_g biases[j, g] * xhat_sum[r, g]
 *
 * with xhat_sum[r, g] the sum of xhat over group g (as llama.cpp's Q8_1 block sums). Hence
 *   |y - x @ w^T| <= sum_b (d_b / 2) * sum_{i in b} |w[j, i]|  (+ fp32 rounding).
 * (Pairing the biases with the exact sums of x instead leaves an error that scales with |scales * q|, the
 * codes' unsigned part, rather than |w|: measured 2-3x larger on Q4_0, Q4_1, AWQ, Q8_0 and Q6_K-style
 * weights, whose zero points sit mid-range.)
 * The integer products run 64 codes at a time (VNNI vpdpbusd: unsigned codes times signed activations
 * into int32 lanes of 4 products each); each lane's sum is converted to float and scaled by its block's
 * d times its group's scale, so any group_size (a multiple of 16) works.
 *
 * Interface (plain pointers and sizes; every function is for ONE thread inside an existing OpenMP parallel
 * region and never opens one itself):
 *
 *   int64_t quant_prepared_bytes(int64_t rows, int64_t k, int64_t group_size);
 *       bytes of the prepared-activation buffer for rows rows (64-byte alignment is best, not required)
 *   void quant_prepare_rows(const float *x, int64_t ldx, int64_t r_lo, int64_t r_hi, int64_t k, int bits,
 *                           int64_t group_size, void *prepared);
 *       quantize rows [r_lo, r_hi) of x (row r at x + r * ldx) into prepared; threads take disjoint rows
 *   void quant_gemv_rows(const void *prepared, int64_t rows, int64_t k, int bits, int64_t group_size,
 *                        const uint8_t *qweight, const void *scales, const void *biases, int half,
 *                        const float *bias, float *y, int64_t ldy, int64_t lo, int64_t hi, int add);
 *       output features [lo, hi) of rows [0, rows): y[r * ldy + j] = (add ? y[r * ldy + j] : 0)
 *       + sum_i w[j, i] xhat[r, i] + (bias ? bias[j] : 0); threads take disjoint feature ranges
 *   void quant_dequantize_rows(const uint8_t *qweight, const void *scales, const void *biases, int half,
 *                              int bits, int64_t k, int64_t group_size, int64_t lo, int64_t hi, float *out,
 *                              int64_t ldo);
 *       features [lo, hi) of the float32 weight into out (feature j at out + (j - lo) * ldo)
 *
 * A typical use, rows of x [rows, k] into y [rows, ldy]:
 *
 *   quant_prepare_rows(x, ldx, rows * t / count, rows * (t + 1) / count, k, bits, group_size, prepared);
 *   #pragma omp barrier
 *   quant_gemv_rows(prepared, rows, k, bits, group_size, qweight, scales, biases, half, bias, y, ldy, lo, hi,
 *                   add);
 *
 * The prepared rows depend on (x, k, bits, group_size) only, so one preparation serves every weight of that
 * format reading the same activations (fused QKV and gate/up weights of one layer, say). One row runs four
 * features per step, two rows two; more rows run four at a time over L2-sized blocks of features.
 *
 * Builds: AVX-512 (F, BW, VL, VNNI) when the compiler targets it, else AVX2 + FMA + F16C (with AVX-VNNI when
 * present), else portable C; all three compute the same sums (integer products are exact, only the float
 * accumulation order differs). The caller validates shapes and pointers: this code trusts them.
 */
#ifndef ASYNCLLM_QUANT_GEMV_H
#define ASYNCLLM_QUANT_GEMV_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__) \
    && !defined(QG_FORCE_PORTABLE)
#define QG_AVX512 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(QG_FORCE_PORTABLE)
#define QG_AVX2 1
#include <immintrin.h>
#endif

#define QG_BLOCK 32 /* activation values per int8 scale */
#define QG_CHUNK 64 /* values per kernel step (one 512-bit register of codes) */
#define QG_ROW_TILE 4
#define QG_L2_BLOCK (512 * 1024) /* bytes of codes and scales per feature block when rows > 4 */
#define QG_TINY 1e-36f /* blocks whose largest magnitude is below this quantize to zero (127 / it is finite) */

static inline int64_t qg_round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

/* An IEEE float16 as float32, exactly (every half is a float). */
static inline float qg_half_to_float(uint16_t h)
{
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu;
    uint32_t u;
    if (exponent == 0x1F) {
        u = sign | 0x7F800000u | (mantissa << 13);
    } else if (exponent) {
        u = sign | ((exponent + 112) << 23) | (mantissa << 13);
    } else { /* zero or subnormal: mantissa * 2^-24, exact in float */
        const float f = (float)mantissa * 5.9604644775390625e-8f;
        memcpy(&u, &f, sizeof u);
        u |= sign;
    }
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Element i of a scales or biases array: float16 when half, else float32. */
static inline __attribute__((always_inline)) float qg_param(const void *p, int64_t i, const int half)
{
    if (half) {
#if defined(__F16C__) && (defined(QG_AVX512) || defined(QG_AVX2))
        return _cvtsh_ss(((const uint16_t *)p)[i]);
#else
        return qg_half_to_float(((const uint16_t *)p)[i]);
#endif
    }
    return ((const float *)p)[i];
}

/* Bytes of one scales or biases element. */
static inline int64_t qg_param_bytes(int half) { return half ? 2 : 4; }

/* Prepared row layout (every part a multiple of 64 bytes):
 *   xq   int8  [kp]        kp = k rounded up to 64; chunk-permuted for 4-bit (see qg_chunk_position),
 *                          zero past k
 *   dl   float [kp / 4]    per int32 lane of each chunk: the d of the block its 4 values belong to
 *   d    float [kp / 32]   per block of 32 values, natural order
 *   xsum float [gp]        per group, the sum of xhat = d * xq over it; gp = groups rounded up to 16, zero
 *                          past them */
static inline int64_t quant_prepared_row_bytes(int64_t k, int64_t group_size)
{
    const int64_t kp = qg_round_up(k, QG_CHUNK);
    return kp + kp + qg_round_up(kp / QG_BLOCK, 16) * 4 + qg_round_up(k / group_size, 16) * 4;
}

static inline int64_t quant_prepared_bytes(int64_t rows, int64_t k, int64_t group_size)
{
    return rows * quant_prepared_row_bytes(k, group_size);
}

/* Byte position, within its 64-value chunk, of value v (0..63) of that chunk. The 4-bit kernel unpacks two
 * nibble runs as [run0 low | run1 low | run0 high | run1 high] 16-byte quarters, i.e. values
 * [0..15 | 32..47 | 16..31 | 48..63]: quarters 1 and 2 swap. 8-bit codes keep their order. */
static inline int qg_chunk_position(int v, int bits)
{
    if (bits != 4) return v;
    static const int quarter[4] = {0, 2, 1, 3};
    return quarter[v >> 4] * 16 + (v & 15);
}

/* First value (within its chunk) of int32 lane l (4 consecutive values) of a chunk. */
static inline int qg_lane_value(int l, int bits)
{
    if (bits != 4) return 4 * l;
    static const int base[4] = {0, 32, 16, 48};
    return base[l >> 2] + 4 * (l & 3);
}

/* Quantize one block of n (16 or 32) values: the scale d and n int8 codes (the last 16 in xq_hi). Every
 * build rounds x * (127 / max|x|) to nearest, ties to even, so all builds produce the same codes. */
static inline float qg_quantize_block(const float *x, int n, int8_t *xq_lo, int8_t *xq_hi)
{
#ifdef QG_AVX512
    const __m512 a = _mm512_loadu_ps(x);
    const __m512 b = n > 16 ? _mm512_loadu_ps(x + 16) : _mm512_setzero_ps();
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    const __m512 inverse = _mm512_set1_ps(amax >= QG_TINY ? 127.f / amax : 0.f);
    _mm_storeu_si128((__m128i *)xq_lo, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(a, inverse))));
    if (n > 16)
        _mm_storeu_si128((__m128i *)xq_hi, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(b, inverse))));
#else
    float amax = 0.f;
    for (int i = 0; i < n; ++i) amax = fmaxf(amax, fabsf(x[i]));
    const float inverse = amax >= QG_TINY ? 127.f / amax : 0.f;
    for (int i = 0; i < n; ++i) {
        const float v = nearbyintf(x[i] * inverse);
        (i < 16 ? xq_lo : xq_hi - 16)[i] = (int8_t)(v > 127.f ? 127.f : v < -127.f ? -127.f : v);
    }
#endif
    return amax >= QG_TINY ? amax / 127.f : 0.f;
}

/* Quantize rows [r_lo, r_hi) of x (row stride ldx) into prepared, which holds rows 0.. of the call. */
static inline void quant_prepare_rows(const float *x, int64_t ldx, int64_t r_lo, int64_t r_hi, int64_t k,
                                      int bits, int64_t group_size, void *prepared)
{
    const int64_t kp = qg_round_up(k, QG_CHUNK), row_bytes = quant_prepared_row_bytes(k, group_size);
    const int64_t blocks = (k + QG_BLOCK - 1) / QG_BLOCK;
    for (int64_t r = r_lo; r < r_hi; ++r) {
        const float *xr = x + r * ldx;
        int8_t *xq = (int8_t *)((char *)prepared + r * row_bytes);
        float *dl = (float *)(xq + kp);
        float *d = dl + kp / 4;
        float *xsum = d + qg_round_up(kp / QG_BLOCK, 16);
        memset(xq, 0, (size_t)row_bytes);
        for (int64_t b = 0; b < blocks; ++b) {
            const int64_t base = b * QG_BLOCK, chunk = base / QG_CHUNK * QG_CHUNK;
            const int offset = (int)(base - chunk), n = k - base < QG_BLOCK ? (int)(k - base) : QG_BLOCK;
            /* the block's two 16-value halves each land contiguously (quarters are 16 bytes) */
            d[b] = qg_quantize_block(xr + base, n, xq + chunk + qg_chunk_position(offset, bits),
                                     xq + chunk + qg_chunk_position(offset + 16, bits));
        }
        for (int64_t c = 0; c < kp / QG_CHUNK; ++c) {
            for (int l = 0; l < 16; ++l) {
                const int64_t value = c * QG_CHUNK + qg_lane_value(l, bits);
                dl[c * 16 + l] = value < k ? d[value / QG_BLOCK] : 0.f;
            }
        }
        /* xhat summed per group: per 16-value segment (one block, one group) an exact integer sum times d */
        for (int64_t s = 0; s < k; s += 16) {
            const int64_t chunk = s / QG_CHUNK * QG_CHUNK;
            const int8_t *seg = xq + chunk + qg_chunk_position((int)(s - chunk), bits);
            int32_t sum = 0;
            for (int v = 0; v < 16; ++v) sum += seg[v];
            xsum[s / group_size] += d[s / QG_BLOCK] * (float)sum;
        }
    }
}

/* y[r, j] for one (r, j): store (add == 0) or accumulate (add != 0) value (+ bias[j] when bias). */
static inline void qg_store(float *y, int64_t ldy, int64_t r, int64_t j, float value, const float *bias, int add)
{
    if (bias) value += bias[j];
    if (add) y[r * ldy + j] += value;
    else y[r * ldy + j] = value;
}

#ifdef QG_AVX512

enum { QG_WIDE_GROUPS = 0, QG_SMALL_GROUPS = 1, QG_OTHER_GROUPS = 2 };

/* The 64 codes of a full chunk of one weight row as unsigned bytes in prepared order. 4-bit: the 32 bytes
 * of two nibble runs in both halves, the upper half shifted right by 4, then masked: quarters
 * [run0 low | run1 low | run0 high | run1 high]. */
static inline __attribute__((always_inline)) __m512i qg_codes(const uint8_t *chunk, const int bits)
{
    if (bits == 4) {
        const __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)chunk));
        return _mm512_and_si512(_mm512_mask_srli_epi16(v, (__mmask32)0xFFFF0000u, v, 4), _mm512_set1_epi8(0x0F));
    }
    return _mm512_loadu_si512((const void *)chunk);
}

/* The last, partial chunk (left = k % 64 values): 4-bit has one run (left == 32; quarters 1 and 3 repeat it
 * and meet zero activations); 8-bit a masked load. Never reads beyond the row. */
static inline __attribute__((always_inline)) __m512i qg_codes_tail(const uint8_t *chunk, int64_t left, const int bits)
{
    if (bits == 4) {
        const __m512i v = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)chunk));
        return _mm512_and_si512(_mm512_mask_srli_epi16(v, (__mmask32)0xFFFF0000u, v, 4), _mm512_set1_epi8(0x0F));
    }
    return _mm512_maskz_loadu_epi8((__mmask64)((1ULL << left) - 1), chunk);
}

/* 16 parameters from element i (float16 when half, else float32) as floats; the masked form loads only
 * elements m selects (the rest zero) and never touches the others. */
static inline __attribute__((always_inline)) __m512 qg_load16(const void *p, int64_t i, const int half)
{
    if (half) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i)));
    return _mm512_loadu_ps((const float *)p + i);
}

static inline __attribute__((always_inline)) __m512 qg_maskz_load16(__mmask16 m, const void *p, int64_t i,
                                                                    const int half)
{
    if (half) return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, (const uint16_t *)p + i));
    return _mm512_maskz_loadu_ps(m, (const float *)p + i);
}

/* Each lane's group minus g0 for chunk values starting at first (lane_value: each lane's first value). */
static inline __m512i qg_lane_groups(__m512i lane_value, int64_t first, int64_t group_size, int64_t g0)
{
    const __m512 value = _mm512_cvtepi32_ps(_mm512_add_epi32(lane_value, _mm512_set1_epi32((int)first)));
    const __m512 g = _mm512_floor_ps(_mm512_mul_ps(_mm512_add_ps(value, _mm512_set1_ps(0.5f)),
                                                   _mm512_set1_ps(1.f / (float)group_size)));
    return _mm512_sub_epi32(_mm512_cvtps_epi32(g), _mm512_set1_epi32((int)g0));
}

/* A tile is F output features x R rows (F * R <= 4), one accumulator each, named acc0..acc3 (index
 * f * R + r) so they stay in registers; QG_EACH expands a statement for every accumulator in use. */
#define QG_EACH(X) X(0) X(1) X(2) X(3)

/* Rows [0, R) of features f < F (rows wrow[f], srow[f], brow[f]): out[f * R + r] = the scaled integer dots
 * plus biases . xsum. F, R, bits and mode are compile-time constants after inlining. */
static inline __attribute__((always_inline)) void qg_tile(
    const int8_t *prepared, int64_t row_bytes, const int F, const int R, const int bits, const int mode,
    const int half, const uint8_t *const *wrow, const void *const *srow, const void *const *brow, int64_t k,
    int64_t group_size,
    int64_t groups, __m512i lane_value, __m512i small_idx, float *out)
{
    const int64_t kp = qg_round_up(k, QG_CHUNK), full = k / QG_CHUNK, wchunk = QG_CHUNK * bits / 8;
    const float *dl = (const float *)(prepared + kp);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
    __m512i w[4];
    __m512 sw[4];
/* accumulator i += cvt(codes of feature i / R . xq of row i % R) * (d_lane of the row * sw of the feature) */
#define QG_DOT(i)                                                                                                \
    if ((i) < F * R) {                                                                                           \
        const int f_ = (i) / R, r_ = (i) % R;                                                                    \
        const __m512i s_ = _mm512_dpbusd_epi32(                                                                  \
            _mm512_setzero_si512(), w[f_],                                                                       \
            _mm512_loadu_si512((const void *)(prepared + r_ * row_bytes + c * QG_CHUNK)));                       \
        const __m512 d_ = _mm512_loadu_ps((const float *)((const char *)dl + r_ * row_bytes) + c * 16);          \
        acc##i = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s_), _mm512_mul_ps(d_, sw[f_]), acc##i);                    \
    }
    if (mode == QG_WIDE_GROUPS) {
        /* k % 64 == 0: per group, sum cvt(dot) * d_lane, then scale once by the group's scale */
        const int64_t per = group_size / QG_CHUNK;
        int64_t c = 0;
        for (int64_t g = 0; g < groups; ++g) {
            __m512 part0 = _mm512_setzero_ps(), part1 = part0, part2 = part0, part3 = part0;
            for (const int64_t end = c + per; c < end; ++c) {
                for (int f = 0; f < F; ++f) w[f] = qg_codes(wrow[f] + c * wchunk, bits);
#define QG_PART(i)                                                                                               \
    if ((i) < F * R) {                                                                                           \
        const int f_ = (i) / R, r_ = (i) % R;                                                                    \
        const __m512i s_ = _mm512_dpbusd_epi32(                                                                  \
            _mm512_setzero_si512(), w[f_],                                                                       \
            _mm512_loadu_si512((const void *)(prepared + r_ * row_bytes + c * QG_CHUNK)));                       \
        const __m512 d_ = _mm512_loadu_ps((const float *)((const char *)dl + r_ * row_bytes) + c * 16);          \
        part##i = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s_), d_, part##i);                                          \
    }
                QG_EACH(QG_PART)
#undef QG_PART
            }
#define QG_SCALE(i) \
    if ((i) < F * R) acc##i = _mm512_fmadd_ps(part##i, _mm512_set1_ps(qg_param(srow[(i) / R], g, half)), acc##i);
            QG_EACH(QG_SCALE)
#undef QG_SCALE
        }
    } else if (mode == QG_SMALL_GROUPS) {
        /* group_size 16 or 32: a full chunk holds 64 / group_size whole groups */
        const int64_t per = QG_CHUNK / group_size;
        const __mmask16 m = (__mmask16)((1u << per) - 1);
        for (int64_t c = 0; c < full; ++c) {
            for (int f = 0; f < F; ++f) {
                w[f] = qg_codes(wrow[f] + c * wchunk, bits);
                sw[f] = _mm512_permutexvar_ps(small_idx, qg_maskz_load16(m, srow[f], c * per, half));
            }
            QG_EACH(QG_DOT)
        }
        if (full * QG_CHUNK < k) {
            const int64_t c = full, left = groups - c * per;
            for (int f = 0; f < F; ++f) {
                w[f] = qg_codes_tail(wrow[f] + c * wchunk, k - c * QG_CHUNK, bits);
                sw[f] = _mm512_permutexvar_ps(
                    small_idx, qg_maskz_load16((__mmask16)((1u << left) - 1), srow[f], c * per, half));
            }
            QG_EACH(QG_DOT)
        }
    } else {
        /* group boundaries at any multiple of 16: each lane's group computed per chunk (at most 4 per chunk) */
        int64_t g0 = 0;
        for (int64_t c = 0; c * QG_CHUNK < k; ++c) {
            while ((g0 + 1) * group_size <= c * QG_CHUNK) ++g0;
            const int64_t left = groups - g0;
            const __m512i idx = qg_lane_groups(lane_value, c * QG_CHUNK, group_size, g0);
            const __mmask16 m = (__mmask16)((1u << (left < 4 ? left : 4)) - 1);
            for (int f = 0; f < F; ++f) {
                w[f] = c < full ? qg_codes(wrow[f] + c * wchunk, bits)
                                : qg_codes_tail(wrow[f] + c * wchunk, k - c * QG_CHUNK, bits);
                sw[f] = _mm512_permutexvar_ps(idx, qg_maskz_load16(m, srow[f], g0, half));
            }
            QG_EACH(QG_DOT)
        }
    }
#undef QG_DOT
    /* biases meet the group sums of xhat */
    const int64_t xsum_at = 2 * kp + qg_round_up(kp / QG_BLOCK, 16) * 4;
    const __mmask16 tail = (__mmask16)((1u << (groups % 16)) - 1);
#define QG_FINISH(i)                                                                                             \
    if ((i) < F * R) {                                                                                           \
        const int f_ = (i) / R, r_ = (i) % R;                                                                    \
        const float *xsum = (const float *)(prepared + r_ * row_bytes + xsum_at);                               \
        __m512 b_ = acc##i;                                                                                      \
        int64_t g = 0;                                                                                           \
        for (; g + 16 <= groups; g += 16)                                                                        \
            b_ = _mm512_fmadd_ps(qg_load16(brow[f_], g, half), _mm512_loadu_ps(xsum + g), b_);                   \
        if (g < groups)                                                                                          \
            b_ = _mm512_fmadd_ps(qg_maskz_load16(tail, brow[f_], g, half), _mm512_loadu_ps(xsum + g), b_);       \
        out[i] = _mm512_reduce_add_ps(b_);                                                                       \
    }
    QG_EACH(QG_FINISH)
#undef QG_FINISH
}

/* Every output feature in [lo, hi) for rows [0, rows): F features x R rows at a time (one row: 4 features,
 * two rows: 2, else 1 feature by up to 4 rows), all compile-time in qg_tile. */
static inline __attribute__((always_inline)) void qg_features(
    const int8_t *prepared, int64_t row_bytes, int64_t rows, const int bits, const int mode, const int half,
    const uint8_t *qweight, const void *scales, const void *biases, const float *bias, float *y, int64_t ldy,
    int64_t lo, int64_t hi, int add, int64_t k, int64_t group_size)
{
    const int64_t groups = k / group_size, wbytes = k * bits / 8, pbytes = qg_param_bytes(half);
    int lanes[16];
    for (int l = 0; l < 16; ++l) lanes[l] = qg_lane_value(l, bits);
    const __m512i lane_value = _mm512_loadu_si512((const void *)lanes);
    const __m512i small_idx = qg_lane_groups(lane_value, 0, group_size, 0);
    const int wide = rows == 1 ? 4 : rows == 2 ? 2 : 1; /* features per tile while enough remain */
    /* Blocks of features whose codes and scales fit comfortably in L2 (QG_L2_BLOCK bytes): every row tile
     * sweeps a block, so the block stays cached across row tiles and a row tile's activations across the
     * block's features. */
    const int64_t feature_bytes = wbytes + 2 * pbytes * groups;
    int64_t block = QG_L2_BLOCK / feature_bytes;
    block = block < 4 ? 4 : block / 4 * 4;
    for (int64_t jb = lo; jb < hi; jb += block) {
        const int64_t jend = jb + block < hi ? jb + block : hi;
        for (int64_t r0 = 0; r0 < rows; r0 += QG_ROW_TILE) {
            const int64_t R = rows - r0 < QG_ROW_TILE ? rows - r0 : QG_ROW_TILE;
            const int8_t *p = prepared + r0 * row_bytes;
            for (int64_t j = jb; j < jend;) {
                const int F = jend - j >= wide ? wide : 1;
                const uint8_t *wrow[4];
                const void *srow[4], *brow[4];
                for (int f = 0; f < F; ++f) {
                    wrow[f] = qweight + (j + f) * wbytes;
                    srow[f] = (const char *)scales + (j + f) * groups * pbytes;
                    brow[f] = (const char *)biases + (j + f) * groups * pbytes;
                }
                float out[4] = {0.f, 0.f, 0.f, 0.f};
#define QG_TILE(f, r) \
    qg_tile(p, row_bytes, f, r, bits, mode, half, wrow, srow, brow, k, group_size, groups, lane_value, small_idx, \
            out)
                if (F == 4) QG_TILE(4, 1);
                else if (F == 2) QG_TILE(2, 2);
                else if (R == 4) QG_TILE(1, 4);
                else if (R == 3) QG_TILE(1, 3);
                else if (R == 2) QG_TILE(1, 2);
                else QG_TILE(1, 1);
#undef QG_TILE
                for (int f = 0; f < F; ++f)
                    for (int64_t r = 0; r < R; ++r) qg_store(y, ldy, r0 + r, j + f, out[f * R + r], bias, add);
                j += F;
            }
        }
    }
}

#undef QG_EACH

#elif defined(QG_AVX2)

enum { QG_WIDE_GROUPS = 0, QG_SMALL_GROUPS = 1, QG_OTHER_GROUPS = 2 };

/* A 64-value chunk as two 256-bit halves: half 0 pairs with prepared bytes 0..31 (lanes 0..7), half 1 with
 * bytes 32..63 (lanes 8..15). 4-bit: half 0 = low nibbles of both runs, half 1 = high nibbles. */
typedef struct { __m256i h[2]; } qg_codes2;

static inline __attribute__((always_inline)) qg_codes2 qg_codes_avx2(const uint8_t *chunk, int64_t left, const int bits)
{
    qg_codes2 w;
    if (bits == 4) {
        const __m256i mask = _mm256_set1_epi8(0x0F);
        const __m256i v = left >= QG_CHUNK ? _mm256_loadu_si256((const __m256i *)chunk)
                                           : _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)chunk));
        w.h[0] = _mm256_and_si256(v, mask);
        w.h[1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    } else if (left >= QG_CHUNK) {
        w.h[0] = _mm256_loadu_si256((const __m256i *)chunk);
        w.h[1] = _mm256_loadu_si256((const __m256i *)(chunk + 32));
    } else { /* left is 16, 32 or 48: whole 4-byte words, masked */
        const __m256i word = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
        w.h[0] = _mm256_maskload_epi32((const int *)chunk, _mm256_cmpgt_epi32(_mm256_set1_epi32((int)left), word));
        w.h[1] = _mm256_maskload_epi32((const int *)(chunk + 32),
                                       _mm256_cmpgt_epi32(_mm256_set1_epi32((int)left - 32), word));
    }
    return w;
}

/* int32 lane l = sum of the 4 products of bytes 4l..4l+3: unsigned codes times signed activations. */
static inline __attribute__((always_inline)) __m256i qg_dot_avx2(__m256i w, __m256i x, const int bits)
{
#if defined(__AVXVNNI__)
    (void)bits;
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), w, x);
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
    (void)bits;
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x);
#else
    const __m256i ones = _mm256_set1_epi16(1);
    if (bits == 4) /* codes <= 15: pair sums <= 2 * 15 * 127, no int16 saturation */
        return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones);
    /* 8-bit codes: split into nibbles so maddubs never saturates; dot = 16 * high + low */
    const __m256i mask = _mm256_set1_epi8(0x0F);
    const __m256i low = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_and_si256(w, mask), x), ones);
    const __m256i high = _mm256_madd_epi16(
        _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(w, 4), mask), x), ones);
    return _mm256_add_epi32(_mm256_slli_epi32(high, 4), low);
#endif
}

static inline float qg_hsum_avx2(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Up to 4 consecutive parameters from element i (count of them, the rest zero) as floats in the low half,
 * never reading past them. */
static inline __attribute__((always_inline)) __m256 qg_load4_avx2(const void *p, int64_t i, int64_t count,
                                                                  const int half)
{
    if (half) {
        uint16_t four[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        memcpy(four, (const uint16_t *)p + i, (size_t)count * 2);
        return _mm256_castps128_ps256(_mm_cvtph_ps(_mm_loadu_si128((const __m128i *)four)));
    }
    const __m128i lane = _mm_setr_epi32(0, 1, 2, 3);
    return _mm256_castps128_ps256(
        _mm_maskload_ps((const float *)p + i, _mm_cmplt_epi32(lane, _mm_set1_epi32((int)count))));
}

/* 8 parameters from element i as floats. */
static inline __attribute__((always_inline)) __m256 qg_load8_avx2(const void *p, int64_t i, const int half)
{
    if (half) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)));
    return _mm256_loadu_ps((const float *)p + i);
}

/* Each lane's group minus g0 for chunk values from first (lane_value: each lane's first value). */
static inline __m256i qg_lane_groups_avx2(__m256i lane_value, int64_t first, int64_t group_size, int64_t g0)
{
    const __m256 value = _mm256_cvtepi32_ps(_mm256_add_epi32(lane_value, _mm256_set1_epi32((int)first)));
    const __m256 g = _mm256_floor_ps(_mm256_mul_ps(_mm256_add_ps(value, _mm256_set1_ps(0.5f)),
                                                   _mm256_set1_ps(1.f / (float)group_size)));
    return _mm256_sub_epi32(_mm256_cvtps_epi32(g), _mm256_set1_epi32((int)g0));
}

static inline __attribute__((always_inline)) void qg_tile(
    const int8_t *prepared, int64_t row_bytes, const int R, const int bits, const int mode, const int half,
    const uint8_t *wrow, const void *srow, const void *brow, int64_t k, int64_t group_size, int64_t groups,
    const __m256i *lane_value, const __m256i *small_idx, float *out)
{
    const int64_t kp = qg_round_up(k, QG_CHUNK), wchunk = QG_CHUNK * bits / 8;
    __m256 acc[QG_ROW_TILE][2];
    for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    int64_t g0 = 0;
    for (int64_t c = 0; c * QG_CHUNK < k; ++c) {
        const int64_t left = k - c * QG_CHUNK;
        const qg_codes2 w = qg_codes_avx2(wrow + c * wchunk, left, bits);
        __m256 sw[2];
        if (mode == QG_WIDE_GROUPS) {
            while ((g0 + 1) * group_size <= c * QG_CHUNK) ++g0;
            sw[0] = sw[1] = _mm256_set1_ps(qg_param(srow, g0, half));
        } else {
            __m256i idx[2] = {small_idx[0], small_idx[1]};
            if (mode == QG_SMALL_GROUPS) {
                g0 = c * (QG_CHUNK / group_size);
            } else {
                while ((g0 + 1) * group_size <= c * QG_CHUNK) ++g0;
                idx[0] = qg_lane_groups_avx2(lane_value[0], c * QG_CHUNK, group_size, g0);
                idx[1] = qg_lane_groups_avx2(lane_value[1], c * QG_CHUNK, group_size, g0);
            }
            const __m256 s4 = qg_load4_avx2(srow, g0, groups - g0 < 4 ? groups - g0 : 4, half);
            sw[0] = _mm256_permutevar8x32_ps(s4, idx[0]);
            sw[1] = _mm256_permutevar8x32_ps(s4, idx[1]);
        }
        for (int i = 0; i < R; ++i) {
            const int8_t *p = prepared + i * row_bytes;
            const float *dl = (const float *)(p + kp) + c * 16;
            for (int h = 0; h < 2; ++h) {
                const __m256i xq = _mm256_loadu_si256((const __m256i *)(p + c * QG_CHUNK + 32 * h));
                const __m256 s = _mm256_cvtepi32_ps(qg_dot_avx2(w.h[h], xq, bits));
                acc[i][h] = _mm256_fmadd_ps(s, _mm256_mul_ps(_mm256_loadu_ps(dl + 8 * h), sw[h]), acc[i][h]);
            }
        }
    }
    for (int i = 0; i < R; ++i) {
        const float *xsum = (const float *)(prepared + i * row_bytes + 2 * kp) + qg_round_up(kp / QG_BLOCK, 16);
        __m256 b = _mm256_add_ps(acc[i][0], acc[i][1]);
        int64_t g = 0;
        for (; g + 8 <= groups; g += 8) b = _mm256_fmadd_ps(qg_load8_avx2(brow, g, half), _mm256_loadu_ps(xsum + g), b);
        float tail = 0.f;
        for (; g < groups; ++g) tail += qg_param(brow, g, half) * xsum[g];
        out[i] = qg_hsum_avx2(b) + tail;
    }
}

static inline __attribute__((always_inline)) void qg_features(
    const int8_t *prepared, int64_t row_bytes, int64_t rows, const int bits, const int mode, const int half,
    const uint8_t *qweight, const void *scales, const void *biases, const float *bias, float *y, int64_t ldy,
    int64_t lo, int64_t hi, int add, int64_t k, int64_t group_size)
{
    const int64_t groups = k / group_size, wbytes = k * bits / 8, pbytes = qg_param_bytes(half);
    int lanes[16];
    for (int l = 0; l < 16; ++l) lanes[l] = qg_lane_value(l, bits);
    __m256i lane_value[2], small_idx[2];
    for (int h = 0; h < 2; ++h) {
        lane_value[h] = _mm256_loadu_si256((const __m256i *)(lanes + 8 * h));
        small_idx[h] = qg_lane_groups_avx2(lane_value[h], 0, group_size, 0);
    }
    /* feature blocks that stay in L2 across row tiles, as in the AVX-512 path */
    int64_t block = QG_L2_BLOCK / (wbytes + 2 * pbytes * groups);
    block = block < 4 ? 4 : block / 4 * 4;
    for (int64_t jb = lo; jb < hi; jb += block) {
        const int64_t jend = jb + block < hi ? jb + block : hi;
        for (int64_t r0 = 0; r0 < rows; r0 += QG_ROW_TILE) {
            const int64_t R = rows - r0 < QG_ROW_TILE ? rows - r0 : QG_ROW_TILE;
            const int8_t *p = prepared + r0 * row_bytes;
            for (int64_t j = jb; j < jend; ++j) {
                const uint8_t *wrow = qweight + j * wbytes;
                const void *srow = (const char *)scales + j * groups * pbytes;
                const void *brow = (const char *)biases + j * groups * pbytes;
                float out[QG_ROW_TILE] = {0.f, 0.f, 0.f, 0.f};
#define QG_TILE(r) \
    qg_tile(p, row_bytes, r, bits, mode, half, wrow, srow, brow, k, group_size, groups, lane_value, small_idx, out)
                if (R == 4) QG_TILE(4);
                else if (R == 3) QG_TILE(3);
                else if (R == 2) QG_TILE(2);
                else QG_TILE(1);
#undef QG_TILE
                for (int64_t i = 0; i < R; ++i) qg_store(y, ldy, r0 + i, j, out[i], bias, add);
            }
        }
    }
}

#else /* portable */

/* Rows [0, R) of a tile, one output feature: per 16-value segment (one group, one block) an exact integer
 * dot, scaled in float; then biases . xsum. */
static void qg_tile_portable(const int8_t *prepared, int64_t row_bytes, int64_t R, int bits, int half,
                             const uint8_t *wrow, const void *srow, const void *brow, int64_t k, int64_t group_size,
                             int64_t groups, float *out)
{
    const int64_t kp = qg_round_up(k, QG_CHUNK);
    for (int64_t i = 0; i < R; ++i) {
        const int8_t *xq = prepared + i * row_bytes;
        const float *d = (const float *)(xq + kp) + kp / 4;
        const float *xsum = d + qg_round_up(kp / QG_BLOCK, 16);
        float acc = 0.f;
        for (int64_t s = 0; s < k; s += 16) {
            const int64_t chunk = s / QG_CHUNK * QG_CHUNK;
            const int8_t *xs = xq + chunk + qg_chunk_position((int)(s - chunk), bits);
            int32_t dot = 0;
            if (bits == 4) {
                const uint8_t *run = wrow + s / 32 * 16;
                const int shift = s & 16 ? 4 : 0;
                for (int v = 0; v < 16; ++v) dot += ((run[v] >> shift) & 15) * xs[v];
            } else {
                for (int v = 0; v < 16; ++v) dot += wrow[s + v] * xs[v];
            }
            acc += (float)dot * d[s / QG_BLOCK] * qg_param(srow, s / group_size, half);
        }
        for (int64_t g = 0; g < groups; ++g) acc += qg_param(brow, g, half) * xsum[g];
        out[i] = acc;
    }
}

#endif

/* Output features [lo, hi) of every row r < rows: y[r * ldy + j] (+)= sum_i w[j, i] x[r, i] (+ bias[j]),
 * x being the rows quant_prepare_rows prepared (same k, bits, group_size); add != 0 accumulates into y. */
static inline void quant_gemv_rows(const void *prepared, int64_t rows, int64_t k, int bits, int64_t group_size,
                                   const uint8_t *qweight, const void *scales, const void *biases, int half,
                                   const float *bias, float *y, int64_t ldy, int64_t lo, int64_t hi, int add)
{
    const int64_t row_bytes = quant_prepared_row_bytes(k, group_size);
    const int8_t *p = (const int8_t *)prepared;
#if defined(QG_AVX512) || defined(QG_AVX2)
    const int mode = group_size % QG_CHUNK == 0 ? QG_WIDE_GROUPS
                   : group_size == 16 || group_size == 32 ? QG_SMALL_GROUPS : QG_OTHER_GROUPS;
#define QG_CASE(b, md, h) \
    qg_features(p, row_bytes, rows, b, md, h, qweight, scales, biases, bias, y, ldy, lo, hi, add, k, group_size)
#define QG_MODES(b, h)                                                \
    {                                                                 \
        if (mode == QG_WIDE_GROUPS) QG_CASE(b, QG_WIDE_GROUPS, h);    \
        else if (mode == QG_SMALL_GROUPS) QG_CASE(b, QG_SMALL_GROUPS, h); \
        else QG_CASE(b, QG_OTHER_GROUPS, h);                          \
    }
    if (bits == 4) {
        if (half) QG_MODES(4, 1)
        else QG_MODES(4, 0)
    } else {
        if (half) QG_MODES(8, 1)
        else QG_MODES(8, 0)
    }
#undef QG_MODES
#undef QG_CASE
#else
    const int64_t groups = k / group_size, wbytes = k * bits / 8, pbytes = qg_param_bytes(half);
    for (int64_t j = lo; j < hi; ++j) {
        for (int64_t r0 = 0; r0 < rows; r0 += QG_ROW_TILE) {
            const int64_t R = rows - r0 < QG_ROW_TILE ? rows - r0 : QG_ROW_TILE;
            float out[QG_ROW_TILE];
            qg_tile_portable(p + r0 * row_bytes, row_bytes, R, bits, half, qweight + j * wbytes,
                             (const char *)scales + j * groups * pbytes, (const char *)biases + j * groups * pbytes,
                             k, group_size, groups, out);
            for (int64_t i = 0; i < R; ++i) qg_store(y, ldy, r0 + i, j, out[i], bias, add);
        }
    }
#endif
}

/* Rows [lo, hi) of the float32 weight, w[j, i] = scales[j, g] * q[j, i] + biases[j, g], into out (row
 * j - lo at out + (j - lo) * ldo): as PackedWeight.dequantize computes it (one multiply, one add). */
static inline void quant_dequantize_rows(const uint8_t *qweight, const void *scales, const void *biases, int half,
                                         int bits, int64_t k, int64_t group_size, int64_t lo, int64_t hi,
                                         float *out, int64_t ldo)
{
    const int64_t groups = k / group_size, wbytes = k * bits / 8;
    for (int64_t j = lo; j < hi; ++j) {
        const uint8_t *wrow = qweight + j * wbytes;
        float *o = out + (j - lo) * ldo;
        for (int64_t s = 0; s < k; s += 16) { /* 16 values: one group, one half of a nibble run */
            const int64_t g = j * groups + s / group_size;
            const float scale = qg_param(scales, g, half), shift = qg_param(biases, g, half);
#ifdef QG_AVX512
            __m512i q;
            if (bits == 4) {
                q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(wrow + s / 32 * 16)));
                q = s & 16 ? _mm512_srli_epi32(q, 4) : _mm512_and_si512(q, _mm512_set1_epi32(15));
            } else {
                q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(wrow + s)));
            }
            _mm512_storeu_ps(o + s, _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(q), _mm512_set1_ps(scale)),
                                                  _mm512_set1_ps(shift)));
#else
            for (int v = 0; v < 16; ++v) {
                const int q = bits == 4 ? (wrow[s / 32 * 16 + v] >> (s & 16 ? 4 : 0)) & 15 : wrow[s + v];
                o[s + v] = (float)q * scale + shift;
            }
#endif
        }
    }
}

#endif /* ASYNCLLM_QUANT_GEMV_H */
