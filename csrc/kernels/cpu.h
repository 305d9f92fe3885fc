/*
 * relora kernels: the instruction-set level that runs, chosen at run time.
 *
 * The kernels are built once per level (level.h); the first call of any kernel picks the highest level
 * that both the build has and the CPU supports (cpuid, through __builtin_cpu_supports), unless the
 * environment variable RELORA_CPU_CAPABILITY names a lower one. Levels, lowest first:
 *
 *   default      the architecture's baseline (x86-64: SSE2; aarch64: NEON), no FMA on x86-64
 *   avx2         AVX2 + FMA + F16C
 *   avx512       AVX-512 F, BW, VL, DQ (+ AVX2, FMA)
 *   avx512_bf16  avx512 + AVX512-BF16 (bf16 dot products in the merge)
 *
 * Only `default` exists on other architectures. A name the build or the CPU lacks is never run:
 * relora_cpu_set_level refuses it, and the environment variable falls back to the best level with a
 * one-line message on stderr.
 */
#ifndef RELORA_CPU_H
#define RELORA_CPU_H

#include "common.h"

enum { RELORA_CPU_DEFAULT = 0, RELORA_CPU_AVX2 = 1, RELORA_CPU_AVX512 = 2, RELORA_CPU_AVX512_BF16 = 3,
       RELORA_CPU_LEVELS = 4 };

/* Name of `level` ("default", ...), or NULL when `level` is out of range or not built. */
const char *relora_cpu_level_name(int level);

/* The level called `name`, or -1 when no built level has that name. */
int relora_cpu_level_from_name(const char *name);

/* The highest level built and supported by this CPU (what runs without RELORA_CPU_CAPABILITY). */
int relora_cpu_best_level(void);

/* The level that runs now. */
int relora_cpu_level(void);

/* Run `level` from now on (for every thread). RELORA_ERR_ARG if it is not built or the CPU lacks it;
 * then the level is unchanged. */
relora_status relora_cpu_set_level(int level);

#endif
