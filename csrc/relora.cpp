// The Python module relora_ext._C, in the bare CPython API. Importing it loads this shared library,
// whose static initialisers register the torch.ops.relora operators:
//
//   csrc/ops/cycle_ops.cpp           schemas of merge_, reset_, prune_ (+ version bump, meta)
//   csrc/ops/cpu/                    CPU implementations through the C kernels (csrc/kernels/)
//   csrc/ops/portable/               ATen implementations for every other device, and the
//                                    test-only torch.ops.relora_testing operators
#include <Python.h>

static struct PyModuleDef relora_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "Native relora operators; use them through torch.ops.relora or relora_ext.ops.", -1, nullptr,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&relora_module); }
