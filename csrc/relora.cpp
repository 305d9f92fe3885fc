// The Python module relora_ext._C, in the bare CPython API. Importing it loads this shared library,
// whose static initialisers register the torch.ops.relora operators:
//
//   csrc/ops/cycle_ops.cpp           schemas of merge_, reset_, prune_ (+ version bump, meta)
//   csrc/ops/cpu/                    CPU implementations through the C kernels (csrc/kernels/)
//   csrc/ops/portable/               ATen implementations for every other device, and the
//                                    test-only torch.ops.relora_testing operators
//
// It also says which instruction-set level the C kernels run (csrc/kernels/cpu.h): chosen at the first
// use from the CPU's features, or lowered by RELORA_CPU_CAPABILITY; the private setters are for tests
// and benchmarks.
#include <Python.h>

#include <string>

extern "C" {
#include "kernels/cpu.h"
}

namespace relora {
bool set_merge_path(const std::string& name);  // ops/cpu/cycle_kernels.cpp
const char* merge_path();
bool merge_takes_blas(int64_t R);
}  // namespace relora

static PyObject* cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(relora_cpu_level_name(relora_cpu_level()));
}

static PyObject* cpu_capabilities(PyObject*, PyObject*) {
  const int best = relora_cpu_best_level();
  PyObject* out = PyTuple_New(best + 1);
  if (out == nullptr) return nullptr;
  for (int l = 0; l <= best; l++) {
    PyObject* name = PyUnicode_FromString(relora_cpu_level_name(l));
    if (name == nullptr) { Py_DECREF(out); return nullptr; }
    PyTuple_SET_ITEM(out, l, name);
  }
  return out;
}

static PyObject* set_cpu_capability(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  const int level = relora_cpu_level_from_name(name);
  if (level < 0) {
    return PyErr_Format(PyExc_ValueError,
                        "_set_cpu_capability: level must be one of default, avx2, avx512, avx512_bf16 "
                        "(those built for this architecture), got '%s'", name);
  }
  if (relora_cpu_set_level(level) != RELORA_OK) {
    return PyErr_Format(PyExc_ValueError,
                        "_set_cpu_capability: this CPU does not support '%s' (its best level is '%s')",
                        name, relora_cpu_level_name(relora_cpu_best_level()));
  }
  Py_RETURN_NONE;
}

static PyObject* set_merge_path(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  if (!relora::set_merge_path(name))
    return PyErr_Format(PyExc_ValueError, "_set_merge_path: path must be 'auto', 'kernel' or 'blas', got '%s'",
                        name);
  Py_RETURN_NONE;
}

static PyObject* merge_path(PyObject*, PyObject*) { return PyUnicode_FromString(relora::merge_path()); }

static PyObject* merge_takes_blas(PyObject*, PyObject* arg) {
  const long long r = PyLong_AsLongLong(arg);
  if (r == -1 && PyErr_Occurred()) return nullptr;
  return PyBool_FromLong(relora::merge_takes_blas(r));
}

static PyMethodDef relora_methods[] = {
    {"_cpu_capability", cpu_capability, METH_NOARGS,
     "The instruction-set level the C kernels run: 'default', 'avx2', 'avx512' or 'avx512_bf16'."},
    {"_cpu_capabilities", cpu_capabilities, METH_NOARGS,
     "The levels this build and this CPU can run, lowest first."},
    {"_set_cpu_capability", set_cpu_capability, METH_O,
     "Run the C kernels at the named level (tests and benchmarks); ValueError if the CPU lacks it."},
    {"_set_merge_path", set_merge_path, METH_O,
     "merge_ on CPU: 'auto' (measured choice), 'kernel' or 'blas' (tests and benchmarks)."},
    {"_merge_path", merge_path, METH_NOARGS, "The merge_ path setting: 'auto', 'kernel' or 'blas'."},
    {"_merge_takes_blas", merge_takes_blas, METH_O,
     "Whether a CPU merge_ at rank r takes the BLAS path now (the level that runs, the path setting)."},
    {nullptr, nullptr, 0, nullptr},
};

static struct PyModuleDef relora_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "Native relora operators; use them through torch.ops.relora or relora_ext.ops.", -1, relora_methods,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&relora_module); }
