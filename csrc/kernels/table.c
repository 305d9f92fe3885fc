/*
 * One level's entry points (kernels.h, level.h), collected for the dispatcher in cpu.c. Compiled once per level.
 */
#include "kernels.h"

#define RELORA_KERNEL_ENTRY(ret, name, params, args, ret_kw) name,
const relora_kernel_table RELORA_AT_LEVEL(relora_kernels) = {RELORA_LEVELED_KERNELS(RELORA_KERNEL_ENTRY)};
