"""C++ CPU kernels: compiled when the package is installed (setup.py), loaded here as a library.

Loading needs no compiler, no build directory and no lock file, so an interrupted start can never leave
anything behind that a later start waits on. A source install (`make install`) builds one library for
this CPU (-march=native); a portable wheel ships one per instruction-set level and the best one the CPU
supports is loaded. Without a library (a source tree never installed, a torch it was not built for) CPU
runs take the PyTorch path, with one warning that says how to build them.
SEDAC_CPU_KERNELS=0 turns them off (A/B measurements, debugging).
"""

from __future__ import annotations

import functools
import os
import platform
import warnings
from dataclasses import dataclass
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import torch

# Preference order: a build for this very CPU, then the portable levels best first (setup.py's names),
# each with the torch CPU capabilities that can run it.
LEVELS = {"native": None, "avx512": {"AVX512"}, "avx2": {"AVX2", "AVX512"}}
REBUILD = "reinstall the package to build them (make install, or pip install --no-build-isolation -e .)"


@dataclass(frozen=True)
class KernelStatus:
    loaded: bool
    detail: str  # the library's build info and path, or why the kernels are off

    def line(self) -> str:
        return f"SEDAC C++ CPU kernels: {'loaded, ' if self.loaded else 'off: '}{self.detail}"


def library_path() -> Path | None:
    """The installed library this CPU should run, if any."""
    here = Path(__file__).parent
    capability = torch.backends.cpu.get_cpu_capability()
    for level, runs_on in LEVELS.items():
        if runs_on is not None and capability not in runs_on:
            continue
        for suffix in EXTENSION_SUFFIXES:
            if (path := here / f"_cpu_kernels_{level}{suffix}").is_file():
                return path
    return None


@functools.cache
def status() -> KernelStatus:
    """Load the library once per process (registers torch.ops.sedac_cpu)."""
    if os.environ.get("SEDAC_CPU_KERNELS", "1") == "0":
        return KernelStatus(False, "disabled by SEDAC_CPU_KERNELS=0")
    path = library_path()
    if path is None:
        return _off(f"not built for this CPU; {REBUILD}")
    try:
        torch.ops.load_library(str(path))
    except OSError as e:  # built against another torch (undefined symbols), a foreign architecture
        return _off(f"{path.name} does not load ({str(e).splitlines()[0]}); {REBUILD}")
    info = torch.ops.sedac_cpu.build_info()
    built_for = info.rsplit("torch=", 1)[1]
    if built_for != torch.__version__:
        return _off(f"{path.name} was built for torch {built_for}, this is {torch.__version__}; {REBUILD}")
    return KernelStatus(True, f"{info} ({path})")


def _off(why: str) -> KernelStatus:
    warnings.warn(f"SEDAC C++ CPU kernels unavailable, CPU runs take the slower PyTorch path: {why}", stacklevel=3)
    return KernelStatus(False, why)


def available() -> bool:
    return status().loaded


def integer_dot_products() -> bool:
    """Whether the loaded library has block_linear_a8's VNNI path (int4 engines use it; elsewhere its
    scalar reference would be slow, so they take the exact block kernel)."""
    return available() and "VNNI" in status().detail


def causal_prefill() -> bool:
    """Whether the loaded library has the causal prefill attention kernel (AVX-512 builds); elsewhere
    prompts take torch's SDPA."""
    return available() and "isa=AVX-512" in status().detail


def usable(x: torch.Tensor) -> bool:
    """The kernels take float32 CPU tensors and have no backward: training (exit heads) and other
    devices or dtypes run the PyTorch path."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled() and available()


# CPU features the kernels and torch's own CPU paths care about
CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_bf16")


def cpu_description() -> tuple[str, list[str]]:
    """(model name, the CPU_FLAGS this CPU has), from /proc/cpuinfo where there is one."""
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags = set(value.split())
                break
    return model, [f for f in CPU_FLAGS if f in flags]
