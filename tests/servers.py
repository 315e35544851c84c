"""Start real servers on loopback for tests, bounded in time, and stop them cleanly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports: all sockets stay bound until every port is chosen (closing
    each before binding the next lets the kernel hand out the same port twice)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def wait_until_up(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"server at {url} did not come up in {timeout}s")


@contextmanager
def launched(command: list[str], ready_url: str, timeout: float = 120.0):
    """Run a server process until the block ends, then SIGTERM it (kill if it does not stop)."""
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    try:
        wait_until_up(ready_url, proc, timeout)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()


@contextmanager
def sedac_server(engine: Path, *extra: str):
    """`sedac-run serve` in a subprocess; yields (base_url, process)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [str(BIN / "sedac-run"), "serve", "--engine", str(engine), "--port", str(port), "--device", "cpu", *extra]
    with launched(command, base + "/ready") as proc:
        yield base, proc


@contextmanager
def triton_server(repo: Path):
    """`sedac-run triton serve` (the real tritonserver); yields (http_url, grpc_address, metrics_url, process)."""
    http, grpc, metrics = free_ports(3)
    command = [
        str(BIN / "sedac-run"),
        "triton",
        "serve",
        "--repo",
        str(repo),
        "--http-port",
        str(http),
        "--grpc-port",
        str(grpc),
        "--metrics-port",
        str(metrics),
    ]
    with launched(command, f"http://127.0.0.1:{http}/v2/health/ready", timeout=180) as proc:
        yield f"http://127.0.0.1:{http}", f"127.0.0.1:{grpc}", f"http://127.0.0.1:{metrics}/metrics", proc
