/*
 * prune: zero all but a fraction of a tensor's entries, in place. Used on optimizer state.
 *
 *   x  (n,) flat, contiguous, dtype in {F32, BF16, F16}
 *
 * magnitude: keep exactly k = n - floor(ratio * n) entries, those with the largest |x|; among equal
 *   magnitudes the lower flat index is kept, so the result is deterministic. NaN counts as larger than
 *   any number (so a NaN is never silently zeroed); -0 and +0 are equal. O(n) time: a radix selection
 *   on the bits of |x| (two histogram passes for fp32, one for 16-bit types), then one writing pass.
 *   Extra memory is a few histograms, never a copy of x.
 * random: keep each entry independently with probability 1 - ratio, using Philox word e of stream
 *   (seed, offset) for entry e: kept iff word < t, t = floor((1 - ratio) * 2^32) computed in double
 *   (an integer in [0, 2^32]; ratio 0 keeps every entry, ratio 1 none). *kept = the number kept.
 *
 * ratio in [0, 1] (NaN or outside: RELORA_ERR_ARG); x may be NULL when n is 0; kept may be NULL.
 * Entries that are zeroed become +0. On success *kept receives the number of entries left as they were
 * (for magnitude mode exactly n - floor(ratio * n)).
 */
#ifndef RELORA_PRUNE_H
#define RELORA_PRUNE_H

#include "common.h"

/* k = n - floor(ratio * n) (ratio in [0, 1]; n <= 0 gives 0), computed once here (common.c, not per level) so
 * that every caller agrees: relora_ext.ops.keep_count asks it too. */
int64_t prune_keep_count(int64_t n, double ratio);

relora_status prune_magnitude(void *x, relora_dtype dtype, int64_t n, double ratio,
                              int64_t *kept, int nthreads);

relora_status prune_random(void *x, relora_dtype dtype, int64_t n, double ratio,
                           uint64_t seed, uint64_t offset, int64_t *kept, int nthreads);

#endif
