"""Bench reports: each bench's plots on results shaped as that bench writes them (titles, axes with units, legends),
write_report's directory (report.md with the machine and plot links, report.json, readable PNGs), and one
`sedac-run bench` run end to end."""

import json
import random
import re

import matplotlib.image
import pytest
import torch

from sedac import __version__
from sedac.cli import bench, o1_bench, precision_bench, sedac_bench
from sedac.cli.report import figure_title, machine, write_report
from sedac.cli.run import main as run_main
from sedac.serving import bench_serve
from tests.test_cli import invoke

UNIT = re.compile(r"\(.+\)|tokens/s|\bms\b|fraction")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

BENCH = {
    "engine": "engines/smollm2",
    "device": "cpu",
    "host": "x86_64",
    "threads": 2,
    "output_len": 128,
    "num_prompts": 32,
    "batch1": {
        "sedac": {"output_tok_s": 54.1, "decode_tok_s": 55.0, "ttft_ms": 40.2, "tpot_ms": 18.18},
        "hf": {"output_tok_s": 21.3},
        "ratio": 2.54,
    },
    "concurrent": {
        "sedac": {
            "output_tok_s": 335.0,
            "generated_tokens": 4096,
            "seconds": 12.2,
            "ttft_p50_ms": 900.1,
            "tpot_p50_ms": 80.2,
        },
        "hf": {"output_tok_s": 120.4, "generated_tokens": 4096, "seconds": 34.0},
        "ratio": 2.78,
        "greedy_match": 0.94,
    },
}


def _precision(tok_s, agreement):
    return {
        "batch1_tok_s": tok_s,
        "batch1_decode_tok_s": tok_s + 1,
        "concurrent32_tok_s": 6 * tok_s,
        "prefill1024_tok_s": 640.0,
        "decode_after1024_tok_s": tok_s - 5,
        "agreement_vs_fp32": agreement,
        "perplexity": 5.545,
        "engine_mb": 513.0,
        "resident_weight_mb": 649.0,
        "batch1_decode_vs_fp32": round(tok_s / 54.4, 2),
    }


PRECISION = {
    "engine": "engines/smollm2",
    "device": "cpu",
    "kv_cache_dtype": "auto",
    "threads": 2,
    "output_len": 128,
    "num_prompts": 32,
    "held_out_tokens": 1890,
    "precisions": {
        "fp32": _precision(54.4, 1.0),
        "fp16": _precision(89.2, 0.9984),
        "bf16": _precision(89.5, 0.9963),
        "int8": _precision(116.0, 0.9714),
        "int4": _precision(129.5, 1.0),
        "gguf": _precision(109.7, 1.0),
    },
}


def _mode(b1, b8, agreement):
    return {
        "batch1_tok_s": b1,
        "batch8_tok_s": b8,
        "agreement": agreement,
        "skip_ratio": 0.3,
        "layers_per_token": 20.5,
        "acceptance_rate": 0.96,
        "perplexity": {"ppl": 5.5, "tokens": 1890, "exited": 0.3},
        "batch1_ratio": round(b1 / 48.3, 3),
        "batch8_ratio": round(b8 / 170.0, 3),
        "identical_to_off": 1.0,
    }


SEDAC = {
    "engine": "engines/smollm2-sedac",
    "device": "cpu",
    "threads": 2,
    "output_len": 64,
    "agreement_target": 0.99,
    "kv_fill": "deferred",
    "lossy_exit": "precision",
    "modes": {"off": _mode(48.3, 170.0, 1.0), "lossless": _mode(59.5, 173.8, 1.0), "lossy": _mode(66.6, 165.7, 0.9871)},
}

O1 = {
    "engine": "engines/smollm2",
    "device": "cpu",
    "questions": 100,
    "seed": 1,
    "max_tokens": 48,
    "rows": {
        "greedy": {"accuracy": 0.41, "tokens": 900, "tokens_vs_greedy": 1.0},
        "self-consistency@4": {"accuracy": 0.47, "tokens": 3600, "tokens_vs_greedy": 4.0},
        "self-consistency@8": {"accuracy": 0.5, "tokens": 7200, "tokens_vs_greedy": 8.0},
        "adaptive (entropy > 4.0, 4 branches)": {
            "accuracy": 0.45,
            "tokens": 1500,
            "tokens_vs_greedy": 1.67,
            "branches_per_question": 1.8,
            "early_stopped": 12,
        },
        "adaptive (entropy > 4.0, 8 branches)": {
            "accuracy": 0.46,
            "tokens": 1900,
            "tokens_vs_greedy": 2.11,
            "branches_per_question": 2.3,
            "early_stopped": 15,
        },
        "adaptive (entropy > 3.0, 2 branches)": {
            "accuracy": 0.43,
            "tokens": 1300,
            "tokens_vs_greedy": 1.44,
            "branches_per_question": 1.4,
            "early_stopped": 3,
        },
    },
    "entropy_auroc_wrong_answer": 0.71,
    "thinking_budgets": "not run: this engine has no reasoning markers",
}


def _bench_serve_result():
    rng = random.Random(0)
    requests = [bench_serve.BenchRequest("p", 24, 16) for _ in range(40)]
    results = []
    for _ in range(40):
        ttft, itl = rng.gammavariate(4, 0.02), [rng.gammavariate(8, 0.003) for _ in range(15)]
        results.append(bench_serve.Result(ok=True, output_tokens=16, ttft=ttft, itl=itl, e2el=ttft + sum(itl)))
    return bench_serve.summarize(
        requests, results, 5.0, "tiny", {}, {"request_rate": 30.0, "burstiness": 1.0, "max_concurrency": 4}
    )


SYNTHETIC = {
    "bench": (bench.figures, BENCH),
    "precision_bench": (precision_bench.figures, PRECISION),
    "sedac_bench": (sedac_bench.figures, SEDAC),
    "o1_bench": (o1_bench.figures, O1),
    "bench_serve": (bench_serve.figures, None),
}


def synthetic_figures(name):
    build, results = SYNTHETIC[name]
    return build(results if results is not None else _bench_serve_result())


@pytest.mark.parametrize("name", list(SYNTHETIC))
def test_every_plot_has_a_title_axes_with_units_and_a_legend_for_several_series(name):
    figures = synthetic_figures(name)
    assert figures
    for fig in figures.values():
        assert figure_title(fig)
        for ax in fig.axes:
            assert UNIT.search(ax.get_xlabel()), ax.get_xlabel()
            assert UNIT.search(ax.get_ylabel()), ax.get_ylabel()
            if len(ax.get_legend_handles_labels()[1]) > 1:
                assert ax.get_legend() is not None


def test_plots_hold_the_results_series():
    assert bench.figures(BENCH)["throughput"].axes[0].get_legend_handles_labels()[1] == ["sedac", "HF transformers"]
    assert precision_bench.figures(PRECISION)["throughput"].axes[0].get_legend_handles_labels()[1] == [
        "batch 1 (decode)",
        "32 concurrent",
    ]
    llama_row = {"batch1_decode_tok_s": 150.4, "prefill1024_tok_s": 323.4, "engine_mb": 93.8}
    with_llama = {**PRECISION, "llama.cpp": {"llama.cpp Q4_1": llama_row}}
    bars = precision_bench.figures(with_llama)["throughput"].axes[0]
    assert [t.get_text() for t in bars.get_xticklabels()][-1] == "llama.cpp Q4_1"  # beside ours, batch 1 only
    assert sedac_bench.figures(SEDAC)["speed_vs_agreement"].axes[0].get_legend_handles_labels()[1] == [
        "batch 1",
        "batch 8",
    ]
    assert o1_bench.figures(O1)["accuracy_vs_tokens"].axes[0].get_legend_handles_labels()[1] == [
        "greedy",
        "self-consistency",
        "adaptive",
    ]
    result = _bench_serve_result()
    assert len(result["per_request_ms"]["ttft"]) == 40 and len(result["per_request_ms"]["itl"][0]) == 15
    assert "per_request_ms" not in bench_serve.markdown(result)


def test_write_report_writes_markdown_json_and_pngs(tmp_path):
    figures = synthetic_figures("precision_bench")
    path = write_report(tmp_path / "out", "a title", PRECISION, "| a | b |\n|---|---|", figures)
    info = machine()
    md = path.read_text()
    assert md.startswith("# a title\n") and "| a | b |" in md
    for needle in (info["cpu"], torch.__version__, info["commit"], f"sedac {__version__}"):
        assert needle in md
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["precisions"] == PRECISION["precisions"] and saved["machine"]["torch"] == torch.__version__
    for name in figures:
        assert f"]({name}.png)" in md
        png = tmp_path / "out" / f"{name}.png"
        assert png.read_bytes()[:8] == PNG_SIGNATURE
        height, width = matplotlib.image.imread(png).shape[:2]
        assert height > 100 and width > 100


def test_bench_cli_writes_a_report_directory(tmp_path, tiny_llama):
    report = tmp_path / "bench"
    code, out = invoke(
        run_main,
        [
            "bench",
            "--engine",
            str(tiny_llama),
            "--device",
            "cpu",
            "--num-prompts",
            "2",
            "--output-len",
            "4",
            "--batch1-prompts",
            "1",
            "--max-prompt-len",
            "64",
            "--report",
            str(report),
        ],
    )
    assert code == 0, out
    assert "| batch 1 | sedac |" in out  # the tables still reach the terminal
    results = json.loads((report / "report.json").read_text())
    assert results["batch1"]["hf"]["output_tok_s"] > 0 and "machine" in results
    assert "![" in (report / "report.md").read_text()
    assert (report / "throughput.png").read_bytes()[:8] == PNG_SIGNATURE
