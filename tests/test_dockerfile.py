"""The Dockerfile's own steps, run on this machine: it installs with `make install` (what CI itself
runs before these tests), then its `RUN sedac-build` line and its CMD must work as written. Not
exercised here (no Docker daemon, no GPU): the base image, apt, and the CUDA device at run time."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _steps() -> tuple[list[str], list[str]]:
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    assert "RUN make install" in lines  # the Makefile's install, as the guide asks
    build = [shlex.split(line[len("RUN ") :]) for line in lines if line.startswith("RUN sedac-build")]
    cmd = [json.loads(line[len("CMD ") :]) for line in lines if line.startswith("CMD ")]
    assert len(build) == 1 and len(cmd) == 1
    return build[0], cmd[0]


def test_dockerfile_builds_its_engine_and_runs_its_command(tmp_path):
    build, cmd = _steps()
    (tmp_path / "configs").symlink_to(ROOT / "configs")  # the image's WORKDIR holds configs/
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
    }
    subprocess.run(build, cwd=tmp_path, env=env, check=True, capture_output=True, timeout=900)
    engine = tmp_path / build[build.index("--output") + 1]
    assert json.loads((engine / "config.json").read_text())["build"]["precision"] == "fp16"
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() and "tok/s" in out.stderr.splitlines()[-1]  # the text, then the stats line
