/*
 * reset: re-draw a LoRA pair after a merge. B <- 0, A <- N(0, std^2).
 *
 *   A  (n_a,) flat, contiguous, dtype adtype in {F32, BF16, F16}
 *   B  (n_b,) flat, contiguous, same dtype
 *
 * A[e] = std * z_e where z_e is the normal derived from Philox stream (seed, offset): block e/4 gives
 * four words, turned into four normals by two Box-Muller pairs; element e takes normal e%4.
 * The result is bit-identical for every thread count and across calls with the same seed and offset.
 * std must be in [0, reset_std_max(dtype)] (else RELORA_ERR_ARG), so that A stays finite. A and B must not
 * overlap (RELORA_ERR_OVERLAP). Either pointer may be NULL when its count is 0.
 */
#ifndef RELORA_RESET_H
#define RELORA_RESET_H

#include "common.h"

/* The largest std a reset or fill of `dtype` takes: every |A| < 6 std then fits the dtype (common.c). */
float reset_std_max(relora_dtype dtype);

/* Fill x (n,) with std * N(0, 1) from stream (seed, offset). */
relora_status normal_fill(void *x, relora_dtype dtype, int64_t n, float std,
                          uint64_t seed, uint64_t offset, int nthreads);

/* B <- 0, A <- std * N(0, 1) from stream (seed, offset). */
relora_status lora_reset(void *A, int64_t n_a, void *B, int64_t n_b, relora_dtype dtype,
                         float std, uint64_t seed, uint64_t offset, int nthreads);

#endif
