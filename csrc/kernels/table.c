/*
 * One level's entry points (level.h), collected for the dispatcher in cpu.c. Compiled once per level.
 */
#include "kernels.h"

const relora_kernel_table relora_kernels = {
    lora_merge, lora_merge_check, lora_merge_add,
    normal_fill, lora_reset,
    prune_keep_count, prune_magnitude, prune_random,
    philox_block, philox_uniform_open0, philox_normal_pair,
    philox_blocks16, philox_words, philox_normals64, philox_log_f32, philox_sincos_turn24,
};
