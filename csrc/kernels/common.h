/*
 * relora kernels: shared definitions.
 *
 * Design rules for everything under csrc/kernels/:
 *   - C11, no Python and no torch headers: functions on raw pointers and sizes.
 *   - Names are <thing>_<verb>; output pointers come first; every function states its shapes.
 *   - Arithmetic is done in fp32 (or wider) whatever the storage dtype; each result is rounded
 *     into its storage dtype exactly once.
 *   - Every random draw comes from Philox4x32-10 keyed by a 64-bit seed and addressed by a
 *     64-bit offset plus the element's flat index, so results never depend on the thread count.
 *   - OpenMP only where it pays; every parallel function takes `nthreads` (<= 0: OpenMP default).
 *   - Functions never abort: they return a relora_status and leave outputs untouched on error.
 *
 * Shape letters used in the headers:
 *   O = out_features (rows of W and B), I = in_features (columns of W and A), R = LoRA rank,
 *   n = number of elements of a flat tensor.
 */
#ifndef RELORA_COMMON_H
#define RELORA_COMMON_H

#include <stdint.h>
#include <stddef.h>

typedef enum {
    RELORA_F32 = 0,
    RELORA_BF16 = 1,
    RELORA_F16 = 2,
} relora_dtype;

typedef enum {
    RELORA_OK = 0,
    RELORA_ERR_ARG = 1,       /* a size, stride or enum argument is out of range */
    RELORA_ERR_NONFINITE = 2, /* an input holds NaN or Inf; outputs untouched */
    RELORA_ERR_NOMEM = 3,     /* an allocation failed; outputs untouched */
    RELORA_ERR_OVERLAP = 4,   /* an output overlaps an input in memory; outputs untouched */
} relora_status;

typedef enum {
    RELORA_ROUND_NEAREST = 0,    /* round to nearest, ties to even */
    RELORA_ROUND_STOCHASTIC = 1, /* round up with probability proportional to the distance */
} relora_rounding;

/* One-line message for a status code (static storage). */
const char *relora_status_string(relora_status status);

/* Size in bytes of one element of `dtype` (0 for an unknown dtype). */
size_t relora_dtype_size(relora_dtype dtype);

/* Built once per instruction-set level: give this level's copies their own names (level.h). */
#ifdef RELORA_LEVEL
#include "level.h"
#endif

#endif
