// The ReLoRA* cycle operators: schemas, and the dispatch-key registrations every device shares.
//
//   merge_(W, A, B, scale, rounding, seed)   W += scale * B @ A, one rounding per element of W
//   reset_(A, B, std, seed, offset)          B = 0; A = std * Philox normals (seed, offset)
//   prune_(x, ratio, selection, seed, offset) -> kept   zero all but a (1 - ratio) share of x
//   uniform_(x, seed, offset)                x = Philox uniforms in (0, 1] (SST's sampling)
//
// Implementations by device: csrc/ops/cpu/ (the C kernels), csrc/ops/portable/ (ATen, every other
// device). Argument checks with user-facing messages: relora_ext/_checks.py via relora_ext/ops.py.
#include <torch/autograd.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <vector>

#include "ops/common.h"

TORCH_LIBRARY(relora, m) {
  m.def("merge_(Tensor(a!) W, Tensor A, Tensor B, float scale, str rounding, int seed) -> ()");
  m.def("reset_(Tensor(a!) A, Tensor(b!) B, float std, int seed, int offset) -> ()");
  m.def("prune_(Tensor(a!) x, float ratio, str selection, int seed, int offset) -> Tensor");
  m.def("uniform_(Tensor(a!) x, int seed, int offset) -> ()");
}

// Autograd, for any op of this library: the ops have no derivative, so under grad mode an input
// that requires grad is refused; and every argument the schema marks as written (Tensor(a!)) gets
// its version counter bumped, so that autograd refuses a graph saved before a merge or reset (as it
// does after any in-place torch op) instead of computing a wrong gradient.
namespace {
void autograd_inplace(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                      torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  const size_t first = stack->size() - args.size();
  std::vector<at::Tensor> written;
  for (size_t i = 0; i < args.size(); ++i) {
    const c10::IValue& v = (*stack)[first + i];
    if (!v.isTensor()) continue;
    TORCH_CHECK(!(c10::GradMode::is_enabled() && v.toTensor().requires_grad()), op.schema().name(),
                ": ", args[i].name(), " requires grad; the op has no derivative, call it under "
                "torch.no_grad()");
    const auto* alias = args[i].alias_info();
    if (alias != nullptr && alias->isWrite()) written.push_back(v.toTensor());
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const at::Tensor& t : written) torch::autograd::impl::bump_version(t);
}
}  // namespace

TORCH_LIBRARY_IMPL(relora, Autograd, m) {
  m.impl("merge_", torch::CppFunction::makeFromBoxedFunction<&autograd_inplace>());
  m.impl("reset_", torch::CppFunction::makeFromBoxedFunction<&autograd_inplace>());
  m.impl("prune_", torch::CppFunction::makeFromBoxedFunction<&autograd_inplace>());
  m.impl("uniform_", torch::CppFunction::makeFromBoxedFunction<&autograd_inplace>());
}

// Meta: the argument checks that need no data (shapes, dtypes, devices, scalars; the ops return nothing
// but prune_'s 0-dim count), so that meta tensors and torch.compile's fake tensors pass through without
// touching data, and a mix of meta and real tensors is refused rather than silently ignored.
namespace {
void merge_meta(const at::Tensor& W, const at::Tensor& A, const at::Tensor& B, double scale,
                c10::string_view rounding, int64_t) {
  relora::check_merge_args(W, A, B);
  relora::kernel_dtype(W, "merge_", "W");
  relora::kernel_dtype(A, "merge_", "A");
  relora::check_f32_scalar(scale, "merge_", "scale", false);
  relora::parse_rounding(rounding);
}
void reset_meta(const at::Tensor& A, const at::Tensor& B, double std, int64_t, int64_t) {
  relora::check_reset_args(A, B, std);
}
at::Tensor prune_meta(const at::Tensor& x, double, c10::string_view, int64_t, int64_t) {
  relora::kernel_dtype(x, "prune_", "x");
  return at::empty({}, x.options().dtype(at::kLong));
}
void uniform_meta(const at::Tensor& x, int64_t, int64_t) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, "uniform_: x must be float32, got ", x.scalar_type());
}
}  // namespace

TORCH_LIBRARY_IMPL(relora, Meta, m) {
  m.impl("merge_", &merge_meta);
  m.impl("reset_", &reset_meta);
  m.impl("prune_", &prune_meta);
  m.impl("uniform_", &uniform_meta);
}
