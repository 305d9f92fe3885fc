/*
 * relora kernels: status strings, dtype sizes, the keep count and std bound, checked allocation.
 */
#include <stdio.h>
#include <stdlib.h>

#include <float.h>
#include <math.h>

#include "common.h"
#include "internal.h"
#include "prune.h"
#include "reset.h"

const char *relora_status_string(relora_status status)
{
    switch (status) {
    case RELORA_OK: return "ok";
    case RELORA_ERR_ARG: return "invalid argument (size, stride, dtype, ratio or std out of range)";
    case RELORA_ERR_OVERLAP: return "an array written in place overlaps another argument in memory";
    case RELORA_ERR_NONFINITE: return "input holds NaN or Inf; outputs left untouched";
    case RELORA_ERR_NOMEM: return "out of memory; outputs left untouched";
    }
    return "unknown relora status";
}

/* Compiled once (not per level): plain rules that the bindings ask too (relora_ext._C, the NumPy module). */

int64_t prune_keep_count(int64_t n, double ratio)
{
    if (n <= 0) return 0;
    if (!(ratio > 0.0)) return n;   /* also NaN: keep everything (callers validate ratio first) */
    if (ratio >= 1.0) return 0;
    int64_t drop = (int64_t)floor(ratio * (double)n);
    if (drop < 0) drop = 0;
    if (drop > n) drop = n;
    return n - drop;
}

/* The normals are bounded by sqrt(2 * 24 * ln 2) < 6 (their uniforms are >= 2^-24, philox.h), so below
 * this std every |A| < 6 std stays finite in the dtype. */
float reset_std_max(relora_dtype dtype)
{
    switch (dtype) {
    case RELORA_F32: return FLT_MAX / 6.0f;
    case RELORA_BF16: return 0x1.FEp127f / 6.0f; /* bf16's largest finite value */
    case RELORA_F16: return 65504.0f / 6.0f;      /* fp16's largest finite value */
    }
    return 0.0f;
}

size_t relora_dtype_size(relora_dtype dtype)
{
    switch (dtype) {
    case RELORA_F32: return 4;
    case RELORA_BF16: return 2;
    case RELORA_F16: return 2;
    }
    return 0;
}

/* 64-byte aligned block: the pointer malloc returned is kept just below the aligned address. */
void *relora_malloc_at(size_t bytes, const char *file, int line)
{
    const size_t align = 64;
    if (bytes > SIZE_MAX - align - sizeof(void *)) {
        fprintf(stderr, "relora: allocation of %zu bytes too large at %s:%d\n", bytes, file, line);
        return NULL;
    }
    void *raw = malloc(bytes + align + sizeof(void *));
    if (raw == NULL) {
        fprintf(stderr, "relora: malloc of %zu bytes failed at %s:%d\n", bytes, file, line);
        return NULL;
    }
    uintptr_t p = ((uintptr_t)raw + sizeof(void *) + align - 1) & ~(uintptr_t)(align - 1);
    ((void **)p)[-1] = raw;
    return (void *)p;
}

void *relora_calloc_at(size_t count, size_t size, const char *file, int line)
{
    if (size != 0 && count > SIZE_MAX / size) {
        fprintf(stderr, "relora: calloc of %zu x %zu bytes too large at %s:%d\n", count, size, file, line);
        return NULL;
    }
    void *p = relora_malloc_at(count * size, file, line);
    if (p != NULL) memset(p, 0, count * size);
    return p;
}

void relora_free(void *p)
{
    if (p != NULL) free(((void **)p)[-1]);
}
