// CPU implementations of merge_, reset_ and prune_: the C kernels of csrc/kernels/ on the tensors'
// raw memory, with torch's thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops/common.h"

extern "C" {
#include "kernels/merge.h"
#include "kernels/prune.h"
#include "kernels/reset.h"
}

namespace relora {
namespace {

void merge_cpu(const at::Tensor& W, const at::Tensor& A, const at::Tensor& B, double scale,
               c10::string_view rounding, int64_t seed) {
  check_merge_args(W, A, B);
  const relora_dtype wdt = kernel_dtype(W, "merge_", "W");
  const relora_dtype adt = kernel_dtype(A, "merge_", "A");
  TORCH_CHECK_VALUE(W.stride(1) == 1 || W.size(1) <= 1,
                    "merge_: W must have unit column stride, got strides ", W.strides());
  const int64_t ldw = W.size(0) <= 1 ? W.size(1) : W.stride(0);
  TORCH_CHECK_VALUE(ldw >= W.size(1), "merge_: W's rows overlap, got strides ", W.strides());
  const at::Tensor Ac = A.contiguous(), Bc = B.contiguous();
  check_status(lora_merge(W.data_ptr(), wdt, ldw, Bc.const_data_ptr(), Ac.const_data_ptr(), adt,
                          W.size(0), W.size(1), A.size(0), static_cast<float>(scale),
                          parse_rounding(rounding), as_u64(seed), at::get_num_threads()),
               "merge_");
}

void reset_cpu(const at::Tensor& A, const at::Tensor& B, double std, int64_t seed, int64_t offset) {
  const relora_dtype dt = kernel_dtype(A, "reset_", "A");
  TORCH_CHECK_TYPE(A.scalar_type() == B.scalar_type(), "reset_: A and B must share a dtype, got ",
                   A.scalar_type(), " and ", B.scalar_type());
  TORCH_CHECK_VALUE(A.is_contiguous() && B.is_contiguous(),
                    "reset_: A and B must be contiguous, got strides ", A.strides(), " and ",
                    B.strides());
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
