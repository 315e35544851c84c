"""SEDAC through the CLI: generate stats, the --sedac-modes bench, and clear errors."""

import json

from click.testing import CliRunner

from sedac.cli.build import main as build_main
from sedac.cli.run import main as run_main
from tests.test_cli import assert_one_line_error, invoke


def test_generate_shows_sedac_stats(tiny_sedac_engine):
    result = CliRunner().invoke(
        run_main,
        [
            "generate",
            "--engine",
            str(tiny_sedac_engine),
            "--prompt",
            "Hello",
            "--max-tokens",
            "8",
            "--sedac-mode",
            "lossless",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "lossless:" in result.output and "layers/token" in result.output


def test_bench_compares_modes_in_one_run(tmp_path, tiny_sedac_engine):
    report = tmp_path / "sedac"
    code, out = invoke(
        run_main,
        [
            "bench",
            "--engine",
            str(tiny_sedac_engine),
            "--sedac-modes",
            "off,lossless,lossy",
            "--output-len",
            "8",
            "--batch1-prompts",
            "2",
            "--batch-size",
            "2",
            "--max-prompt-len",
            "64",
            "--report",
            str(report),
        ],
    )
    assert code == 0, out
    modes = json.loads((report / "report.json").read_text())["modes"]
    assert set(modes) == {"off", "lossless", "lossy"}
    assert modes["off"]["agreement"] == 1.0 and modes["lossless"]["identical_to_off"] == 1.0
    assert modes["lossless"]["agreement"] == modes["lossless"]["humaneval_agreement"] == 1.0
    assert 0 < modes["lossy"]["humaneval_agreement"] <= 1 and modes["off"]["humaneval_skip_ratio"] == 0
    assert modes["lossless"]["perplexity"] == modes["off"]["perplexity"]
    for r in modes.values():
        assert r["batch1_tok_s"] > 0 and "batch2_ratio" in r
    assert "| lossy |" in (report / "report.md").read_text() and (report / "speed_vs_agreement.png").is_file()


def test_sedac_errors(tmp_path, tiny_llama, tiny_models):
    code, out = invoke(run_main, ["generate", "--engine", str(tiny_llama), "--prompt", "x", "--sedac-mode", "lossy"])
    assert_one_line_error(code, out, "--sedac")
    code, out = invoke(run_main, ["bench", "--engine", str(tiny_llama), "--sedac-modes", "off,fast"])
    assert_one_line_error(code, out, "--sedac-modes")
    code, out = invoke(run_main, ["bench", "--engine", str(tiny_llama), "--sedac-modes", "off,lossless"])
    assert_one_line_error(code, out, "without --sedac")
    code, out = invoke(run_main, ["serve", "--engine", str(tiny_llama), "--port", "1", "--sedac-kv-fill", "ghost"])
    assert_one_line_error(code, out, "Ghost KV")
    code, out = invoke(
        build_main,
        [
            "--model",
            str(tiny_models["llama"]),
            "--output",
            str(tmp_path / "e"),
            "--max-seq-len",
            "256",
            "--sedac",
            "--exit-layers",
            "0,9",
        ],
    )
    assert_one_line_error(code, out, "exit layers")
    assert not (tmp_path / "e").exists()
