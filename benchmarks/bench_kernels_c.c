/*
 * Micro-benchmark of the C kernels (no torch): min and median time of lora_merge and prune over repeats.
 *
 * The leveled kernels are built once per instruction-set level (csrc/kernels/levels.txt), as setup.py does;
 * RELORA_CPU_CAPABILITY picks the level at run time (csrc/kernels/cpu.h):
 *   mkdir -p /tmp/relora_bench && objs=$(sh csrc/kernels/build_levels.sh gcc $(uname -m) /tmp/relora_bench \
 *       -O3 -std=c11 -fopenmp -Wno-psabi)
 *   gcc -O3 -std=c11 -fopenmp -Icsrc/kernels benchmarks/bench_kernels_c.c csrc/kernels/common.c csrc/kernels/cpu.c $objs -lm
 *   RELORA_CPU_CAPABILITY=avx2 ./a.out merge 4096 4096 64 0 0 2
 *   ./a.out merge O I R wdtype(0 f32, 1 bf16, 2 f16) rounding(0, 1) nthreads
 *   ./a.out prune n dtype ratio nthreads mode(0 magnitude, 1 random)
 *   ./a.out copy n_floats                      (memory bandwidth reference)
 */
#define _POSIX_C_SOURCE 199309L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common.h"
#include "merge.h"
#include "prune.h"
#include "reset.h"

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int cmpd(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

#define REPS 9

int main(int argc, char **argv)
{
    if (argc < 2) return 2;
    double t[REPS];
    if (!strcmp(argv[1], "merge") && argc >= 8) {
        long O = atol(argv[2]), I = atol(argv[3]), R = atol(argv[4]);
        relora_dtype wd = (relora_dtype)atoi(argv[5]);
        int rnd = atoi(argv[6]), nt = atoi(argv[7]);
        void *W = calloc((size_t)(O * I), relora_dtype_size(wd));
        void *B = malloc((size_t)(O * R) * relora_dtype_size(wd)), *A = malloc((size_t)(R * I) * relora_dtype_size(wd));
        normal_fill(W, wd, O * I, 1.0f, 1, 0, nt);
        normal_fill(B, wd, O * R, 0.01f, 2, 0, nt);
        normal_fill(A, wd, R * I, 0.01f, 3, 0, nt);
        lora_merge(W, wd, I, B, A, wd, O, I, R, 0.5f, (relora_rounding)rnd, 1, nt);
        for (int r = 0; r < REPS; r++) {
            double t0 = now();
            relora_status st = lora_merge(W, wd, I, B, A, wd, O, I, R, 0.5f, (relora_rounding)rnd, 1, nt);
            t[r] = now() - t0;
            if (st) { printf("status %d\n", st); return 1; }
        }
        qsort(t, REPS, sizeof(double), cmpd);
        double gflop = 2.0 * O * I * R * 1e-9, gb = 2.0 * O * I * relora_dtype_size(wd) * 1e-9;
        printf("merge %ldx%ld R=%ld wd=%d rnd=%d nt=%d: min %.2f ms median %.2f ms  %.1f GFLOP/s  %.1f GB/s\n",
               O, I, R, (int)wd, rnd, nt, t[0] * 1e3, t[REPS / 2] * 1e3, gflop / t[0], gb / t[0]);
    } else if (!strcmp(argv[1], "prune") && argc >= 7) {
        long n = atol(argv[2]);
        relora_dtype dt = (relora_dtype)atoi(argv[3]);
        double ratio = atof(argv[4]);
        int nt = atoi(argv[5]), mode = atoi(argv[6]);
        size_t bytes = (size_t)n * relora_dtype_size(dt);
        void *x0 = malloc(bytes), *x = malloc(bytes);
        normal_fill(x0, dt, n, 1.0f, 1, 0, nt);
        for (int r = 0; r < REPS; r++) {
            memcpy(x, x0, bytes);
            int64_t kept;
            double t0 = now();
            if (mode == 0) prune_magnitude(x, dt, n, ratio, &kept, nt);
            else prune_random(x, dt, n, ratio, 1, 2, &kept, nt);
            t[r] = now() - t0;
        }
        qsort(t, REPS, sizeof(double), cmpd);
        printf("prune %s n=%ld dt=%d ratio=%g nt=%d: min %.2f ms median %.2f ms\n", mode ? "random" : "magnitude",
               n, (int)dt, ratio, nt, t[0] * 1e3, t[REPS / 2] * 1e3);
    } else if (!strcmp(argv[1], "copy") && argc >= 3) {
        long n = atol(argv[2]);
        float *a = malloc((size_t)n * 4), *b = malloc((size_t)n * 4);
        memset(a, 1, (size_t)n * 4); memset(b, 0, (size_t)n * 4);
        for (int r = 0; r < REPS; r++) {
            double t0 = now();
            memcpy(b, a, (size_t)n * 4);
            t[r] = now() - t0;
        }
        qsort(t, REPS, sizeof(double), cmpd);
        printf("copy %ld floats: min %.2f ms  %.1f GB/s (read + write)\n", n, t[0] * 1e3, 8.0 * n / t[0] * 1e-9);
    } else return 2;
    return 0;
}
