/*
 * relora kernels: choose the instruction-set level at run time (cpu.h) and define the plain entry
 * points (merge.h, prune.h, reset.h, philox.h), which call that level's copy (level.h).
 * Compiled once, for the architecture's baseline.
 */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu.h"
#include "kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#define RELORA_X86 1
extern const relora_kernel_table relora_kernels_default, relora_kernels_avx2, relora_kernels_avx512,
    relora_kernels_avx512_bf16;
static const relora_kernel_table *const tables[RELORA_CPU_LEVELS] = {
    &relora_kernels_default, &relora_kernels_avx2, &relora_kernels_avx512, &relora_kernels_avx512_bf16,
};
#else
#define RELORA_X86 0
extern const relora_kernel_table relora_kernels_default;
static const relora_kernel_table *const tables[RELORA_CPU_LEVELS] = {&relora_kernels_default};
#endif

static const char *const names[RELORA_CPU_LEVELS] = {"default", "avx2", "avx512", "avx512_bf16"};

const char *relora_cpu_level_name(int level)
{
    return (level >= 0 && level < RELORA_CPU_LEVELS && tables[level] != NULL) ? names[level] : NULL;
}

int relora_cpu_level_from_name(const char *name)
{
    for (int l = 0; name != NULL && l < RELORA_CPU_LEVELS; l++)
        if (tables[l] != NULL && strcmp(name, names[l]) == 0) return l;
    return -1;
}

int relora_cpu_best_level(void)
{
#if RELORA_X86 && defined(__GNUC__)
    /* __builtin_cpu_supports also checks that the OS saves the AVX / AVX-512 registers (XCR0) */
    __builtin_cpu_init();
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) return RELORA_CPU_DEFAULT;
    if (!(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")))
        return RELORA_CPU_AVX2;
    if (!__builtin_cpu_supports("avx512bf16")) return RELORA_CPU_AVX512;
    return RELORA_CPU_AVX512_BF16;
#else
    return RELORA_CPU_DEFAULT;
#endif
}

/* -1 until the first use; then the level that runs. */
static _Atomic int current = -1;

/* The level RELORA_CPU_CAPABILITY asks for, clamped to what runs here (with a message when it is). */
static int level_from_env(void)
{
    const int best = relora_cpu_best_level();
    const char *want = getenv("RELORA_CPU_CAPABILITY");
    if (want == NULL || want[0] == '\0') return best;
    const int l = relora_cpu_level_from_name(want);
    if (l < 0) {
        fprintf(stderr, "relora: RELORA_CPU_CAPABILITY=%s is not a level (default, avx2, avx512, "
                        "avx512_bf16 on x86-64; default elsewhere); running %s\n", want, names[best]);
        return best;
    }
    if (l > best) {
        fprintf(stderr, "relora: RELORA_CPU_CAPABILITY=%s needs instructions this CPU lacks; running %s "
                        "(its best level)\n", want, names[best]);
        return best;
    }
    return l;
}

int relora_cpu_level(void)
{
    int l = atomic_load_explicit(&current, memory_order_acquire);
    if (l < 0) {
        int expected = -1;
        l = level_from_env();
        if (!atomic_compare_exchange_strong(&current, &expected, l)) l = expected; /* set meanwhile */
    }
    return l;
}

relora_status relora_cpu_set_level(int level)
{
    if (relora_cpu_level_name(level) == NULL || level > relora_cpu_best_level()) return RELORA_ERR_ARG;
    atomic_store_explicit(&current, level, memory_order_release);
    return RELORA_OK;
}

static inline const relora_kernel_table *kt(void) { return tables[relora_cpu_level()]; }

/* the plain entry points (kernel_list.h): each calls its copy at the level that runs */
#define RELORA_DISPATCH(ret, name, params, args, ret_kw) \
    ret name params { ret_kw kt()->f_##name args; }
RELORA_LEVELED_KERNELS(RELORA_DISPATCH)
