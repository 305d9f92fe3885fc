"""Build relora_ext: a static C library of kernels, the torch operator module `_C`, and the
NumPy module `_numpy`, both linked against the same kernels.

Build with `pip install --no-build-isolation -e .` after torch, numpy, setuptools, wheel and ninja
are installed (see the README): a build-isolated install would download a CUDA torch.

The kernels that do arithmetic (csrc/kernels/LEVELED) are compiled once per instruction-set level
(x86-64: default, avx2, avx512, avx512_bf16; other architectures: default), each with its own -m flags
and -DRELORA_LEVEL=<level> (csrc/kernels/level.h renames their symbols); csrc/kernels/cpu.c, compiled
for the baseline, picks the level at run time (csrc/kernels/cpu.h). Nothing is built with -march=native,
so a binary runs on any CPU of its architecture.
"""
import glob
import os
import platform

import numpy
from setuptools import Extension, setup
from setuptools.command.build_clib import build_clib as _build_clib
from torch.utils.cpp_extension import BuildExtension, CppExtension

openmp = ["-fopenmp"]

# Sources compiled once per level; every other csrc/kernels/*.c is compiled once.
LEVELED = {"merge.c", "prune.c", "reset.c", "philox.c", "table.c"}
X86_LEVELS = {
    "default": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"],
    "avx512_bf16": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
                    "-mavx512bf16"],
}
LEVELS = X86_LEVELS if platform.machine().lower() in ("x86_64", "amd64") else {"default": []}

sources = sorted(glob.glob("csrc/kernels/*.c"))
kernels = (
    "relora_kernels",
    {
        "sources": sources,
        "include_dirs": ["csrc/kernels"],
        "cflags": ["-O3", "-std=c11", "-fPIC", "-Wno-psabi", *openmp],
    },
)


class build_clib(_build_clib):
    """setuptools' build_clib compiles a library with one flag set; compile the leveled sources once
    per level (each into its own directory) and the rest once, into one static library."""

    def build_libraries(self, libraries):
        for name, info in libraries:
            cflags = info.get("cflags", [])
            leveled = [s for s in info["sources"] if os.path.basename(s) in LEVELED]
            once = [s for s in info["sources"] if os.path.basename(s) not in LEVELED]
            objects = self.compiler.compile(once, output_dir=self.build_temp, include_dirs=info["include_dirs"],
                                            extra_postargs=cflags, debug=self.debug)
            for level, flags in LEVELS.items():
                objects += self.compiler.compile(
                    leveled, output_dir=os.path.join(self.build_temp, "level_" + level),
                    macros=[("RELORA_LEVEL", level)], include_dirs=info["include_dirs"],
                    extra_postargs=cflags + flags, debug=self.debug)
            self.compiler.create_static_lib(objects, name, output_dir=self.build_clib, debug=self.debug)


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
    cmdclass={"build_ext": build_ext, "build_clib": build_clib},
)
