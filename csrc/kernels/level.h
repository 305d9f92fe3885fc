/*
 * relora kernels: one source, several instruction-set levels.
 *
 * merge.c, prune.c, reset.c, philox.c and table.c are compiled once per level (setup.py, the C tests),
 * each time with the level's -m flags and -DRELORA_LEVEL=<name> (default, avx2, avx512, avx512_bf16).
 * This header, included by common.h when RELORA_LEVEL is defined, renames every function those files
 * export to <name>_<level>, so that the copies link side by side; table.c collects one level's copies in
 * a relora_kernel_table, and cpu.c (compiled once, for the baseline) defines the plain names, which
 * call the table of the level chosen at run time (cpu.h).
 */
#ifndef RELORA_LEVEL_H
#define RELORA_LEVEL_H

#define RELORA_CAT2(a, b) a##_##b
#define RELORA_CAT(a, b) RELORA_CAT2(a, b)
#define RELORA_AT_LEVEL(f) RELORA_CAT(f, RELORA_LEVEL)

#define lora_merge RELORA_AT_LEVEL(lora_merge)
#define lora_merge_check RELORA_AT_LEVEL(lora_merge_check)
#define lora_merge_add RELORA_AT_LEVEL(lora_merge_add)
#define normal_fill RELORA_AT_LEVEL(normal_fill)
#define lora_reset RELORA_AT_LEVEL(lora_reset)
#define prune_keep_count RELORA_AT_LEVEL(prune_keep_count)
#define prune_magnitude RELORA_AT_LEVEL(prune_magnitude)
#define prune_random RELORA_AT_LEVEL(prune_random)
#define philox_block RELORA_AT_LEVEL(philox_block)
#define philox_uniform_open0 RELORA_AT_LEVEL(philox_uniform_open0)
#define philox_normal_pair RELORA_AT_LEVEL(philox_normal_pair)
#define philox_blocks16 RELORA_AT_LEVEL(philox_blocks16)
#define philox_words RELORA_AT_LEVEL(philox_words)
#define philox_normals64 RELORA_AT_LEVEL(philox_normals64)
#define philox_log_f32 RELORA_AT_LEVEL(philox_log_f32)
#define philox_sincos_turn24 RELORA_AT_LEVEL(philox_sincos_turn24)
#define relora_kernels RELORA_AT_LEVEL(relora_kernels)

#endif
