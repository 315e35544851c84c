"""The C++ CPU kernels are compiled at install time and loaded as a library: a start needs no compiler,
builds nothing and waits on no lock, so neither a lock file left by a killed JIT build nor a start
killed half-way holds up the next one; the load says what it runs (engine load, `sedac-run --version`,
`sedac-run env`); a missing or unloadable library falls back with one warning naming the fix; and a
portable wheel from `python -m build` runs `sedac-run generate` in a clean venv with no compiler."""

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sedac.models import cpu_kernels

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


def _no_compiler_env(tmp_path: Path, bin_dir: Path = BIN) -> dict[str, str]:
    """Only the venv on PATH (no cc, c++, ninja), and an empty torch extensions dir to watch."""
    env = {
        **os.environ,
        "PATH": str(bin_dir),
        "TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions"),
        "CC": "/nonexistent/cc",
        "CXX": "/nonexistent/c++",
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("SEDAC_CPU_KERNELS", None)
    return env


def _generate(engine: Path, env: dict, bin_dir: Path = BIN, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(bin_dir / "sedac-run"), "generate", "--engine", str(engine), "--prompt", "Hi", "--max-tokens", "4"],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_start_never_waits_on_a_lock_or_a_killed_start(tiny_llama, tmp_path):
    env = _no_compiler_env(tmp_path)
    # The lock torch's JIT loader took in the build directory it used for this copy (the old loader
    # waited on a leftover one forever).
    copy = hashlib.sha1(str(Path(cpu_kernels.__file__).resolve().parent).encode()).hexdigest()[:10]
    (tmp_path / "torch_extensions" / f"sedac_cpu_kernels_{copy}").mkdir(parents=True)
    (tmp_path / "torch_extensions" / f"sedac_cpu_kernels_{copy}" / "lock").touch()
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "torch_extensions").rglob("*"))
    # A start killed mid-way (kill -9, as by OOM or a closed terminal) leaves nothing for the next one.
    victim = subprocess.Popen(
        [str(BIN / "sedac-run"), "generate", "--engine", str(tiny_llama), "--prompt", "Hi", "--max-tokens", "200"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(3)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    started = time.monotonic()
    out = _generate(tiny_llama, env, timeout=120)  # a hang fails here, bounded
    assert out.returncode == 0, out.stderr[-2000:]
    assert time.monotonic() - started < 120
    assert "SEDAC C++ CPU kernels: loaded, target=native" in out.stderr
    assert out.stdout.strip() and "tok/s" in out.stderr.splitlines()[-1]
    # nothing was compiled or written where torch's JIT would build
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "torch_extensions").rglob("*")) == before


def test_version_and_env_name_the_kernels(tmp_path):
    env = _no_compiler_env(tmp_path)
    version = subprocess.run(
        [str(BIN / "sedac-run"), "--version"], env=env, capture_output=True, text=True, timeout=120
    )
    assert version.returncode == 0
    assert version.stdout.splitlines()[0].startswith("sedac-run ")
    assert version.stdout.splitlines()[1] == cpu_kernels.status().line()
    report = subprocess.run([str(BIN / "sedac-run"), "env"], env=env, capture_output=True, text=True, timeout=120)
    assert report.returncode == 0
    fields = dict(line.split(":", 1) for line in report.stdout.splitlines())
    assert set(fields) == {"sedac", "python", "torch", "cpu", "cpu kernels", "triton", "gpu"}
    assert fields["cpu kernels"].strip().startswith("loaded, target=native isa=")
    assert "avx2" in fields["cpu"]


def test_missing_or_broken_library_falls_back_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernels, "library_path", lambda: None)
    with pytest.warns(UserWarning, match="not built for this CPU; reinstall the package"):
        status = cpu_kernels.status.__wrapped__()
    assert not status.loaded and "make install" in status.line()
    broken = tmp_path / "_cpu_kernels_native.so"
    broken.write_bytes(b"\x7fELF not really a library")
    monkeypatch.setattr(cpu_kernels, "library_path", lambda: broken)
    with pytest.warns(UserWarning, match="_cpu_kernels_native.so does not load"):
        assert not cpu_kernels.status.__wrapped__().loaded
    monkeypatch.setenv("SEDAC_CPU_KERNELS", "0")
    assert cpu_kernels.status.__wrapped__().detail == "disabled by SEDAC_CPU_KERNELS=0"


def test_the_installed_library_is_the_one_for_this_cpu():
    path = cpu_kernels.library_path()
    assert path is not None and path.parent == Path(cpu_kernels.__file__).parent
    assert path.name.startswith("_cpu_kernels_native")  # make install builds for this CPU
    assert cpu_kernels.available()


@pytest.mark.slow
def test_portable_wheel_runs_in_a_clean_venv_without_a_compiler(real_engine, tmp_path):
    dist, venv = tmp_path / "dist", tmp_path / "venv"
    build = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist)],
        cwd=ROOT,
        env={**os.environ, "SEDAC_CPU_ARCH": "portable"},
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (wheel,) = dist.glob("sedac-*.whl")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    for args in (["torch==2.13.0"], [str(wheel)]):  # torch first and pinned, as the Makefile does
        install = subprocess.run(pip + args, capture_output=True, text=True, timeout=1200)
        assert install.returncode == 0, install.stderr[-2000:]
    # the best level this CPU runs, and the AVX2 baseline where torch sees only AVX2 (ATEN_CPU_CAPABILITY)
    best = (
        "target=avx512 isa=AVX-512" if torch.backends.cpu.get_cpu_capability() == "AVX512" else "target=avx2 isa=AVX2"
    )
    for capability, expected in ((None, best), ("avx2", "target=avx2 isa=AVX2")):
        env = _no_compiler_env(tmp_path, venv / "bin")
        if capability:
            env["ATEN_CPU_CAPABILITY"] = capability
        out = _generate(real_engine, env, venv / "bin")
        assert out.returncode == 0, out.stderr[-2000:]
        assert f"SEDAC C++ CPU kernels: loaded, {expected}" in out.stderr
        assert out.stdout.strip()
    assert not (tmp_path / "torch_extensions").exists()
