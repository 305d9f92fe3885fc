// relora::lora_linear, Autograd: the derivative as a C++ autograd Function (no Python on the hot
// path). With G = ∂L/∂y (N, out), xd the adapter's input (x_dropped, or x) and h = xd Aᵀ (N, r):
//
//   ∂x  = G W            (+ s (G B) A when the adapter reads x itself)
//   ∂xd = s (G B) A      (when x_dropped is given; the dropout's own backward applies its mask)
//   ∂A  = s (G B)ᵀ xd    ∂B = s Gᵀ h    ∂b = Σ_n G    ∂W = Gᵀ x (only if W requires grad)
//
// Saved for backward: h, and x only where a gradient reads it (xd without dropout, or ∂W); with
// dropout xd instead (the dropout saves its own mask): never more than PEFT's LoRA layer keeps.
// Under create_graph=True (grad mode on inside backward) the backward is written with out-of-place
// ops and recomputes h from xd and A, so it is itself differentiable (double backward).
#include <torch/autograd.h>
#include <torch/library.h>

#include "ops/lora_linear.h"

namespace relora {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Up to this rank ∂B is computed as (s hᵀ G)ᵀ: CPU GEMMs (MKL/oneDNN, fp32 and bf16) with a
// (N, out)ᵀ·(N, r) shape run several times slower than the (r, N)·(N, out) one at r = 8; from r ≈ 32
// on the two are alike (benchmarks/bench_lora_layer.py).
constexpr int64_t kSmallRank = 16;

class LoRALinearFunction : public torch::autograd::Function<LoRALinearFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& A,
                            const at::Tensor& B, double scaling,
                            const std::optional<at::Tensor>& x_dropped) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    check_lora_linear_args(x, weight, bias, A, B, x_dropped);
    const bool dropped = present(x_dropped);
    std::optional<at::Tensor> xd2;
    if (dropped) xd2 = rows(*x_dropped);
    auto [y, h] = lora_linear_2d(rows(x), weight, bias, A, B, scaling, xd2);

    // Which inputs are autograd edges (undefined optionals are not), to read needs_input_grad.
    const bool has_bias = present(bias);
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["has_bias"] = has_bias;
    ctx->saved_data["dropped"] = dropped;
    ctx->saved_data["x_shape"] = x.sizes().vec();
    const bool keep_x = !dropped || weight.requires_grad();
    ctx->save_for_backward({keep_x ? x : at::Tensor(), weight, A, B, h,
                            dropped ? *x_dropped : at::Tensor()});
    std::vector<int64_t> shape = x.sizes().vec();
    shape.back() = weight.size(0);
    return y.view(shape);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &A = saved[2], &B = saved[3];
    const at::Tensor &h = saved[4], &xd = saved[5];
    const double s = ctx->saved_data["scaling"].toDouble();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool dropped = ctx->saved_data["dropped"].toBool();
    const auto x_shape = ctx->saved_data["x_shape"].toIntVector();

    // edges: x, weight, [bias], A, B, [x_dropped]
    size_t e = 0;
    const bool need_x = ctx->needs_input_grad(e++);
    const bool need_w = ctx->needs_input_grad(e++);
    const bool need_b = has_bias && ctx->needs_input_grad(e++);
    const bool need_A = ctx->needs_input_grad(e++);
    const bool need_B = ctx->needs_input_grad(e++);
    const bool need_xd = dropped && ctx->needs_input_grad(e++);

    const at::Tensor g = grads[0].reshape({-1, weight.size(0)});
    const at::Tensor x2 = x.defined() ? rows(x) : at::Tensor();
    const at::Tensor xa = dropped ? rows(xd) : x2;  // the adapter's input, (N, in)
    at::Tensor gx, gw, gb, gA, gB, gxd;
    const bool adapter_dx = dropped ? need_xd : need_x;  // does the adapter path need (G B) A?

    if (c10::GradMode::is_enabled()) {  // double backward: differentiable, h recomputed
      const at::Tensor W = weight_as(weight, g);
      const at::Tensor gBm = g.mm(B);
      if (need_x) gx = dropped ? g.mm(W) : g.mm(W) + gBm.mm(A) * s;
      if (need_xd) gxd = gBm.mm(A) * s;
      if (need_A) gA = gBm.t().mm(xa) * s;
      if (need_B) gB = g.t().mm(xa.mm(A.t())) * s;
    } else {
      const at::Tensor gBm = (adapter_dx || need_A) ? g.mm(B) : at::Tensor();
      if (need_x) {
        gx = g.mm(weight_as(weight, g));
        if (!dropped) gx.addmm_(gBm, A, /*beta=*/1, /*alpha=*/s);
      }
      if (need_xd) gxd = at::addmm(xa, gBm, A, /*beta=*/0, /*alpha=*/s);
      if (need_A) gA = at::addmm(A, gBm.t(), xa, /*beta=*/0, /*alpha=*/s);
      if (need_B) {
        if (h.size(1) <= kSmallRank) {  // (hᵀ G)ᵀ: an (r, out) product, ~5x faster than Gᵀ h at r = 8
          gB = at::addmm(B.t(), h.t(), g, /*beta=*/0, /*alpha=*/s).t().contiguous();
        } else {
          gB = at::addmm(B, g.t(), h, /*beta=*/0, /*alpha=*/s);
        }
      }
    }
    if (need_w) gw = g.t().mm(x2);
    if (need_b) gb = g.sum(0);
    if (gx.defined()) gx = gx.view(x_shape);
    if (gxd.defined()) gxd = gxd.view(x_shape);
    return {gx, gw, gb, gA, gB, at::Tensor(), gxd};
  }
};

at::Tensor lora_linear_autograd(const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, const at::Tensor& A,
                                const at::Tensor& B, double scaling,
                                const std::optional<at::Tensor>& x_dropped) {
  return LoRALinearFunction::apply(x, weight, bias, A, B, scaling, x_dropped);
}

}  // namespace
}  // namespace relora

TORCH_LIBRARY_IMPL(relora, Autograd, m) {
  m.impl("lora_linear", &relora::lora_linear_autograd);
}
