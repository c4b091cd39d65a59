"""Build of the native CPU kernels (csrc/) as two pybind11 modules, and the package layout.

``fastmerge._C`` is built for the x86-64 baseline and loads everywhere; on x86-64 a second
build, ``fastmerge._C_avx2`` (AVX2 + F16C), is preferred at import when the CPU has those
features. Neither links against libtorch. ``-ffp-contract=off`` keeps every multiply and add
separately rounded, as the torch reference and the GPU kernels do.
"""
import copy
import os
import platform

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

# one file per pass, named as in triton_kernels/ (csrc/kernels.h lists them); then the kernels of
# mergekit's other methods (fastmerge/methods/)
SOURCES = ["csrc/magnitude_select.cpp", "csrc/select_merge.cpp", "csrc/mask_norms.cpp", "csrc/della.cpp", "csrc/fused_merge.cpp",
           "csrc/quant.cpp", "csrc/bindings.cpp", "csrc/gram.cpp", "csrc/lincomb.cpp",
           "csrc/nearswap.cpp", "csrc/ram.cpp", "csrc/passthrough.cpp", "csrc/sce.cpp",
           "csrc/arcee_fusion.cpp", "csrc/consensus.cpp", "csrc/emr.cpp", "csrc/fisher.cpp",
           "csrc/pcb.cpp"]
COMMON = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-std=c++17"]


def ext(name, isa, extra):
    return Pybind11Extension(
        f"fastmerge.{name}",
        SOURCES,
        include_dirs=["csrc"],
        define_macros=[("FM_MODULE", name), ("FM_ISA", f'"{isa}"')],
        extra_compile_args=COMMON + extra,
        extra_link_args=["-fopenmp"],
        cxx_std=17,
    )


class BuildExt(build_ext):
    """One object folder per extension: both modules compile the same sources with different
    flags, and a shared ``build/temp`` lets one build reuse (or, under ``-j``, race with) the
    other's objects, which once put AVX2 code into the baseline module."""

    def build_extension(self, ext):
        mine = copy.copy(self)  # not self: under -j the extensions build concurrently
        mine.build_temp = os.path.join(self.build_temp, ext.name.rpartition(".")[2])
        build_ext.build_extension(mine, ext)


ext_modules = []
if os.environ.get("FASTMERGE_NO_NATIVE") != "1":
    ext_modules.append(ext("_C", "baseline", []))
    if platform.machine() in ("x86_64", "AMD64"):
        ext_modules.append(ext("_C_avx2", "avx2+f16c", ["-mavx2", "-mf16c", "-mfma"]))

setup(
    # fastmerge._csrc: the CUDA sources, shipped as data and compiled on first use on a machine
    # with a GPU and a CUDA toolkit (fastmerge/cuda.py), never at install time
    packages=["fastmerge", "fastmerge.backends", "fastmerge.methods", "fastmerge.integrations",
              "fastmerge.triton_kernels", "fastmerge.bench", "fastmerge._csrc"],
    package_dir={"fastmerge": "fastmerge", "fastmerge.triton_kernels": "triton_kernels",
                 "fastmerge.bench": "bench", "fastmerge._csrc": "csrc"},
    package_data={"fastmerge._csrc": ["cuda_kernels.cu", "cuda_kernels.h", "abi.h", "philox_mask.h",
                                     "cuda_bindings.cpp"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExt},
    zip_safe=False,
)
