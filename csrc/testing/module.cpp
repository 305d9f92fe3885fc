// relora_ext._C_testing: the test-only module (tests and benchmarks import it; nothing in relora_ext
// does). Importing it registers the torch.ops.relora_testing operators (ops.cpp) and gives Python the
// switches of relora_ext._C that only tests and benchmarks turn: the instruction-set level its kernels
// run and the path of its CPU merge_, reached through _C's capsule (api.h).
#include <Python.h>

#include "testing/api.h"

static const relora_testing_api* api = nullptr;

static PyObject* cpu_capabilities(PyObject*, PyObject*) {
  const int best = api->cpu_best_level();
  PyObject* out = PyTuple_New(best + 1);
  if (out == nullptr) return nullptr;
  for (int l = 0; l <= best; l++) {
    PyObject* name = PyUnicode_FromString(api->cpu_level_name(l));
    if (name == nullptr) { Py_DECREF(out); return nullptr; }
    PyTuple_SET_ITEM(out, l, name);
  }
  return out;
}

static PyObject* set_cpu_capability(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  const int level = api->cpu_level_from_name(name);
  if (level < 0) {
    return PyErr_Format(PyExc_ValueError,
                        "set_cpu_capability: level must be one of default, avx2, avx512, avx512_bf16 "
                        "(those built for this architecture), got '%s'", name);
  }
  if (api->cpu_set_level(level) != RELORA_OK) {
    return PyErr_Format(PyExc_ValueError,
                        "set_cpu_capability: this CPU does not support '%s' (its best level is '%s')",
                        name, api->cpu_level_name(api->cpu_best_level()));
  }
  Py_RETURN_NONE;
}

static PyObject* set_merge_path(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  if (!api->set_merge_path(name))
    return PyErr_Format(PyExc_ValueError, "set_merge_path: path must be 'auto', 'kernel' or 'blas', got '%s'",
                        name);
  Py_RETURN_NONE;
}

static PyObject* merge_path(PyObject*, PyObject*) { return PyUnicode_FromString(api->merge_path()); }

static PyObject* merge_takes_blas(PyObject*, PyObject* arg) {
  const long long r = PyLong_AsLongLong(arg);
  if (r == -1 && PyErr_Occurred()) return nullptr;
  return PyBool_FromLong(api->merge_takes_blas(r));
}

static PyMethodDef testing_methods[] = {
    {"cpu_capabilities", cpu_capabilities, METH_NOARGS,
     "The levels this build and this CPU can run, lowest first."},
    {"set_cpu_capability", set_cpu_capability, METH_O,
     "Run relora_ext._C's kernels at the named level; ValueError if the CPU lacks it."},
    {"set_merge_path", set_merge_path, METH_O,
     "merge_ on CPU: 'auto' (measured choice), 'kernel' or 'blas'."},
    {"merge_path", merge_path, METH_NOARGS, "The merge_ path setting: 'auto', 'kernel' or 'blas'."},
    {"merge_takes_blas", merge_takes_blas, METH_O,
     "Whether a CPU merge_ at rank r takes the BLAS path now (the level that runs, the path setting)."},
    {nullptr, nullptr, 0, nullptr},
};

static struct PyModuleDef testing_module = {
    PyModuleDef_HEAD_INIT, "_C_testing",
    "Test-only: torch.ops.relora_testing and the switches of relora_ext._C (tests and benchmarks).", -1,
    testing_methods,
};

PyMODINIT_FUNC PyInit__C_testing(void) {
  api = static_cast<const relora_testing_api*>(PyCapsule_Import(RELORA_TESTING_API_CAPSULE, 0));
  if (api == nullptr) return nullptr;
  return PyModule_Create(&testing_module);
}
