/*
 * relora kernels: the table of one level's entry points (private; see level.h and cpu.h).
 * Field names differ from the function names on purpose: level.h renames those.
 */
#ifndef RELORA_KERNELS_H
#define RELORA_KERNELS_H

#include "merge.h"
#include "prune.h"
#include "reset.h"
#include "philox.h"
#include "internal.h"

typedef struct {
    relora_status (*merge)(void *, relora_dtype, int64_t, const void *, const void *, relora_dtype,
                           int64_t, int64_t, int64_t, float, relora_rounding, uint64_t, int);
    relora_status (*merge_check)(const void *, relora_dtype, int64_t, const void *, const void *,
                                 relora_dtype, int64_t, int64_t, int64_t, float, relora_rounding, int);
    relora_status (*merge_add)(void *, relora_dtype, int64_t, const float *, int64_t, int64_t, int64_t,
                               int64_t, int64_t, int64_t, float, relora_rounding, uint64_t, int);
    relora_status (*fill)(void *, relora_dtype, int64_t, float, uint64_t, uint64_t, int);
    relora_status (*reset)(void *, int64_t, void *, int64_t, relora_dtype, float, uint64_t, uint64_t, int);
    int64_t (*keep_count)(int64_t, double);
    relora_status (*prune_mag)(void *, relora_dtype, int64_t, double, int64_t *, int);
    relora_status (*prune_rand)(void *, relora_dtype, int64_t, double, uint64_t, uint64_t, int64_t *, int);
    philox_u32x4 (*block)(uint64_t, uint64_t, uint64_t);
    float (*uniform)(uint32_t);
    void (*normal_pair)(float[2], uint32_t, uint32_t);
    void (*blocks16)(uint64_t, uint64_t, uint64_t, uint32_t[64]);
    void (*words)(uint64_t, uint64_t, uint64_t, int64_t, uint32_t *);
    void (*normals64)(uint64_t, uint64_t, uint64_t, float[64]);
    float (*log_f32)(float);
    void (*sincos)(uint32_t, float *, float *);
} relora_kernel_table;

#endif
