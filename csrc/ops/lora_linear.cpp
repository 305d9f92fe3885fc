// relora::lora_linear: schema, argument checks and the compute every kernel shares. See
// lora_linear.h for the math, shapes and dtypes.
#include "ops/lora_linear.h"

#include <torch/library.h>

namespace relora {

namespace {
const char* kOp = "lora_linear";

void check_same(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), kOp, ": ", name,
                   " must have x's dtype ", x.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), kOp, ": ", name, " must be on x's device ",
                    x.device(), ", got ", t.device());
}
}  // namespace

void check_lora_linear_args(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& A,
                            const at::Tensor& B, const std::optional<at::Tensor>& x_dropped) {
  TORCH_CHECK_VALUE(x.dim() >= 1, kOp, ": x must have at least 1 dimension (*, in), got a ",
                    x.dim(), "-D tensor");
  TORCH_CHECK_VALUE(weight.dim() == 2, kOp, ": weight must be 2-D (out, in), got shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(A.dim() == 2, kOp, ": lora_A must be 2-D (r, in), got shape ", A.sizes());
  TORCH_CHECK_VALUE(B.dim() == 2, kOp, ": lora_B must be 2-D (out, r), got shape ", B.sizes());
  const int64_t in = weight.size(1), out = weight.size(0), r = A.size(0);
  TORCH_CHECK_VALUE(x.size(-1) == in, kOp, ": x must be (*, in) with in = weight.shape[1] = ", in,
                    ", got x of shape ", x.sizes());
  TORCH_CHECK_VALUE(A.size(1) == in, kOp, ": lora_A must be (r, in) with in = ", in,
                    ", got shape ", A.sizes());
  TORCH_CHECK_VALUE(B.size(0) == out && B.size(1) == r, kOp, ": lora_B must be (out, r) = (", out,
                    ", ", r, "), got shape ", B.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), kOp,
                   ": x must be a floating-point tensor, got ", x.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(weight.scalar_type()), kOp,
                   ": weight must be a floating-point tensor, got ", weight.scalar_type());
  TORCH_CHECK_VALUE(weight.device() == x.device(), kOp, ": weight must be on x's device ",
                    x.device(), ", got ", weight.device());
  check_same(A, "lora_A", x);
  check_same(B, "lora_B", x);
  if (present(bias)) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == out, kOp, ": bias must be (out,) = (",
                      out, ",), got shape ", bias->sizes());
    check_same(*bias, "bias", x);
  }
  if (present(x_dropped)) {
    TORCH_CHECK_VALUE(x_dropped->sizes() == x.sizes(), kOp,
                      ": x_dropped must have x's shape ", x.sizes(), ", got ", x_dropped->sizes());
    check_same(*x_dropped, "x_dropped", x);
  }
}

std::tuple<at::Tensor, at::Tensor> lora_linear_2d(const at::Tensor& x2, const at::Tensor& weight,
                                                  const std::optional<at::Tensor>& bias,
                                                  const at::Tensor& A, const at::Tensor& B,
                                                  double scaling,
                                                  const std::optional<at::Tensor>& xd2) {
  const at::Tensor W = weight_as(weight, x2);
  at::Tensor h = at::mm(present(xd2) ? *xd2 : x2, A.t());
  at::Tensor y = present(bias) ? at::addmm(*bias, x2, W.t()) : at::mm(x2, W.t());
  y.addmm_(h, B.t(), /*beta=*/1, /*alpha=*/scaling);
  return {std::move(y), std::move(h)};
}

at::Tensor lora_linear(const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, const at::Tensor& A,
                       const at::Tensor& B, double scaling,
                       const std::optional<at::Tensor>& x_dropped) {
  check_lora_linear_args(x, weight, bias, A, B, x_dropped);
  std::optional<at::Tensor> xd2;
  if (present(x_dropped)) xd2 = rows(*x_dropped);
  at::Tensor y = std::get<0>(lora_linear_2d(rows(x), weight, bias, A, B, scaling, xd2));
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = weight.size(0);
  return y.view(shape);
}

}  // namespace relora

// -- define the operator ----------------------------------------------------------------------
TORCH_LIBRARY_FRAGMENT(relora, m) {
  m.def("lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
        "float scaling, Tensor? x_dropped=None) -> Tensor");
}

// -- the compute, for every device (ATen GEMMs) ------------------------------------------------
TORCH_LIBRARY_IMPL(relora, CompositeExplicitAutograd, m) {
  m.impl("lora_linear", &relora::lora_linear);
}
