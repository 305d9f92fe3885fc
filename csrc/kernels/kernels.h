/*
 * relora kernels: the table of one level's entry points (private; see level.h and cpu.h), a field per
 * row of kernel_list.h.
 */
#ifndef RELORA_KERNELS_H
#define RELORA_KERNELS_H

#include "merge.h"
#include "prune.h"
#include "reset.h"
#include "philox.h"
#include "internal.h"
#include "kernel_list.h"

/* One level's entry points, a field per row of the list. */
#define RELORA_KERNEL_FIELD(ret, name, params, args, ret_kw) ret(*f_##name) params;
typedef struct {
    RELORA_LEVELED_KERNELS(RELORA_KERNEL_FIELD)
} relora_kernel_table;
#undef RELORA_KERNEL_FIELD

#endif
