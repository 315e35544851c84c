"""`sedac-run triton serve`: launch a real tritonserver on a model repository.

Uses a tritonserver on PATH, else the one bundled in the nvidia-pytriton wheel. The Python backend's
stub is matched to this interpreter's version and runs with this environment's packages (sedac,
torch, numpy<2) on its path, so the exported model imports the same code as the CLI.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path


def _bundled_dist() -> Path:
    try:
        import pytriton
    except ImportError:
        raise ValueError(
            "no tritonserver on PATH and nvidia-pytriton is not installed (pip install nvidia-pytriton)"
        ) from None
    return Path(pytriton.__file__).parent / "tritonserver"


def prepare_server(workspace: Path) -> tuple[list[str], dict]:
    """Return the tritonserver command prefix and environment."""
    env = dict(os.environ)
    site = sysconfig.get_paths()["purelib"]
    source_root = str(Path(__file__).resolve().parents[2])  # where the sedac package lives
    env["SEDAC_PYTHONPATH"] = os.pathsep.join(p for p in (source_root, site) if p)  # read by model.py
    on_path = shutil.which("tritonserver")
    if on_path:
        return [on_path], env
    dist = _bundled_dist()
    backend = workspace / "backends" / "python"
    backend.mkdir(parents=True, exist_ok=True)
    for item in (dist / "backends" / "python").iterdir():
        target = backend / item.name
        if not target.exists():
            target.symlink_to(item)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ValueError(f"nvidia-pytriton has no Python backend stub for Python {version}")
    shutil.copy(stub, backend / "triton_python_backend_stub")
    libs = [str(dist.parent.parent / "nvidia_pytriton.libs"), sysconfig.get_config_var("LIBDIR") or ""]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libs + [env.get("LD_LIBRARY_PATH", "")] if p)
    env["PYTHONHOME"] = sys.base_prefix  # the stub embeds this interpreter's libpython
    return [str(dist / "bin" / "tritonserver"), f"--backend-directory={workspace / 'backends'}"], env


def triton_command(
    repo: str | Path, http_port: int, grpc_port: int, metrics_port: int, workspace: Path
) -> tuple[list[str], dict]:
    repo = Path(repo)
    if not repo.is_dir() or not any(repo.glob("*/config.pbtxt")):
        raise ValueError(f"not a Triton model repository (no */config.pbtxt): {repo}")
    prefix, env = prepare_server(workspace)
    return prefix + [
        f"--model-repository={repo.resolve()}",
        f"--http-port={http_port}",
        f"--grpc-port={grpc_port}",
        f"--metrics-port={metrics_port}",
        "--http-address=127.0.0.1",
        "--grpc-address=127.0.0.1",
        "--exit-timeout-secs=10",
        "--log-verbose=0",
    ], env


def run_tritonserver(repo: str, http_port: int, grpc_port: int, metrics_port: int) -> int:
    """Run tritonserver in the foreground; Ctrl-C / SIGTERM are passed on so it shuts down cleanly."""
    with tempfile.TemporaryDirectory(prefix="sedac-triton-") as tmp:
        command, env = triton_command(repo, http_port, grpc_port, metrics_port, Path(tmp))
        proc = subprocess.Popen(command, env=env)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda received, _: proc.send_signal(received))
        return proc.wait()
