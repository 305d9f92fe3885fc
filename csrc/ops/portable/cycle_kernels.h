// The portable (ATen) implementations of the cycle ops, shared with the test-only operators of
// csrc/testing/ops.cpp (compiled into the test-only module relora_ext._C_testing). Arguments as in the schemas of csrc/ops/cycle_ops.cpp.
#pragma once

#include <ATen/ATen.h>

namespace relora {

void merge_portable(const at::Tensor& W, const at::Tensor& A, const at::Tensor& B, double scale,
                    c10::string_view rounding, int64_t seed);
void reset_portable(const at::Tensor& A, const at::Tensor& B, double std, int64_t seed,
                    int64_t offset);
at::Tensor prune_portable(const at::Tensor& x, double ratio, c10::string_view mode, int64_t seed,
                          int64_t offset);
void uniform_portable(const at::Tensor& x, int64_t seed, int64_t offset);

}  // namespace relora
