"""Compiles the C++ CPU kernels when the package is installed (pip install [-e] ., python -m build).

SEDAC_CPU_ARCH picks the instruction set:
  native   (default; `make install`): -march=native, everything this CPU has (AVX2, AVX-512, F16C ...)
  portable (`make wheel`): a wheel that moves between x86-64 machines, one library per level in
           PORTABLE_LEVELS; sedac.models.cpu_kernels loads the best one the CPU supports.
The library registers torch.ops.sedac_cpu and is loaded with torch.ops.load_library: no compiler,
no build directory and no lock at run time.
"""

import os
from pathlib import Path

import torch
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

CSRC = Path("sedac/models/csrc")
# level name -> -march; the loader (sedac/models/cpu_kernels.py) ranks them by the same names
PORTABLE_LEVELS = {"avx512": "x86-64-v4", "avx2": "x86-64-v3"}


def kernels(target: str, march: str) -> CppExtension:
    # -ffp-contract=off: no fused multiply-adds the source does not ask for, so elementwise results round
    # exactly as torch's do.
    flags = [
        "-O3",
        "-g0",
        f"-march={march}",
        "-fopenmp",
        "-ffp-contract=off",
        f'-DSEDAC_TARGET="{target}"',
        f'-DSEDAC_TORCH_VERSION="{torch.__version__}"',
    ]
    return CppExtension(
        f"sedac.models._cpu_kernels_{target}",
        sorted(str(s) for s in CSRC.glob("*.cpp")),
        extra_compile_args=flags,
        extra_link_args=["-fopenmp"],
    )


def extensions() -> list[CppExtension]:
    arch = os.environ.get("SEDAC_CPU_ARCH", "native")
    if arch == "native":
        return [kernels("native", "native")]
    if arch == "portable":
        return [kernels(level, march) for level, march in PORTABLE_LEVELS.items()]
    raise SystemExit(f"SEDAC_CPU_ARCH must be native or portable, got {arch!r}")


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExtension})
