/*
 * Arithmetic peaks of this CPU, for the roofline of the merge (benchmarks/RESULTS.md): 12 independent
 * accumulators per thread, 2 threads, in a register-only loop.
 *
 *   gcc -O2 -mavx512f -mavx512vl -mavx512bf16 -fopenmp benchmarks/cpu_peak.c -o /tmp/cpu_peak && /tmp/cpu_peak
 *
 * Prints GFLOP/s of vdpbf16ps (zmm: 16 lanes x 2 products x 2 flops), vfmadd (zmm fp32) and the SSE2
 * baseline's mulps + addps (what the `default` level's kernels can use: no FMA, 4 lanes).
 */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>

#define ITERS 8000000L
#define NT 2

int main(void)
{
    for (int what = 0; what < 3; what++) {
        double best = 0;
        for (int rep = 0; rep < 5; rep++) {
            float sink = 0;
            const double t0 = omp_get_wtime();
#pragma omp parallel num_threads(NT) reduction(+ : sink)
            {
                if (what == 0) {
                    __m512 acc[12];
                    _Pragma("GCC unroll 12") for (int i = 0; i < 12; i++) acc[i] = _mm512_set1_ps((float)i);
                    __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80), b = a;
                    for (long it = 0; it < ITERS; it++) {
                        _Pragma("GCC unroll 12") for (int i = 0; i < 12; i++) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
                        __asm__ volatile("" : "+v"(a));
                    }
                    for (int i = 0; i < 12; i++) sink += _mm512_reduce_add_ps(acc[i]);
                } else if (what == 1) {
                    __m512 acc[12];
                    _Pragma("GCC unroll 12") for (int i = 0; i < 12; i++) acc[i] = _mm512_set1_ps((float)i);
                    __m512 a = _mm512_set1_ps(0.5f), b = _mm512_set1_ps(0.25f);
                    for (long it = 0; it < ITERS; it++) {
                        _Pragma("GCC unroll 12") for (int i = 0; i < 12; i++) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
                        __asm__ volatile("" : "+v"(a));
                    }
                    for (int i = 0; i < 12; i++) sink += _mm512_reduce_add_ps(acc[i]);
                } else {
                    __m128 acc[12];
                    _Pragma("GCC unroll 12") for (int i = 0; i < 12; i++) acc[i] = _mm_set1_ps((float)i);
                    __m128 a = _mm_set1_ps(0.5f), b = _mm_set1_ps(0.25f);
                    for (long it = 0; it < ITERS; it++) {
                        _Pragma("GCC unroll 12") for (int i = 0; i < 12; i++) acc[i] = _mm_add_ps(_mm_mul_ps(acc[i], a), b);
                        __asm__ volatile("" : "+x"(a));
                    }
                    for (int i = 0; i < 12; i++) sink += acc[i][0];
                }
            }
            const double t = omp_get_wtime() - t0;
            const double flops = (double)NT * ITERS * 12 * (what == 0 ? 64 : what == 1 ? 32 : 8);
            if (flops / t > best) best = flops / t;
            if (sink == 12345.0f) printf(" ");
        }
        printf("%-28s %7.1f GFLOP/s (%d threads)\n",
               what == 0 ? "bf16 vdpbf16ps zmm" : what == 1 ? "fp32 vfmadd zmm" : "fp32 SSE2 mulps+addps", best / 1e9, NT);
    }
    return 0;
}
