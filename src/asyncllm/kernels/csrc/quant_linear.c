/* y = x @ w^T (+ bias) for a weight-only quantized w (a PackedWeight, see quant_gemv.h), all rows in one
 * OpenMP region: each thread quantizes its share of the activation rows into a shared scratch buffer, then,
 * after a barrier, computes one contiguous range of output features for every row.
 *
 * x [rows, k] float32 with row stride ldx; y [rows, n] float32 contiguous, overwritten (add == 0) or
 * accumulated into (add != 0); bias [n] or NULL; the weight's scales and biases float16 when half != 0, else
 * float32. Returns 0, or -1 when the scratch buffer cannot be
 * allocated (y untouched). The caller validates shapes: this code trusts them. */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "quant_gemv.h"

/* [lo, hi) of n features for thread t of count, in multiples of 16 where possible. */
static void feature_range(int64_t n, int t, int count, int64_t *lo, int64_t *hi)
{
    const int64_t units = (n + 15) / 16;
    const int64_t a = units * t / count, b = units * (t + 1) / count;
    *lo = a * 16 < n ? a * 16 : n;
    *hi = b * 16 < n ? b * 16 : n;
}

int asyncllm_quant_linear(const float *x, int64_t ldx, int64_t rows, int64_t k, const uint8_t *qweight,
                          const void *scales, const void *biases, int32_t half, int32_t bits, int64_t group_size,
                          int64_t n, const float *bias, float *y, int32_t add, int32_t threads)
{
    const int64_t bytes = qg_round_up(quant_prepared_bytes(rows, k, group_size), 64);
    void *work = aligned_alloc(64, (size_t)bytes);
    if (!work) return -1;
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), count = omp_get_num_threads();
        quant_prepare_rows(x, ldx, rows * t / count, rows * (t + 1) / count, k, bits, group_size, work);
#pragma omp barrier
        int64_t lo, hi;
        feature_range(n, t, count, &lo, &hi);
        quant_gemv_rows(work, rows, k, bits, group_size, qweight, scales, biases, half, bias, y, n, lo, hi, add);
    }
    free(work);
    return 0;
}

/* Features [lo, hi) of the weight as float32 rows out[(j - lo) * k + i], features split across threads. */
void asyncllm_quant_dequantize(const uint8_t *qweight, const void *scales, const void *biases, int32_t half,
                               int32_t bits, int64_t k, int64_t group_size, int64_t lo, int64_t hi, float *out,
                               int32_t threads)
{
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), count = omp_get_num_threads();
        int64_t a, b;
        feature_range(hi - lo, t, count, &a, &b);
        quant_dequantize_rows(qweight, scales, biases, half, bits, k, group_size, lo + a, lo + b, out + a * k, k);
    }
}
