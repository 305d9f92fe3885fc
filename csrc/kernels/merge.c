/*
 * merge: W += scale * B @ A in place, one rounding per element of W. See merge.h.
 *
 * A GEMM in the style of GotoBLAS / BLIS, specialised to a short inner dimension (R, the LoRA rank, is
 * never split):
 *   - W is cut into tiles of MC rows x NC columns; tiles are spread over the threads (static schedule,
 *     column block outer so that a thread re-uses its packed panel of A across consecutive tiles);
 *   - per tile, the R x NC panel of A is packed (converted to fp32) into slivers of NR columns, and the
 *     MC x R block of B into slivers of MR rows, k-major: the micro-kernel streams contiguous fp32;
 *   - the micro-kernel keeps an MR x NR block of sums in vector registers over k = 0 .. R-1, then the
 *     epilogue reads that block of W once, adds scale * sum in fp32, rounds into W's dtype and stores
 *     (fp32 W without FMA: A is packed already scaled where that is exact, and the micro-kernel adds
 *     its sums into W itself, see prescaled_ok).
 * W is read and written exactly once, so for small R the merge runs at memory speed; for large R the
 * micro-kernel runs at (close to) FMA peak. Temporaries are the per-thread packs (a few hundred KB).
 *
 * Compiled once per instruction-set level (level.h); the micro-tile is sized for the level's registers:
 *   avx512 (32 zmm):            VW = 16 floats a vector, MR x NR = 8 x 32: 16 accumulators
 *   avx2 (16 ymm):              VW = 8,                  MR x NR = 6 x 16: 12 accumulators
 *   default (x86-64 SSE2: 16 xmm; aarch64 NEON: 32 q): VW = 4, MR x NR = 6 x 8 (8 x 8 on aarch64)
 * so that accumulators, the NV = 2 vectors of A and a broadcast of B stay in registers.
 *
 * Vector code uses GNU C vector extensions (gcc, clang), no intrinsics except the AVX512-BF16 path; sums
 * use fused multiply-add where the level has it (fp-contract is forced on below, since -std=c11 turns
 * it off in gcc).
 */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=fast")
#elif defined(__clang__)
#pragma clang fp contract(fast)
#endif

#include <float.h>
#include <math.h>

#if defined(__AVX512BF16__) && defined(__AVX512F__) && !defined(RELORA_NO_INTRINSICS)
#define MERGE_BF16_DP 1 /* bf16 A, B: AVX512-BF16 dot products (vdpbf16ps), see merge.h */
#include <immintrin.h>
#else
#define MERGE_BF16_DP 0
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "merge.h"
#include "philox.h"
#include "internal.h"

#if defined(__AVX512F__)
#define VW 16     /* floats per vector register */
#define MR 8      /* micro-tile rows (of W and B) */
#elif defined(__AVX2__)
#define VW 8
#define MR 6
#elif defined(__aarch64__)
#define VW 4
#define MR 8
#else
#define VW 4
#define MR 6
#endif
#define NV 2            /* vectors per micro-tile row */
/* floats per packed entry of B: SSE2 has no broadcast from memory (a load and a shuffle, and the shuffles
 * compete with the adds for ports), so at that level B is packed already broadcast, a vector per entry */
#if VW == 4 && (defined(__x86_64__) || defined(__i386__))
#define BB VW
#else
#define BB 1
#endif
#define NR (VW * NV)    /* micro-tile columns (of W and A) */
#define MC 96           /* rows per tile, a multiple of MR */
#define NC_MAX 8192
#define A_PACK_FLOATS 65536 /* target size of one packed A panel (256 KB, half an L2) */

typedef float vf __attribute__((vector_size(4 * VW)));
typedef uint32_t vu __attribute__((vector_size(4 * VW)));
typedef uint16_t vh __attribute__((vector_size(2 * VW)));
/* the same at any element alignment, for W: a load or store through these is one unaligned vector move
 * (memcpy into an array element whose address is taken goes through the stack, piecewise, under gcc 12) */
typedef float vf_u __attribute__((vector_size(4 * VW), aligned(4)));
typedef uint16_t vh_u __attribute__((vector_size(2 * VW), aligned(2)));

/* x in every lane (an element-wise loop here becomes a chain of inserts under gcc's generic tuning) */
static inline vf vbcast(float x)
{
#if defined(__AVX512F__)
    return (vf)_mm512_set1_ps(x);
#elif defined(__AVX__)
    return (vf)_mm256_set1_ps(x);
#elif defined(__SSE__)
    return (vf)_mm_set1_ps(x);
#else
    vf v;
    for (int l = 0; l < VW; l++) v[l] = x;
    return v;
#endif
}

/* w + scale * c rounded once to fp32: a fused multiply-add where the level has one (the contraction
 * below), else in double (the product of two floats is exact there, and the double sum rounded to fp32
 * differs from the exact one only at ties of 2^-29 relative, never here in practice). */
#if defined(__FMA__) || defined(__aarch64__)
#define MERGE_HAS_FMA 1
static inline float add_scaled(float w, float scale, float c) { return w + scale * c; }
#else
#define MERGE_HAS_FMA 0
static inline float add_scaled(float w, float scale, float c) { return (float)((double)w + (double)scale * c); }
#endif

/* 1/scale when scale is a power of two whose reciprocal is also a normal float (alpha/r with both powers
 * of two, the common LoRA setting), else 0. Then scale * c is exact whenever (scale * c) / scale == c
 * (no underflow, no overflow), and w + scale * c in plain fp32 is the one rounding: where the level has
 * no FMA this replaces the double-precision epilogue (four conversions per element) by a mul and an add. */
static inline float pow2_inverse(float scale)
{
    int e;
    const float m = frexpf(scale, &e);
    return (m == 0.5f || m == -0.5f) && e >= -124 && e <= 126 ? 1.0f / scale : 0.0f;
}

/* o[0..n) = round(o + scale * c) for an fp32 W, the exact add_scaled; inv = pow2_inverse(scale). */
static inline void add_scaled_f32(float *restrict o, const float *restrict c, int64_t n, float scale,
                                  float inv)
{
#if MERGE_HAS_FMA
    (void)inv;
    for (int64_t j = 0; j < n; j++) o[j] = add_scaled(o[j], scale, c[j]);
#else
    int64_t j = 0;
    if (inv != 0.0f) {
        for (; j + VW <= n; j += VW) {
            vf cv, wv;
            memcpy(&cv, c + j, sizeof cv);
            memcpy(&wv, o + j, sizeof wv);
            const vf p = scale * cv;
            const vu inexact = (vu)(p * inv != cv); /* underflow, overflow, NaN: the double path */
#if defined(__SSE2__) && VW == 4
            const int any = _mm_movemask_ps((__m128)inexact);
#else
            uint32_t any = 0;
            for (int l = 0; l < VW; l++) any |= inexact[l];
#endif
            if (any) {
                for (int l = 0; l < VW; l++) o[j + l] = add_scaled(o[j + l], scale, c[j + l]);
            } else {
                wv += p;
                memcpy(o + j, &wv, sizeof wv);
            }
        }
    }
    for (; j < n; j++) o[j] = add_scaled(o[j], scale, c[j]);
#endif
}

/* ---------------------------------------------------------------------------------------------------- */
/* argument checks and the non-finite scan */

static int range_overlap(const void *p, int64_t pbytes, const void *q, int64_t qbytes)
{
    if (pbytes <= 0 || qbytes <= 0) return 0;
    uintptr_t p0 = (uintptr_t)p, p1 = p0 + (uintptr_t)pbytes;
    uintptr_t q0 = (uintptr_t)q, q1 = q0 + (uintptr_t)qbytes;
    return p0 < q1 && q0 < p1;
}

/* 1 if x (n,) of dtype holds a NaN or Inf (exponent all ones). */
static int has_nonfinite(const void *x, relora_dtype dt, int64_t n, int nt)
{
    int bad = 0;
    (void)nt;
    if (dt == RELORA_F32) {
        const uint32_t *u = (const uint32_t *)x;
#pragma omp parallel for schedule(static) num_threads(nt) reduction(| : bad) if (n > 262144)
        for (int64_t i = 0; i < n; i++) bad |= (u[i] & 0x7F800000u) == 0x7F800000u;
    } else {
        const uint16_t *h = (const uint16_t *)x;
        const uint16_t m = dt == RELORA_BF16 ? 0x7F80u : 0x7C00u;
#pragma omp parallel for schedule(static) num_threads(nt) reduction(| : bad) if (n > 262144)
        for (int64_t i = 0; i < n; i++) bad |= (h[i] & m) == m;
    }
    return bad;
}

/* ---------------------------------------------------------------------------------------------------- */
/* packing */

/* ap <- A[:, j0 : j0+nc] times `pre` as fp32 slivers of NR columns: ap[s*R*NR + k*NR + l] =
 * pre * A[k, j0 + s*NR + l], zero past column j0+nc (pre: 1, or the scale, see prescaled_ok). */
static void pack_a(float *restrict ap, const void *A, relora_dtype dt, int64_t I, int64_t R,
                   int64_t j0, int64_t nc, float pre)
{
    const int64_t ns = (nc + NR - 1) / NR;
    for (int64_t s = 0; s < ns; s++) {
        const int64_t c0 = j0 + s * NR;
        const int64_t w = nc - s * NR < NR ? nc - s * NR : NR;
        float *restrict dst = ap + s * R * NR;
        for (int64_t k = 0; k < R; k++) {
            float *restrict d = dst + k * NR;
            if (w == NR) {
                switch (dt) {
                case RELORA_F32: {
                    const float *src = (const float *)A + k * I + c0;
                    for (int l = 0; l < NR; l++) d[l] = pre * src[l];
                    break;
                }
                case RELORA_BF16: {
                    const uint16_t *src = (const uint16_t *)A + k * I + c0;
                    for (int l = 0; l < NR; l++) d[l] = pre * bf16_to_f32(src[l]);
                    break;
                }
                case RELORA_F16: {
                    const uint16_t *src = (const uint16_t *)A + k * I + c0;
                    for (int l = 0; l < NR; l++) d[l] = pre * f16_to_f32(src[l]);
                    break;
                }
                }
            } else {
                for (int l = 0; l < NR; l++) d[l] = l < w ? pre * load_as_f32(A, dt, k * I + c0 + l) : 0.0f;
            }
        }
    }
}

/* bp <- B[i0 : i0+mc, :] as fp32 slivers of MR rows, each entry BB times: bp[(q*R*MR + k*MR + r)*BB + l]
 * = B[i0 + q*MR + r, k], zero past row i0+mc. */
static inline void put_b(float *restrict d, float v)
{
    for (int l = 0; l < BB; l++) d[l] = v;
}

static void pack_b(float *restrict bp, const void *B, relora_dtype dt, int64_t R, int64_t i0, int64_t mc)
{
    const int64_t nq = (mc + MR - 1) / MR;
    for (int64_t q = 0; q < nq; q++) {
        float *restrict dst = bp + q * R * MR * BB;
        for (int r = 0; r < MR; r++) {
            const int64_t row = q * MR + r;
            if (row < mc) {
                const int64_t base = (i0 + row) * R;
                switch (dt) {
                case RELORA_F32:
                    for (int64_t k = 0; k < R; k++) put_b(dst + (k * MR + r) * BB, ((const float *)B)[base + k]);
                    break;
                case RELORA_BF16:
                    for (int64_t k = 0; k < R; k++)
                        put_b(dst + (k * MR + r) * BB, bf16_to_f32(((const uint16_t *)B)[base + k]));
                    break;
                case RELORA_F16:
                    for (int64_t k = 0; k < R; k++)
                        put_b(dst + (k * MR + r) * BB, f16_to_f32(((const uint16_t *)B)[base + k]));
                    break;
                }
            } else {
                for (int64_t k = 0; k < R; k++) put_b(dst + (k * MR + r) * BB, 0.0f);
            }
        }
    }
}

/* ---------------------------------------------------------------------------------------------------- */
/* micro-kernel: c (MR, NR, rows ldc apart) = sum_k bp[k, :]^T ap[k, :], or c += that sum (accumulate: an
 * fp32 W, one rounding per element); bp (R, MR), ap (R, NR), both packed fp32 */
static inline void kernel_mrxnr(float *restrict c, int64_t ldc, int accumulate, const float *restrict bp,
                                const float *restrict ap, int64_t R)
{
    vf acc[MR][NV];
#pragma GCC unroll 8
    for (int r = 0; r < MR; r++)
        for (int v = 0; v < NV; v++) acc[r][v] = (vf){0};
    for (int64_t k = 0; k < R; k++) {
        vf a[NV];
        for (int v = 0; v < NV; v++) a[v] = *(const vf *)(ap + k * NR + v * VW);
#pragma GCC unroll 8
        for (int r = 0; r < MR; r++) {
#if BB == VW
            const vf b = *(const vf *)(bp + (k * MR + r) * BB);
#else
            const vf b = vbcast(bp[k * MR + r]);
#endif
            for (int v = 0; v < NV; v++) acc[r][v] += b * a[v];
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; r++)
        for (int v = 0; v < NV; v++) {
            vf_u *o = (vf_u *)(c + r * ldc + v * VW);
            *o = accumulate ? *o + acc[r][v] : acc[r][v];
        }
}

/* Whether A can be packed already multiplied by the scale (pack_a's `pre`) for an fp32 W at a level
 * without FMA, so that the epilogue is one add, fused into the micro-kernel. It can when the scale is a
 * power of two of magnitude <= 1 (inv != 0), every nonzero s * a and s * b * a is a normal float, and no
 * sum of R products overflows: then each product, and so each partial sum, is exactly the scale times
 * what the unscaled kernel computes (a sum that falls below the normal range is exact), and W + sum is
 * W + scale * sum of the unscaled path, rounded once as add_scaled_f32 would (up to the sign of a zero
 * result). The scan of A and B costs one pass over the factors, next to the product's R passes. */
static int prescaled_ok(const void *A, const void *B, relora_dtype dt, int64_t R, int64_t na, int64_t nb,
                        float scale, float inv)
{
    if (inv == 0.0f || fabsf(scale) > 1.0f) return 0;
    double amin = INFINITY, bmin = INFINITY, amax = 0.0, bmax = 0.0;
    for (int64_t i = 0; i < na; i++) {
        const double x = fabs((double)load_as_f32(A, dt, i));
        if (x != 0.0 && x < amin) amin = x;
        if (x > amax) amax = x;
    }
    for (int64_t i = 0; i < nb; i++) {
        const double x = fabs((double)load_as_f32(B, dt, i));
        if (x != 0.0 && x < bmin) bmin = x;
        if (x > bmax) bmax = x;
    }
    if (amin == INFINITY || bmin == INFINITY) return 1; /* A or B all zeros: every product is zero */
    const double s = fabs((double)scale);
    return amin * s >= (double)FLT_MIN && amin * bmin * s >= (double)FLT_MIN &&
           (double)R * amax * bmax <= (double)FLT_MAX;
}

#if MERGE_BF16_DP
/* ---------------------------------------------------------------------------------------------------- */
/* bf16 A and B: pairs of k multiplied and summed in one vdpbf16ps (products exact in fp32, sums in fp32),
 * twice the k per instruction of the fp32 kernel. Packs hold raw bf16, k-pairs interleaved, zero past
 * R (odd R), past the last column or row: one uint32 = (k = 2p in the low half, k = 2p+1 in the high). */

/* ap[s*P*NR + p*NR + l] = (A[2p, j0+s*NR+l], A[2p+1, ...]), P = (R+1)/2 pairs */
static void pack_a_bf16(uint32_t *restrict ap, const uint16_t *A, int64_t I, int64_t R, int64_t j0, int64_t nc)
{
    const int64_t ns = (nc + NR - 1) / NR, P = (R + 1) / 2;
    for (int64_t s = 0; s < ns; s++) {
        const int64_t c0 = j0 + s * NR;
        const int64_t w = nc - s * NR < NR ? nc - s * NR : NR;
        for (int64_t p = 0; p < P; p++) {
            uint32_t *restrict d = ap + s * P * NR + p * NR;
            const uint16_t *lo = A + 2 * p * I + c0, *hi = 2 * p + 1 < R ? lo + I : NULL;
            for (int l = 0; l < NR; l++) {
                const uint32_t a0 = l < w ? lo[l] : 0u, a1 = (l < w && hi) ? hi[l] : 0u;
                d[l] = a0 | (a1 << 16);
            }
        }
    }
}

/* bp[q*P*MR + p*MR + r] = (B[i0+q*MR+r, 2p], B[..., 2p+1]) */
static void pack_b_bf16(uint32_t *restrict bp, const uint16_t *B, int64_t R, int64_t i0, int64_t mc)
{
    const int64_t nq = (mc + MR - 1) / MR, P = (R + 1) / 2;
    for (int64_t q = 0; q < nq; q++)
        for (int r = 0; r < MR; r++) {
            const int64_t row = q * MR + r;
            const uint16_t *b = B + (i0 + row) * R;
            for (int64_t p = 0; p < P; p++) {
                uint32_t v = 0;
                if (row < mc) v = b[2 * p] | (2 * p + 1 < R ? (uint32_t)b[2 * p + 1] << 16 : 0u);
                bp[q * P * MR + p * MR + r] = v;
            }
        }
}

/* c (MR, NR) = sum over pairs of bp[p, :]^T ap[p, :] */
static inline void kernel_bf16(float *restrict c, const uint32_t *restrict bp, const uint32_t *restrict ap,
                               int64_t P)
{
    __m512 acc[MR][2];
#pragma GCC unroll 8
    for (int r = 0; r < MR; r++) { acc[r][0] = _mm512_setzero_ps(); acc[r][1] = _mm512_setzero_ps(); }
    for (int64_t p = 0; p < P; p++) {
        const __m512bh a0 = (__m512bh)_mm512_loadu_si512(ap + p * NR);
        const __m512bh a1 = (__m512bh)_mm512_loadu_si512(ap + p * NR + 16);
#pragma GCC unroll 8
        for (int r = 0; r < MR; r++) {
            const __m512bh b = (__m512bh)_mm512_set1_epi32((int)bp[p * MR + r]);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a0, b);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a1, b);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; r++) {
        _mm512_storeu_ps(c + r * NR, acc[r][0]);
        _mm512_storeu_ps(c + r * NR + 16, acc[r][1]);
    }
}
#endif

/* ---------------------------------------------------------------------------------------------------- */
/* rounding into W */

/* bf16 stochastic rounding: add 16 random bits below the bf16 mantissa and truncate. NaN stays NaN;
 * a finite value only becomes Inf when round-to-nearest would (then the RNE result is used). */
RELORA_INLINE uint16_t f32_to_bf16_sr(float x, uint32_t word)
{
    const uint32_t u = f32_bits(x);
    const uint32_t r = (u + (word & 0xFFFFu)) >> 16;
    const int finite = (u & 0x7F800000u) != 0x7F800000u;
    const int overflow = (r & 0x7F80u) == 0x7F80u;
    return (!finite || overflow) ? f32_to_bf16(x) : (uint16_t)r;
}

/* fp16 stochastic rounding: with lo <= |x| <= hi the two neighbouring fp16 magnitudes, round to hi
 * iff word < p * 2^32, p = (|x| - lo) / (hi - lo) (exact in fp32, compared exactly in double).
 * NaN, Inf and |x| > 65504 (largest fp16) use round-to-nearest. */
RELORA_INLINE uint16_t f32_to_f16_sr(float x, uint32_t word)
{
    const uint32_t u = f32_bits(x);
    const float ax = f32_from_bits(u & 0x7FFFFFFFu);
    if (!(ax <= 65504.0f)) return f32_to_f16(x); /* NaN, Inf, beyond the largest fp16 */
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint16_t h = f32_to_f16(ax);
    const float hf = f16_to_f32(h);
    if (hf == ax) return (uint16_t)(sign | h);
    const uint16_t lo = hf < ax ? h : (uint16_t)(h - 1);
    const float lof = f16_to_f32(lo), hif = f16_to_f32((uint16_t)(lo + 1));
    const float p = (ax - lof) / (hif - lof);
    const int up = (double)word < (double)p * 4294967296.0;
    return (uint16_t)(sign | (uint16_t)(lo + up));
}

/* The same conversions on VW lanes (internal.h has the scalar versions and the references). */

static inline vf v_bf16_to_f32(vh h) { return (vf)(__builtin_convertvector(h, vu) << 16); }

static inline vh v_f32_to_bf16(vf f) /* f32_to_bf16 */
{
    const vu u = (vu)f;
    const vu rne = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const vu nan = (vu)((u & 0x7FFFFFFFu) > 0x7F800000u);
    return __builtin_convertvector((((u >> 16) | 0x0040u) & nan) | (rne & ~nan), vh);
}

static inline vf v_f16_to_f32(vh h)
{
    const vu w = __builtin_convertvector(h, vu) << 16;
    const vu sign = w & 0x80000000u;
    const vu two_w = w + w;
    const vf normalized = (vf)((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const vf denormalized = (vf)((two_w >> 17) | (126u << 23)) - 0.5f;
    const vu m = (vu)(two_w < (1u << 27));
    return (vf)(sign | (((vu)denormalized & m) | ((vu)normalized & ~m)));
}

static inline vu v_f32_to_f16(vf f) /* result in the low 16 bits of each lane */
{
    const vu w = (vu)f;
    const vu shl1_w = w + w;
    const vu sign = w & 0x80000000u;
    vf base = ((vf)(shl1_w >> 1) * 0x1.0p+112f) * 0x1.0p-110f;
    vu bias = shl1_w & 0xFF000000u;
    const vu small = (vu)(bias < 0x71000000u);
    bias = (bias & ~small) | (0x71000000u & small);
    base = (vf)((bias >> 1) + 0x07800000u) + base;
    const vu bits = (vu)base;
    const vu nonsign = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
    const vu nan = (vu)(shl1_w > 0xFF000000u);
    return (sign >> 16) | ((0x7E00u & nan) | (nonsign & ~nan));
}

/* f32_to_f16_sr on VW lanes, bit-identical to the scalar version. */
static inline vu v_f32_to_f16_sr(vf x, vu word)
{
    const vu u = (vu)x;
    const vf ax = (vf)(u & 0x7FFFFFFFu);
    const vu sign = (u >> 16) & 0x8000u;
    const vu h = v_f32_to_f16(ax);
    const vf hf = v_f16_to_f32(__builtin_convertvector(h, vh));
    const vu lo = h + (vu)(hf > ax); /* h - 1 where nearest rounded up */
    const vf lof = v_f16_to_f32(__builtin_convertvector(lo, vh));
    const vf hif = v_f16_to_f32(__builtin_convertvector(lo + 1u, vh));
    const vf t = (ax - lof) / (hif - lof) * 0x1.0p32f; /* p * 2^32, exact, < 2^32 */
    const vu thr = __builtin_convertvector(t, vu);   /* floor */
    const vf thrf = __builtin_convertvector(thr, vf);
    const vu up = (vu)((word < thr) | ((word == thr) & (vu)(t > thrf))); /* word < t */
    const vu sr = sign | (lo - up);
    const vu ok = (vu)(ax <= 65504.0f); /* false for NaN, Inf and beyond the largest fp16 */
    return (sr & ok) | (v_f32_to_f16(x) & ~ok);
}

#if MERGE_BF16_DP
/* o[0..NR) = round(w + scale * c), w = o[0..NR) as loaded, for a bf16 W with vcvtne2ps2bf16: round to nearest even like
 * f32_to_bf16, NaN quieted the same way, but fp32 subnormals flushed to zero; a segment holding one
 * (|x| < 2^-126, x != 0: rare) takes the scalar conversion instead, so the result is the same. */
static inline void apply_bf16_nearest_avx(uint16_t *o, __m512i w, const float *c, float scale)
{
    const __m512 w0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(w)), 16));
    const __m512 w1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(w, 1)), 16));
    const __m512 sv = _mm512_set1_ps(scale);
    const __m512 x0 = _mm512_fmadd_ps(sv, _mm512_loadu_ps(c), w0);
    const __m512 x1 = _mm512_fmadd_ps(sv, _mm512_loadu_ps(c + 16), w1);
    const __m512i abs = _mm512_set1_epi32(0x7FFFFFFF), one = _mm512_set1_epi32(1), lim = _mm512_set1_epi32(0x007FFFFF);
    const __mmask16 sub0 = _mm512_cmplt_epu32_mask(_mm512_sub_epi32(_mm512_and_si512(_mm512_castps_si512(x0), abs), one), lim);
    const __mmask16 sub1 = _mm512_cmplt_epu32_mask(_mm512_sub_epi32(_mm512_and_si512(_mm512_castps_si512(x1), abs), one), lim);
    if (sub0 | sub1) {
        float x[NR];
        _mm512_storeu_ps(x, x0);
        _mm512_storeu_ps(x + 16, x1);
        for (int j = 0; j < NR; j++) o[j] = f32_to_bf16(x[j]);
        return;
    }
    _mm512_storeu_si512(o, (__m512i)_mm512_cvtne2ps_pbh(x1, x0));
}
#endif

/* W row segment w[0..n) += scale * c[0..n), rounded; words[j] is the Philox word of element j (SR). */
static void apply_row(void *w, relora_dtype wdt, int n, const float *restrict c, float scale,
                      int stochastic, const uint32_t *restrict words)
{
    switch (wdt) {
    case RELORA_F32:
        add_scaled_f32((float *)w, c, n, scale, pow2_inverse(scale));
        break;
    case RELORA_BF16: {
        uint16_t *restrict o = (uint16_t *)w;
        if (!stochastic) {
            if (n == NR) {
#if MERGE_BF16_DP
                apply_bf16_nearest_avx(o, _mm512_loadu_si512(o), c, scale);
#else
                for (int v = 0; v < NR; v += VW) {
                    vh wh; vf cv;
                    memcpy(&wh, o + v, sizeof wh);
                    memcpy(&cv, c + v, sizeof cv);
                    wh = v_f32_to_bf16(v_bf16_to_f32(wh) + scale * cv);
                    memcpy(o + v, &wh, sizeof wh);
                }
#endif
            } else {
                for (int j = 0; j < n; j++) o[j] = f32_to_bf16(bf16_to_f32(o[j]) + scale * c[j]);
            }
        } else {
            for (int j = 0; j < n; j++) o[j] = f32_to_bf16_sr(bf16_to_f32(o[j]) + scale * c[j], words[j]);
        }
        break;
    }
    case RELORA_F16: {
        uint16_t *restrict o = (uint16_t *)w;
        if (n == NR) {
            for (int half = 0; half < NR; half += VW) {
                vh wh; vf cv; vu wv;
                memcpy(&wh, o + half, sizeof wh);
                memcpy(&cv, c + half, sizeof cv);
                const vf x = v_f16_to_f32(wh) + scale * cv;
                if (stochastic) {
                    memcpy(&wv, words + half, sizeof wv);
                    wh = __builtin_convertvector(v_f32_to_f16_sr(x, wv), vh);
                } else {
                    wh = __builtin_convertvector(v_f32_to_f16(x), vh);
                }
                memcpy(o + half, &wh, sizeof wh);
            }
        } else if (!stochastic) {
            for (int j = 0; j < n; j++) o[j] = f32_to_f16(f16_to_f32(o[j]) + scale * c[j]);
        } else {
            for (int j = 0; j < n; j++) o[j] = f32_to_f16_sr(f16_to_f32(o[j]) + scale * c[j], words[j]);
        }
        break;
    }
    }
}

/* A full (MR, NR) tile of W += scale * c rounded to nearest, for fp32 and bf16 W (returns 0 for other
 * dtypes: the caller goes row by row). All of the tile's W is loaded before any of it is stored: with a
 * row stride that is a multiple of 4 KiB (4096 columns, common), a load issued after a store to another
 * row at the same column aliases it in the store buffer's 4K check and waits ("4K aliasing"). */
static inline int apply_tile(char *w, relora_dtype wdt, int64_t ldw, const float *restrict c, float scale,
                             float inv)
{
    if (wdt == RELORA_F32 && !MERGE_HAS_FMA) {
        float *o = (float *)w;
        for (int r = 0; r < MR; r++) add_scaled_f32(o + r * ldw, c + r * NR, NR, scale, inv);
        return 1;
    }
    if (wdt == RELORA_F32) {
        float *o = (float *)w;
        vf x[MR][NV];
#pragma GCC unroll 8
        for (int r = 0; r < MR; r++)
            for (int v = 0; v < NV; v++) x[r][v] = *(const vf_u *)(o + r * ldw + v * VW);
#pragma GCC unroll 8
        for (int r = 0; r < MR; r++)
            for (int v = 0; v < NV; v++)
                *(vf_u *)(o + r * ldw + v * VW) = x[r][v] + scale * *(const vf *)(c + r * NR + v * VW);
        return 1;
    }
#if MERGE_BF16_DP
    if (wdt == RELORA_BF16) {
        uint16_t *o = (uint16_t *)w;
        __m512i x[MR];
#pragma GCC unroll 8
        for (int r = 0; r < MR; r++) x[r] = _mm512_loadu_si512(o + r * ldw);
#pragma GCC unroll 8
        for (int r = 0; r < MR; r++) apply_bf16_nearest_avx(o + r * ldw, x[r], c + r * NR, scale);
        return 1;
    }
#else
    if (wdt == RELORA_BF16) {
        uint16_t *o = (uint16_t *)w;
        vh x[MR][NV];
#pragma GCC unroll 8
        for (int r = 0; r < MR; r++)
            for (int v = 0; v < NV; v++) x[r][v] = *(const vh_u *)(o + r * ldw + v * VW);
#pragma GCC unroll 8
        for (int r = 0; r < MR; r++)
            for (int v = 0; v < NV; v++)
                *(vh_u *)(o + r * ldw + v * VW) =
                    v_f32_to_bf16(v_bf16_to_f32(x[r][v]) + scale * *(const vf *)(c + r * NR + v * VW));
        return 1;
    }
#endif
    return 0;
}

/* ---------------------------------------------------------------------------------------------------- */

/* The bf16 dot-product path through the fp32 path's buffers (no-ops where it is not compiled). */
static inline void pack_a_dp(float *ap, const void *A, int64_t I, int64_t R, int64_t j0, int64_t nc)
{
#if MERGE_BF16_DP
    pack_a_bf16((uint32_t *)ap, (const uint16_t *)A, I, R, j0, nc);
#else
    (void)ap; (void)A; (void)I; (void)R; (void)j0; (void)nc;
#endif
}

static inline void pack_b_dp(float *bp, const void *B, int64_t R, int64_t i0, int64_t mc)
{
#if MERGE_BF16_DP
    pack_b_bf16((uint32_t *)bp, (const uint16_t *)B, R, i0, mc);
#else
    (void)bp; (void)B; (void)R; (void)i0; (void)mc;
#endif
}

static inline void kernel_dp(float *ct, const float *bp, const float *ap, int64_t R, int64_t q, int64_t s)
{
#if MERGE_BF16_DP
    const int64_t P = (R + 1) / 2;
    kernel_bf16(ct, (const uint32_t *)bp + q * P * MR, (const uint32_t *)ap + s * P * NR, P);
#else
    (void)ct; (void)bp; (void)ap; (void)R; (void)q; (void)s;
#endif
}

relora_status lora_merge_check(const void *W, relora_dtype wdtype, int64_t ldw,
                               const void *B, const void *A, relora_dtype adtype,
                               int64_t O, int64_t I, int64_t R,
                               float scale, relora_rounding rounding, int nthreads)
{
    if (!dtype_valid(wdtype) || !dtype_valid(adtype)) return RELORA_ERR_ARG;
    if (rounding != RELORA_ROUND_NEAREST && rounding != RELORA_ROUND_STOCHASTIC) return RELORA_ERR_ARG;
    if (O < 0 || I < 0 || R < 1 || ldw < I || ldw < 0) return RELORA_ERR_ARG;
    const int64_t lim = INT64_MAX / 8;
    if ((ldw > 0 && O > lim / ldw) || O > lim / R || (I > 0 && R > lim / I)) return RELORA_ERR_ARG;
    if (!isfinite(scale)) return RELORA_ERR_ARG;
    if ((W == NULL && O > 0 && I > 0) || (B == NULL && O > 0) || (A == NULL && I > 0)) return RELORA_ERR_ARG;
    const int64_t wes = (int64_t)relora_dtype_size(wdtype), aes = (int64_t)relora_dtype_size(adtype);
    const int64_t wbytes = (O > 0 && I > 0) ? ((O - 1) * ldw + I) * wes : 0;
    if (range_overlap(W, wbytes, A, R * I * aes) || range_overlap(W, wbytes, B, O * R * aes))
        return RELORA_ERR_OVERLAP;
    const int nt = relora_threads(nthreads);
    if (has_nonfinite(A, adtype, R * I, nt) || has_nonfinite(B, adtype, O * R, nt))
        return RELORA_ERR_NONFINITE;
    return RELORA_OK;
}

relora_status lora_merge_add(void *W, relora_dtype wdtype, int64_t ldw, const float *C, int64_t ldc,
                             int64_t row0, int64_t rows, int64_t col0, int64_t cols, int64_t I,
                             float scale, relora_rounding rounding, uint64_t seed, int nthreads)
{
    if (!dtype_valid(wdtype) || (rounding != RELORA_ROUND_NEAREST && rounding != RELORA_ROUND_STOCHASTIC))
        return RELORA_ERR_ARG;
    if (row0 < 0 || rows < 0 || col0 < 0 || cols < 0 || col0 > I - cols || ldw < I || ldc < cols ||
        !isfinite(scale))
        return RELORA_ERR_ARG;
    if (rows == 0 || cols == 0) return RELORA_OK;
    if (W == NULL || C == NULL) return RELORA_ERR_ARG;
    const int stochastic = rounding == RELORA_ROUND_STOCHASTIC && wdtype != RELORA_F32;
    const int64_t wes = (int64_t)relora_dtype_size(wdtype);
    const int nt = relora_threads(nthreads);
    const int64_t nseg = (cols + NR - 1) / NR;
    const float inv = pow2_inverse(scale);
    (void)nt;
#pragma omp parallel for schedule(static) num_threads(nt) if (rows * cols > 65536)
    for (int64_t r = 0; r < rows; r++) {
        uint32_t words[NR];
        const int64_t i = row0 + r;
        if (r + 1 < rows) /* the next row of W, whose lines the hardware prefetcher would fetch late:
                           * it restarts at every row (and 4 KiB page) */
            for (int64_t b = 0; b < cols * wes; b += 64)
                __builtin_prefetch((const char *)W + ((i + 1) * ldw + col0) * wes + b, 0, 3);
        if (wdtype == RELORA_F32) { /* the one rounding of apply_row, on the whole row */
            add_scaled_f32((float *)W + i * ldw + col0, C + r * ldc, cols, scale, inv);
            continue;
        }
        for (int64_t s = 0; s < nseg; s++) {
            const int64_t j0 = col0 + s * NR;
            const int n = col0 + cols - j0 < NR ? (int)(col0 + cols - j0) : NR;
            if (stochastic) philox_words(seed, 0, (uint64_t)i * (uint64_t)I + (uint64_t)j0, n, words);
            apply_row((char *)W + (i * ldw + j0) * wes, wdtype, n, C + r * ldc + s * NR, scale, stochastic,
                      words);
        }
    }
    return RELORA_OK;
}

relora_status lora_merge(void *W, relora_dtype wdtype, int64_t ldw,
                         const void *B, const void *A, relora_dtype adtype,
                         int64_t O, int64_t I, int64_t R,
                         float scale, relora_rounding rounding, uint64_t seed, int nthreads)
{
    relora_status st = lora_merge_check(W, wdtype, ldw, B, A, adtype, O, I, R, scale, rounding, nthreads);
    if (st != RELORA_OK) return st;
    if (O == 0 || I == 0) return RELORA_OK;
    const int nt = relora_threads(nthreads);
    const int64_t wes = (int64_t)relora_dtype_size(wdtype);

    /* blocking */
    int64_t nc = (A_PACK_FLOATS / R) / NR * NR;
    if (nc > NC_MAX) nc = NC_MAX;
    if (nc < NR) nc = NR;
    const int64_t ipad = (I + NR - 1) / NR * NR;
    if (nc > ipad) nc = ipad;
    {   /* several column panels: as many as a multiple of the threads, of (nearly) equal widths, so that
         * the static schedule (column panel outer) gives every thread the same work: e.g. I = 5632 at
         * r = 64 would otherwise be 5 panels of 1024 and one of 512, 3 : 2.5 between two threads */
        const int64_t ns_all = ipad / NR;
        int64_t np = (ipad + nc - 1) / nc;
        if (np > 1) {
            np = (np + nt - 1) / nt * nt;
            nc = (ns_all + np - 1) / np * NR;
        }
    }
    const int64_t n_ic = (O + MC - 1) / MC, n_jc = (I + nc - 1) / nc;
    const int64_t ntiles = n_ic * n_jc;
    const int stochastic = rounding == RELORA_ROUND_STOCHASTIC && wdtype != RELORA_F32;
    const int nthr = ntiles < nt ? (int)ntiles : nt;
    const int dp = MERGE_BF16_DP && adtype == RELORA_BF16; /* packs hold bf16 pairs (fit in the fp32 sizes) */
    const float inv = pow2_inverse(scale);
    const int pre = !MERGE_HAS_FMA && !dp && wdtype == RELORA_F32 &&
                    prescaled_ok(A, B, adtype, R, R * I, O * R, scale, inv);

    /* per-thread packs: A panel (R, nc), B block (MC, R), SR words (MR, nc) */
    const size_t a_floats = (size_t)(R * nc), b_floats = (size_t)(MC * R * BB);
    const size_t w_words = stochastic ? (size_t)(MR * nc) : 0;
    const size_t per_thread = (a_floats + b_floats + w_words + (size_t)(MR * NR) + 64 + 15) / 16 * 16;
    float *scratch = relora_malloc(sizeof(float) * per_thread * (size_t)nthr);
    if (scratch == NULL) return RELORA_ERR_NOMEM;

#pragma omp parallel num_threads(nthr)
    {
        const int t = relora_thread_id();
        float *ap = scratch + per_thread * (size_t)t;           /* 64-byte aligned: sizes below are */
        float *bp = ap + a_floats;                              /* multiples of 16 floats */
        float *ct = bp + b_floats;                              /* (MR, NR) sums */
        uint32_t *words = (uint32_t *)(ct + MR * NR);
        int64_t packed_jc = -1;

#pragma omp for schedule(static)
        for (int64_t tile = 0; tile < ntiles; tile++) {
            const int64_t jci = tile / n_ic, ici = tile % n_ic;
            const int64_t j0 = jci * nc, i0 = ici * MC;
            const int64_t ncw = I - j0 < nc ? I - j0 : nc;
            const int64_t mc = O - i0 < MC ? O - i0 : MC;
            if (packed_jc != jci) {
                if (dp) pack_a_dp(ap, A, I, R, j0, ncw);
                else pack_a(ap, A, adtype, I, R, j0, ncw, pre ? scale : 1.0f);
                packed_jc = jci;
            }
            if (dp) pack_b_dp(bp, B, R, i0, mc);
            else pack_b(bp, B, adtype, R, i0, mc);
            const int64_t nq = (mc + MR - 1) / MR, ns = (ncw + NR - 1) / NR;
            for (int64_t q = 0; q < nq; q++) {
                const int64_t mr = mc - q * MR < MR ? mc - q * MR : MR;
                if (stochastic)
                    for (int64_t r = 0; r < mr; r++)
                        philox_words(seed, 0, (uint64_t)(i0 + q * MR + r) * (uint64_t)I + (uint64_t)j0,
                                     ncw, words + r * nc);
                for (int64_t s = 0; s < ns; s++) {
                    const int nr = ncw - s * NR < NR ? (int)(ncw - s * NR) : NR;
                    /* W under the next row sliver, so that it is in cache when that sliver's epilogue comes
                     * (measured: without it the W traffic does not overlap the product; 5-15% at r = 64) */
                    if (q + 1 < nq)
                        for (int64_t r = 0; r < MR && (q + 1) * MR + r < mc; r++)
                            for (int64_t b = 0; b < NR * wes; b += 64)
                                __builtin_prefetch((const char *)W + ((i0 + (q + 1) * MR + r) * ldw + j0 + s * NR) * wes + b, 0, 3);
                    char *w0 = (char *)W + ((i0 + q * MR) * ldw + j0 + s * NR) * wes;
                    if (pre) { /* sums already scaled: W += sum, in the micro-kernel for a whole tile */
                        const float *bq = bp + q * R * MR * BB, *as = ap + s * R * NR;
                        if (mr == MR && nr == NR) {
                            kernel_mrxnr((float *)w0, ldw, 1, bq, as, R);
                        } else {
                            kernel_mrxnr(ct, NR, 0, bq, as, R);
                            for (int64_t r = 0; r < mr; r++)
                                add_scaled_f32((float *)w0 + r * ldw, ct + r * NR, nr, 1.0f, 1.0f);
                        }
                        continue;
                    }
                    if (dp) kernel_dp(ct, bp, ap, R, q, s);
                    else kernel_mrxnr(ct, NR, 0, bp + q * R * MR * BB, ap + s * R * NR, R);
                    if (mr == MR && nr == NR && !stochastic && apply_tile(w0, wdtype, ldw, ct, scale, inv))
                        continue;
                    for (int64_t r = 0; r < mr; r++) {
                        const int64_t i = i0 + q * MR + r;
                        char *wrow = (char *)W + (i * ldw + j0 + s * NR) * wes;
                        apply_row(wrow, wdtype, nr, ct + r * NR, scale, stochastic,
                                  words + r * nc + s * NR);
                    }
                }
            }
        }
    }
    relora_free(scratch);
    return RELORA_OK;
}
