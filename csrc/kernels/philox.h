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
 * Normals (reset): Box-Muller in fp32 arithmetic only, each operation rounded to nearest in the order
 * written, no FMA and no libm (sqrt is IEEE, correctly rounded), so every machine and a port in tensor
 * ops get the same bits. Uniform u(w) = ((w >> 8) + 1) * 2^-24, in (0, 1], exact in fp32. Words (w0, w1):
 *   ln u(w0), by FreeBSD's logf (max error 0.83 ulp):
 *       i = bits(u(w0)) + 0x004AFB0D (mod 2^32), k = (i >> 23) - 127 (signed),
 *       f = float_from_bits((i & 0x7FFFFF) + 0x3F3504F3) - 1         (u = 2^k (1 + f), exact)
 *       s = f / (2 + f), z = s * s, w = z * z, R = z * (L1 + w * L3) + w * (L2 + w * L4),
 *       h = 0.5 * f * f, ln = s * (h + R) + k * LN2_LO - h + f + k * LN2_HI   (left to right)
 *   r = sqrt(-2 * ln)
 *   angle t = 2 pi u(w1), reduced exactly in integers: j = (w1 >> 8) + 1, q = (j + 2^21) >> 22,
 *       g = (float)(j - q * 2^22) * 2^-22 in [-1/2, 1/2] (t = (q + g) pi/2), x = g * g,
 *       S = g * (S1 + x * (S3 + x * (S5 + x * S7))), C = 1 + x * (C2 + x * (C4 + x * (C6 + x * C8)))
 *       (sin and cos of g pi/2, minimax, max error 1.7 and 1.3 ulp), then a quarter-turn rotation:
 *       (cos t, sin t) = (C, S), (-S, C), (-C, -S), (S, -C) for q mod 4 = 0, 1, 2, 3
 *   z0 = r * cos t, z1 = r * sin t       (within 4 ulp of the same formula in double; checked)
 *   The constants L1..L4, LN2_HI, LN2_LO, S1..S7, C2..C8 are the fp32 literals PHILOX_* below.
 *   Block b gives the normals of elements 4b .. 4b+3: (z0, z1) from words (v0, v1), then (z0, z1) from
 *   words (v2, v3). Elements of a dtype other than fp32 are (std * z) computed in fp32, then rounded to
 *   nearest even into the dtype.
 */
#ifndef RELORA_PHILOX_H
#define RELORA_PHILOX_H

#include <stdint.h>

/* fp32 constants of the normal transform (see above) */
#define PHILOX_L1 0xaaaaaa.0p-24f
#define PHILOX_L2 0xccce13.0p-25f
#define PHILOX_L3 0x91e9ee.0p-25f
#define PHILOX_L4 0xf89e26.0p-26f
#define PHILOX_LN2_HI 0x1.62e3p-1f    /* ln 2 in 17 bits: k * LN2_HI is exact for |k| < 2^7 */
#define PHILOX_LN2_LO 0x1.2fefa2p-17f /* ln 2 - LN2_HI */
#define PHILOX_S1 0x1.921fb6p+0f
#define PHILOX_S3 -0x1.4abbbap-1f
#define PHILOX_S5 0x1.465e92p-4f
#define PHILOX_S7 -0x1.2d93p-8f
#define PHILOX_C2 -0x1.3bd3ccp+0f
#define PHILOX_C4 0x1.03c1dep-2f
#define PHILOX_C6 -0x1.55c5ep-6f
#define PHILOX_C8 0x1.d9d57p-11f

typedef struct { uint32_t v[4]; } philox_u32x4;

/* The four 32-bit words of block `block` for stream (`seed`, `offset`). */
philox_u32x4 philox_block(uint64_t seed, uint64_t offset, uint64_t block);

/* Uniform float in (0, 1], from the top 24 bits of `word` (never 0, so log() is safe). */
float philox_uniform_open0(uint32_t word);

/* Two independent N(0, 1) samples from two uniform words (Box-Muller in fp32, as above). */
void philox_normal_pair(float out[2], uint32_t word0, uint32_t word1);

#endif
