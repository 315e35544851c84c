"""`sedac-run env` and `--version`: what this installation runs on, for bug reports and for checking that
the C++ kernels were built for this machine."""

from __future__ import annotations

import importlib.metadata
import platform

from sedac.models.cpu_kernels import cpu_description


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


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
