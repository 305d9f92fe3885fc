/*
 * Tests for csrc/kernels: every kernel is compared with a reference computed here in double precision
 * (or, for selection and randomness, with a slow and obviously correct reimplementation). Prints the
 * max difference of each check; exits non-zero on the first failing group.
 *
 * build and run: csrc/tests/run_c_tests.sh
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "cpu.h"
#include "philox.h"
#include "merge.h"
#include "reset.h"
#include "prune.h"
#include "internal.h"

static int g_fail = 0;
#define CHECK(cond, ...)                                                      \
    do {                                                                      \
        if (!(cond)) {                                                        \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);                      \
            printf(__VA_ARGS__);                                              \
            printf("\n");                                                     \
            g_fail++;                                                         \
        }                                                                     \
    } while (0)

/* ---------------------------------------------------------------------------------------------------- */
/* helpers */

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t rng_u64(void)
{ /* splitmix64 */
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static double rng_unif(void) { return (double)(rng_u64() >> 11) * 0x1.0p-53; }
static double rng_normal(void)
{
    double u1 = 1.0 - rng_unif(), u2 = rng_unif();
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

static const char *dt_name(relora_dtype dt)
{
    return dt == RELORA_F32 ? "f32" : dt == RELORA_BF16 ? "bf16" : "f16";
}

static void *xmalloc(size_t bytes)
{
    void *p = malloc(bytes ? bytes : 1);
    if (!p) { printf("test: out of memory\n"); exit(2); }
    return p;
}

/* fill x (n,) of dtype with round(scale * N(0,1)) */
static void fill_normal(void *x, relora_dtype dt, int64_t n, double scale)
{
    for (int64_t i = 0; i < n; i++) store_from_f32(x, dt, i, (float)(scale * rng_normal()));
}

/* unit in the last place of a 16-bit dtype at magnitude |v| (spacing of the grid holding v) */
static double ulp16(relora_dtype dt, double v)
{
    v = fabs(v);
    int e = v > 0 ? ilogb(v) : -200;
    if (dt == RELORA_BF16) return ldexp(1.0, (e < -126 ? -126 : e) - 7);
    return ldexp(1.0, (e < -14 ? -14 : e) - 10);
}

/* ---------------------------------------------------------------------------------------------------- */
/* conversions and Philox */

static void test_conversions(void)
{
    int bad = 0;
    /* fp16 -> fp32 against ldexp, every value */
    for (uint32_t h = 0; h < 65536; h++) {
        int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
        float f = f16_to_f32((uint16_t)h);
        double ref = e == 0 ? ldexp(m, -24) : e < 31 ? ldexp(1024 + m, e - 25) : (m ? NAN : INFINITY);
        if (s) ref = -ref;
        if (isnan(ref) ? !isnan(f) : (double)f != ref) bad++;
        if (!isnan(ref) && f32_to_f16(f) != h) bad++;          /* round trip */
        if (isnan(ref) && (f32_to_f16(f) & 0x7C00) != 0x7C00) bad++;
        uint16_t b = (uint16_t)h;
        float fb = bf16_to_f32(b);
        if (!isnan(fb) && f32_to_bf16(fb) != b) bad++;
        if (isnan(fb) && !isnan(bf16_to_f32(f32_to_bf16(fb)))) bad++;
    }
    CHECK(bad == 0, "16-bit exhaustive conversions: %d mismatches", bad);
    /* fp32 -> 16 bit: nearest, ties to even, checked against neighbours in double */
    bad = 0;
    for (int it = 0; it < 400000; it++) {
        uint32_t u = (uint32_t)rng_u64();
        if (it % 4 == 0) u &= 0x387FFFFFu | 0x80000000u; /* fp16 subnormal range */
        if (it % 4 == 1) u = (u & 0xFFFF0000u) | 0x8000u; /* exact bf16 ties */
        if (it % 4 == 2) u = (u & 0xC7FFE000u) | 0x1000u; /* exact fp16 ties */
        float x = f32_from_bits(u);
        if (isnan(x)) {
            if (!isnan(f16_to_f32(f32_to_f16(x))) || !isnan(bf16_to_f32(f32_to_bf16(x)))) bad++;
            continue;
        }
        for (int k = 0; k < 2; k++) {
            uint16_t h = k ? f32_to_bf16(x) : f32_to_f16(x);
            double r = k ? bf16_to_f32(h) : f16_to_f32(h);
            double xd = x;
            double maxf = k ? 0x1.FEp127 : 65504.0, lim = k ? 0x1.FFp127 : 65520.0;
            if (fabs(xd) >= lim) { if (!isinf(r) || (r > 0) != (xd > 0)) bad++; continue; }
            if (fabs(r) > maxf) { bad++; continue; }
            uint16_t hm = (uint16_t)(h & 0x7FFF);
            double up = k ? bf16_to_f32((uint16_t)((h & 0x8000) | (hm + 1))) : f16_to_f32((uint16_t)((h & 0x8000) | (hm + 1)));
            double dn = hm ? (k ? bf16_to_f32((uint16_t)(h - 1)) : f16_to_f32((uint16_t)(h - 1))) : -r;
            double d = fabs(xd - r);
            if (d > fabs(xd - up) || d > fabs(xd - dn)) bad++;
            if ((d == fabs(xd - up) || (hm && d == fabs(xd - dn))) && d > 0 && (h & 1)) bad++; /* tie: even */
        }
    }
    CHECK(bad == 0, "fp32 -> 16 bit rounding: %d mismatches", bad);
    printf("conversions: exhaustive 16-bit and 400k random fp32 -> 16-bit, mismatches %d\n", bad);
}

static void test_philox(void)
{
    /* Random123 known-answer vectors for philox4x32_R(10); ctr = (block lo, hi, offset lo, hi) */
    static const struct { uint64_t seed, offset, block; uint32_t out[4]; } kat[] = {
        {0, 0, 0, {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
        {~0ull, ~0ull, ~0ull, {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
        {0x299f31d0a4093822ull, 0x0370734413198a2eull, 0x85a308d3243f6a88ull,
         {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
    };
    for (int i = 0; i < 3; i++) {
        philox_u32x4 r = philox_block(kat[i].seed, kat[i].offset, kat[i].block);
        CHECK(memcmp(r.v, kat[i].out, 16) == 0, "philox KAT %d", i);
    }
    /* bulk words agree with philox_block, across the 2^32 block boundary too */
    uint32_t w[300];
    int bad = 0;
    uint64_t firsts[2] = {5, ((uint64_t)1 << 34) - 37};
    for (int f = 0; f < 2; f++) {
        philox_words(123, 456, firsts[f], 300, w);
        for (int j = 0; j < 300; j++) {
            uint64_t e = firsts[f] + (uint64_t)j;
            if (philox_block(123, 456, e / 4).v[e % 4] != w[j]) bad++;
        }
    }
    CHECK(bad == 0, "philox_words vs philox_block: %d mismatches", bad);
    CHECK(philox_uniform_open0(0) == 0x1.0p-24f && philox_uniform_open0(0xFFFFFFFFu) == 1.0f, "uniform range");
    float z[2];
    philox_normal_pair(z, 0xFFFFFFFFu, 0); /* u1 = 1 -> r = 0 */
    CHECK(z[0] == 0.0f && z[1] == 0.0f, "normal pair at u1 = 1");
    printf("philox: 3 KAT vectors, bulk words, mismatches %d\n", bad);
}

/* |got - ref| in units of the fp32 ulp at ref, with |ref| below 2^-24 counted as 2^-24: the exact
 * zeros of cos and sin come out of double libm as ~1e-16 (the nonzero values here are above 2^-22). */
static double ulps32(float got, double ref)
{
    double a = fabs(ref) < 0x1.0p-24 ? 0x1.0p-24 : fabs(ref);
    return fabs((double)got - ref) / ldexp(1.0, ilogb(a) - 23);
}

/* The fp32 pieces of Box-Muller against double libm, on every input they can get (2^24 each). */
static void test_box_muller(void)
{
    double worst_log = 0, worst_cos = 0, worst_sin = 0;
    for (uint32_t j = 1; j <= (1u << 24); j++) {
        const float u = (float)j * 0x1.0p-24f;
        double e = ulps32(philox_log_f32(u), log((double)u));
        if (!(e <= worst_log)) worst_log = e;
        float c, s;
        philox_sincos_turn24(j, &c, &s);
        const double t = 6.283185307179586476925286766559 * ((double)j * 0x1.0p-24);
        e = ulps32(c, cos(t));
        if (!(e <= worst_cos)) worst_cos = e;
        e = ulps32(s, sin(t));
        if (!(e <= worst_sin)) worst_sin = e;
    }
    printf("box-muller fp32: max error over all 2^24 inputs: log %.3f ulp, cos %.3f ulp, sin %.3f ulp\n",
           worst_log, worst_cos, worst_sin);
    CHECK(worst_log <= 1.0 && worst_cos <= 2.0 && worst_sin <= 2.0, "log/sincos above 1/2/2 ulp");
    CHECK(philox_log_f32(1.0f) == 0.0f, "log(1) = %a", philox_log_f32(1.0f));
    /* whole normals against the double formula of the same words */
    double worst = 0;
    for (int it = 0; it < 2000000; it++) {
        uint32_t w0 = (uint32_t)rng_u64(), w1 = (uint32_t)rng_u64();
        if (it < 4096) w0 = (uint32_t)it << 8; /* the far tail: u = (it + 1) 2^-24 */
        float z[2];
        philox_normal_pair(z, w0, w1);
        double r = sqrt(-2.0 * log((double)philox_uniform_open0(w0)));
        double t = 6.283185307179586476925286766559 * (double)philox_uniform_open0(w1);
        double e0 = ulps32(z[0], r * cos(t)), e1 = ulps32(z[1], r * sin(t));
        if (!(e0 <= worst)) worst = e0;
        if (!(e1 <= worst)) worst = e1;
    }
    printf("box-muller fp32: normals vs double formula, max error %.3f ulp\n", worst);
    CHECK(worst <= 4.0, "normal pair above 4 ulp (%.3f)", worst);
}

/* ---------------------------------------------------------------------------------------------------- */
/* merge */

/* 1: merge_case goes through lora_merge_check + lora_merge_add (the epilogue of the BLAS path) with the
 * product computed here, in blocks; 0: lora_merge. */
static int g_via_add = 0;

static relora_status merge_via_add(void *W, relora_dtype wd, int64_t ldw, const void *B, const void *A,
                                   relora_dtype ad, int64_t O, int64_t I, int64_t R, float scale,
                                   relora_rounding rnd, uint64_t seed, int nthreads)
{
    relora_status st = lora_merge_check(W, wd, ldw, B, A, ad, O, I, R, scale, rnd, nthreads);
    if (st != RELORA_OK || O == 0 || I == 0) return st;
    float *C = xmalloc((size_t)(O * I) * 4);
    for (int64_t i = 0; i < O; i++)
        for (int64_t j = 0; j < I; j++) {
            double acc = 0;
            for (int64_t k = 0; k < R; k++)
                acc += (double)load_as_f32(B, ad, i * R + k) * (double)load_as_f32(A, ad, k * I + j);
            C[i * I + j] = (float)acc;
        }
    /* rows [0, h) whole; rows [h, O) in two column blocks (C's row stride stays I) */
    const int64_t h = O / 2, c = I / 3;
    st = lora_merge_add(W, wd, ldw, C, I, 0, h, 0, I, I, scale, rnd, seed, nthreads);
    if (st == RELORA_OK) st = lora_merge_add(W, wd, ldw, C + h * I, I, h, O - h, 0, c, I, scale, rnd, seed, nthreads);
    if (st == RELORA_OK)
        st = lora_merge_add(W, wd, ldw, C + h * I + c, I, h, O - h, c, I - c, I, scale, rnd, seed, nthreads);
    free(C);
    return st;
}

/* One merge against a double reference. Returns max |err| / tol. */
static double merge_case(relora_dtype wd, relora_dtype ad, int64_t O, int64_t I, int64_t R, int64_t pad,
                         relora_rounding rnd, int nthreads, float scale)
{
    const int64_t ldw = I + pad;
    const size_t wes = relora_dtype_size(wd), aes = relora_dtype_size(ad);
    unsigned char *W = xmalloc((size_t)(O * ldw) * wes), *W0 = xmalloc((size_t)(O * ldw) * wes);
    void *B = xmalloc((size_t)(O * R) * aes), *A = xmalloc((size_t)(R * I) * aes);
    fill_normal(W, wd, O * ldw, 1.0);
    memcpy(W0, W, (size_t)(O * ldw) * wes);
    fill_normal(B, ad, O * R, 0.5);
    fill_normal(A, ad, R * I, 0.5);
    relora_status st = (g_via_add ? merge_via_add : lora_merge)(W, wd, ldw, B, A, ad, O, I, R, scale, rnd, 42,
                                                                  nthreads);
    CHECK(st == RELORA_OK, "merge status %d", st);
    double worst = 0;
    const double eps32 = 0x1.0p-24;
    for (int64_t i = 0; i < O; i++) {
        for (int64_t j = 0; j < ldw; j++) {
            const int64_t e = i * ldw + j;
            if (j >= I) { /* padding untouched */
                if (memcmp(W + e * wes, W0 + e * wes, wes) != 0) worst = INFINITY;
                continue;
            }
            double acc = 0, accabs = 0;
            for (int64_t k = 0; k < R; k++) {
                double p = (double)load_as_f32(B, ad, i * R + k) * (double)load_as_f32(A, ad, k * I + j);
                acc += p; accabs += fabs(p);
            }
            double w0 = load_as_f32(W0, wd, e);
            double ref = w0 + (double)scale * acc;
            double got = load_as_f32(W, wd, e);
            /* fp32 error of the sum (any order, fused or not), the scaling and the add */
            double tol = eps32 * ((double)(R + 3) * fabs((double)scale) * accabs + fabs(w0) + fabs(ref)) + 1e-30;
            if (wd != RELORA_F32) tol += (rnd == RELORA_ROUND_NEAREST ? 0.5 : 1.0) * ulp16(wd, fabs(ref) + tol);
            double r = fabs(got - ref) / tol;
            if (!(r <= worst)) worst = r; /* NaN -> worst NaN */
        }
    }
    free(W); free(W0); free(B); free(A);
    return worst;
}

static void test_merge_accuracy(void)
{
    const relora_dtype dts[3] = {RELORA_F32, RELORA_BF16, RELORA_F16};
    const int64_t odd[3] = {1, 7, 33};
    double worst_all = 0;
    int cases = 0;
    for (int a = 0; a < 3; a++)
        for (int b = 0; b < 3; b++) {
            double worst = 0;
            for (int io = 0; io < 3; io++)
                for (int ii = 0; ii < 3; ii++)
                    for (int ir = 0; ir < 3; ir++) {
                        int64_t O = odd[io], I = odd[ii], R = odd[ir];
                        int64_t pad = (io + ii + ir) % 2 ? 3 : 0;
                        relora_rounding rnd = (relora_rounding)((io + ir) % 2);
                        double r = merge_case(dts[a], dts[b], O, I, R, pad, rnd, 1 + (ii % 2), 0.75f);
                        if (!(r <= worst)) worst = r;
                        cases++;
                    }
            /* rounder and bigger shapes: several tiles, both threads, edge slivers */
            static const int64_t big[][3] = {{96, 512, 8}, {200, 300, 64}, {64, 1100, 16}, {130, 96, 256}};
            for (int s = 0; s < 4; s++)
                for (int rnd = 0; rnd < 2; rnd++) {
                    double r = merge_case(dts[a], dts[b], big[s][0], big[s][1], big[s][2], s == 1 ? 17 : 0,
                                          (relora_rounding)rnd, 2, s == 2 ? -2.0f : 0.5f);
                    if (!(r <= worst)) worst = r;
                    cases++;
                }
            printf("merge%s W %-4s A/B %-4s: max |err| / tol = %.3f\n", g_via_add ? " (check + add)" : "",
                   dt_name(dts[a]), dt_name(dts[b]), worst);
            CHECK(worst <= 1.0, "merge W %s A/B %s: error above tolerance (%.3f)", dt_name(dts[a]),
                  dt_name(dts[b]), worst);
            if (!(worst <= worst_all)) worst_all = worst;
        }
    printf("merge: %d cases, max |err| / tol = %.3f\n", cases, worst_all);
}

/* fp32 W, power-of-two scale: the epilogue (lora_merge_add, and lora_merge with R = 1, whose sum is one
 * exact product) is exactly fmaf(scale, c, w) at every level, including where scale * c underflows into
 * the subnormals or overflows (levels without FMA take a fast fp32 path there only when scale * c is
 * exact, merge.c). Inputs: random magnitudes over the whole exponent range, and ties. */
static void test_merge_add_pow2_exact(void)
{
    static const float scales[] = {0.5f, 0.125f, 2.0f, -0.25f, 0x1.0p-60f, 0x1.0p+60f, 0x1.0p-120f};
    const int64_t O = 9, I = 203;
    float *W = xmalloc(sizeof(float) * (size_t)(O * I)), *W0 = xmalloc(sizeof(float) * (size_t)(O * I));
    float *C = xmalloc(sizeof(float) * (size_t)(O * I));
    int bad = 0;
    for (size_t si = 0; si < sizeof scales / sizeof scales[0]; si++) {
        const float s = scales[si];
        for (int64_t e = 0; e < O * I; e++) {
            const int kind = (int)(e % 5);
            const double u = rng_normal();
            W0[e] = (float)(u * ldexp(1.0, (int)(e % 61) - 30));
            if (kind == 0) C[e] = (float)(rng_normal() * ldexp(1.0, -140 + (int)(e % 40))); /* s*c tiny */
            else if (kind == 1) C[e] = (float)(rng_normal() * 0x1.0p100);                 /* s*c huge */
            else if (kind == 2) C[e] = ldexpf(1.0f, -25) * (float)(1 + 2 * (e % 7)) / s;   /* near ties */
            else C[e] = (float)rng_normal() * W0[e];
            if (!isfinite(C[e])) C[e] = 1.0f;
        }
        memcpy(W, W0, sizeof(float) * (size_t)(O * I));
        CHECK(lora_merge_add(W, RELORA_F32, I, C, I, 0, O, 0, I, I, s, RELORA_ROUND_NEAREST, 0, 2) == RELORA_OK,
              "lora_merge_add");
        for (int64_t e = 0; e < O * I; e++) {
            const float want = fmaf(s, C[e], W0[e]);
            if (memcmp(&want, &W[e], 4) != 0 && !(want != want && W[e] != W[e])) bad++;
        }
        /* R = 1 through lora_merge: B = 1, A = one row of C */
        const float one[9] = {1, 1, 1, 1, 1, 1, 1, 1, 1};
        memcpy(W, W0, sizeof(float) * (size_t)(O * I));
        int finite = 1;
        for (int64_t j = 0; j < I; j++) finite &= isfinite(C[j]);
        if (finite) {
            CHECK(lora_merge(W, RELORA_F32, I, one, C, RELORA_F32, O, I, 1, s, RELORA_ROUND_NEAREST, 0, 2) == RELORA_OK,
                  "lora_merge R = 1");
            for (int64_t e = 0; e < O * I; e++) {
                const float want = fmaf(s, C[e % I], W0[e]);
                if (memcmp(&want, &W[e], 4) != 0 && !(want != want && W[e] != W[e])) bad++;
            }
        }
    }
    printf("merge fp32 W, power-of-two scale: %d results differ from fmaf\n", bad);
    CHECK(bad == 0, "merge with a power-of-two scale must equal fmaf(scale, c, w) (%d differ)", bad);
    free(W); free(W0); free(C);
}

/* Stochastic rounding: deterministic across thread counts, unbiased, one of the two neighbours. */
static void test_merge_stochastic(void)
{
    const relora_dtype wds[2] = {RELORA_BF16, RELORA_F16};
    for (int t = 0; t < 2; t++) {
        relora_dtype wd = wds[t];
        const int64_t O = 64, I = 513, R = 1;
        /* W = w0, update = 0.3 ulp: each element rounds up with probability 0.3 */
        const double w0s[2] = {1.0, t == 1 ? 0x1.0p-20 : 0x1.0p-130}; /* normal and subnormal */
        for (int v = 0; v < 2; v++) {
            double w0 = w0s[v], ulp = ulp16(wd, w0);
            uint16_t *W1 = xmalloc((size_t)(O * I) * 2), *W2 = xmalloc((size_t)(O * I) * 2);
            float *B = xmalloc((size_t)O * 4), *A = xmalloc((size_t)I * 4);
            for (int64_t i = 0; i < O * I; i++) W1[i] = W2[i] = wd == RELORA_BF16 ? f32_to_bf16((float)w0) : f32_to_f16((float)w0);
            for (int64_t i = 0; i < O; i++) B[i] = 1.0f;
            for (int64_t j = 0; j < I; j++) A[j] = (float)(0.3 * ulp);
            relora_status s1 = lora_merge(W1, wd, I, B, A, RELORA_F32, O, I, R, 1.0f, RELORA_ROUND_STOCHASTIC, 7, 1);
            relora_status s2 = lora_merge(W2, wd, I, B, A, RELORA_F32, O, I, R, 1.0f, RELORA_ROUND_STOCHASTIC, 7, 2);
            CHECK(s1 == RELORA_OK && s2 == RELORA_OK, "SR merge status");
            CHECK(memcmp(W1, W2, (size_t)(O * I) * 2) == 0, "SR merge %s differs between 1 and 2 threads", dt_name(wd));
            int64_t ups = 0, other = 0;
            for (int64_t i = 0; i < O * I; i++) {
                double g = load_as_f32(W1, wd, i);
                if (g == w0 + ulp) ups++;
                else if (g != w0) other++;
            }
            double frac = (double)ups / (double)(O * I);
            double sd = sqrt(0.21 / (double)(O * I));
            printf("merge SR %-4s at %g: fraction rounded up %.4f (expect 0.3 +- %.4f), other values %lld\n",
                   dt_name(wd), w0, frac, sd, (long long)other);
            CHECK(other == 0 && fabs(frac - 0.3) < 5 * sd, "SR merge %s biased", dt_name(wd));
            /* a different seed gives a different pattern */
            lora_merge(W2, wd, I, B, A, RELORA_F32, O, I, R, 0.0f, RELORA_ROUND_STOCHASTIC, 8, 2);
            free(W1); free(W2); free(B); free(A);
        }
    }
    /* SR never makes Inf out of a finite value unless nearest does; NaN W stays NaN */
    {
        uint16_t W[4] = {0x7F7F, 0x7F7F, 0x7FC0, 0xFF7F};
        float B[4] = {1, 1, 1, 1}, A[1] = {0x1.0p112f}; /* tiny push toward overflow: stays finite */
        CHECK(lora_merge(W, RELORA_BF16, 1, B, A, RELORA_F32, 4, 1, 1, 1.0f, RELORA_ROUND_STOCHASTIC, 1, 1) == RELORA_OK, "status");
        CHECK(W[0] == 0x7F7F && W[1] == 0x7F7F && (W[2] & 0x7FFF) > 0x7F80 && W[3] == 0xFF7F, "bf16 SR overflow/NaN: %04x %04x %04x %04x", W[0], W[1], W[2], W[3]);
        uint16_t H[3] = {0x7BFF, 0x7BFF, 0x7E00};
        float Ah[1] = {8.0f};
        CHECK(lora_merge(H, RELORA_F16, 1, B, Ah, RELORA_F32, 3, 1, 1, 1.0f, RELORA_ROUND_STOCHASTIC, 1, 1) == RELORA_OK, "status");
        CHECK(H[0] == 0x7BFF && H[1] == 0x7BFF && (H[2] & 0x7FFF) > 0x7C00, "f16 SR overflow/NaN: %04x %04x %04x", H[0], H[1], H[2]);
    }
}

static void test_merge_refusals(void)
{
    const relora_dtype dts[3] = {RELORA_F32, RELORA_BF16, RELORA_F16};
    const int64_t O = 9, I = 35, R = 4;
    int refused = 0;
    for (int a = 0; a < 3; a++) {
        relora_dtype ad = dts[a];
        size_t aes = relora_dtype_size(ad);
        float W[9 * 35], W0[9 * 35];
        unsigned char *B = xmalloc((size_t)(O * R) * aes), *A = xmalloc((size_t)(R * I) * aes);
        for (int64_t i = 0; i < O * I; i++) W[i] = W0[i] = (float)i;
        const float bad_vals[3] = {NAN, INFINITY, -INFINITY};
        for (int which = 0; which < 2; which++)
            for (int v = 0; v < 3; v++) {
                fill_normal(B, ad, O * R, 1.0);
                fill_normal(A, ad, R * I, 1.0);
                if (which == 0) store_from_f32(A, ad, R * I - 1 - v, bad_vals[v]);
                else store_from_f32(B, ad, v * 3, bad_vals[v]);
                relora_status st = lora_merge(W, RELORA_F32, I, B, A, ad, O, I, R, 1.0f, RELORA_ROUND_NEAREST, 0, 2);
                CHECK(st == RELORA_ERR_NONFINITE, "non-finite %s in %s not refused (%d)", which ? "B" : "A", dt_name(ad), st);
                CHECK(memcmp(W, W0, sizeof W) == 0, "W touched by a refused merge");
                refused += st == RELORA_ERR_NONFINITE;
            }
        fill_normal(B, ad, O * R, 1.0);
        fill_normal(A, ad, R * I, 1.0);
        struct { int64_t ldw, O, I, R; relora_dtype wd, ad; int rnd; float scale; const void *W; } bad[] = {
            {I, O, I, 0, RELORA_F32, ad, 0, 1.0f, W},      /* R = 0 */
            {I - 1, O, I, R, RELORA_F32, ad, 0, 1.0f, W},  /* ldw < I */
            {I, -1, I, R, RELORA_F32, ad, 0, 1.0f, W},     /* O < 0 */
            {I, O, -2, R, RELORA_F32, ad, 0, 1.0f, W},     /* I < 0 */
            {I, O, I, R, (relora_dtype)7, ad, 0, 1.0f, W}, /* bad W dtype */
            {I, O, I, R, RELORA_F32, (relora_dtype)-1, 0, 1.0f, W},
            {I, O, I, R, RELORA_F32, ad, 5, 1.0f, W},      /* bad rounding */
            {I, O, I, R, RELORA_F32, ad, 0, NAN, W},       /* non-finite scale */
            {I, O, I, R, RELORA_F32, ad, 0, INFINITY, W},
            {I, O, I, R, RELORA_F32, ad, 0, 1.0f, NULL},   /* NULL W */
        };
        for (size_t c = 0; c < sizeof bad / sizeof bad[0]; c++) {
            relora_status st = lora_merge((void *)bad[c].W, bad[c].wd, bad[c].ldw, B, A, bad[c].ad, bad[c].O,
                                          bad[c].I, bad[c].R, bad[c].scale, (relora_rounding)bad[c].rnd, 0, 1);
            CHECK(st == RELORA_ERR_ARG, "bad merge argument set %zu accepted (%d)", c, st);
            CHECK(memcmp(W, W0, sizeof W) == 0, "W touched by a refused merge (case %zu)", c);
            refused += st == RELORA_ERR_ARG;
        }
        CHECK(lora_merge(W, RELORA_F32, I, NULL, A, ad, O, I, R, 1.0f, RELORA_ROUND_NEAREST, 0, 1) == RELORA_ERR_ARG, "NULL B");
        CHECK(lora_merge(W, RELORA_F32, I, B, W, ad, O, I, R, 1.0f, RELORA_ROUND_NEAREST, 0, 1) == RELORA_ERR_OVERLAP, "A aliases W");
        /* empty shapes are fine */
        CHECK(lora_merge(NULL, RELORA_F32, 0, NULL, NULL, ad, 0, 0, 3, 1.0f, RELORA_ROUND_NEAREST, 0, 1) == RELORA_OK, "empty merge");
        CHECK(lora_merge(NULL, RELORA_F32, 0, B, NULL, ad, 5, 0, 3, 1.0f, RELORA_ROUND_NEAREST, 0, 1) == RELORA_OK, "I = 0 merge");
        CHECK(memcmp(W, W0, sizeof W) == 0, "W touched");
        free(A); free(B);
    }
    printf("merge refusals: %d refused as expected, W untouched\n", refused);
}

/* ---------------------------------------------------------------------------------------------------- */
/* reset */

static void test_reset(void)
{
    const int64_t n = 1000003;
    float *x1 = xmalloc((size_t)n * 4), *x2 = xmalloc((size_t)n * 4);
    const float std = 0.02f;
    CHECK(normal_fill(x1, RELORA_F32, n, std, 11, 3, 1) == RELORA_OK, "fill");
    CHECK(normal_fill(x2, RELORA_F32, n, std, 11, 3, 2) == RELORA_OK, "fill");
    CHECK(memcmp(x1, x2, (size_t)n * 4) == 0, "normal_fill differs between 1 and 2 threads");
    /* against the element-wise definition */
    int64_t bad = 0;
    for (int64_t e = 0; e < n; e += (e < 1000 ? 1 : 997)) {
        philox_u32x4 b = philox_block(11, 3, (uint64_t)e / 4);
        float z[2];
        int w = (int)(e % 4);
        philox_normal_pair(z, b.v[w & 2], b.v[(w & 2) + 1]);
        if (x1[e] != std * z[w & 1]) bad++;
    }
    CHECK(bad == 0, "normal_fill differs from the element-wise definition (%lld)", (long long)bad);
    double s1 = 0, s2 = 0;
    for (int64_t i = 0; i < n; i++) { double v = x1[i] / std; s1 += v; s2 += v * v; }
    double mean = s1 / n, var = s2 / n - mean * mean;
    printf("reset: n = %lld, mean/std = %.5f (|.| < %.5f), var/std^2 = %.5f, element-wise mismatches %lld\n",
           (long long)n, mean, 5 / sqrt((double)n), var, (long long)bad);
    CHECK(fabs(mean) < 5 / sqrt((double)n) && fabs(var - 1) < 0.01, "normal moments off");
    /* 16-bit dtypes: the fp32 result rounded once */
    uint16_t *h = xmalloc((size_t)n * 2), *h2 = xmalloc((size_t)n * 2);
    for (int d = 1; d < 3; d++) {
        relora_dtype dt = (relora_dtype)d;
        CHECK(normal_fill(h, dt, n, std, 11, 3, 2) == RELORA_OK, "fill 16");
        CHECK(normal_fill(h2, dt, n, std, 11, 3, 1) == RELORA_OK, "fill 16");
        int64_t mism = 0;
        for (int64_t i = 0; i < n; i++) {
            uint16_t r = dt == RELORA_BF16 ? f32_to_bf16(x1[i]) : f32_to_f16(x1[i]);
            mism += (h[i] != r) + (h2[i] != r);
        }
        CHECK(mism == 0, "normal_fill %s != rounded fp32 (%lld)", dt_name(dt), (long long)mism);
    }
    /* different offsets give different draws; lora_reset zeroes B */
    float A[37], B[11], A2[37];
    for (int i = 0; i < 11; i++) B[i] = 1.0f;
    CHECK(lora_reset(A, 37, B, 11, RELORA_F32, 1.0f, 11, 4, 2) == RELORA_OK, "reset");
    CHECK(normal_fill(A2, RELORA_F32, 37, 1.0f, 11, 3, 1) == RELORA_OK, "fill");
    int same = 0, nonzero = 0;
    for (int i = 0; i < 37; i++) same += A[i] == A2[i];
    for (int i = 0; i < 11; i++) nonzero += B[i] != 0.0f;
    CHECK(same < 3 && nonzero == 0, "reset: offsets not independent or B not zeroed");
    CHECK(memcmp(A2, x1, 37 * 4) != 0, "std not applied");
    /* refusals */
    float keep[8] = {1, 2, 3, 4, 5, 6, 7, 8}, keep0[8];
    memcpy(keep0, keep, sizeof keep);
    CHECK(normal_fill(keep, RELORA_F32, 8, -1.0f, 0, 0, 1) == RELORA_ERR_ARG, "negative std");
    CHECK(normal_fill(keep, RELORA_F32, 8, NAN, 0, 0, 1) == RELORA_ERR_ARG, "NaN std");
    CHECK(normal_fill(keep, RELORA_F32, 8, INFINITY, 0, 0, 1) == RELORA_ERR_ARG, "Inf std");
    CHECK(normal_fill(keep, (relora_dtype)3, 8, 1.0f, 0, 0, 1) == RELORA_ERR_ARG, "bad dtype");
    CHECK(normal_fill(keep, RELORA_F32, -1, 1.0f, 0, 0, 1) == RELORA_ERR_ARG, "negative n");
    CHECK(normal_fill(NULL, RELORA_F32, 3, 1.0f, 0, 0, 1) == RELORA_ERR_ARG, "NULL x");
    CHECK(lora_reset(keep, 8, keep + 4, 4, RELORA_F32, 1.0f, 0, 0, 1) == RELORA_ERR_OVERLAP, "overlap");
    CHECK(lora_reset(keep, 8, NULL, 4, RELORA_F32, 1.0f, 0, 0, 1) == RELORA_ERR_ARG, "NULL B");
    CHECK(lora_reset(keep, 8, keep0, 8, RELORA_F32, -2.0f, 0, 0, 1) == RELORA_ERR_ARG, "negative std");
    CHECK(memcmp(keep, keep0, sizeof keep) == 0, "refused reset wrote");
    /* std bound: every |A| < 6 std must fit the dtype; above reset_std_max a reset is refused, at it A is
     * finite (fp16: std 1e5 once wrote Inf into 26 of 64 entries) */
    {
        uint16_t h16[64], z16[4];
        memset(h16, 0, sizeof h16);
        CHECK(lora_reset(h16, 64, z16, 4, RELORA_F16, 1e5f, 0, 0, 1) == RELORA_ERR_ARG, "fp16 std 1e5 accepted");
        int wrote = 0;
        for (int i = 0; i < 64; i++) wrote += h16[i] != 0;
        CHECK(wrote == 0, "refused fp16 reset wrote");
        const relora_dtype dts[3] = {RELORA_F32, RELORA_BF16, RELORA_F16};
        for (int d = 0; d < 3; d++) {
            const float smax = reset_std_max(dts[d]);
            CHECK(normal_fill(h16, dts[d], d == 0 ? 32 : 64, nextafterf(smax, INFINITY), 0, 0, 1) == RELORA_ERR_ARG,
                  "std above reset_std_max accepted (dtype %d)", d);
            int bad = 0;
            for (uint64_t seed = 0; seed < 64; seed++) {
                CHECK(normal_fill(h16, dts[d], d == 0 ? 32 : 64, smax, seed, 0, 1) == RELORA_OK, "std max refused");
                for (int i = 0; i < (d == 0 ? 32 : 64); i++) bad += !isfinite(load_as_f32(h16, dts[d], i));
            }
            CHECK(bad == 0, "std = reset_std_max gave %d non-finite values (dtype %d)", bad, d);
        }
    }
    CHECK(lora_reset(NULL, 0, NULL, 0, RELORA_F32, 1.0f, 0, 0, 1) == RELORA_OK, "empty reset");
    CHECK(normal_fill(keep, RELORA_F32, 8, 0.0f, 0, 0, 1) == RELORA_OK && keep[3] == 0.0f, "std 0");
    free(x1); free(x2); free(h); free(h2);
}

/* ---------------------------------------------------------------------------------------------------- */
/* prune */

static uint32_t key_of(const void *x, relora_dtype dt, int64_t i)
{
    return dt == RELORA_F32 ? (((const uint32_t *)x)[i] & 0x7FFFFFFFu) : (uint32_t)(((const uint16_t *)x)[i] & 0x7FFF);
}
static int cmp_desc(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x < y) - (x > y);
}

/* expected result of magnitude pruning by sorting the keys (an independent algorithm). */
static void prune_reference(void *out, const void *x, relora_dtype dt, int64_t n, int64_t k)
{
    size_t es = relora_dtype_size(dt);
    memcpy(out, x, (size_t)n * es);
    if (n == 0 || k == n) return;
    uint32_t *keys = xmalloc((size_t)n * 4);
    for (int64_t i = 0; i < n; i++) keys[i] = key_of(x, dt, i);
    qsort(keys, (size_t)n, 4, cmp_desc);
    uint32_t T = k > 0 ? keys[k - 1] : 0xFFFFFFFFu;
    int64_t c_gt = 0;
    for (int64_t i = 0; i < n; i++) c_gt += key_of(x, dt, i) > T;
    int64_t take = k - c_gt;
    for (int64_t i = 0; i < n; i++) {
        uint32_t key = key_of(x, dt, i);
        int keep = key > T || (key == T && take-- > 0);
        if (!keep) memset((char *)out + i * (int64_t)es, 0, es);
    }
    free(keys);
}

/* data kinds: 0 normal, 1 few distinct values (ties), 2 all equal, 3 zeros (+-0), 4 with NaN and Inf */
static void fill_prune(void *x, relora_dtype dt, int64_t n, int kind)
{
    for (int64_t i = 0; i < n; i++) {
        float v;
        switch (kind) {
        case 0: v = (float)rng_normal(); break;
        case 1: v = (float)((int)(rng_u64() % 7) - 3) * 0.25f; break;
        case 2: v = -1.5f; break;
        case 3: v = (rng_u64() & 1) ? -0.0f : 0.0f; break;
        default: {
            uint64_t r = rng_u64() % 100;
            v = r == 0 ? NAN : r == 1 ? -INFINITY : r == 2 ? INFINITY : (float)rng_normal();
        }
        }
        store_from_f32(x, dt, i, v);
    }
}

static void test_prune_magnitude(void)
{
    const relora_dtype dts[3] = {RELORA_F32, RELORA_BF16, RELORA_F16};
    const int64_t sizes[] = {0, 1, 2, 7, 1000, 70001, 300007};
    const double ratios[] = {0.0, 0.01, 0.5, 0.9, 0.99, 0.999999, 1.0};
    int cases = 0, mism_cases = 0;
    for (int d = 0; d < 3; d++)
        for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++)
            for (int kind = 0; kind < 5; kind++)
                for (size_t r = 0; r < sizeof ratios / sizeof ratios[0]; r++) {
                    int64_t n = sizes[s];
                    if (n > 100000 && (r % 2 || kind == 3)) continue; /* keep runtime down */
                    relora_dtype dt = dts[d];
                    size_t es = relora_dtype_size(dt);
                    void *x = xmalloc((size_t)n * es), *x2 = xmalloc((size_t)n * es);
                    void *orig = xmalloc((size_t)n * es), *ref = xmalloc((size_t)n * es);
                    fill_prune(x, dt, n, kind);
                    memcpy(orig, x, (size_t)n * es);
                    memcpy(x2, x, (size_t)n * es);
                    int64_t k = prune_keep_count(n, ratios[r]);
                    prune_reference(ref, orig, dt, n, k);
                    int64_t kept = -1, kept2 = -1;
                    relora_status st = prune_magnitude(x, dt, n, ratios[r], &kept, 1);
                    relora_status st2 = prune_magnitude(x2, dt, n, ratios[r], &kept2, 2);
                    int ok = st == RELORA_OK && st2 == RELORA_OK && kept == k && kept2 == k &&
                             memcmp(x, ref, (size_t)n * es) == 0 && memcmp(x2, ref, (size_t)n * es) == 0;
                    CHECK(ok, "prune_magnitude %s n=%lld kind=%d ratio=%g: status %d/%d kept %lld/%lld (k %lld)",
                          dt_name(dt), (long long)n, kind, ratios[r], st, st2, (long long)kept, (long long)kept2,
                          (long long)k);
                    mism_cases += !ok;
                    cases++;
                    free(x); free(x2); free(orig); free(ref);
                }
    /* ties spread over several chunks (65536 elements each): the lower flat index wins */
    {
        const int64_t n = 5 * 65536 + 123;
        float *x = xmalloc((size_t)n * 4), *ref = xmalloc((size_t)n * 4);
        for (int64_t i = 0; i < n; i++) x[i] = (i % 3 == 0) ? 2.0f : (i % 3 == 1 ? -2.0f : 1.0f);
        int64_t k = prune_keep_count(n, 0.5);
        prune_reference(ref, x, RELORA_F32, n, k);
        int64_t kept;
        CHECK(prune_magnitude(x, RELORA_F32, n, 0.5, &kept, 2) == RELORA_OK && kept == k, "ties status");
        CHECK(memcmp(x, ref, (size_t)n * 4) == 0, "ties across chunks");
        /* |x| = 2 at i % 3 in {0, 1}: the kept ones are the first k of those */
        int64_t last = -1, expect_last = (k - 1) / 2 * 3 + (k - 1) % 2;
        for (int64_t i = 0; i < n; i++) if (x[i] != 0) last = i;
        CHECK(last == expect_last, "ties: last kept %lld, expected %lld", (long long)last, (long long)expect_last);
        mism_cases += last != expect_last;
        cases++;
        free(x); free(ref);
    }
    /* NaN is never zeroed; -0/+0 tie */
    {
        float x[6] = {NAN, 1.0f, -0.0f, 0.0f, -NAN, 3.0f};
        int64_t kept;
        CHECK(prune_magnitude(x, RELORA_F32, 6, 0.75, &kept, 1) == RELORA_OK && kept == 2, "nan status");
        CHECK(isnan(x[0]) && isnan(x[4]) && x[5] == 0 && x[1] == 0, "NaN kept as largest");
    }
    /* more than 2^24 entries, 16-bit with many ties (reference by sorting would be slow: check counts and
     * the ordering property directly) */
    {
        const int64_t n = ((int64_t)1 << 24) + 3;
        uint16_t *x = xmalloc((size_t)n * 2), *orig = xmalloc((size_t)n * 2);
        for (int64_t i = 0; i < n; i++) x[i] = orig[i] = f32_to_bf16((float)((int)(rng_u64() % 1001) - 500));
        int64_t k = prune_keep_count(n, 0.99), kept = -1;
        CHECK(prune_magnitude(x, RELORA_BF16, n, 0.99, &kept, 2) == RELORA_OK && kept == k, "big prune");
        /* counting reference */
        int64_t *cnt = calloc(32768, sizeof(int64_t));
        for (int64_t i = 0; i < n; i++) cnt[orig[i] & 0x7FFF]++;
        int64_t cum = 0; int T = 32767;
        for (; T >= 0; T--) { if (cum + cnt[T] >= k) break; cum += cnt[T]; }
        int64_t take = k - cum, bad = 0;
        for (int64_t i = 0; i < n; i++) {
            int key = orig[i] & 0x7FFF;
            int keep = key > T || (key == T && take-- > 0);
            bad += x[i] != (keep ? orig[i] : 0);
        }
        CHECK(bad == 0, "prune n > 2^24: %lld mismatches", (long long)bad);
        printf("prune_magnitude: n = 2^24 + 3 bf16 ratio 0.99, kept %lld, mismatches %lld\n", (long long)kept, (long long)bad);
        free(cnt); free(x); free(orig);
    }
    printf("prune_magnitude: %d cases against a sorting reference, %d mismatching\n", cases, mism_cases);
    /* keep count and refusals */
    CHECK(prune_keep_count(100, 0.99) == 1 && prune_keep_count(0, 0.5) == 0 && prune_keep_count(10, 0) == 10 &&
          prune_keep_count(10, 1.0) == 0 && prune_keep_count(7, 0.5) == 4 && prune_keep_count(1, 0.99) == 1,
          "prune_keep_count");
    float y[4] = {1, 2, 3, 4}, y0[4];
    memcpy(y0, y, sizeof y);
    int64_t kept = 77;
    CHECK(prune_magnitude(y, RELORA_F32, 4, NAN, &kept, 1) == RELORA_ERR_ARG, "NaN ratio");
    CHECK(prune_magnitude(y, RELORA_F32, 4, -0.1, &kept, 1) == RELORA_ERR_ARG, "negative ratio");
    CHECK(prune_magnitude(y, RELORA_F32, 4, 1.1, &kept, 1) == RELORA_ERR_ARG, "ratio > 1");
    CHECK(prune_magnitude(y, (relora_dtype)9, 4, 0.5, &kept, 1) == RELORA_ERR_ARG, "bad dtype");
    CHECK(prune_magnitude(y, RELORA_F32, -4, 0.5, &kept, 1) == RELORA_ERR_ARG, "negative n");
    CHECK(prune_magnitude(NULL, RELORA_F32, 4, 0.5, &kept, 1) == RELORA_ERR_ARG, "NULL x");
    CHECK(prune_random(y, RELORA_F32, 4, 2.0, 0, 0, &kept, 1) == RELORA_ERR_ARG, "random ratio > 1");
    CHECK(memcmp(y, y0, sizeof y) == 0 && kept == 77, "refused prune wrote");
    CHECK(prune_magnitude(NULL, RELORA_F32, 0, 0.5, &kept, 1) == RELORA_OK && kept == 0, "n = 0");
}

static void test_prune_random(void)
{
    const int64_t n = 1000001;
    const double ratios[] = {0.0, 0.5, 0.9, 0.99, 1.0};
    for (int d = 0; d < 3; d++)
        for (int r = 0; r < 5; r++) {
            relora_dtype dt = (relora_dtype)d;
            size_t es = relora_dtype_size(dt);
            void *x = xmalloc((size_t)n * es), *x2 = xmalloc((size_t)n * es), *orig = xmalloc((size_t)n * es);
            for (int64_t i = 0; i < n; i++) store_from_f32(x, dt, i, 1.0f + (float)(i % 100));
            memcpy(x2, x, (size_t)n * es);
            memcpy(orig, x, (size_t)n * es);
            int64_t k1 = -1, k2 = -1;
            CHECK(prune_random(x, dt, n, ratios[r], 5, 9, &k1, 1) == RELORA_OK, "random status");
            CHECK(prune_random(x2, dt, n, ratios[r], 5, 9, &k2, 2) == RELORA_OK, "random status");
            CHECK(k1 == k2 && memcmp(x, x2, (size_t)n * es) == 0, "prune_random differs between 1 and 2 threads");
            double p = 1 - ratios[r], mu = p * n, sd = sqrt(n * p * (1 - p));
            int64_t cnt = 0, bad = 0;
            const uint64_t thr = (uint64_t)floor(p * 4294967296.0);
            for (int64_t e = 0; e < n; e++) {
                int nz = load_as_f32(x, dt, e) != 0.0f;
                cnt += nz;
                if (e < 5000 || e % 101 == 0) {
                    int keep = (uint64_t)philox_block(5, 9, (uint64_t)e / 4).v[e % 4] < thr;
                    bad += keep != nz || (nz && memcmp((char *)x + e * (int64_t)es, (char *)orig + e * (int64_t)es, es));
                }
            }
            if (d == 0) printf("prune_random ratio %.2f: kept %lld (expect %.0f +- %.0f), definition mismatches %lld\n",
                               ratios[r], (long long)k1, mu, sd, (long long)bad);
            CHECK(cnt == k1 && fabs((double)k1 - mu) <= 5 * sd + 1e-9 && bad == 0,
                  "prune_random %s ratio %g: kept %lld counted %lld", dt_name(dt), ratios[r], (long long)k1, (long long)cnt);
            free(x); free(x2); free(orig);
        }
}

/* ---------------------------------------------------------------------------------------------------- */
/* levels: reset and prune give the same bits at every level (integer Philox, fp32 polynomials without
 * FMA contraction, integer selection) */

static void test_levels_identical(void)
{
    const int best = relora_cpu_best_level();
    const int64_t n = 100003;
    const relora_dtype dts[3] = {RELORA_F32, RELORA_BF16, RELORA_F16};
    unsigned char *ref = xmalloc((size_t)n * 4 * 9), *x = xmalloc((size_t)n * 4), *src = xmalloc((size_t)n * 4);
    int64_t refk[9] = {0};
    for (int l = 0; l <= best; l++) {
        CHECK(relora_cpu_set_level(l) == RELORA_OK, "set level %d", l);
        for (int d = 0; d < 3; d++) {
            const size_t bytes = (size_t)n * relora_dtype_size(dts[d]);
            for (int what = 0; what < 3; what++) {
                int64_t k = -1;
                if (what == 0) {
                    CHECK(normal_fill(x, dts[d], n, 0.02f, 77, 5, 2) == RELORA_OK, "fill");
                } else {
                    rng_state = 1234; /* the same input at every level */
                    fill_normal(src, dts[d], n, 1.0);
                    memcpy(x, src, bytes);
                    relora_status st = what == 1 ? prune_magnitude(x, dts[d], n, 0.9, &k, 2)
                                                 : prune_random(x, dts[d], n, 0.9, 3, 1, &k, 2);
                    CHECK(st == RELORA_OK, "prune");
                }
                unsigned char *r = ref + (size_t)(d * 3 + what) * (size_t)n * 4;
                if (l == 0) { memcpy(r, x, bytes); refk[d * 3 + what] = k; continue; }
                CHECK(memcmp(r, x, bytes) == 0 && k == refk[d * 3 + what],
                      "%s %s differs between levels %s and %s", what == 0 ? "normal_fill" : what == 1 ?
                      "prune_magnitude" : "prune_random", dt_name(dts[d]), relora_cpu_level_name(0),
                      relora_cpu_level_name(l));
            }
        }
    }
    printf("levels default .. %s: reset and prune bit-identical\n", relora_cpu_level_name(best));
    free(ref); free(x); free(src);
}

int main(void)
{
    test_conversions();
    const int best = relora_cpu_best_level();
    CHECK(relora_cpu_set_level(best + 1) == RELORA_ERR_ARG, "a level above the CPU's must be refused");
    CHECK(relora_cpu_level_from_name("avx512_bf16x") == -1, "unknown level name");
    for (int l = 0; l <= best; l++) {
        CHECK(relora_cpu_set_level(l) == RELORA_OK && relora_cpu_level() == l, "set level %d", l);
        printf("== level %s\n", relora_cpu_level_name(l));
        test_philox();
        test_box_muller();
        test_merge_accuracy();
        g_via_add = 1;
        test_merge_accuracy();
        g_via_add = 0;
        test_merge_add_pow2_exact();
        test_merge_stochastic();
        test_merge_refusals();
        test_reset();
        test_prune_magnitude();
        test_prune_random();
    }
    test_levels_identical();
    if (g_fail) {
        printf("FAILED: %d checks\n", g_fail);
        return 1;
    }
    printf("all kernel tests passed\n");
    return 0;
}
