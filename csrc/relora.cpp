// The Python module relora_ext._C, in the bare CPython API. Importing it loads this shared library,
// whose static initialisers register the torch.ops.relora operators:
//
//   csrc/ops/cycle_ops.cpp           schemas of merge_, reset_, prune_, uniform_ (+ autograd version
//                                    bump, meta)
//   csrc/ops/cpu/                    CPU implementations through the C kernels (csrc/kernels/)
//   csrc/ops/portable/               ATen implementations for every other device
//   csrc/ops/lora_linear.cpp         relora::lora_linear (LoRALinear's forward), with autograd/ and autocast/
//   csrc/ops/sst_linear.cpp          relora::sst_linear and relora::sst_renormalize_ (SSTLinear)
//
// It also says which instruction-set level the C kernels run (csrc/kernels/cpu.h): chosen at the first
// use from the CPU's features, or lowered by RELORA_CPU_CAPABILITY; and it answers two rules the kernels
// hold, so that Python states neither again: the count magnitude pruning keeps, and the largest std a
// reset takes. The switches that only tests and benchmarks turn live in relora_ext._C_testing
// (csrc/testing/), which reaches this module's state through the capsule _testing_api.
#include <Python.h>

#include <string>

extern "C" {
#include "kernels/cpu.h"
#include "kernels/prune.h"
#include "kernels/reset.h"
}

#include "testing/api.h"

namespace relora {
bool set_merge_path(const std::string& name);  // ops/cpu/cycle_kernels.cpp (the capsule, testing/api.h)
const char* merge_path();
bool merge_takes_blas(int64_t R);
}  // namespace relora

static PyObject* cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(relora_cpu_level_name(relora_cpu_level()));
}

// (n, ratio) -> n - floor(ratio n), kernels/prune.h.
static PyObject* py_keep_count(PyObject*, PyObject* args) {
  long long n;
  double ratio;
  if (!PyArg_ParseTuple(args, "Ld", &n, &ratio)) return nullptr;
  return PyLong_FromLongLong(prune_keep_count(n, ratio));
}

// dtype code (0 float32, 1 bfloat16, 2 float16, kernels/common.h) -> the largest std reset_ takes.
static PyObject* py_reset_std_max(PyObject*, PyObject* arg) {
  const long code = PyLong_AsLong(arg);
  if (code == -1 && PyErr_Occurred()) return nullptr;
  if (code < RELORA_F32 || code > RELORA_F16)
    return PyErr_Format(PyExc_ValueError, "_reset_std_max: dtype code must be 0, 1 or 2, got %ld", code);
  return PyFloat_FromDouble(reset_std_max(static_cast<relora_dtype>(code)));
}

static bool set_merge_path_c(const char* name) { return relora::set_merge_path(name); }

static const relora_testing_api testing_api = {
    relora_cpu_level,          relora_cpu_best_level, relora_cpu_level_name, relora_cpu_level_from_name,
    relora_cpu_set_level,      set_merge_path_c,      relora::merge_path,    relora::merge_takes_blas,
};

static PyMethodDef relora_methods[] = {
    {"_cpu_capability", cpu_capability, METH_NOARGS,
     "The instruction-set level the C kernels run: 'default', 'avx2', 'avx512' or 'avx512_bf16'."},
    {"_keep_count", py_keep_count, METH_VARARGS, "n - floor(ratio * n): what magnitude pruning keeps (prune.h)."},
    {"_reset_std_max", py_reset_std_max, METH_O,
     "The largest std reset_ takes for dtype code 0 (float32), 1 (bfloat16) or 2 (float16) (reset.h)."},
    {nullptr, nullptr, 0, nullptr},
};

static struct PyModuleDef relora_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "Native relora operators; use them through torch.ops.relora or relora_ext.ops.", -1, relora_methods,
};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&relora_module);
  if (m == nullptr) return nullptr;
  PyObject* capsule = PyCapsule_New(const_cast<relora_testing_api*>(&testing_api), RELORA_TESTING_API_CAPSULE,
                                    nullptr);
  if (capsule == nullptr || PyModule_AddObject(m, "_testing_api", capsule) < 0) {
    Py_XDECREF(capsule);
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
