"""`sedac-run bench serve` against the server on loopback: vLLM's metric names from a real run, goodput
against SLOs, both datasets, and clear errors for bad options or no server."""

import json

from click.testing import CliRunner

from sedac.cli.run import main
from tests.servers import free_port, sedac_server


def test_bench_serve_reports_vllm_metrics(tiny_llama, tmp_path):
    runner = CliRunner()
    with sedac_server(tiny_llama, "--served-model-name", "tiny") as (base, _):
        common = ["bench", "serve", "--url", base, "--tokenizer", str(tiny_llama)]
        out = runner.invoke(
            main,
            [
                *common,
                "--dataset-name",
                "random",
                "--num-prompts",
                "12",
                "--random-input-len",
                "24",
                "--random-output-len",
                "16",
                "--request-rate",
                "30",
                "--max-concurrency",
                "4",
                "--goodput",
                "ttft:60000",
                "--goodput",
                "tpot:0.001",
                "--report",
                str(tmp_path / "r"),
            ],
        )
        assert out.exit_code == 0, out.output
        result = json.loads((tmp_path / "r" / "report.json").read_text())
        assert result["Successful requests"] == 12 and result["Failed requests"] == 0
        assert result["Total generated tokens"] == 12 * 16  # ignore_eos: every planned token
        for name in ("TTFT", "TPOT", "ITL", "E2EL"):
            assert 0 < result[f"Median {name} (ms)"] <= result[f"P99 {name} (ms)"]
        assert result["Output token throughput (tok/s)"] > 0 and result["Request goodput (req/s)"] == 0  # tpot SLO
        assert len(result["per_request_ms"]["ttft"]) == 12 and len(result["per_request_ms"]["itl"]) == 12
        report = (tmp_path / "r" / "report.md").read_text()
        assert "| Output token throughput (tok/s) |" in report and "(latency.png)" in report
        assert (tmp_path / "r" / "latency.png").is_file() and (tmp_path / "r" / "throughput.png").is_file()
        out = runner.invoke(
            main,
            [
                *common,
                "--num-prompts",
                "4",
                "--sharegpt-output-len",
                "8",
                "--max-prompt-len",
                "120",
                "--report",
                str(tmp_path / "s"),
            ],
        )
        assert out.exit_code == 0, out.output
        assert json.loads((tmp_path / "s" / "report.json").read_text())["Successful requests"] == 4
        sweep = [*common, "--dataset-name", "random", "--num-prompts", "6", "--random-output-len", "8"]
        out = runner.invoke(main, [*sweep, "--max-concurrency", "1,3", "--report", str(tmp_path / "w")])
        assert out.exit_code == 0, out.output
        runs = json.loads((tmp_path / "w" / "report.json").read_text())["sweep"]
        assert [r["max_concurrency"] for r in runs] == [1, 3] and all(r["Successful requests"] == 6 for r in runs)
        assert "| 3 | 6 |" in (tmp_path / "w" / "report.md").read_text()
        assert (tmp_path / "w" / "throughput_vs_concurrency.png").is_file()
        out = runner.invoke(main, [*common, "--goodput", "latency:5"])
        assert out.exit_code != 0 and "--goodput takes METRIC:MS" in out.output
        out = runner.invoke(main, [*common, "--max-concurrency", "4,x"])
        assert out.exit_code != 0 and "--max-concurrency takes N or a comma list" in out.output
    out = runner.invoke(
        main,
        [
            "bench",
            "serve",
            "--url",
            f"http://127.0.0.1:{free_port()}",
            "--tokenizer",
            str(tiny_llama),
            "--dataset-name",
            "random",
            "--num-prompts",
            "2",
            "--report",
            str(tmp_path / "x"),
        ],
    )
    assert out.exit_code != 0 and "no OpenAI-compatible server answers" in out.output
    out = runner.invoke(main, ["bench"])
    assert out.exit_code != 0 and "--engine is required" in out.output
