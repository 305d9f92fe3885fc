// relora::lora_linear, Autograd: the derivative as a C++ autograd node (no Python on the hot path;
// a plain Node like the ones PyTorch generates for its own ops, which costs less per call than a
// torch::autograd::Function). With G = ∂L/∂y (N, out), xd the adapter's input (x_dropped, or x)
// and h = xd Aᵀ (N, r):
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
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include "ops/lora_linear.h"

namespace relora {
namespace {

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// ∂B = s Gᵀ h is computed as (s hᵀ G)ᵀ when r is at most this and N at least min_rows (64 rows in
// float32 and float64, 256 in bfloat16 and float16): CPU GEMMs (MKL/oneDNN) with a (N, out)ᵀ·(N, r) shape
// run several times slower than the (r, N)·(N, out) one at r = 8 from those N; below them the
// transposing copy costs more than it saves (benchmarks/bench_lora_layer.py).
constexpr int64_t kSmallRank = 16;

bool transposed_dB(int64_t r, int64_t n, at::ScalarType dt) {
  const int64_t min_rows = (dt == at::kFloat || dt == at::kDouble) ? 64 : 256;
  return r <= kSmallRank && n >= min_rows;
}

// Edges, in the order of the schema's tensor arguments.
enum Edge : size_t { kX = 0, kW, kBias, kA, kB, kXd, kEdges };

struct LoRALinearBackward : public torch::autograd::Node {
  SavedVariable x_, weight_, A_, B_, h_, xd_;
  double scaling = 1.0;
  bool dropped = false;
  std::vector<int64_t> x_shape;

  std::string name() const override { return "LoRALinearBackward"; }

  void release_variables() override {
    x_.reset_data();
    weight_.reset_data();
    A_.reset_data();
    B_.reset_data();
    h_.reset_data();
    xd_.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    variable_list out(kEdges);
    if (!grads[0].defined()) return out;
    const at::Tensor x = x_.unpack(), weight = weight_.unpack(), A = A_.unpack(), B = B_.unpack();
    const at::Tensor h = h_.unpack(), xd = xd_.unpack();
    const double s = scaling;
    const bool need_x = should_compute_output(kX), need_w = should_compute_output(kW);
    const bool need_b = should_compute_output(kBias), need_A = should_compute_output(kA);
    const bool need_B = should_compute_output(kB), need_xd = should_compute_output(kXd);

    const bool flat = x_shape.size() == 2;
    const at::Tensor g = flat ? grads[0] : grads[0].reshape({-1, weight.size(0)});
    const at::Tensor x2 = !x.defined() ? at::Tensor() : (flat ? x : rows(x));
    const at::Tensor xa = dropped ? (flat ? xd : rows(xd)) : x2;  // the adapter's input (N, in)
    const bool adapter_dx = dropped ? need_xd : need_x;  // does anything need (G B) A?
    at::Tensor gx, gxd;

    if (c10::GradMode::is_enabled()) {  // double backward: differentiable, h recomputed
      const at::Tensor W = weight_as(weight, g);
      const at::Tensor gBm = g.mm(B);
      if (need_x) gx = dropped ? g.mm(W) : g.mm(W) + gBm.mm(A) * s;
      if (need_xd) gxd = gBm.mm(A) * s;
      if (need_A) out[kA] = gBm.t().mm(xa) * s;
      if (need_B) out[kB] = g.t().mm(xa.mm(A.t())) * s;
    } else {
      const at::Tensor gBm = (adapter_dx || need_A) ? g.mm(B) : at::Tensor();
      if (need_x) {
        gx = g.mm(weight_as(weight, g));
        if (!dropped) gx.addmm_(gBm, A, /*beta=*/1, /*alpha=*/s);
      }
      if (need_xd) gxd = at::addmm(xa, gBm, A, /*beta=*/0, /*alpha=*/s);
      if (need_A) out[kA] = at::addmm(A, gBm.t(), xa, /*beta=*/0, /*alpha=*/s);
      if (need_B) {
        if (transposed_dB(h.size(1), h.size(0), h.scalar_type())) {
          out[kB] = at::addmm(B.t(), h.t(), g, /*beta=*/0, /*alpha=*/s).t().contiguous();
        } else {
          out[kB] = at::addmm(B, g.t(), h, /*beta=*/0, /*alpha=*/s);
        }
      }
    }
    if (need_w) out[kW] = g.t().mm(x2);
    if (need_b) out[kBias] = g.sum(0);
    if (gx.defined()) out[kX] = flat ? gx : gx.view(x_shape);
    if (gxd.defined()) out[kXd] = flat ? gxd : gxd.view(x_shape);
    return out;
  }
};

at::Tensor lora_linear_autograd(const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, const at::Tensor& A,
                                const at::Tensor& B, double scaling,
                                const std::optional<at::Tensor>& x_dropped) {
  check_lora_linear_args(x, weight, bias, A, B, x_dropped);
  const bool dropped = present(x_dropped);
  const bool flat = x.dim() == 2;
  at::Tensor y, h;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::optional<at::Tensor> xd2;
    if (dropped) xd2 = flat ? *x_dropped : rows(*x_dropped);
    std::tie(y, h) = lora_linear_2d(flat ? x : rows(x), weight, bias, A, B, scaling, xd2);
    if (!flat) {
      std::vector<int64_t> shape = x.sizes().vec();
      shape.back() = weight.size(0);
      y = y.view(shape);
    }
  }
  if (torch::autograd::compute_requires_grad(x, weight, bias, A, B, x_dropped)) {
    auto node = c10::make_intrusive<LoRALinearBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(x, weight, bias, A, B, x_dropped));
    node->scaling = scaling;
    node->dropped = dropped;
    node->x_shape = x.sizes().vec();
    if (!dropped || weight.requires_grad()) node->x_ = SavedVariable(x, false);
    node->weight_ = SavedVariable(weight, false);
    node->A_ = SavedVariable(A, false);
    node->B_ = SavedVariable(B, false);
    node->h_ = SavedVariable(h, false);
    if (dropped) node->xd_ = SavedVariable(*x_dropped, false);
    torch::autograd::set_history(y, node);
  }
  return y;
}

}  // namespace
}  // namespace relora

TORCH_LIBRARY_IMPL(relora, Autograd, m) {
  m.impl("lora_linear", &relora::lora_linear_autograd);
}
