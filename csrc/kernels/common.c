/*
 * relora kernels: status strings, dtype sizes, checked allocation.
 */
#include <stdio.h>
#include <stdlib.h>

#include "common.h"
#include "internal.h"

const char *relora_status_string(relora_status status)
{
    switch (status) {
    case RELORA_OK: return "ok";
    case RELORA_ERR_ARG: return "invalid argument (size, stride, dtype, ratio or std out of range)";
    case RELORA_ERR_NONFINITE: return "input holds NaN or Inf; outputs left untouched";
    case RELORA_ERR_NOMEM: return "out of memory; outputs left untouched";
    }
    return "unknown relora status";
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
