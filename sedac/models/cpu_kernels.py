"""C++ CPU kernels, compiled on first use with torch.utils.cpp_extension and cached by torch.

Compiled on the machine that runs them (-march=native: AVX2/AVX-512 wherever the CPU has it); a
machine without a C++ toolchain falls back to the portable PyTorch path with one warning.
make install compiles them ahead of time (cpu_kernels.available()).
SEDAC_CPU_KERNELS=0 turns them off (A/B measurements, debugging).
"""
from __future__ import annotations

import functools
import hashlib
import os
import warnings
from pathlib import Path

import torch

SOURCES = [Path(__file__).parent / "csrc" / name
           for name in ("paged_attention.cpp", "fused_ops.cpp", "panel_linear.cpp", "decode_layer.cpp")]


def _build_name() -> str:
    """One build per installed copy: torch rewrites build.ninja with the copy's source paths, so two
    checkouts sharing one build directory would recompile each other's build on every load."""
    return "sedac_cpu_kernels_" + hashlib.sha1(str(Path(__file__).resolve().parent).encode()).hexdigest()[:10]


@functools.cache
def available() -> bool:
    """Compile (or load the cached build of) the kernels once per process; False if that fails."""
    if os.environ.get("SEDAC_CPU_KERNELS", "1") == "0":
        return False
    from torch.utils.cpp_extension import load
    try:
        # -ffp-contract=off: no fused multiply-adds, so elementwise results round exactly as torch's do.
        load(name=_build_name(), sources=[str(s) for s in SOURCES], is_python_module=False, verbose=False,
             extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"])
    except Exception as e:   # no compiler, no ninja, unsupported platform
        warnings.warn(f"SEDAC CPU kernels unavailable, using the PyTorch path: {str(e).splitlines()[0]}")
        return False
    return True


def usable(x: torch.Tensor) -> bool:
    """The kernels take float32 CPU tensors and have no backward: training (exit heads) and other
    devices or dtypes run the PyTorch path."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled() and available()

