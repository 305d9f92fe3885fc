/*
 * Philox4x32-10 (Salmon, Moraes, Dror, Shaw: "Parallel random numbers: as easy as 1, 2, 3", SC'11),
 * identical to Random123's philox4x32_R(10, ctr, key), and the Box-Muller transform used by reset.
 * See philox.h for the exact conventions (they are what a pure-PyTorch port must reproduce).
 *
 * The transform is plain fp32 arithmetic in a fixed order: no libm, and no contraction into FMA (that
 * would change the last bits from one compiler or machine to the next). sqrtf is IEEE (correctly
 * rounded); errno is never needed (its argument is >= 0), and not asking for it lets it vectorise.
 */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off", "no-math-errno")
#elif defined(__clang__)
#pragma clang fp contract(off)
#endif

#include <math.h>
#if (defined(__AVX512F__) || defined(__AVX2__)) && !defined(RELORA_NO_INTRINSICS)
#include <immintrin.h>
#elif defined(__SSE2__) && !defined(RELORA_NO_INTRINSICS)
#include <emmintrin.h>
#endif

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

/* Words of blocks block0 .. block0+15 as four lane arrays: c0[l] .. c3[l] = words 0..3 of block0 + l.
 * GNU C vectors of the level's register width (64, 32 or 16 bytes: wider ones are split by the compiler
 * through memory), so 16 blocks are 1, 2 or 4 passes. Each 32x32 -> 64 product is done on the even and
 * the odd lanes seen as uint64 lanes with (v)pmuludq, then the halves are put back in place: no widening
 * of the lanes and no shuffles. */
#if defined(__AVX512F__) && !defined(RELORA_NO_INTRINSICS)
#define PHILOX_VB 64
#elif defined(__AVX2__) && !defined(RELORA_NO_INTRINSICS)
#define PHILOX_VB 32
#else
#define PHILOX_VB 16
#endif
#define PHILOX_LANES (PHILOX_VB / 4)
typedef uint32_t vpu32 __attribute__((vector_size(PHILOX_VB)));
typedef uint64_t vpu64 __attribute__((vector_size(PHILOX_VB)));

/* m * (x & 0xFFFFFFFF) on each uint64 lane. The generic form is what gcc 12 compiles badly: into vpmullq
 * (64x64) with AVX-512, into a shift-and-add chain for the constant m below it (measured ~3x slower at
 * avx2); the intrinsics ask for (v)pmuludq. */
static inline vpu64 mul_even(vpu64 x, uint32_t m)
{
#if defined(__AVX512F__) && !defined(RELORA_NO_INTRINSICS)
    return (vpu64)_mm512_mul_epu32((__m512i)x, _mm512_set1_epi64((long long)m));
#elif defined(__AVX2__) && !defined(RELORA_NO_INTRINSICS)
    return (vpu64)_mm256_mul_epu32((__m256i)x, _mm256_set1_epi64x((long long)m));
#elif defined(__SSE2__) && !defined(RELORA_NO_INTRINSICS)
    return (vpu64)_mm_mul_epu32((__m128i)x, _mm_set1_epi64x((long long)m));
#else
    return (x & 0xFFFFFFFFu) * (uint64_t)m;
#endif
}

/* (hi, lo) 32-bit halves of m * x on every lane */
static inline void mulhilo(uint32_t m, vpu32 x, vpu32 *hi, vpu32 *lo)
{
    const vpu64 x64 = (vpu64)x, lo32 = (vpu64){0} + 0xFFFFFFFFu;
    const vpu64 pe = mul_even(x64, m);        /* products of the even lanes */
    const vpu64 po = mul_even(x64 >> 32, m);  /* and of the odd lanes */
    *hi = (vpu32)((pe >> 32) | (po & ~lo32));
    *lo = (vpu32)((pe & lo32) | (po << 32));
}

static inline void philox_lanes16(uint64_t seed, uint64_t offset, uint64_t block0,
                                  uint32_t c0[16], uint32_t c1[16], uint32_t c2[16], uint32_t c3[16])
{
    vpu32 iota;
    for (int l = 0; l < PHILOX_LANES; l++) iota[l] = (uint32_t)l;
    for (int pass = 0; pass < 16; pass += PHILOX_LANES) {
        /* the counter block0 + pass + l, its 64 bits in (x1, x0): a lane whose low word wrapped carries */
        const uint64_t b = block0 + (uint64_t)pass;
        vpu32 x0 = iota + (uint32_t)b;
        vpu32 x1 = ((vpu32){0} + (uint32_t)(b >> 32)) - (vpu32)(x0 < (uint32_t)b);
        vpu32 x2 = (vpu32){0} + (uint32_t)offset, x3 = (vpu32){0} + (uint32_t)(offset >> 32);
        uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
        for (int r = 0; r < 10; r++) {
            if (r > 0) { k0 += PHILOX_W0; k1 += PHILOX_W1; }
            vpu32 hi0, lo0, hi1, lo1;
            mulhilo(PHILOX_M0, x0, &hi0, &lo0);
            mulhilo(PHILOX_M1, x2, &hi1, &lo1);
            x0 = hi1 ^ x1 ^ k0; x1 = lo1;
            x2 = hi0 ^ x3 ^ k1; x3 = lo0;
        }
        memcpy(c0 + pass, &x0, PHILOX_VB); memcpy(c1 + pass, &x1, PHILOX_VB);
        memcpy(c2 + pass, &x2, PHILOX_VB); memcpy(c3 + pass, &x3, PHILOX_VB);
    }
}

/* out[4*l + w] is word w of block block0 + l, i.e. the words of elements 4*block0 .. 4*block0 + 63. */
void philox_blocks16(uint64_t seed, uint64_t offset, uint64_t block0, uint32_t out[64])
{
    uint32_t c0[16], c1[16], c2[16], c3[16];
    philox_lanes16(seed, offset, block0, c0, c1, c2, c3);
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

/* (static inline: the exported functions of a -fPIC build may be interposed, so calls to them are
 * neither inlined nor vectorised) */
static inline float uniform_open0(uint32_t word) { return (float)((word >> 8) + 1u) * 0x1.0p-24f; }

float philox_uniform_open0(uint32_t word) { return uniform_open0(word); }

/* ---------------------------------------------------------------------------------------------------- */
/* Box-Muller in fp32 */

/* ln(x) for a normal fp32 x > 0 (here x in [2^-24, 1]). FreeBSD's e_logf.c reduction and polynomial
 * (max error 0.83 ulp over all 2^24 uniforms): x = 2^k m with m in [sqrt(2)/2, sqrt(2)), f = m - 1
 * (exact), s = f / (2 + f), ln(1 + f) = f - f^2/2 + s (f^2/2 + R(s^2)). */
static inline float log_f32(float x)
{
    const float L1 = PHILOX_L1, L2 = PHILOX_L2, L3 = PHILOX_L3, L4 = PHILOX_L4;
    const float LN2_HI = PHILOX_LN2_HI, LN2_LO = PHILOX_LN2_LO; /* k * LN2_HI is exact */
    uint32_t i = f32_bits(x) + (0x3F800000u - 0x3F3504F3u);
    const int32_t k = (int32_t)(i >> 23) - 127;
    const float f = f32_from_bits((i & 0x007FFFFFu) + 0x3F3504F3u) - 1.0f;
    const float s = f / (2.0f + f);
    const float z = s * s, w = z * z;
    const float R = z * (L1 + w * L3) + w * (L2 + w * L4);
    const float h = 0.5f * f * f;
    const float dk = (float)k;
    return s * (h + R) + dk * LN2_LO - h + f + dk * LN2_HI;
}

/* (cos, sin) of 2 pi j 2^-24 for j in [1, 2^24]. The reduction is exact, in integers: q = nearest
 * quarter turn, g = the rest in quarter turns, in [-1/2, 1/2]; then minimax polynomials in g for
 * sin(g pi/2) and cos(g pi/2) (max error 1.7 and 1.3 ulp), and an exact rotation by q quarter turns. */
static inline void sincos_turn24(uint32_t j, float *c, float *s)
{
    const float S1 = PHILOX_S1, S3 = PHILOX_S3, S5 = PHILOX_S5, S7 = PHILOX_S7;
    const float C2 = PHILOX_C2, C4 = PHILOX_C4, C6 = PHILOX_C6, C8 = PHILOX_C8;
    const uint32_t q = (j + (1u << 21)) >> 22;
    const float g = (float)((int32_t)j - (int32_t)(q << 22)) * 0x1.0p-22f;
    const float x = g * g;
    const float sg = g * (S1 + x * (S3 + x * (S5 + x * S7)));
    const float cg = 1.0f + x * (C2 + x * (C4 + x * (C6 + x * C8)));
    const uint32_t quad = q & 3u;
    const float cr = (quad & 1u) ? sg : cg, sr = (quad & 1u) ? cg : sg; /* swap on odd quadrants */
    *c = (quad == 1u || quad == 2u) ? -cr : cr;
    *s = (quad >= 2u) ? -sr : sr;
}

/* The pair of normals from words (w0, w1), split in its three steps so that the bulk version below can
 * run the first and last on 16 lanes: y = -2 ln u(w0) and the unit vector (c, s); r = sqrt(y) (a libm
 * call, which gcc does not vectorise unless errno is off for the whole build); (r c, r s). */
static inline float radius2_f32(uint32_t w0) { return -2.0f * log_f32(uniform_open0(w0)); }

static inline void normal_pair_f32(uint32_t w0, uint32_t w1, float *z0, float *z1)
{
    const float r = sqrtf(radius2_f32(w0));
    float c, s;
    sincos_turn24((w1 >> 8) + 1u, &c, &s);
    *z0 = r * c;
    *z1 = r * s;
}

void philox_normal_pair(float out[2], uint32_t word0, uint32_t word1)
{
    normal_pair_f32(word0, word1, &out[0], &out[1]);
}

float philox_log_f32(float x) { return log_f32(x); }

void philox_sincos_turn24(uint32_t j, float *c, float *s) { sincos_turn24(j, c, s); }

/* The normals of elements 4*block0 .. 4*block0 + 63, in order (16 Philox blocks, 32 Box-Muller pairs). */
void philox_normals64(uint64_t seed, uint64_t offset, uint64_t block0, float out[64])
{
    uint32_t c0[16], c1[16], c2[16], c3[16];
    float y[32], r[32], cs[4][16];
    philox_lanes16(seed, offset, block0, c0, c1, c2, c3);
#pragma omp simd
    for (int l = 0; l < 16; l++) {
        y[l] = radius2_f32(c0[l]);
        y[16 + l] = radius2_f32(c2[l]);
        sincos_turn24((c1[l] >> 8) + 1u, &cs[0][l], &cs[1][l]);
        sincos_turn24((c3[l] >> 8) + 1u, &cs[2][l], &cs[3][l]);
    }
#if defined(__AVX512F__) && !defined(RELORA_NO_INTRINSICS)
    /* the same IEEE square roots, 16 at a time */
    _mm512_storeu_ps(r, _mm512_sqrt_ps(_mm512_loadu_ps(y)));
    _mm512_storeu_ps(r + 16, _mm512_sqrt_ps(_mm512_loadu_ps(y + 16)));
#else
    for (int l = 0; l < 32; l++) r[l] = sqrtf(y[l]);
#endif
    for (int l = 0; l < 16; l++) {
        out[4 * l + 0] = r[l] * cs[0][l]; out[4 * l + 1] = r[l] * cs[1][l];
        out[4 * l + 2] = r[16 + l] * cs[2][l]; out[4 * l + 3] = r[16 + l] * cs[3][l];
    }
}
