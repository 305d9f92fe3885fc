// relora::lora_linear: the LoRALinear forward as one operator.
//
//   y = x Wᵀ + b + s · (xd Aᵀ) Bᵀ          xd = x_dropped if given (the adapter's dropout), else x
//
// Shapes (the legend used below): N rows (every leading dimension of x flattened), in, out, r.
//   x (*, in), weight W (out, in), bias b (out,) or None, lora_A A (r, in), lora_B B (out, r),
//   x_dropped xd (*, in) like x or None; y (*, out). The 2-D kernels below take x (N, in).
//
// dtypes: x, b, A, B and xd share one floating dtype; W may be stored in another (a frozen weight
// kept in bfloat16, say) and is then cast to x's dtype for the product. Under autocast every
// floating argument but float64 is cast to the autocast dtype first (csrc/ops/autocast/).
//
// Files: lora_linear.cpp (schema, checks, the compute shared by every kernel, the
// CompositeExplicitAutograd kernel), autograd/lora_linear.cpp (the derivative, double backward
// included), autocast/lora_linear.cpp (AutocastCPU / AutocastCUDA). The fake kernel that
// torch.compile traces with is relora_ext/ops.py's.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace relora {

// Raises a ValueError/TypeError naming the argument, what was expected and what was given.
void check_lora_linear_args(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& A,
                            const at::Tensor& B, const std::optional<at::Tensor>& x_dropped);

// W in the dtype of `like` (no copy when it already is).
inline at::Tensor weight_as(const at::Tensor& weight, const at::Tensor& like) {
  return weight.scalar_type() == like.scalar_type() ? weight : weight.to(like.scalar_type());
}

// The forward on 2-D x (N, in): returns y (N, out) and the adapter's hidden h = xd Aᵀ (N, r).
// Order of operations (the same as the former Python autograd.Function, so CPU results are
// bit-identical): h = xd Aᵀ; y = addmm(b, x, Wᵀ) (or x Wᵀ); y += s h Bᵀ in place (one addmm_,
// no (N, out) temporary and no separate scale or add pass). No argument checks.
std::tuple<at::Tensor, at::Tensor> lora_linear_2d(const at::Tensor& x2, const at::Tensor& weight,
                                                  const std::optional<at::Tensor>& bias,
                                                  const at::Tensor& A, const at::Tensor& B,
                                                  double scaling,
                                                  const std::optional<at::Tensor>& xd2);

// x (*, in) -> (*, out) flattened to 2-D and back: the CompositeExplicitAutograd kernel.
at::Tensor lora_linear(const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, const at::Tensor& A,
                       const at::Tensor& B, double scaling,
                       const std::optional<at::Tensor>& x_dropped);

// x (*, in) as (N, in): a view when x's layout allows it.
inline at::Tensor rows(const at::Tensor& x) { return x.reshape({-1, x.size(-1)}); }

inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

}  // namespace relora
