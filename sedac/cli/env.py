"""`sedac-run env` and `--version`: what this installation runs on, for bug reports and for checking that
the C++ kernels were built for this machine."""

from __future__ import annotations

import importlib.metadata
import platform
from pathlib import Path

# CPU features the kernels and torch's own CPU paths care about
CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_bf16")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


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


def environment() -> dict[str, str]:
    import torch

    from sedac import __version__
    from sedac.models import cpu_kernels

    model, flags = cpu_description()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "sedac": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": f"{model} ({torch.get_num_threads()} threads, torch capability "
        f"{torch.backends.cpu.get_cpu_capability()}; {' '.join(flags) or 'no AVX2'})",
        "cpu kernels": cpu_kernels.status().line().split(": ", 1)[1],
        "triton": _version("triton"),
        "gpu": gpu if gpu == "none" else f"{gpu} (CUDA {torch.version.cuda})",
    }
