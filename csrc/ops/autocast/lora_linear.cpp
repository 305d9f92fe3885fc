// relora::lora_linear under autocast (AutocastCPU, AutocastCUDA): like torch's own lower-precision
// ops (mm, linear), every floating argument other than float64 is cast to the autocast dtype, then
// the operator is called again with this autocast key excluded. The casts are autocast's own
// (at::autocast::cached_cast: trainable leaf parameters are cast once per autocast region); a
// frozen weight already stored in the autocast dtype (LoRALinear(weight_dtype=...)) is not copied.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <optional>

namespace relora {
namespace {

at::Tensor call_lora_linear(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& A,
                            const at::Tensor& B, double scaling,
                            const std::optional<at::Tensor>& x_dropped) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("relora::lora_linear", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                               const std::optional<at::Tensor>&, const at::Tensor&,
                                               const at::Tensor&, double,
                                               const std::optional<at::Tensor>&)>();
  return op.call(x, weight, bias, A, B, scaling, x_dropped);
}

template <c10::DispatchKey key, c10::DeviceType device>
at::Tensor lora_linear_autocast(const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, const at::Tensor& A,
                                const at::Tensor& B, double scaling,
                                const std::optional<at::Tensor>& x_dropped) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  const at::ScalarType dt = at::autocast::get_autocast_dtype(device);
  using at::autocast::cached_cast;
  return call_lora_linear(cached_cast(dt, x, device), cached_cast(dt, weight, device),
                          cached_cast(dt, bias, device), cached_cast(dt, A, device),
                          cached_cast(dt, B, device), scaling,
                          cached_cast(dt, x_dropped, device));
}

}  // namespace
}  // namespace relora

TORCH_LIBRARY_IMPL(relora, AutocastCPU, m) {
  m.impl("lora_linear",
         &relora::lora_linear_autocast<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(relora, AutocastCUDA, m) {
  m.impl("lora_linear",
         &relora::lora_linear_autocast<c10::DispatchKey::AutocastCUDA, c10::DeviceType::CUDA>);
}
