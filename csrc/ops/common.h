// Shared by the device implementations of the cycle ops: dtype mapping, status codes, and the
// checks that keep the process safe when an op is called directly (torch.ops.relora.*). The
// user-facing validation, with messages that name the argument, lives in relora_ext/_checks.py.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <cmath>
#include <cstdint>
#include <new>
#include <string>

extern "C" {
#include "kernels/common.h"
#include "kernels/reset.h"
}

namespace relora {

inline relora_dtype kernel_dtype(const at::Tensor& t, const char* op, const char* arg) {
  switch (t.scalar_type()) {
    case at::kFloat: return RELORA_F32;
    case at::kBFloat16: return RELORA_BF16;
    case at::kHalf: return RELORA_F16;
    default:
      TORCH_CHECK_TYPE(false, op, ": ", arg, " must be float32, bfloat16 or float16, got ",
                       t.scalar_type());
  }
  return RELORA_F32;  // unreachable
}

inline void check_status(relora_status status, const char* op) {
  if (status == RELORA_OK) return;
  if (status == RELORA_ERR_NOMEM) throw std::bad_alloc();
  TORCH_CHECK_VALUE(false, op, ": ", relora_status_string(status));
}

// Seeds and offsets travel through the schema as int64; the kernels read them as uint64.
inline uint64_t as_u64(int64_t v) { return static_cast<uint64_t>(v); }

inline relora_rounding parse_rounding(c10::string_view rounding) {
  if (rounding == "nearest") return RELORA_ROUND_NEAREST;
  if (rounding == "stochastic") return RELORA_ROUND_STOCHASTIC;
  TORCH_CHECK_VALUE(false, "merge_: rounding must be 'nearest' or 'stochastic', got '",
                    std::string(rounding), "'");
  return RELORA_ROUND_NEAREST;
}

inline void check_merge_args(const at::Tensor& W, const at::Tensor& A, const at::Tensor& B) {
  TORCH_CHECK_VALUE(W.dim() == 2 && A.dim() == 2 && B.dim() == 2,
                    "merge_: W, A and B must be 2-D, got ", W.dim(), "-D, ", A.dim(), "-D and ",
                    B.dim(), "-D");
  TORCH_CHECK_VALUE(B.size(0) == W.size(0) && A.size(1) == W.size(1) && B.size(1) == A.size(0),
                    "merge_: expected W (out, in), B (out, r), A (r, in), got W ", W.sizes(),
                    ", B ", B.sizes(), ", A ", A.sizes());
  TORCH_CHECK_VALUE(A.size(0) >= 1, "merge_: rank r must be >= 1, got A ", A.sizes());
  TORCH_CHECK_TYPE(A.scalar_type() == B.scalar_type(), "merge_: A and B must share a dtype, got ",
                   A.scalar_type(), " and ", B.scalar_type());
  TORCH_CHECK_VALUE(A.device() == W.device() && B.device() == W.device(),
                    "merge_: W, A and B must be on one device, got ", W.device(), ", ",
                    A.device(), ", ", B.device());
}

// scale and std reach the kernels as float32.
inline void check_f32_scalar(double v, const char* op, const char* arg, bool nonnegative) {
  constexpr double kF32Max = 3.4028234663852886e38;
  TORCH_CHECK_VALUE(std::isfinite(v) && std::fabs(v) <= kF32Max && !(nonnegative && v < 0), op, ": ", arg,
                    " must be finite", nonnegative ? ", >= 0" : "", " and at most the float32 maximum, got ", v);
}

inline void check_reset_args(const at::Tensor& A, const at::Tensor& B, double std) {
  const relora_dtype dt = kernel_dtype(A, "reset_", "A");
  TORCH_CHECK_TYPE(A.scalar_type() == B.scalar_type(), "reset_: A and B must share a dtype, got ",
                   A.scalar_type(), " and ", B.scalar_type());
  TORCH_CHECK_VALUE(A.device() == B.device(), "reset_: A and B must be on one device, got ", A.device(),
                    " and ", B.device());
  // the kernels' bound (kernels/reset.h): every |A| < 6 std must fit A's dtype
  const double hi = reset_std_max(dt);
  TORCH_CHECK_VALUE(std::isfinite(std) && std >= 0 && std <= hi, "reset_: std must be a finite number in [0, ", hi,
                    "] for ", A.scalar_type(), " A (every |A| < 6 std must fit the dtype), got ", std);
}

// Whether a and b share memory (conservative where ATen cannot tell: views of one storage with gaps).
// Only for tensors with data (never meta or fake tensors).
inline bool may_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || !a.storage().is_alias_of(b.storage())) return false;
  return at::get_overlap_status(a, b) != at::MemOverlapStatus::No;
}

// Refuse `written` sharing memory with `other`, naming both (before anything is written).
inline void check_disjoint(const char* op, const char* written_name, const at::Tensor& written,
                           const char* other_name, const at::Tensor& other) {
  TORCH_CHECK_VALUE(!may_overlap(written, other), op, ": ", written_name, " overlaps ", other_name,
                    " in memory (", written_name, " is written in place while ", other_name,
                    " is read); pass tensors that do not share memory");
}

}  // namespace relora
