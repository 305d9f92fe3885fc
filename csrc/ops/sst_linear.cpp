// SST's native operators (see relora_ext/sst.py for the method):
//   relora::sst_linear        SSTLinear's forward and its enhanced-gradient backward as one operator;
//   relora::sst_renormalize_  the per-step renormalisation of every layer's active columns in one call
//                             (ReLoRAOptimizer.step runs it after each optimizer step: no Python loop).
//
//   y = x Wᵀ + b,    W = U diag(Σ) Vᵀ + U_a diag(Σ_S) V_aᵀ over all m directions (out, in)
//
// Shapes: x (*, in) flattened to (N, in); U (out, m) and V (in, m) the frozen directions (zeros in the
// active columns); sigma Σ (m,); active S (r,) int64; U_active U_a (out, r), V_active V_a (in, r);
// bias (out,) or None. One floating dtype for all but `active`, `U` and `V`: the frozen directions may be
// kept in another floating dtype (SSTLinear's weight_dtype, e.g. bf16 beside fp32 trained columns); they
// are cast to x's dtype where used.
//
// Backward, with G = ∂L/∂y (N, out) and M = Gᵀ x (out, in):
//   ∂x   = G W                                          the true gradient
//   ∂Σ   = diag(Uᵀ M V), and diag(U_aᵀ M V_a) at S      the true gradient
//   ∂U_a = M V_a = Gᵀ (x V_a)    ∂V_a = Mᵀ U_a = xᵀ (G U_a)     SST's enhanced gradient (no Σ_S)
//   ∂b   = Σ_n G
// Work in multiply-adds, square d x d, N tokens: 2 d³ + 3 N d² + 3 d² r. Folding the active block into W
// and reading every gradient off M costs the rank r almost nothing: separate rank-r products for the
// active block (x V_a, G U_a, and the four products with them) would cost 6 N d r instead of 3 d² r.
// Saved for backward: x and W when W is no larger than x (out <= N: it then costs less memory than x
// itself and saves the backward an out·in·m product). The backward uses out-of-place ops only (but for
// an in-place update of a fresh product), and recomputes W under create_graph, so it is itself
// differentiable (double backward).
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <ATen/MemoryOverlap.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <utility>
#include <tuple>
#include <vector>

namespace relora {
namespace {

const char* kOp = "sst_linear";

bool given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// Whether t's values can be read here without a device synchronisation or a traced (fake, functional)
// tensor: a plain CPU tensor with its data.
bool readable_on_host(const at::Tensor& t) {
  return t.is_cpu() && t.has_storage() && !t.key_set().has(c10::DispatchKey::Python) &&
         !t.key_set().has(c10::DispatchKey::Functionalize);
}

// Every entry of `active` (r,) an index into Σ's m directions, no direction twice (checked where the values
// can be read: see readable_on_host). `where` prefixes the message ("sst_linear", "sst_renormalize_: layer 1").
void check_active(const std::string& where, const at::Tensor& active, int64_t m) {
  if (!readable_on_host(active)) return;
  const at::Tensor Sc = active.contiguous();
  const int64_t* idx = Sc.const_data_ptr<int64_t>();
  std::vector<char> seen(static_cast<size_t>(m), 0);
  for (int64_t j = 0; j < Sc.numel(); j++) {
    TORCH_CHECK_INDEX(idx[j] >= 0 && idx[j] < m, where, ": active must index sigma's ", m,
                      " entries (each in [0, ", m, ")), got active[", j, "] = ", idx[j]);
    TORCH_CHECK_VALUE(!seen[idx[j]], where, ": active must not repeat a direction, got ", idx[j], " twice");
    seen[idx[j]] = 1;
  }
}

void check_args(const at::Tensor& x, const at::Tensor& U, const at::Tensor& V, const at::Tensor& sigma,
                const at::Tensor& active, const at::Tensor& Ua, const at::Tensor& Va,
                const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(U.dim() == 2 && V.dim() == 2 && sigma.dim() == 1 && U.size(1) == sigma.size(0) &&
                        V.size(1) == sigma.size(0),
                    kOp, ": expected U (out, m), V (in, m), sigma (m,), got ", U.sizes(), ", ",
                    V.sizes(), ", ", sigma.sizes());
  TORCH_CHECK_VALUE(active.dim() == 1 && Ua.dim() == 2 && Va.dim() == 2 &&
                        Ua.size(0) == U.size(0) && Va.size(0) == V.size(0) &&
                        Ua.size(1) == active.size(0) && Va.size(1) == active.size(0),
                    kOp, ": expected active (r,), U_active (out, r), V_active (in, r), got ",
                    active.sizes(), ", ", Ua.sizes(), ", ", Va.sizes());
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == V.size(0), kOp,
                    ": x must be (*, in) with in = V.shape[0] = ", V.size(0), ", got ", x.sizes());
  TORCH_CHECK_TYPE(active.scalar_type() == at::kLong, kOp, ": active must be int64, got ",
                   active.scalar_type());
  for (const at::Tensor* t : {&sigma, &Ua, &Va}) {
    TORCH_CHECK_TYPE(t->scalar_type() == x.scalar_type(), kOp,
                     ": sigma, U_active and V_active must have x's dtype ", x.scalar_type(), ", got ",
                     t->scalar_type());
  }
  for (const at::Tensor* t : {&U, &V}) {
    TORCH_CHECK_TYPE(at::isFloatingType(t->scalar_type()), kOp,
                     ": U and V must be floating point, got ", t->scalar_type());
  }
  if (given(bias)) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == U.size(0), kOp,
                      ": bias must be (out,), got ", bias->sizes());
  }
  check_active(kOp, active, sigma.size(0));
}

// t in dtype dt (a copy only where the dtypes differ: aten::to would return t itself, an alias).
at::Tensor as_dtype(const at::Tensor& t, at::ScalarType dt) {
  return t.scalar_type() == dt ? t : t.to(dt);
}

// W = U diag(Σ) Vᵀ + U_a diag(Σ_S) V_aᵀ (out, in): all m directions, the frozen ones (U, V are zero in
// the active columns) and the active ones, in Σ's dtype. A rank-r update rather than copies of U and V
// with the active columns put in: two fewer (out + in) x m copies a call.
at::Tensor sst_weight(const at::Tensor& U, const at::Tensor& V, const at::Tensor& sigma,
                      const at::Tensor& active, const at::Tensor& Ua, const at::Tensor& Va) {
  const at::ScalarType dt = sigma.scalar_type();
  at::Tensor W = at::mm(as_dtype(U, dt) * sigma, as_dtype(V, dt).t());
  return W.addmm_(Ua * sigma.index_select(0, active), Va.t());
}

// y (N, out) and the weight W (out, in) for x2 (N, in).
std::tuple<at::Tensor, at::Tensor> forward_2d(const at::Tensor& x2, const at::Tensor& U, const at::Tensor& V,
                                              const at::Tensor& sigma, const at::Tensor& active,
                                              const at::Tensor& Ua, const at::Tensor& Va,
                                              const std::optional<at::Tensor>& bias) {
  at::Tensor W = sst_weight(U, V, sigma, active, Ua, Va);
  at::Tensor y = given(bias) ? at::addmm(*bias, x2, W.t()) : at::mm(x2, W.t());
  return {std::move(y), std::move(W)};
}

at::Tensor out_shape(const at::Tensor& y2, const at::Tensor& x) {
  if (x.dim() == 2) return y2;
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = y2.size(1);
  return y2.view(shape);
}

at::Tensor sst_linear(const at::Tensor& x, const at::Tensor& U, const at::Tensor& V,
                      const at::Tensor& sigma, const at::Tensor& active, const at::Tensor& Ua,
                      const at::Tensor& Va, const std::optional<at::Tensor>& bias) {
  check_args(x, U, V, sigma, active, Ua, Va, bias);
  const at::Tensor x2 = x.reshape({-1, x.size(-1)});
  return out_shape(std::get<0>(forward_2d(x2, U, V, sigma, active, Ua, Va, bias)), x);
}

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// Edges: the arguments that can take a gradient, in schema order.
enum Edge : size_t { kX = 0, kSigma, kUa, kVa, kBias, kEdges };

struct SSTLinearBackward : public torch::autograd::Node {
  SavedVariable x_, U_, V_, sigma_, active_, Ua_, Va_, W_;  // W_: empty when not kept
  std::vector<int64_t> x_shape;

  std::string name() const override { return "SSTLinearBackward"; }

  void release_variables() override {
    for (SavedVariable* v : {&x_, &U_, &V_, &sigma_, &active_, &Ua_, &Va_, &W_}) v->reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    variable_list out(kEdges);
    if (!grads[0].defined()) return out;
    const at::Tensor x = x_.unpack(), U = U_.unpack(), V = V_.unpack(), sigma = sigma_.unpack();
    const at::Tensor active = active_.unpack(), Ua = Ua_.unpack(), Va = Va_.unpack();
    const at::Tensor g = grads[0].reshape({-1, U.size(0)});
    const at::Tensor x2 = x.reshape({-1, x.size(-1)});
    if (should_compute_output(kX)) {
      // Under create_graph (double backward) W is recomputed, so that it carries its dependence on Σ, U_a, V_a.
      const at::Tensor kept = c10::GradMode::is_enabled() ? at::Tensor() : W_.unpack();
      const at::Tensor W = kept.defined() ? kept : sst_weight(U, V, sigma, active, Ua, Va);
      out[kX] = at::mm(g, W).view(x_shape);
    }
    const bool need_sigma = should_compute_output(kSigma), need_ua = should_compute_output(kUa);
    if (need_sigma || need_ua || should_compute_output(kVa)) {
      const at::Tensor gW = at::mm(g.t(), x2);  // Gᵀ x (out, in): every other gradient is a product with it
      if (need_sigma) {  // ∂Σ = diag(Uᵀ (Gᵀx) V) over the frozen directions, diag(U_aᵀ Q_a) at S
        const at::ScalarType dt = sigma.scalar_type();
        const at::Tensor Qa = at::mm(gW, Va);  // Gᵀ x V_a = ∂U_a
        const at::Tensor gs = (as_dtype(U, dt) * at::mm(gW, as_dtype(V, dt))).sum(0);
        out[kSigma] = gs.index_add(0, active, (Ua * Qa).sum(0));
        if (need_ua) out[kUa] = Qa;
      } else if (need_ua) {
        out[kUa] = at::mm(gW, Va);
      }
      if (should_compute_output(kVa)) out[kVa] = at::mm(gW.t(), Ua);
    }
    if (should_compute_output(kBias)) out[kBias] = g.sum(0);
    return out;
  }
};

at::Tensor sst_linear_autograd(const at::Tensor& x, const at::Tensor& U, const at::Tensor& V,
                               const at::Tensor& sigma, const at::Tensor& active,
                               const at::Tensor& Ua, const at::Tensor& Va,
                               const std::optional<at::Tensor>& bias) {
  check_args(x, U, V, sigma, active, Ua, Va, bias);
  at::Tensor y, W;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::tie(y, W) = forward_2d(x.reshape({-1, x.size(-1)}), U, V, sigma, active, Ua, Va, bias);
    y = out_shape(y, x);
  }
  if (torch::autograd::compute_requires_grad(x, sigma, Ua, Va, bias)) {
    auto node = c10::make_intrusive<SSTLinearBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(x, sigma, Ua, Va, bias));
    node->x_shape = x.sizes().vec();
    node->x_ = SavedVariable(x, false);
    node->U_ = SavedVariable(U, false);
    node->V_ = SavedVariable(V, false);
    node->sigma_ = SavedVariable(sigma, false);
    node->active_ = SavedVariable(active, false);
    node->Ua_ = SavedVariable(Ua, false);
    node->Va_ = SavedVariable(Va, false);
    // out <= N, as x.numel() >= out * in (symbolic sizes under torch.compile: a guard there)
    if (x.requires_grad() &&
        x.sym_numel() >= U.sym_size(0) * x.sym_size(-1))
      node->W_ = SavedVariable(W, false);
    torch::autograd::set_history(y, node);
  }
  return y;
}

// Autocast: every floating argument to the autocast dtype, then the operator again without autocast.
template <c10::DispatchKey key, c10::DeviceType device>
at::Tensor sst_linear_autocast(const at::Tensor& x, const at::Tensor& U, const at::Tensor& V,
                               const at::Tensor& sigma, const at::Tensor& active,
                               const at::Tensor& Ua, const at::Tensor& Va,
                               const std::optional<at::Tensor>& bias) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("relora::sst_linear", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const std::optional<at::Tensor>&)>();
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  const at::ScalarType dt = at::autocast::get_autocast_dtype(device);
  using at::autocast::cached_cast;
  return op.call(cached_cast(dt, x, device), cached_cast(dt, U, device), cached_cast(dt, V, device),
                 cached_cast(dt, sigma, device), active, cached_cast(dt, Ua, device),
                 cached_cast(dt, Va, device), cached_cast(dt, bias, device));
}

// Column norms of x (rows, r), row-major, in double: norms[j] = ‖x[:, j]‖.
template <typename T>
void column_norms(const T* x, int64_t rows, int64_t r, double* norms) {
  std::fill(norms, norms + r, 0.0);
  for (int64_t i = 0; i < rows; i++)
    for (int64_t j = 0; j < r; j++) {
      const double v = static_cast<double>(x[i * r + j]);
      norms[j] += v * v;
    }
  for (int64_t j = 0; j < r; j++) norms[j] = std::sqrt(norms[j]);
}

// One layer on CPU, in one pass over each tensor after the norms: what the ATen path below computes
// (x / norm in x's arithmetic type, Σ · ‖u‖‖v‖ in double), without a dozen small ops per layer (about
// 100 us each layer on CPU, as much as AdamW's own step for a model of small layers; bench_step.py).
template <typename T>
void renormalize_layer_cpu(const at::Tensor& Ua, const at::Tensor& Va, const at::Tensor& sigma,
                           const at::Tensor& S) {
  using acc_t = at::opmath_type<T>;
  const int64_t r = S.size(0);
  std::vector<double> nu(r), nv(r);
  T *u = Ua.data_ptr<T>(), *v = Va.data_ptr<T>(), *sg = sigma.data_ptr<T>();
  column_norms(u, Ua.size(0), r, nu.data());
  column_norms(v, Va.size(0), r, nv.data());
  std::vector<acc_t> du(r), dv(r);  // divisors: 1 where a column is zero (it is left as it is)
  std::vector<char> ok(r);
  for (int64_t j = 0; j < r; j++) {
    ok[j] = nu[j] > 0 && nv[j] > 0;
    du[j] = ok[j] ? static_cast<acc_t>(nu[j]) : acc_t(1);
    dv[j] = ok[j] ? static_cast<acc_t>(nv[j]) : acc_t(1);
  }
  for (int64_t i = 0; i < Ua.size(0); i++)
    for (int64_t j = 0; j < r; j++) u[i * r + j] = static_cast<T>(static_cast<acc_t>(u[i * r + j]) / du[j]);
  for (int64_t i = 0; i < Va.size(0); i++)
    for (int64_t j = 0; j < r; j++) v[i * r + j] = static_cast<T>(static_cast<acc_t>(v[i * r + j]) / dv[j]);
  const int64_t* idx = S.data_ptr<int64_t>();
  for (int64_t j = 0; j < r; j++)
    if (ok[j]) sg[idx[j]] = static_cast<T>(static_cast<double>(sg[idx[j]]) * (nu[j] * nv[j]));
  for (int64_t k = 0; k < sigma.size(0); k++)
    if (static_cast<acc_t>(sg[k]) < acc_t(0)) sg[k] = T(0);  // a NaN stays, as clamp_min leaves it
}

bool renormalize_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// For each layer i: unit-length columns of U_active[i] (out, r) and V_active[i] (in, r), their norms
// moved into sigma[i] at active[i] (the function is unchanged), then sigma[i] >= 0. A column with a zero
// norm is left as it is. Every layer is checked before any is changed (shapes, dtypes, devices, the
// active indices on CPU, no written tensor that requires grad under grad mode, none with overlapping
// elements or sharing memory with another of its layer). Layers run one after the other (two layers may
// name one tensor); contiguous CPU layers take the loop above, others ATen ops (any
// device) that compute the same: the division in the dtype's arithmetic type, Σ's product in double.
// Both bump the tensors' versions, so a graph that saved them notices.
void sst_renormalize_(at::TensorList U_active, at::TensorList V_active, at::TensorList sigma,
                      at::TensorList active) {
  const size_t n = U_active.size();
  TORCH_CHECK_VALUE(V_active.size() == n && sigma.size() == n && active.size() == n,
                    "sst_renormalize_: U_active, V_active, sigma and active must be lists of one length, got ",
                    n, ", ", V_active.size(), ", ", sigma.size(), ", ", active.size());
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor &Ua = U_active[i], &Va = V_active[i], &s = sigma[i], &S = active[i];
    TORCH_CHECK_VALUE(Ua.dim() == 2 && Va.dim() == 2 && s.dim() == 1 && S.dim() == 1 &&
                          Ua.size(1) == S.size(0) && Va.size(1) == S.size(0),
                      "sst_renormalize_: layer ", i, ": expected U_active (out, r), V_active (in, r), "
                      "sigma (m,), active (r,), got ", Ua.sizes(), ", ", Va.sizes(), ", ", s.sizes(),
                      ", ", S.sizes());
    TORCH_CHECK_TYPE(S.scalar_type() == at::kLong, "sst_renormalize_: layer ", i,
                     ": active must be int64, got ", S.scalar_type());
    TORCH_CHECK_TYPE(renormalize_dtype(Ua.scalar_type()) && renormalize_dtype(Va.scalar_type()) &&
                         renormalize_dtype(s.scalar_type()),
                     "sst_renormalize_: layer ", i, ": U_active, V_active and sigma must be float32, float64, "
                     "bfloat16 or float16, got ", Ua.scalar_type(), ", ", Va.scalar_type(), ", ", s.scalar_type());
    TORCH_CHECK_VALUE(Va.device() == Ua.device() && s.device() == Ua.device() && S.device() == Ua.device(),
                      "sst_renormalize_: layer ", i, ": U_active, V_active, sigma and active must be on one "
                      "device, got ", Ua.device(), ", ", Va.device(), ", ", s.device(), ", ", S.device());
    check_active("sst_renormalize_: layer " + std::to_string(i), S, s.size(0));  // (CPU only: no GPU sync a step)
  }
  for (size_t i = 0; i < n; ++i) {  // what is written in place: each tensor once, none a leaf autograd tracks
    const std::string layer = "sst_renormalize_: layer " + std::to_string(i);
    const at::Tensor &Ua = U_active[i], &Va = V_active[i], &s = sigma[i];
    const std::pair<const char*, const at::Tensor*> written[3] = {{"U_active", &Ua}, {"V_active", &Va}, {"sigma", &s}};
    for (int a = 0; a < 3; a++) {
      const char* name = written[a].first;
      const at::Tensor& t = *written[a].second;
      TORCH_CHECK_VALUE(!(c10::GradMode::is_enabled() && t.requires_grad()), layer, ": ", name,
                        " requires grad and is written in place; the op has no derivative, call it under "
                        "torch.no_grad()");
      TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, layer, ": ", name,
                        " is written in place but its elements overlap (an expanded view?), got shape ",
                        t.sizes(), " with strides ", t.strides(), "; pass a tensor with its own memory");
      for (int b = 0; b < a; b++)  // each column is normalised once: U_active and V_active must be two tensors
        TORCH_CHECK_VALUE(t.numel() == 0 || written[b].second->numel() == 0 ||
                              !t.storage().is_alias_of(written[b].second->storage()) ||
                              at::get_overlap_status(t, *written[b].second) == at::MemOverlapStatus::No,
                          layer, ": ", written[b].first, " and ", name, " share memory (the same tensor named "
                          "twice?); each is normalised in place, so they must be separate tensors");
    }
  }
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor &Ua = U_active[i], &Va = V_active[i], &s = sigma[i], &S = active[i];
    if (Ua.is_cpu() && Va.scalar_type() == Ua.scalar_type() && s.scalar_type() == Ua.scalar_type() &&
        Ua.is_contiguous() && Va.is_contiguous() && s.is_contiguous() && S.is_contiguous()) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, Ua.scalar_type(), "sst_renormalize_",
                                      [&] { renormalize_layer_cpu<scalar_t>(Ua, Va, s, S); });
      for (const at::Tensor* t : {&Ua, &Va, &s}) torch::autograd::impl::bump_version(*t);
      continue;
    }
    // Norms and their product in double: columns of large entries (1e20, a diverging run) would overflow
    // the sum of squares, and the product of two large norms, in fp32.
    const at::Tensor nu = at::linalg_vector_norm(Ua, 2, at::IntArrayRef{0}, false, at::kDouble);
    const at::Tensor nv = at::linalg_vector_norm(Va, 2, at::IntArrayRef{0}, false, at::kDouble);
    const at::Tensor ok = at::logical_and(nu > 0, nv > 0);
    Ua.div_(at::where(ok, nu, 1).to(at::toOpMathType(Ua.scalar_type())));
    Va.div_(at::where(ok, nv, 1).to(at::toOpMathType(Va.scalar_type())));
    s.index_copy_(0, S, (s.index_select(0, S).to(at::kDouble) * at::where(ok, nu * nv, 1)).to(s.scalar_type()));
    s.clamp_min_(0);
  }
}

}  // namespace
}  // namespace relora

TORCH_LIBRARY_FRAGMENT(relora, m) {
  m.def("sst_linear(Tensor x, Tensor U, Tensor V, Tensor sigma, Tensor active, Tensor U_active, "
        "Tensor V_active, Tensor? bias) -> Tensor");
  m.def("sst_renormalize_(Tensor(a!)[] U_active, Tensor(b!)[] V_active, Tensor(c!)[] sigma, "
        "Tensor[] active) -> ()");
}

TORCH_LIBRARY_IMPL(relora, CompositeImplicitAutograd, m) {
  m.impl("sst_renormalize_", &relora::sst_renormalize_);
}

TORCH_LIBRARY_IMPL(relora, CompositeExplicitAutograd, m) {
  m.impl("sst_linear", &relora::sst_linear);
}

TORCH_LIBRARY_IMPL(relora, Autograd, m) {
  m.impl("sst_linear", &relora::sst_linear_autograd);
}

TORCH_LIBRARY_IMPL(relora, AutocastCPU, m) {
  m.impl("sst_linear",
         &relora::sst_linear_autocast<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(relora, AutocastCUDA, m) {
  m.impl("sst_linear",
         &relora::sst_linear_autocast<c10::DispatchKey::AutocastCUDA, c10::DeviceType::CUDA>);
}
