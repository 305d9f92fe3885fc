// CPU implementations of merge_, reset_ and prune_: the C kernels of csrc/kernels/ on the tensors'
// raw memory, with torch's thread count. The kernels run at the instruction-set level chosen at
// import (csrc/kernels/cpu.h).
//
// merge_ takes one of two paths:
//   kernel  lora_merge: our register-blocked product with the one-rounding epilogue fused in;
//   blas    the product through ATen (torch's BLAS) on 256 x 256 tiles of W, each into a per-thread
//           fp32 buffer, then our one-rounding epilogue (lora_merge_add). The checks, the NaN/Inf scan of A and B
//           included, run before any of W is touched, and no W-sized temporary is made.
// "auto" chooses by measurement (benchmarks/RESULTS.md, bench_ops): see merge_takes_blas.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops/common.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>

extern "C" {
#include "kernels/cpu.h"
#include "kernels/merge.h"
#include "kernels/prune.h"
#include "kernels/reset.h"
}

namespace relora {

// 0: auto, 1: always the kernel, 2: always BLAS (tests and benchmarks use the forced ones).
static std::atomic<int> merge_path_mode{0};
static const char* const merge_path_names[] = {"auto", "kernel", "blas"};

bool set_merge_path(const std::string& name) {
  for (int i = 0; i < 3; i++)
    if (name == merge_path_names[i]) { merge_path_mode = i; return true; }
  return false;
}

const char* merge_path() { return merge_path_names[merge_path_mode.load()]; }

namespace {

// Whether torch's BLAS multiplies with wider vectors than our default-level kernel (SSE2 mul + add): where
// the CPU has AVX and MKL is not held to its SSE2 code by MKL_CBWR=COMPATIBLE (users set it for
// reproducible MKL results). Other MKL_CBWR values do not count: on AMD CPUs MKL keeps its fast code under
// MKL_CBWR=SSE4_2 (measured on a Zen 5). Read once, as MKL reads it.
bool blas_wider_than_sse2() {
  static const bool wider = [] {
#if defined(__x86_64__) || defined(__i386__)
    if (!__builtin_cpu_supports("avx")) return false;
    const char* cbwr = std::getenv("MKL_CBWR");
    return !(cbwr != nullptr && std::strncmp(cbwr, "COMPATIBLE", 10) == 0);
#else
    return false;  // aarch64's default level has NEON FMA: our kernel keeps up
#endif
  }();
  return wider;
}

}  // namespace

// The measured choice (bench_ops.py at every level of a Zen 4 and a Zen 5, benchmarks/RESULTS.md): from
// avx2 up our fused kernel matches or beats torch's BLAS at every rank, so it always runs. At the baseline
// level our kernel runs SSE2 without FMA (117 GFLOP/s peak on 2 Zen 4 cores, benchmarks/cpu_peak.c):
// where torch's BLAS uses wider vectors (about twice as fast there) its product wins once the merge is
// compute-bound (r >= 32), for every dtype of W; below that, or against MKL held to SSE2, the kernel,
// which moves W once, is as fast or faster (Zen 5, 4096², r = 256: 83 ms against 95 ms through BLAS).
bool merge_takes_blas(int64_t R) {
  const int mode = merge_path_mode.load();
  if (mode != 0) return mode == 2;
  return relora_cpu_level() == RELORA_CPU_DEFAULT && R >= 32 && blas_wider_than_sse2();
}

namespace {

// W (O, I) += scale * B @ A: W is cut into tiles of at most TILE x TILE, spread over torch's threads;
// each thread computes a tile's product with at::mm (torch's BLAS, single-threaded inside the parallel
// region) into its own fp32 buffer (256 KB: it stays in L2 while our epilogue adds it into W with one
// rounding, prefetching W's next row). Square tiles keep BLAS's packing of A and B small next to the
// tile's flops. Measured at the default level (Zen 4, r = 64 and 256): panels of 64 whole rows made
// the epilogue cheaper but BLAS's product 15-35% slower at r = 256; 256 x 1024 tiles were no better.
void merge_blas(const at::Tensor& W, relora_dtype wdt, int64_t ldw, const at::Tensor& A,
                const at::Tensor& B, float scale, relora_rounding rounding, uint64_t seed) {
  constexpr int64_t TILE = 256;
  const int64_t O = W.size(0), I = W.size(1);
  if (O == 0 || I == 0) return;
  const at::Tensor A32 = A.to(at::kFloat).contiguous(), B32 = B.to(at::kFloat).contiguous();
  const int64_t n_i = (O + TILE - 1) / TILE, n_j = (I + TILE - 1) / TILE;
  void* const w = W.data_ptr();
  at::parallel_for(0, n_i * n_j, 1, [&](int64_t t0, int64_t t1) {
    at::Tensor C = at::empty({TILE, TILE}, A32.options());
    for (int64_t t = t0; t < t1; t++) {
      const int64_t i0 = (t / n_j) * TILE, j0 = (t % n_j) * TILE;
      const int64_t m = std::min(TILE, O - i0), n = std::min(TILE, I - j0);
      at::Tensor Cmn = C.view({-1}).narrow(0, 0, m * n).view({m, n});
      at::mm_out(Cmn, B32.narrow(0, i0, m), A32.narrow(1, j0, n));
      check_status(lora_merge_add(w, wdt, ldw, Cmn.const_data_ptr<float>(), n, i0, m, j0, n, I, scale,
                                  rounding, seed, 1),
                   "merge_");
    }
  });
}

void merge_cpu(const at::Tensor& W, const at::Tensor& A, const at::Tensor& B, double scale,
               c10::string_view rounding, int64_t seed) {
  check_merge_args(W, A, B);
  check_f32_scalar(scale, "merge_", "scale", false);
  const relora_dtype wdt = kernel_dtype(W, "merge_", "W");
  const relora_dtype adt = kernel_dtype(A, "merge_", "A");
  TORCH_CHECK_VALUE(W.stride(1) == 1 || W.size(1) <= 1,
                    "merge_: W must have unit column stride, got strides ", W.strides());
  const int64_t ldw = W.size(0) <= 1 ? W.size(1) : W.stride(0);
  TORCH_CHECK_VALUE(ldw >= W.size(1), "merge_: W's rows overlap, got strides ", W.strides());
  check_disjoint("merge_", "W", W, "A", A);
  check_disjoint("merge_", "W", W, "B", B);
  const at::Tensor Ac = A.contiguous(), Bc = B.contiguous();
  const relora_rounding rnd = parse_rounding(rounding);
  const int nt = at::get_num_threads();
  const int64_t O = W.size(0), I = W.size(1), R = A.size(0);
  if (merge_takes_blas(R)) {
    check_status(lora_merge_check(W.const_data_ptr(), wdt, ldw, Bc.const_data_ptr(), Ac.const_data_ptr(),
                                  adt, O, I, R, static_cast<float>(scale), rnd, nt),
                 "merge_");
    merge_blas(W, wdt, ldw, Ac, Bc, static_cast<float>(scale), rnd, as_u64(seed));
    return;
  }
  check_status(lora_merge(W.data_ptr(), wdt, ldw, Bc.const_data_ptr(), Ac.const_data_ptr(), adt, O, I,
                          R, static_cast<float>(scale), rnd, as_u64(seed), nt),
               "merge_");
}

void reset_cpu(const at::Tensor& A, const at::Tensor& B, double std, int64_t seed, int64_t offset) {
  check_reset_args(A, B, std);
  const relora_dtype dt = kernel_dtype(A, "reset_", "A");
  TORCH_CHECK_VALUE(A.is_contiguous() && B.is_contiguous(),
                    "reset_: A and B must be contiguous, got strides ", A.strides(), " and ",
                    B.strides());
  check_disjoint("reset_", "B", B, "A", A);
  check_status(lora_reset(A.data_ptr(), A.numel(), B.data_ptr(), B.numel(), dt,
                          static_cast<float>(std), as_u64(seed), as_u64(offset),
                          at::get_num_threads()),
               "reset_");
}

at::Tensor prune_cpu(const at::Tensor& x, double ratio, c10::string_view mode, int64_t seed,
                     int64_t offset) {
  const relora_dtype dt = kernel_dtype(x, "prune_", "x");
  TORCH_CHECK_VALUE(x.is_contiguous(), "prune_: x must be contiguous, got strides ", x.strides());
  int64_t kept = 0;
  const int nt = at::get_num_threads();
  if (mode == "magnitude") {
    check_status(prune_magnitude(x.data_ptr(), dt, x.numel(), ratio, &kept, nt), "prune_");
  } else if (mode == "random") {
    check_status(prune_random(x.data_ptr(), dt, x.numel(), ratio, as_u64(seed), as_u64(offset),
                              &kept, nt),
                 "prune_");
  } else {
    TORCH_CHECK_VALUE(false, "prune_: mode must be 'magnitude' or 'random', got '",
                      std::string(mode), "'");
  }
  return at::scalar_tensor(kept, x.options().dtype(at::kLong));
}

}  // namespace

TORCH_LIBRARY_IMPL(relora, CPU, m) {
  m.impl("merge_", &merge_cpu);
  m.impl("reset_", &reset_cpu);
  m.impl("prune_", &prune_cpu);
}

}  // namespace relora
