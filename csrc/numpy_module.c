/*
 * relora_ext.numpy_ops: the relora C kernels on NumPy arrays, through the NumPy C API.
 *
 * Same kernels, same semantics and same random streams as the torch operators: reset and prune are
 * bit-identical for the same data; merge too, except where torch's merge_ takes its BLAS path (the
 * `default` level at large r), which can differ in the last float32 bit. This module always runs the
 * fused kernel, at the level RELORA_CPU_CAPABILITY allows (read at the first kernel call, or at import).
 * This module links its own copy of the kernels, so its level is its own: cpu_capability() says which
 * level runs, _set_cpu_capability(name) forces one the CPU has (tests, benchmarks), as
 * relora_ext._C_testing.set_cpu_capability does for the torch operators. Arrays are float32 or float16 (NumPy has no bfloat16),
 * native byte order, aligned; the written arrays must be writeable. The GIL is released while a
 * kernel runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <numpy/arrayobject.h>

#include <float.h>
#include <math.h>
#include <stdio.h>
#undef I /* <complex.h>, pulled in by NumPy, defines I; the kernels use it as a shape letter */

#include "kernels/cpu.h"
#include "kernels/merge.h"
#include "kernels/prune.h"
#include "kernels/reset.h"

/* ---- argument checks: each sets a Python exception naming the argument and returns 0 ---- */

static int array_dtype(PyArrayObject *a, const char *fn, const char *arg, relora_dtype *out)
{
    switch (PyArray_TYPE(a)) {
    case NPY_FLOAT32: *out = RELORA_F32; break;
    case NPY_FLOAT16: *out = RELORA_F16; break;
    default: {
        PyObject *descr = PyObject_Str((PyObject *)PyArray_DESCR(a));
        PyErr_Format(PyExc_TypeError, "%s: %s must be a float32 or float16 array, got dtype %S",
                     fn, arg, descr ? descr : Py_None);
        Py_XDECREF(descr);
        return 0;
    }
    }
    if (!PyArray_ISNOTSWAPPED(a) || !PyArray_ISALIGNED(a)) {
        PyErr_Format(PyExc_ValueError, "%s: %s must be aligned and in native byte order", fn, arg);
        return 0;
    }
    return 1;
}

static PyArrayObject *as_array(PyObject *obj, const char *fn, const char *arg)
{
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s: %s must be a numpy.ndarray, got %s", fn, arg,
                     Py_TYPE(obj)->tp_name);
        return NULL;
    }
    return (PyArrayObject *)obj;
}

static int check_contiguous(PyArrayObject *a, const char *fn, const char *arg)
{
    if (!PyArray_IS_C_CONTIGUOUS(a)) {
        PyErr_Format(PyExc_ValueError, "%s: %s must be C-contiguous", fn, arg);
        return 0;
    }
    return 1;
}

static int check_writeable(PyArrayObject *a, const char *fn, const char *arg)
{
    if (!PyArray_ISWRITEABLE(a)) {
        PyErr_Format(PyExc_ValueError, "%s: %s must be writeable (it is written in place)", fn, arg);
        return 0;
    }
    return 1;
}

/* An integer in [0, 2^64) (a Python int or a NumPy integer scalar, not a bool), as the kernels' uint64 seeds
 * and offsets. */
static int parse_u64(PyObject *obj, const char *fn, const char *arg, uint64_t *out)
{
    if (PyBool_Check(obj) || PyArray_IsScalar(obj, Bool) ||
        !(PyLong_Check(obj) || PyArray_IsScalar(obj, Integer))) {
        PyErr_Format(PyExc_TypeError, "%s: %s must be an int, got %s", fn, arg, Py_TYPE(obj)->tp_name);
        return 0;
    }
    PyObject *index = PyNumber_Index(obj);
    if (index == NULL) return 0;
    unsigned long long v = PyLong_AsUnsignedLongLong(index);
    Py_DECREF(index);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s: %s must be in [0, 2**64), got %R", fn, arg, obj);
        return 0;
    }
    *out = (uint64_t)v;
    return 1;
}

/* A finite double in [lo, hi]; the kernels take scale and std as float, so their bounds are at most FLT_MAX
 * (a cast of a larger double to float is undefined behaviour); std's is reset_std_max (reset.h). */
static int check_real(double v, double lo, double hi, const char *fn, const char *arg)
{
    if (!isfinite(v) || v < lo || v > hi) {
        char msg[160];
        snprintf(msg, sizeof msg, "must be a finite number in [%.9g, %.9g], got %.17g", lo, hi, v);
        PyErr_Format(PyExc_ValueError, "%s: %s %s", fn, arg, msg);
        return 0;
    }
    return 1;
}

/* A real number (int or float, not bool, as the torch wrappers accept) as a double. */
static int parse_real(PyObject *obj, const char *fn, const char *arg, double *out)
{
    if (PyBool_Check(obj) || PyArray_IsScalar(obj, Bool) ||
        !(PyFloat_Check(obj) || PyLong_Check(obj) || PyArray_IsScalar(obj, Floating) ||
          PyArray_IsScalar(obj, Integer))) {
        PyErr_Format(PyExc_TypeError, "%s: %s must be a real number, got %s", fn, arg, Py_TYPE(obj)->tp_name);
        return 0;
    }
    *out = PyFloat_AsDouble(obj);
    if (*out == -1.0 && PyErr_Occurred()) { /* an int too large for a double */
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s: %s must be a finite number, got %R", fn, arg, obj);
        return 0;
    }
    return 1;
}

/* Thread counts: <= 0 means OpenMP's default; a huge team makes libgomp abort the process. */
#define MAX_THREADS 1024
static int parse_nthreads(PyObject *obj, const char *fn, int *out)
{
    *out = 0;
    if (obj == NULL) return 1;
    if (PyBool_Check(obj) || !PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s: nthreads must be an int, got %s", fn, Py_TYPE(obj)->tp_name);
        return 0;
    }
    int overflow = 0;
    long long n = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (overflow > 0 || n > MAX_THREADS) {
        PyErr_Format(PyExc_ValueError, "%s: nthreads must be <= %d (or <= 0 for OpenMP's default), got %R", fn,
                     MAX_THREADS, obj);
        return 0;
    }
    *out = (overflow < 0 || n < 0) ? 0 : (int)n;
    return 1;
}

/* The bytes [lo, hi) that array a spans (its strides may be negative). */
static void byte_bounds(PyArrayObject *a, uintptr_t *lo, uintptr_t *hi)
{
    uintptr_t p = (uintptr_t)PyArray_DATA(a), l = p, h = p;
    for (int d = 0; d < PyArray_NDIM(a); d++) {
        const npy_intp extent = (PyArray_DIM(a, d) - 1) * PyArray_STRIDE(a, d);
        if (PyArray_DIM(a, d) == 0) { *lo = *hi = p; return; }
        if (extent < 0) l -= (uintptr_t)(-extent); else h += (uintptr_t)extent;
    }
    *lo = l;
    *hi = h + (uintptr_t)PyArray_ITEMSIZE(a);
}

/* 0 with a ValueError naming both when `written` and `other` may share memory (the kernels would refuse too). */
static int check_disjoint(PyArrayObject *written, PyArrayObject *other, const char *fn, const char *wname,
                          const char *oname)
{
    uintptr_t w0, w1, o0, o1;
    byte_bounds(written, &w0, &w1);
    byte_bounds(other, &o0, &o1);
    if (w0 < w1 && o0 < o1 && w0 < o1 && o0 < w1) {
        PyErr_Format(PyExc_ValueError, "%s: %s overlaps %s in memory (%s is written in place while %s is read); "
                     "pass arrays that do not share memory", fn, wname, oname, wname, oname);
        return 0;
    }
    return 1;
}

static PyObject *raise_status(relora_status status, const char *fn)
{
    if (status == RELORA_ERR_NOMEM) return PyErr_NoMemory();
    PyErr_Format(PyExc_ValueError, "%s: %s", fn, relora_status_string(status));
    return NULL;
}

/* ---- merge_(W, A, B, scale, rounding="nearest", seed=None, nthreads=0) ---- */

static PyObject *py_merge(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"W", "A", "B", "scale", "rounding", "seed", "nthreads", NULL};
    PyObject *w_obj, *a_obj, *b_obj, *scale_obj, *seed_obj = NULL, *nthreads_obj = NULL;
    double scale;
    const char *rounding = "nearest";
    int nthreads = 0;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOO|$sOO", kwlist, &w_obj, &a_obj, &b_obj,
                                     &scale_obj, &rounding, &seed_obj, &nthreads_obj) ||
        !parse_real(scale_obj, "merge_", "scale", &scale) || !parse_nthreads(nthreads_obj, "merge_", &nthreads))
        return NULL;
    PyArrayObject *W = as_array(w_obj, "merge_", "W"), *A, *B;
    if (!W || !(A = as_array(a_obj, "merge_", "A")) || !(B = as_array(b_obj, "merge_", "B")))
        return NULL;
    relora_dtype wdt, adt, bdt;
    if (!array_dtype(W, "merge_", "W", &wdt) || !array_dtype(A, "merge_", "A", &adt) ||
        !array_dtype(B, "merge_", "B", &bdt) || !check_writeable(W, "merge_", "W") ||
        !check_contiguous(A, "merge_", "A") || !check_contiguous(B, "merge_", "B"))
        return NULL;
    if (adt != bdt) {
        PyErr_SetString(PyExc_TypeError, "merge_: A and B must share a dtype");
        return NULL;
    }
    if (PyArray_NDIM(W) != 2 || PyArray_NDIM(A) != 2 || PyArray_NDIM(B) != 2) {
        PyErr_Format(PyExc_ValueError, "merge_: W, A and B must be 2-D, got %d-D, %d-D and %d-D",
                     PyArray_NDIM(W), PyArray_NDIM(A), PyArray_NDIM(B));
        return NULL;
    }
    const npy_intp O = PyArray_DIM(W, 0), I = PyArray_DIM(W, 1), R = PyArray_DIM(A, 0);
    if (PyArray_DIM(B, 0) != O || PyArray_DIM(B, 1) != R || PyArray_DIM(A, 1) != I || R < 1) {
        PyErr_Format(PyExc_ValueError,
                     "merge_: expected W (out, in), B (out, r), A (r, in) with r >= 1, got W (%zd, %zd),"
                     " B (%zd, %zd), A (%zd, %zd)", (Py_ssize_t)O, (Py_ssize_t)I,
                     (Py_ssize_t)PyArray_DIM(B, 0), (Py_ssize_t)PyArray_DIM(B, 1), (Py_ssize_t)R,
                     (Py_ssize_t)PyArray_DIM(A, 1));
        return NULL;
    }
    const npy_intp esize = PyArray_ITEMSIZE(W);
    const npy_intp s0 = PyArray_STRIDE(W, 0), s1 = PyArray_STRIDE(W, 1);
    if (O > 0 && I > 0 && ((I > 1 && s1 != esize) || (O > 1 && (s0 % esize != 0 || s0 / esize < I)))) {
        PyErr_SetString(PyExc_ValueError,
                        "merge_: W must have unit column stride and non-overlapping rows");
        return NULL;
    }
    const int64_t ldw = O > 1 ? (int64_t)(s0 / esize) : (int64_t)I;
    relora_rounding mode;
    if (strcmp(rounding, "nearest") == 0) mode = RELORA_ROUND_NEAREST;
    else if (strcmp(rounding, "stochastic") == 0) mode = RELORA_ROUND_STOCHASTIC;
    else {
        PyErr_Format(PyExc_ValueError, "merge_: rounding must be 'nearest' or 'stochastic', got '%s'",
                     rounding);
        return NULL;
    }
    uint64_t seed = 0;
    if (seed_obj && seed_obj != Py_None && !parse_u64(seed_obj, "merge_", "seed", &seed)) return NULL;
    if (mode == RELORA_ROUND_STOCHASTIC && (seed_obj == NULL || seed_obj == Py_None)) {
        /* no generator here to draw one from: a fixed default would round every call the same way */
        PyErr_SetString(PyExc_ValueError, "merge_: rounding='stochastic' needs a seed (a new one per call), got None");
        return NULL;
    }
    if (!check_real(scale, -FLT_MAX, FLT_MAX, "merge_", "scale") || !check_disjoint(W, A, "merge_", "W", "A") ||
        !check_disjoint(W, B, "merge_", "W", "B"))
        return NULL;
    relora_status status;
    Py_BEGIN_ALLOW_THREADS
    status = lora_merge(PyArray_DATA(W), wdt, ldw, PyArray_DATA(B), PyArray_DATA(A), adt,
                        O, I, R, (float)scale, mode, seed, nthreads);
    Py_END_ALLOW_THREADS
    if (status != RELORA_OK) return raise_status(status, "merge_");
    Py_RETURN_NONE;
}

/* ---- reset_(A, B, std, seed, offset=0, nthreads=0) ---- */

static PyObject *py_reset(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"A", "B", "std", "seed", "offset", "nthreads", NULL};
    PyObject *a_obj, *b_obj, *std_obj, *seed_obj, *offset_obj = NULL, *nthreads_obj = NULL;
    double std;
    int nthreads = 0;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOO|OO", kwlist, &a_obj, &b_obj, &std_obj,
                                     &seed_obj, &offset_obj, &nthreads_obj) ||
        !parse_real(std_obj, "reset_", "std", &std) || !parse_nthreads(nthreads_obj, "reset_", &nthreads))
        return NULL;
    PyArrayObject *A = as_array(a_obj, "reset_", "A"), *B;
    if (!A || !(B = as_array(b_obj, "reset_", "B"))) return NULL;
    relora_dtype adt, bdt;
    if (!array_dtype(A, "reset_", "A", &adt) || !array_dtype(B, "reset_", "B", &bdt) ||
        !check_contiguous(A, "reset_", "A") || !check_contiguous(B, "reset_", "B") ||
        !check_writeable(A, "reset_", "A") || !check_writeable(B, "reset_", "B"))
        return NULL;
    if (adt != bdt) {
        PyErr_SetString(PyExc_TypeError, "reset_: A and B must share a dtype");
        return NULL;
    }
    uint64_t seed, offset = 0;
    if (!parse_u64(seed_obj, "reset_", "seed", &seed) ||
        (offset_obj && !parse_u64(offset_obj, "reset_", "offset", &offset)) ||
        !check_real(std, 0.0, reset_std_max(adt), "reset_", "std") || !check_disjoint(B, A, "reset_", "B", "A"))
        return NULL;
    relora_status status;
    Py_BEGIN_ALLOW_THREADS
    status = lora_reset(PyArray_DATA(A), PyArray_SIZE(A), PyArray_DATA(B), PyArray_SIZE(B), adt,
                        (float)std, seed, offset, nthreads);
    Py_END_ALLOW_THREADS
    if (status != RELORA_OK) return raise_status(status, "reset_");
    Py_RETURN_NONE;
}

/* ---- prune_(x, ratio, mode="magnitude", seed=None, offset=0, nthreads=0) -> kept ---- */

static PyObject *py_prune(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"x", "ratio", "mode", "seed", "offset", "nthreads", NULL};
    PyObject *x_obj, *ratio_obj, *seed_obj = NULL, *offset_obj = NULL, *nthreads_obj = NULL;
    double ratio;
    const char *mode = "magnitude";
    int nthreads = 0;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|$sOOO", kwlist, &x_obj, &ratio_obj, &mode,
                                     &seed_obj, &offset_obj, &nthreads_obj) ||
        !parse_real(ratio_obj, "prune_", "ratio", &ratio) || !parse_nthreads(nthreads_obj, "prune_", &nthreads))
        return NULL;
    PyArrayObject *x = as_array(x_obj, "prune_", "x");
    relora_dtype dt;
    if (!x || !array_dtype(x, "prune_", "x", &dt) || !check_contiguous(x, "prune_", "x") ||
        !check_writeable(x, "prune_", "x"))
        return NULL;
    uint64_t seed = 0, offset = 0;
    if ((seed_obj && seed_obj != Py_None && !parse_u64(seed_obj, "prune_", "seed", &seed)) ||
        (offset_obj && !parse_u64(offset_obj, "prune_", "offset", &offset)) ||
        !check_real(ratio, 0.0, 1.0, "prune_", "ratio"))
        return NULL;
    int64_t kept = 0;
    relora_status status;
    if (strcmp(mode, "magnitude") == 0) {
        Py_BEGIN_ALLOW_THREADS
        status = prune_magnitude(PyArray_DATA(x), dt, PyArray_SIZE(x), ratio, &kept, nthreads);
        Py_END_ALLOW_THREADS
    } else if (strcmp(mode, "random") == 0) {
        if (seed_obj == NULL || seed_obj == Py_None) {
            PyErr_SetString(PyExc_ValueError, "prune_: mode='random' needs a seed, got None");
            return NULL;
        }
        Py_BEGIN_ALLOW_THREADS
        status = prune_random(PyArray_DATA(x), dt, PyArray_SIZE(x), ratio, seed, offset, &kept,
                              nthreads);
        Py_END_ALLOW_THREADS
    } else {
        PyErr_Format(PyExc_ValueError, "prune_: mode must be 'magnitude' or 'random', got '%s'", mode);
        return NULL;
    }
    if (status != RELORA_OK) return raise_status(status, "prune_");
    return PyLong_FromLongLong((long long)kept);
}

/* ---- the instruction-set level (kernels/cpu.h) ---- */

static PyObject *py_cpu_capability(PyObject *self, PyObject *args)
{
    (void)self; (void)args;
    return PyUnicode_FromString(relora_cpu_level_name(relora_cpu_level()));
}

static PyObject *py_cpu_capabilities(PyObject *self, PyObject *args)
{
    (void)self; (void)args;
    const int best = relora_cpu_best_level();
    PyObject *out = PyTuple_New(best + 1);
    if (out == NULL) return NULL;
    for (int l = 0; l <= best; l++) {
        PyObject *name = PyUnicode_FromString(relora_cpu_level_name(l));
        if (name == NULL) { Py_DECREF(out); return NULL; }
        PyTuple_SET_ITEM(out, l, name);
    }
    return out;
}

static PyObject *py_set_cpu_capability(PyObject *self, PyObject *arg)
{
    (void)self;
    if (!PyUnicode_Check(arg))
        return PyErr_Format(PyExc_TypeError, "_set_cpu_capability: level must be a str, got %s",
                            Py_TYPE(arg)->tp_name);
    const char *name = PyUnicode_AsUTF8(arg);
    if (name == NULL) return NULL;
    const int level = relora_cpu_level_from_name(name);
    if (level < 0)
        return PyErr_Format(PyExc_ValueError,
                            "_set_cpu_capability: level must be one of default, avx2, avx512, avx512_bf16 "
                            "(those built for this architecture), got '%s'", name);
    if (relora_cpu_set_level(level) != RELORA_OK)
        return PyErr_Format(PyExc_ValueError,
                            "_set_cpu_capability: this CPU does not support '%s' (its best level is '%s')",
                            name, relora_cpu_level_name(relora_cpu_best_level()));
    Py_RETURN_NONE;
}

/* ---- the module ---- */

static PyMethodDef numpy_methods[] = {
    {"merge_", (PyCFunction)(void (*)(void))py_merge, METH_VARARGS | METH_KEYWORDS,
     "merge_(W, A, B, scale, *, rounding='nearest', seed=None, nthreads=0)\n--\n\n"
     "W (out, in) += scale * B (out, r) @ A (r, in), in place, one rounding per element."},
    {"reset_", (PyCFunction)(void (*)(void))py_reset, METH_VARARGS | METH_KEYWORDS,
     "reset_(A, B, std, seed, offset=0, nthreads=0)\n--\n\n"
     "B <- 0 and A <- std * N(0, 1) from the Philox stream (seed, offset), in place."},
    {"prune_", (PyCFunction)(void (*)(void))py_prune, METH_VARARGS | METH_KEYWORDS,
     "prune_(x, ratio, *, mode='magnitude', seed=None, offset=0, nthreads=0)\n--\n\n"
     "Zero all but n - floor(ratio * n) largest-|x| entries (or a random 1 - ratio share); "
     "returns the number kept."},
    {"cpu_capability", py_cpu_capability, METH_NOARGS,
     "cpu_capability()\n--\n\n"
     "The instruction-set level this module's kernels run: 'default', 'avx2', 'avx512' or 'avx512_bf16' "
     "(the CPU's best, unless RELORA_CPU_CAPABILITY names a lower one)."},
    {"_cpu_capabilities", py_cpu_capabilities, METH_NOARGS,
     "_cpu_capabilities()\n--\n\nThe levels this build and this CPU can run, lowest first."},
    {"_set_cpu_capability", py_set_cpu_capability, METH_O,
     "_set_cpu_capability(level)\n--\n\n"
     "Run this module's kernels at the named level (tests, benchmarks); ValueError if the CPU lacks it."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef numpy_module = {
    PyModuleDef_HEAD_INIT, "numpy_ops",
    "The relora C kernels on NumPy arrays (float32, float16). nthreads <= 0 uses OpenMP's default.",
    -1, numpy_methods,
};

PyMODINIT_FUNC PyInit_numpy_ops(void)
{
    import_array();
    (void)relora_cpu_level(); /* pick the level now (RELORA_CPU_CAPABILITY), as relora_ext does for _C */
    return PyModule_Create(&numpy_module);
}
