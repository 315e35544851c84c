"""schemathesis (a property-based API fuzzer) runs every one of its checks against the server on loopback,
from the server's own /openapi.json: no 5xx, every status and content type documented, responses
matching their schemas, schema-violating requests rejected, schema-valid ones accepted (or a documented
400/404: tests/schemathesis.toml says which). The server keeps serving and its KV pool ends free."""

import subprocess

import httpx

from sedac.builder import build_engine
from sedac.config import BuildConfig
from tests.conftest import ROOT
from tests.servers import BIN, sedac_server


def test_schemathesis_finds_no_failure(tiny_models, tmp_path):
    engine = tmp_path / "tiny"  # a short context keeps each fuzzed generation short
    build_engine(str(tiny_models["llama"]), engine, BuildConfig(max_batch_size=8, max_seq_len=64, max_num_tokens=64))
    with sedac_server(engine, "--served-model-name", "tiny") as (base, _):
        run = subprocess.run(
            [
                str(BIN / "st"),
                "--no-color",
                "--config-file",
                str(ROOT / "tests/schemathesis.toml"),
                "run",
                base + "/openapi.json",
                "--max-examples",
                "10",
                "--seed",
                "7",
                "--request-timeout",
                "30",
            ],
            capture_output=True,
            text=True,
            timeout=900,
            cwd=tmp_path,
        )  # its .schemathesis/ cache stays out of the checkout
        assert run.returncode == 0, run.stdout[-6000:]
        assert "Selected: 13/13" in run.stdout and "Tested: 13" in run.stdout  # every endpoint ran
        assert "✅ Coverage" in run.stdout and "✅ Fuzzing" in run.stdout
        assert httpx.get(base + "/health", timeout=10).status_code == 200
        stats = httpx.get(base + "/stats", timeout=10).json()
        assert stats["kv_blocks_free"] == stats["kv_blocks_total"] and stats["num_requests_running"] == 0
