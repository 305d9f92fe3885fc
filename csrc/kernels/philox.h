/*
 * Counter-based random numbers: Philox4x32-10 (Salmon et al., SC'11).
 *
 * A draw is a pure function of (key, counter): the same on every machine and for every thread count.
 * Convention used by every kernel here: key = 64-bit seed; counter = (block index: 64 bits,
 * offset: 64 bits), where block b yields 4 uint32 words used by elements 4b .. 4b+3 of the output.
 */
#ifndef RELORA_PHILOX_H
#define RELORA_PHILOX_H

#include <stdint.h>

typedef struct { uint32_t v[4]; } philox_u32x4;

/* The four 32-bit words of block `block` for stream (`seed`, `offset`). */
philox_u32x4 philox_block(uint64_t seed, uint64_t offset, uint64_t block);

/* Uniform float in (0, 1], from the top 24 bits of `word` (never 0, so log() is safe). */
float philox_uniform_open0(uint32_t word);

/* Two independent N(0, 1) samples from two uniform words (Box-Muller, computed in double). */
void philox_normal_pair(float out[2], uint32_t word0, uint32_t word1);

#endif
