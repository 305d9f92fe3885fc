// Test-only operators, in a namespace of their own (torch.ops.relora_testing), built into the test-only
// module relora_ext._C_testing so that the installed relora_ext._C registers only what users call: the
// portable implementations (compiled into that module too) run on any device, CPU included,
// so the test suite can compare them with the C kernels on a machine without a GPU.
#include <torch/library.h>

#include "ops/portable/cycle_kernels.h"

TORCH_LIBRARY(relora_testing, m) {
  m.def("merge_portable_(Tensor(a!) W, Tensor A, Tensor B, float scale, str rounding, int seed) -> ()");
  m.def("reset_portable_(Tensor(a!) A, Tensor(b!) B, float std, int seed, int offset) -> ()");
  m.def("prune_portable_(Tensor(a!) x, float ratio, str selection, int seed, int offset) -> Tensor");
}

TORCH_LIBRARY_IMPL(relora_testing, CompositeExplicitAutograd, m) {
  m.impl("merge_portable_", &relora::merge_portable);
  m.impl("reset_portable_", &relora::reset_portable);
  m.impl("prune_portable_", &relora::prune_portable);
}
