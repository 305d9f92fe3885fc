/*
 * merge: W += scale * B @ A, in place, rounding into W's dtype once per element.
 *
 *   W  (O, I) dtype wdtype, row stride ldw >= I elements, unit column stride
 *   B  (O, R) dtype adtype, contiguous (row-major)
 *   A  (R, I) dtype adtype, contiguous (row-major)
 *   wdtype, adtype in {F32, BF16, F16}
 *
 * Each W[i,j] becomes round(W[i,j] + scale * sum_k B[i,k] * A[k,j]) with the sum and the add in fp32.
 * rounding: RELORA_ROUND_NEAREST (ties to even), or RELORA_ROUND_STOCHASTIC (only meaningful for a
 * bf16/fp16 W; the random bits for W[i,j] are Philox word (i*I + j) of stream (seed, 0), so the result
 * does not depend on the thread count). For an fp32 W stochastic rounding is the same as nearest.
 *
 * Before anything is written, A and B are scanned: if either holds NaN or Inf the function returns
 * RELORA_ERR_NONFINITE and W is untouched. No temporary the size of W is allocated.
 * Stochastic rounding, exactly: with x the fp32 value W[i,j] + scale * sum and w its Philox word,
 *   bf16 W: bits(x) + (w & 0xFFFF), then keep the top 16 bits (round up with probability = the dropped
 *           fraction); fp16 W: with lo <= |x| <= hi the neighbouring fp16 magnitudes, take hi iff
 *           w < p * 2^32 where p = (|x| - lo) / (hi - lo); sign copied from x.
 *   NaN stays NaN; a finite x never becomes Inf unless round-to-nearest would (then nearest is used).
 * Fast path (the avx512_bf16 level, cpu.h, i.e. __AVX512BF16__ and __AVX512F__ defined, unless
 * RELORA_NO_INTRINSICS is defined; the C tests run every level): with bf16 A and B the sums use vdpbf16ps,
 * two k per instruction. bf16 x bf16 products are exact in fp32 and the sums are fp32 adds rounded to
 * nearest even, so the contract above holds, with one difference at the edge of the range: vdpbf16ps
 * ignores MXCSR and works with DAZ/FTZ, i.e. bf16 subnormals in A or B (|x| < 2^-126) count as zero
 * and partial sums below 2^-126 are flushed to zero (an absolute error below 2^-126 * R per element).
 * A bf16 W rounded to nearest uses vcvtne2ps2bf16 (RNE, also FTZ): segments whose fp32 result is
 * subnormal fall back to the scalar rounding, so W's rounding is exactly round-to-nearest-even.
 * Aliasing: W must not overlap A or B (checked: RELORA_ERR_OVERLAP). O, I >= 0 and R >= 1 (R = 0 is
 * RELORA_ERR_ARG); ldw >= I; scale must be finite (else RELORA_ERR_ARG). Pointers may be NULL where the
 * matching tensor is empty.
 */
#ifndef RELORA_MERGE_H
#define RELORA_MERGE_H

#include "common.h"

relora_status lora_merge(void *W, relora_dtype wdtype, int64_t ldw,
                         const void *B, const void *A, relora_dtype adtype,
                         int64_t O, int64_t I, int64_t R,
                         float scale, relora_rounding rounding, uint64_t seed, int nthreads);

/* The checks lora_merge makes before it writes anything (arguments, overlap, the NaN/Inf scan of A and
 * B), same arguments and status; W is not written. For a caller that computes the product elsewhere
 * (a BLAS) and then applies it with lora_merge_add. */
relora_status lora_merge_check(const void *W, relora_dtype wdtype, int64_t ldw,
                               const void *B, const void *A, relora_dtype adtype,
                               int64_t O, int64_t I, int64_t R,
                               float scale, relora_rounding rounding, int nthreads);

/* The epilogue alone, on the block of W (O, I) at rows row0 .. row0+rows-1, columns col0 .. col0+cols-1
 * (row stride ldw >= I):
 *   W[i, j] = round(W[i, j] + scale * C[i - row0, j - col0])
 * with C (rows, cols) fp32, row stride ldc >= cols, and the rounding of lora_merge (the same fp32 add,
 * the same Philox word (i*I + j) of stream (seed, 0) for stochastic rounding). With C the block of
 * B @ A summed in fp32, the result is lora_merge's up to the order of the sum. No NaN/Inf check. */
relora_status lora_merge_add(void *W, relora_dtype wdtype, int64_t ldw, const float *C, int64_t ldc,
                             int64_t row0, int64_t rows, int64_t col0, int64_t cols, int64_t I,
                             float scale, relora_rounding rounding, uint64_t seed, int nthreads);

#endif
