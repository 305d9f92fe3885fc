/*
 * prune: magnitude (exact top-k by |x|, radix selection) and random (Philox) pruning, in place.
 *
 * Magnitude pruning works on the key of an entry: the bits of |x| (sign bit cleared) read as an unsigned
 * integer, 31 bits for fp32 and 15 bits for bf16/fp16. For non-negative IEEE numbers the key is monotonic
 * in the value, -0 and +0 share key 0, and every NaN (exponent all ones, mantissa non-zero) has a key
 * above +Inf: "NaN counts as the largest magnitude" comes for free.
 *
 *   1. histogram of the top 15 key bits (32768 bins; fp32: key >> 16, 16-bit types: the whole key);
 *      walking down from the top bin gives the bin holding the k-th largest key;
 *   2. fp32 only: histogram of the low 16 bits of the keys inside that bin -> the threshold key T and
 *      c_gt = #{key > T}; the k kept entries are all keys > T plus the first k - c_gt keys == T;
 *   3. only when some but not all keys == T are kept: count keys == T per fixed chunk (chunking depends
 *      on n only, never on the thread count) and take an exclusive prefix sum;
 *   4. one writing pass: zero every entry not kept.
 * Histograms are per thread (uint32, merged into int64 after each round of at most 2^31 elements), so
 * any n up to int64 range works and the result never depends on the thread count.
 */
#include <math.h>

#include "prune.h"
#include "philox.h"
#include "internal.h"

#define HI_BINS 32768          /* pass 1 bins: 15 bits */
#define LO_BINS 65536          /* pass 2 bins: 16 bits */
#define ROUND_MAX ((int64_t)1 << 31) /* elements per histogram round: uint32 counters cannot overflow */

static relora_status check_args(const void *x, relora_dtype dtype, int64_t n, double ratio)
{
    if (!dtype_valid(dtype)) return RELORA_ERR_ARG;
    if (n < 0 || n > INT64_MAX / 8) return RELORA_ERR_ARG;
    if (x == NULL && n > 0) return RELORA_ERR_ARG;
    if (!(ratio >= 0.0 && ratio <= 1.0)) return RELORA_ERR_ARG; /* also NaN */
    return RELORA_OK;
}

/* ---------------------------------------------------------------------------------------------------- */
/* magnitude */

/* hist (nt, nbins) uint32 scratch; total (nbins) int64 accumulates. mode 0: pass 1 (top 15 bits);
 * mode 1: fp32 pass 2, low 16 bits of keys whose top bits equal `hi`. */
static void histogram(const void *x, int is32, int64_t n, int mode, uint32_t hi,
                      uint32_t *hist, int64_t *total, int nbins, int nt)
{
    for (int64_t r0 = 0; r0 < n; r0 += ROUND_MAX) {
        const int64_t r1 = (n - r0 > ROUND_MAX) ? r0 + ROUND_MAX : n;
        memset(hist, 0, sizeof(uint32_t) * (size_t)nbins * (size_t)nt);
#pragma omp parallel num_threads(nt) if (r1 - r0 > 65536)
        {
            const int t = relora_thread_id(), T = relora_num_threads();
            const int64_t len = r1 - r0;
            const int64_t a = r0 + len * t / T, b = r0 + len * (t + 1) / T;
            uint32_t *restrict h = hist + (size_t)t * (size_t)nbins;
            if (is32) {
                const uint32_t *restrict u = (const uint32_t *)x;
                if (mode == 0) {
                    for (int64_t i = a; i < b; i++) h[(u[i] >> 16) & 0x7FFFu]++;
                } else {
                    for (int64_t i = a; i < b; i++) {
                        uint32_t key = u[i] & 0x7FFFFFFFu;
                        if ((key >> 16) == hi) h[key & 0xFFFFu]++;
                    }
                }
            } else {
                const uint16_t *restrict u = (const uint16_t *)x;
                for (int64_t i = a; i < b; i++) h[u[i] & 0x7FFFu]++;
            }
        }
        for (int t = 0; t < nt; t++)
            for (int b = 0; b < nbins; b++) total[b] += hist[(size_t)t * (size_t)nbins + (size_t)b];
    }
}

/* Walk down from the top bin: the bin holding the k-th largest key, and *above = count in higher bins. */
static int select_bin(const int64_t *total, int nbins, int64_t k, int64_t *above)
{
    int64_t cum = 0;
    for (int b = nbins - 1; b >= 0; b--) {
        if (cum + total[b] >= k) { *above = cum; return b; }
        cum += total[b];
    }
    *above = cum; /* not reached when 1 <= k <= n */
    return 0;
}

RELORA_INLINE uint32_t key_at(const void *x, int is32, int64_t i)
{
    return is32 ? (((const uint32_t *)x)[i] & 0x7FFFFFFFu) : (uint32_t)(((const uint16_t *)x)[i] & 0x7FFFu);
}

/* Zero x[a..b) where key < T; with budget >= 0, keys == T are kept only while budget lasts. */
static void write_range(void *x, int is32, int64_t a, int64_t b, uint32_t T, int64_t budget)
{
    if (is32) {
        uint32_t *restrict u = (uint32_t *)x;
        if (budget < 0) {
            for (int64_t i = a; i < b; i++) u[i] = ((u[i] & 0x7FFFFFFFu) >= T) ? u[i] : 0u;
        } else {
            for (int64_t i = a; i < b; i++) {
                uint32_t key = u[i] & 0x7FFFFFFFu;
                if (key > T) continue;
                if (key == T && budget > 0) { budget--; continue; }
                u[i] = 0u;
            }
        }
    } else {
        uint16_t *restrict u = (uint16_t *)x;
        const uint16_t t16 = (uint16_t)T;
        if (budget < 0) {
            for (int64_t i = a; i < b; i++) u[i] = ((uint16_t)(u[i] & 0x7FFFu) >= t16) ? u[i] : (uint16_t)0;
        } else {
            for (int64_t i = a; i < b; i++) {
                uint16_t key = (uint16_t)(u[i] & 0x7FFFu);
                if (key > t16) continue;
                if (key == t16 && budget > 0) { budget--; continue; }
                u[i] = 0;
            }
        }
    }
}

static int64_t count_eq(const void *x, int is32, int64_t a, int64_t b, uint32_t T)
{
    int64_t c = 0;
    if (is32) {
        const uint32_t *restrict u = (const uint32_t *)x;
        for (int64_t i = a; i < b; i++) c += (u[i] & 0x7FFFFFFFu) == T;
    } else {
        const uint16_t *restrict u = (const uint16_t *)x;
        const uint16_t t16 = (uint16_t)T;
        for (int64_t i = a; i < b; i++) c += (uint16_t)(u[i] & 0x7FFFu) == t16;
    }
    return c;
}

relora_status prune_magnitude(void *x, relora_dtype dtype, int64_t n, double ratio,
                              int64_t *kept, int nthreads)
{
    relora_status st = check_args(x, dtype, n, ratio);
    if (st != RELORA_OK) return st;
    const int64_t k = prune_keep_count(n, ratio);
    const size_t es = relora_dtype_size(dtype);
    const int nt = relora_threads(nthreads);
    const int is32 = dtype == RELORA_F32;

    if (k == n) { if (kept) *kept = n; return RELORA_OK; }
    if (k == 0) {
        const int64_t bytes = n * (int64_t)es, step = (int64_t)1 << 20;
        const int64_t nsteps = (bytes + step - 1) / step;
#pragma omp parallel for schedule(static) num_threads(nt) if (nsteps > 1)
        for (int64_t s = 0; s < nsteps; s++) {
            int64_t len = bytes - s * step < step ? bytes - s * step : step;
            memset((char *)x + s * step, 0, (size_t)len);
        }
        if (kept) *kept = 0;
        return RELORA_OK;
    }

    /* chunking for the tie pass: depends on n only */
    int64_t chunk = (int64_t)1 << 16;
    while ((n + chunk - 1) / chunk > 4096) chunk *= 2;
    const int64_t nchunks = (n + chunk - 1) / chunk;

    uint32_t *hist = relora_malloc(sizeof(uint32_t) * (size_t)LO_BINS * (size_t)nt);
    int64_t *total = relora_calloc(LO_BINS, sizeof(int64_t));
    int64_t *chunk_eq = relora_malloc(sizeof(int64_t) * (size_t)nchunks);
    if (!hist || !total || !chunk_eq) {
        relora_free(hist); relora_free(total); relora_free(chunk_eq);
        return RELORA_ERR_NOMEM;
    }

    /* passes 1 and 2: threshold key T, c_gt = #{key > T}, c_eq = #{key == T} */
    histogram(x, is32, n, 0, 0, hist, total, HI_BINS, nt);
    int64_t c_gt = 0;
    uint32_t T = (uint32_t)select_bin(total, HI_BINS, k, &c_gt);
    int64_t c_eq = total[T];
    if (is32) {
        memset(total, 0, sizeof(int64_t) * LO_BINS);
        histogram(x, is32, n, 1, T, hist, total, LO_BINS, nt);
        int64_t above = 0;
        uint32_t lo = (uint32_t)select_bin(total, LO_BINS, k - c_gt, &above);
        c_gt += above;
        c_eq = total[lo];
        T = (T << 16) | lo;
    }
    const int64_t take_eq = k - c_gt; /* 1 <= take_eq <= c_eq */

    if (take_eq == c_eq) {
        /* every key == T is kept: keep key >= T */
#pragma omp parallel for schedule(static) num_threads(nt) if (nchunks > 1)
        for (int64_t c = 0; c < nchunks; c++) {
            int64_t a = c * chunk, b = a + chunk < n ? a + chunk : n;
            write_range(x, is32, a, b, T, -1);
        }
    } else {
        /* pass 3: keys == T per chunk, exclusive prefix, then the writing pass with per-chunk budgets */
#pragma omp parallel for schedule(static) num_threads(nt) if (nchunks > 1)
        for (int64_t c = 0; c < nchunks; c++) {
            int64_t a = c * chunk, b = a + chunk < n ? a + chunk : n;
            chunk_eq[c] = count_eq(x, is32, a, b, T);
        }
        int64_t before = 0;
        for (int64_t c = 0; c < nchunks; c++) {
            int64_t here = chunk_eq[c];
            int64_t budget = take_eq - before;
            chunk_eq[c] = budget < 0 ? 0 : budget;  /* keys == T this chunk may keep */
            before += here;
        }
#pragma omp parallel for schedule(static) num_threads(nt) if (nchunks > 1)
        for (int64_t c = 0; c < nchunks; c++) {
            int64_t a = c * chunk, b = a + chunk < n ? a + chunk : n;
            write_range(x, is32, a, b, T, chunk_eq[c]);
        }
    }

    relora_free(hist); relora_free(total); relora_free(chunk_eq);
    if (kept) *kept = k;
    return RELORA_OK;
}

/* ---------------------------------------------------------------------------------------------------- */
/* random */

relora_status prune_random(void *x, relora_dtype dtype, int64_t n, double ratio,
                           uint64_t seed, uint64_t offset, int64_t *kept, int nthreads)
{
    relora_status st = check_args(x, dtype, n, ratio);
    if (st != RELORA_OK) return st;
    double tf = floor((1.0 - ratio) * 4294967296.0);
    const uint64_t thresh = tf <= 0.0 ? 0 : (tf >= 4294967296.0 ? (uint64_t)1 << 32 : (uint64_t)tf);
    if (thresh == (uint64_t)1 << 32) { if (kept) *kept = n; return RELORA_OK; }

    const int is32 = dtype == RELORA_F32;
    const int nt = relora_threads(nthreads);
    const int64_t ngroups = (n + 63) / 64;
    int64_t total = 0;
    (void)nt;
#pragma omp parallel for schedule(static) num_threads(nt) reduction(+ : total) if (ngroups > 64)
    for (int64_t g = 0; g < ngroups; g++) {
        uint32_t w[64];
        philox_blocks16(seed, offset, (uint64_t)g * 16, w);
        const int64_t e0 = g * 64;
        const int cnt = n - e0 < 64 ? (int)(n - e0) : 64;
        int64_t c = 0;
        if (is32) {
            uint32_t *u = (uint32_t *)x + e0;
            for (int j = 0; j < cnt; j++) {
                int keep = (uint64_t)w[j] < thresh;
                u[j] = keep ? u[j] : 0u;
                c += keep;
            }
        } else {
            uint16_t *u = (uint16_t *)x + e0;
            for (int j = 0; j < cnt; j++) {
                int keep = (uint64_t)w[j] < thresh;
                u[j] = keep ? u[j] : (uint16_t)0;
                c += keep;
            }
        }
        total += c;
    }
    if (kept) *kept = total;
    return RELORA_OK;
}
