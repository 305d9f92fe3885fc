/*
 * relora kernels: the one list of the entry points built once per instruction-set level (private; see
 * level.h and cpu.h). Each row: X(return type, name, (parameters), (arguments), return keyword or empty).
 * From it level.h renames one level's copies (<name>_<level>), kernels.h lays out the table of a level's
 * copies, table.c fills it, and cpu.c defines the plain names, which call the table of the level that runs.
 * The prototypes, with their documentation, stay in merge.h, prune.h, reset.h, philox.h and internal.h;
 * table.c's initialiser makes the compiler check that they agree with this list.
 */
#ifndef RELORA_KERNEL_LIST_H
#define RELORA_KERNEL_LIST_H

#define RELORA_LEVELED_KERNELS(X)                                                                            \
    X(relora_status, lora_merge,                                                                             \
      (void *W, relora_dtype wdtype, int64_t ldw, const void *B, const void *A, relora_dtype adtype,         \
       int64_t O, int64_t I, int64_t R, float scale, relora_rounding rounding, uint64_t seed, int nthreads), \
      (W, wdtype, ldw, B, A, adtype, O, I, R, scale, rounding, seed, nthreads), return)                      \
    X(relora_status, lora_merge_check,                                                                       \
      (const void *W, relora_dtype wdtype, int64_t ldw, const void *B, const void *A, relora_dtype adtype,   \
       int64_t O, int64_t I, int64_t R, float scale, relora_rounding rounding, int nthreads),                \
      (W, wdtype, ldw, B, A, adtype, O, I, R, scale, rounding, nthreads), return)                            \
    X(relora_status, lora_merge_add,                                                                         \
      (void *W, relora_dtype wdtype, int64_t ldw, const float *C, int64_t ldc, int64_t row0, int64_t rows,   \
       int64_t col0, int64_t cols, int64_t I, float scale, relora_rounding rounding, uint64_t seed,          \
       int nthreads),                                                                                        \
      (W, wdtype, ldw, C, ldc, row0, rows, col0, cols, I, scale, rounding, seed, nthreads), return)          \
    X(relora_status, normal_fill,                                                                            \
      (void *x, relora_dtype dtype, int64_t n, float std, uint64_t seed, uint64_t offset, int nthreads),     \
      (x, dtype, n, std, seed, offset, nthreads), return)                                                    \
    X(relora_status, lora_reset,                                                                             \
      (void *A, int64_t n_a, void *B, int64_t n_b, relora_dtype dtype, float std, uint64_t seed,             \
       uint64_t offset, int nthreads),                                                                       \
      (A, n_a, B, n_b, dtype, std, seed, offset, nthreads), return)                                          \
    X(relora_status, prune_magnitude,                                                                        \
      (void *x, relora_dtype dtype, int64_t n, double ratio, int64_t *kept, int nthreads),                   \
      (x, dtype, n, ratio, kept, nthreads), return)                                                          \
    X(relora_status, prune_random,                                                                           \
      (void *x, relora_dtype dtype, int64_t n, double ratio, uint64_t seed, uint64_t offset, int64_t *kept,  \
       int nthreads),                                                                                        \
      (x, dtype, n, ratio, seed, offset, kept, nthreads), return)                                            \
    X(philox_u32x4, philox_block, (uint64_t seed, uint64_t offset, uint64_t block), (seed, offset, block),   \
      return)                                                                                                \
    X(float, philox_uniform_open0, (uint32_t word), (word), return)                                          \
    X(void, philox_normal_pair, (float out[2], uint32_t word0, uint32_t word1), (out, word0, word1), )       \
    X(void, philox_blocks16, (uint64_t seed, uint64_t offset, uint64_t block0, uint32_t out[64]),            \
      (seed, offset, block0, out), )                                                                         \
    X(void, philox_words, (uint64_t seed, uint64_t offset, uint64_t first, int64_t count, uint32_t *out),    \
      (seed, offset, first, count, out), )                                                                   \
    X(void, philox_normals64, (uint64_t seed, uint64_t offset, uint64_t block0, float out[64]),              \
      (seed, offset, block0, out), )                                                                         \
    X(float, philox_log_f32, (float x), (x), return)                                                         \
    X(void, philox_sincos_turn24, (uint32_t j, float *c, float *s), (j, c, s), )

#endif
