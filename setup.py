"""Build relora_ext: a static C library of kernels, the torch operator module `_C`, and the
NumPy module `_numpy`, both linked against the same kernels.

Build with `pip install --no-build-isolation -e .` after torch, numpy, setuptools, wheel and ninja
are installed (see the README): a build-isolated install would download a CUDA torch.
Set RELORA_PORTABLE=1 to build without -march=native (a binary to run on other CPUs).
"""
import glob
import os

import numpy
from setuptools import Extension, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

native = [] if os.environ.get("RELORA_PORTABLE") == "1" else ["-march=native"]
openmp = ["-fopenmp"]

# The kernels are C11, compiled as C by setuptools' build_clib, then linked into both modules.
kernels = (
    "relora_kernels",
    {
        "sources": sorted(glob.glob("csrc/kernels/*.c")),
        "include_dirs": ["csrc/kernels"],
        "cflags": ["-O3", "-std=c11", "-fPIC", *native, *openmp],
    },
)


class build_ext(BuildExtension):
    """torch's BuildExtension compiles every source with the C++ compiler; build the plain C
    extension (`_numpy`) with setuptools' own compile step so that it is compiled as C."""

    def build_extension(self, ext):
        if ext.name != "relora_ext._numpy":
            return super().build_extension(ext)
        patched = {k: self.compiler.__dict__.pop(k) for k in ("compile", "_compile")
                   if k in self.compiler.__dict__}
        try:
            return super().build_extension(ext)
        finally:
            self.compiler.__dict__.update(patched)


setup(
    libraries=[kernels],
    ext_modules=[
        CppExtension(
            "relora_ext._C",
            sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/ops/**/*.cpp", recursive=True)),
            include_dirs=[os.path.abspath("csrc")],
            extra_compile_args={"cxx": ["-O3", *openmp]},
            extra_link_args=openmp,
        ),
        Extension(
            "relora_ext._numpy",
            ["csrc/numpy_module.c"],
            include_dirs=["csrc", numpy.get_include()],
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_20_API_VERSION")],
            extra_compile_args=["-O3", "-std=c11", *openmp],
            extra_link_args=openmp,
        ),
    ],
    cmdclass={"build_ext": build_ext},
)
