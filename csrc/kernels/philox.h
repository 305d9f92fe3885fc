/*
 * Counter-based random numbers: Philox4x32-10 (Salmon et al., SC'11).
 *
 * A draw is a pure function of (key, counter): the same on every machine and for every thread count.
 * Convention used by every kernel here: key = 64-bit seed; counter = (block index: 64 bits,
 * offset: 64 bits), where block b yields 4 uint32 words used by elements 4b .. 4b+3 of the output.
 *
 * Exactly (so that a pure-PyTorch port, e.g. for GPUs, reproduces every bit):
 *   key     k0 = seed & 0xFFFFFFFF, k1 = seed >> 32
 *   counter c0 = block & 0xFFFFFFFF, c1 = block >> 32, c2 = offset & 0xFFFFFFFF, c3 = offset >> 32
 *   10 rounds; before every round but the first, k0 += 0x9E3779B9, k1 += 0xBB67AE85 (mod 2^32); a round:
 *       p0 = 0xD2511F53 * c0 (64-bit product), p1 = 0xCD9E8D57 * c2
 *       (c0, c1, c2, c3) <- (hi(p1) ^ c1 ^ k0, lo(p1), hi(p0) ^ c3 ^ k1, lo(p0))
 *   output words (v0, v1, v2, v3) = (c0, c1, c2, c3) after the 10th round. This is Random123's
 *   philox4x32_R(10, ctr, key); philox_block(0, 0, 0) = {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}.
 *   Element e of a stream uses word e % 4 of block e / 4 ("word e of the stream").
 *
 * Normals (reset): uniform u(w) = ((w >> 8) + 1) * 2^-24, in (0, 1], exact in fp32. For words (w0, w1):
 *       r = sqrt(-2 ln u(w0)), t = 2 pi u(w1)      (in double)
 *       z0 = (float)(r cos t),  z1 = (float)(r sin t)
 *   Block b gives the normals of elements 4b .. 4b+3: (z0, z1) from words (v0, v1), then (z0, z1) from
 *   words (v2, v3). Elements of a dtype other than fp32 are (std * z) computed in fp32, then rounded to
 *   nearest even into the dtype.
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
