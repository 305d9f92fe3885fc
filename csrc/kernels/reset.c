/*
 * reset: B <- 0, A <- std * N(0, 1) from Philox. See reset.h and philox.h for the stream convention.
 *
 * Work is split into groups of 64 elements (16 Philox blocks); groups are independent, so the output
 * does not depend on how they are spread over threads.
 */
#include <math.h>

#include "reset.h"
#include "philox.h"
#include "internal.h"

#define GROUP 64 /* elements per philox_normals64 call */

static relora_status check_flat(const void *x, relora_dtype dtype, int64_t n)
{
    if (!dtype_valid(dtype)) return RELORA_ERR_ARG;
    if (n < 0 || n > INT64_MAX / 8) return RELORA_ERR_ARG;
    if (x == NULL && n > 0) return RELORA_ERR_ARG;
    return RELORA_OK;
}

static int std_valid(float std, relora_dtype dtype) { return std >= 0.0f && std <= reset_std_max(dtype); }

/* x[e] for e in [64 g, 64 g + count) with count <= 64: x = round(std * z_e). */
static void normal_group(void *x, relora_dtype dtype, int64_t g, int count, float std,
                         uint64_t seed, uint64_t offset)
{
    float z[GROUP];
    philox_normals64(seed, offset, (uint64_t)g * (GROUP / 4), z);
    int64_t e0 = g * GROUP;
    switch (dtype) {
    case RELORA_F32: {
        float *o = (float *)x + e0;
        for (int j = 0; j < count; j++) o[j] = std * z[j];
        break;
    }
    case RELORA_BF16: {
        uint16_t *o = (uint16_t *)x + e0;
        for (int j = 0; j < count; j++) o[j] = f32_to_bf16(std * z[j]);
        break;
    }
    case RELORA_F16: {
        uint16_t *o = (uint16_t *)x + e0;
        for (int j = 0; j < count; j++) o[j] = f32_to_f16(std * z[j]);
        break;
    }
    }
}

static void normal_fill_unchecked(void *x, relora_dtype dtype, int64_t n, float std,
                                  uint64_t seed, uint64_t offset, int nthreads)
{
    const int64_t ngroups = (n + GROUP - 1) / GROUP;
    const int nt = relora_threads(nthreads);
    (void)nt;
#pragma omp parallel for schedule(static) num_threads(nt) if (ngroups > 512) /* ~50 us of work */
    for (int64_t g = 0; g < ngroups; g++) {
        int64_t left = n - g * GROUP;
        normal_group(x, dtype, g, left < GROUP ? (int)left : GROUP, std, seed, offset);
    }
}

relora_status normal_fill(void *x, relora_dtype dtype, int64_t n, float std,
                          uint64_t seed, uint64_t offset, int nthreads)
{
    relora_status st = check_flat(x, dtype, n);
    if (st != RELORA_OK) return st;
    if (!std_valid(std, dtype)) return RELORA_ERR_ARG;
    normal_fill_unchecked(x, dtype, n, std, seed, offset, nthreads);
    return RELORA_OK;
}

relora_status lora_reset(void *A, int64_t n_a, void *B, int64_t n_b, relora_dtype dtype,
                         float std, uint64_t seed, uint64_t offset, int nthreads)
{
    relora_status st = check_flat(A, dtype, n_a);
    if (st == RELORA_OK) st = check_flat(B, dtype, n_b);
    if (st != RELORA_OK) return st;
    if (!std_valid(std, dtype)) return RELORA_ERR_ARG;
    const size_t es = relora_dtype_size(dtype);
    if (n_a > 0 && n_b > 0) { /* refuse overlapping A and B */
        uintptr_t a0 = (uintptr_t)A, a1 = a0 + (size_t)n_a * es;
        uintptr_t b0 = (uintptr_t)B, b1 = b0 + (size_t)n_b * es;
        if (a0 < b1 && b0 < a1) return RELORA_ERR_OVERLAP;
    }
    if (n_b > 0) memset(B, 0, (size_t)n_b * es);
    normal_fill_unchecked(A, dtype, n_a, std, seed, offset, nthreads);
    return RELORA_OK;
}
