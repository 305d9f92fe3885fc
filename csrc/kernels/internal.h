/*
 * relora kernels: private helpers shared by the .c files (not part of the API).
 *
 *   - bf16 / fp16 <-> fp32 conversion by portable bit manipulation (no _Float16, no intrinsics), so the
 *     same code builds with gcc, clang and nvcc's host compiler. fp32 -> 16 bit rounds to nearest, ties
 *     to even; NaN stays NaN (quiet, sign kept), +-Inf stays +-Inf, subnormals are exact where they can be.
 *   - checked allocation that reports file:line and returns NULL (never aborts);
 *   - the OpenMP thread count rule (nthreads <= 0: OpenMP default).
 */
#ifndef RELORA_INTERNAL_H
#define RELORA_INTERNAL_H

#include <stdint.h>
#include <stddef.h>
#include <string.h>

#include "common.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#define RELORA_INLINE static inline

/* ----------------------------------------------------------------------------------------------------
 * bit casts */

RELORA_INLINE uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
RELORA_INLINE float f32_from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* ----------------------------------------------------------------------------------------------------
 * bf16: the top 16 bits of an fp32. */

RELORA_INLINE float bf16_to_f32(uint16_t h) { return f32_from_bits((uint32_t)h << 16); }

/* Round to nearest even. NaN -> quiet NaN with the same sign and top payload bits. Values at or above
 * the midpoint between the largest bf16 and 2^128 round to Inf, as IEEE requires. */
RELORA_INLINE uint16_t f32_to_bf16(float f)
{
    uint32_t u = f32_bits(f);
    uint32_t rne = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    uint32_t nan = (u >> 16) | 0x0040u;
    return (uint16_t)(((u & 0x7FFFFFFFu) > 0x7F800000u) ? nan : rne);
}

/* ----------------------------------------------------------------------------------------------------
 * fp16 (IEEE binary16). Branch-free formulations (after M. Maratyszcza's FP16 library) that compilers
 * vectorise; they rely only on IEEE fp32 arithmetic in round-to-nearest mode (no -ffast-math). */

RELORA_INLINE float f16_to_f32(uint16_t h)
{
    const uint32_t w = (uint32_t)h << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    /* normal / Inf / NaN: move the exponent into place, then rescale by 2^-112 (exact). */
    const float normalized = f32_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    /* subnormal: put the mantissa under an exponent of 2^-1 and subtract 0.5 (exact). */
    const float denormalized = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t r = sign | (two_w < (1u << 27) ? f32_bits(denormalized) : f32_bits(normalized));
    return f32_from_bits(r);
}

/* Round to nearest even; overflow (|f| >= 65520) gives Inf; NaN gives a quiet NaN (0x7E00 | sign). */
RELORA_INLINE uint16_t f32_to_f16(float f)
{
    const float scale_to_inf = 0x1.0p+112f;
    const float scale_to_zero = 0x1.0p-110f;
    const uint32_t w = f32_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    float base = (f32_from_bits(shl1_w >> 1) * scale_to_inf) * scale_to_zero; /* |f|, overflow -> Inf */
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    /* adding 2^(e+13) (or 2^-1 for the subnormal range) makes the fp32 adder do the rounding */
    base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = f32_bits(base);
    const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
    const uint32_t mantissa_bits = bits & 0x00000FFFu;
    const uint32_t nonsign = exp_bits + mantissa_bits;
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

/* ----------------------------------------------------------------------------------------------------
 * load / store one element of any supported dtype as fp32 (store rounds to nearest even). */

RELORA_INLINE float load_as_f32(const void *p, relora_dtype dt, int64_t i)
{
    switch (dt) {
    case RELORA_BF16: return bf16_to_f32(((const uint16_t *)p)[i]);
    case RELORA_F16: return f16_to_f32(((const uint16_t *)p)[i]);
    default: return ((const float *)p)[i];
    }
}

RELORA_INLINE void store_from_f32(void *p, relora_dtype dt, int64_t i, float v)
{
    switch (dt) {
    case RELORA_BF16: ((uint16_t *)p)[i] = f32_to_bf16(v); break;
    case RELORA_F16: ((uint16_t *)p)[i] = f32_to_f16(v); break;
    default: ((float *)p)[i] = v; break;
    }
}

RELORA_INLINE int dtype_valid(relora_dtype dt)
{
    return dt == RELORA_F32 || dt == RELORA_BF16 || dt == RELORA_F16;
}

/* ----------------------------------------------------------------------------------------------------
 * checked allocation: on failure print "relora: ... at file:line" to stderr and return NULL; the caller
 * returns RELORA_ERR_NOMEM. Blocks are 64-byte aligned; free with relora_free. */

void *relora_malloc_at(size_t bytes, const char *file, int line);
void *relora_calloc_at(size_t count, size_t size, const char *file, int line);
void relora_free(void *p);
#define relora_malloc(bytes) relora_malloc_at((bytes), __FILE__, __LINE__)
#define relora_calloc(count, size) relora_calloc_at((count), (size), __FILE__, __LINE__)

/* ----------------------------------------------------------------------------------------------------
 * threads */

RELORA_INLINE int relora_threads(int nthreads)
{
#ifdef _OPENMP
    if (nthreads <= 0) nthreads = omp_get_max_threads();
#endif
    return nthreads < 1 ? 1 : nthreads;
}

RELORA_INLINE int relora_thread_id(void)
{
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

RELORA_INLINE int relora_num_threads(void)
{
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

/* ----------------------------------------------------------------------------------------------------
 * Philox in bulk (philox.c): same words as philox_block, 16 blocks per call. */

/* out[4*l + w] = word w of block (block0 + l), l < 16: the words of elements 4*block0 .. 4*block0+63. */
void philox_blocks16(uint64_t seed, uint64_t offset, uint64_t block0, uint32_t out[64]);

/* out[j] = word (first + j) of stream (seed, offset), j < count: element e uses word e%4 of block e/4. */
void philox_words(uint64_t seed, uint64_t offset, uint64_t first, int64_t count, uint32_t *out);

/* out[j] = normal j of the 64 that blocks block0 .. block0+15 give (philox.h), j < 64. */
void philox_normals64(uint64_t seed, uint64_t offset, uint64_t block0, float out[64]);

/* The fp32 pieces of the Box-Muller transform, exposed for the tests: ln(x) for x in [2^-24, 1], and
 * (cos, sin) of 2 pi j 2^-24 for j in [1, 2^24]. */
float philox_log_f32(float x);
void philox_sincos_turn24(uint32_t j, float *c, float *s);

#endif
