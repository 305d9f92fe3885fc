"""Build relora_ext: a static C library of kernels, the torch operator module `_C`, the NumPy module
`numpy_ops`, both linked against the same kernels, and `_C_testing`, the test-only module (the
`torch.ops.relora_testing` operators and the level / merge-path setters; tests and benchmarks import it).

Build with `pip install --no-build-isolation -e .` after torch, numpy, setuptools, wheel and ninja
are installed (see the README): a build-isolated install would download a CUDA torch.

The kernels that do arithmetic are compiled once per instruction-set level (the sources, levels and
flags of csrc/kernels/levels.txt; x86-64: default, avx2, avx512, avx512_bf16; other architectures:
default), each with -DRELORA_LEVEL=<level> (csrc/kernels/level.h renames their symbols); csrc/kernels/cpu.c,
compiled for the baseline, picks the level at run time (csrc/kernels/cpu.h). Nothing is built with
-march=native, so a binary runs on any CPU of its architecture.
"""
import glob
import os
import platform

import numpy
from setuptools import Extension, setup
from setuptools.command.build_clib import build_clib as _build_clib
from torch.utils.cpp_extension import BuildExtension, CppExtension

openmp = ["-fopenmp"]



def read_levels(path="csrc/kernels/levels.txt"):
    """(the sources compiled once per level, {level: flags}) for this machine's architecture."""
    arch = {"amd64": "x86_64"}.get(platform.machine().lower(), platform.machine().lower())
    leveled, levels = set(), {}
    with open(path) as f:
        for line in f:
            words = line.split("#", 1)[0].split()
            if words[:1] == ["level"] and len(words) < 3:
                raise SystemExit(f"{path}: a level line needs a name and an architecture, got {line.strip()!r}")
            if words[:1] == ["sources"]:
                leveled = set(words[1:])
            elif words[:1] == ["level"] and words[2] in ("any", arch):
                levels[words[1]] = words[3:]
    return leveled, levels


LEVELED, LEVELS = read_levels()
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
    extension (`numpy_ops`) with setuptools' own compile step so that it is compiled as C."""

    def build_extension(self, ext):
        if ext.name != "relora_ext.numpy_ops":
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
            ["csrc/relora.cpp", *sorted(glob.glob("csrc/ops/**/*.cpp", recursive=True))],
            include_dirs=[os.path.abspath("csrc")],
            extra_compile_args={"cxx": ["-O3", *openmp]},
            extra_link_args=openmp,
        ),
        # test-only: its own copy of the portable implementations, under torch.ops.relora_testing
        CppExtension(
            "relora_ext._C_testing",
            ["csrc/testing/module.cpp", "csrc/testing/ops.cpp", "csrc/ops/portable/cycle_kernels.cpp"],
            include_dirs=[os.path.abspath("csrc")],
            define_macros=[("RELORA_TESTING_MODULE", "1")],
            extra_compile_args={"cxx": ["-O3", *openmp]},
            extra_link_args=openmp,
        ),
        Extension(
            "relora_ext.numpy_ops",
            ["csrc/numpy_module.c"],
            include_dirs=["csrc", numpy.get_include()],
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_20_API_VERSION")],
            extra_compile_args=["-O3", "-std=c11", *openmp],
            extra_link_args=openmp,
        ),
    ],
    cmdclass={"build_ext": build_ext, "build_clib": build_clib},
)
