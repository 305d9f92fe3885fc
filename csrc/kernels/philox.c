/*
 * Philox4x32-10 (Salmon, Moraes, Dror, Shaw: "Parallel random numbers: as easy as 1, 2, 3", SC'11),
 * identical to Random123's philox4x32_R(10, ctr, key), and the Box-Muller transform used by reset.
 * See philox.h for the exact conventions (they are what a pure-PyTorch port must reproduce).
 */
#include <math.h>

#include "philox.h"
#include "internal.h"

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u

philox_u32x4 philox_block(uint64_t seed, uint64_t offset, uint64_t block)
{
    uint32_t c0 = (uint32_t)block, c1 = (uint32_t)(block >> 32);
    uint32_t c2 = (uint32_t)offset, c3 = (uint32_t)(offset >> 32);
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    for (int r = 0; r < 10; r++) {
        if (r > 0) { k0 += PHILOX_W0; k1 += PHILOX_W1; }
        uint64_t p0 = (uint64_t)PHILOX_M0 * c0;
        uint64_t p1 = (uint64_t)PHILOX_M1 * c2;
        uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0;
        uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
        c0 = n0; c1 = (uint32_t)p1; c2 = n2; c3 = (uint32_t)p0;
    }
    philox_u32x4 out = {{c0, c1, c2, c3}};
    return out;
}

/* Blocks block0 .. block0+15 at once (a loop over 16 lanes that compilers vectorise): out[4*l + w] is
 * word w of block block0 + l, i.e. the words of elements 4*block0 .. 4*block0 + 63 in order. */
void philox_blocks16(uint64_t seed, uint64_t offset, uint64_t block0, uint32_t out[64])
{
    uint32_t c0[16], c1[16], c2[16], c3[16];
    for (int l = 0; l < 16; l++) {
        uint64_t b = block0 + (uint64_t)l;
        c0[l] = (uint32_t)b; c1[l] = (uint32_t)(b >> 32);
        c2[l] = (uint32_t)offset; c3[l] = (uint32_t)(offset >> 32);
    }
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    for (int r = 0; r < 10; r++) {
        if (r > 0) { k0 += PHILOX_W0; k1 += PHILOX_W1; }
#pragma omp simd
        for (int l = 0; l < 16; l++) {
            uint64_t p0 = (uint64_t)PHILOX_M0 * c0[l];
            uint64_t p1 = (uint64_t)PHILOX_M1 * c2[l];
            uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1[l] ^ k0;
            uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3[l] ^ k1;
            c0[l] = n0; c1[l] = (uint32_t)p1; c2[l] = n2; c3[l] = (uint32_t)p0;
        }
    }
    for (int l = 0; l < 16; l++) {
        out[4 * l + 0] = c0[l]; out[4 * l + 1] = c1[l];
        out[4 * l + 2] = c2[l]; out[4 * l + 3] = c3[l];
    }
}

void philox_words(uint64_t seed, uint64_t offset, uint64_t first, int64_t count, uint32_t *out)
{
    uint32_t buf[64];
    uint64_t e = first;
    int64_t done = 0;
    while (done < count) {
        uint64_t block0 = e / 4;
        int skip = (int)(e % 4);
        philox_blocks16(seed, offset, block0, buf);
        int64_t take = 64 - skip;
        if (take > count - done) take = count - done;
        memcpy(out + done, buf + skip, (size_t)take * sizeof(uint32_t));
        done += take;
        e += (uint64_t)take;
    }
}

float philox_uniform_open0(uint32_t word)
{
    return (float)((word >> 8) + 1u) * 0x1.0p-24f;
}

void philox_normal_pair(float out[2], uint32_t word0, uint32_t word1)
{
    const double two_pi = 6.283185307179586476925286766559;
    double u1 = (double)philox_uniform_open0(word0);
    double u2 = (double)philox_uniform_open0(word1);
    double r = sqrt(-2.0 * log(u1));
    double t = two_pi * u2;
    out[0] = (float)(r * cos(t));
    out[1] = (float)(r * sin(t));
}
