"""CLI: sedac-build and sedac-run give one clear error line and a nonzero exit on bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from sedac.cli.build import main as build_main
from sedac.cli.run import main as run_main


def invoke(cli, args):
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    return result.exit_code, result.output


def assert_one_line_error(code, output, needle):
    assert code != 0
    error_lines = [l for l in output.splitlines() if l.startswith("Error:")]
    assert len(error_lines) == 1 and needle in error_lines[0], output
    assert "Traceback" not in output


def test_build_from_hf_dir_with_yaml_preset(tmp_path, tiny_models):
    preset = tmp_path / "p.yaml"
    preset.write_text("precision: bf16\nmax_seq_len: 128\nkv_block_size: 8\n")
    out = tmp_path / "eng"
    code, output = invoke(
        build_main,
        ["--model", str(tiny_models["qwen2"]), "--output", str(out), "--config", str(preset), "--max-seq-len", "64"],
    )
    assert code == 0, output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["build"] == {
        "precision": "bf16",
        "max_batch_size": 32,
        "max_seq_len": 64,
        "max_num_tokens": 2048,
        "kv_block_size": 8,
        "group_size": None,
    }
    report = json.loads((out / "build_report.json").read_text())
    assert report["architecture"] == "qwen2" and report["parameters"] > 0
    from transformers import AutoTokenizer

    assert "<|im_start|>" in AutoTokenizer.from_pretrained(out).chat_template
    from safetensors.torch import load_file

    assert load_file(str(out / "model.safetensors"))["norm.weight"].dtype == torch.bfloat16


def test_build_errors(tmp_path):
    code, out = invoke(build_main, ["--model", str(tmp_path / "missing"), "--output", str(tmp_path / "e")])
    assert_one_line_error(code, out, "not found")
    code, out = invoke(build_main, ["--model", "someorg/not-cached-model", "--output", str(tmp_path / "e")])
    assert_one_line_error(code, out, "not in the local Hugging Face cache")
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(gpt2)
    code, out = invoke(build_main, ["--model", str(gpt2), "--output", str(tmp_path / "e")])
    assert_one_line_error(code, out, "unsupported architecture 'gpt2'")
    assert "llama" in out and "qwen2" in out
    code, out = invoke(build_main, ["--model", str(gpt2), "--output", str(tmp_path / "e"), "--max-batch-size", "0"])
    assert_one_line_error(code, out, "max_batch_size")
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("kv", [[], ["--kv-cache-dtype", "fp16"]])
def test_generate_prompt_streams_with_stats(tiny_llama, kv):
    result = CliRunner().invoke(
        run_main, ["generate", "--engine", str(tiny_llama), "--prompt", "Hello", "--max-tokens", "8"] + kv
    )
    assert result.exit_code == 0, result.output
    assert "tok/s" in result.output and "ttft" in result.output


def test_generate_batch_jsonl_bad_line_fails_alone(tmp_path, tiny_llama):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(
        "\n".join(
            [
                json.dumps({"prompt": "one"}),
                "{broken",
                json.dumps({"prompt": list(range(400))}),
                json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
            ]
        )
        + "\n"
    )
    code, output = invoke(
        run_main,
        ["generate", "--engine", str(tiny_llama), "--input", str(inp), "--output", str(out), "--max-tokens", "4"],
    )
    assert code == 0, output
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert [("error" in r) for r in rows] == [False, True, True, False]
    assert len(rows[0]["token_ids"]) >= 1 and "max_seq_len" in rows[2]["error"]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--engine", "/nonexistent", "--prompt", "x"], "not found"),
        (["--prompt", "x", "--temperature", "-1"], "temperature"),
        (["--prompt", "x", "--max-tokens", "0"], "max_tokens"),
        (["--prompt", "x " * 400, "--raw"], "max_seq_len"),
        (["--input", "/nonexistent.jsonl", "--output", "/tmp/o.jsonl"], "No such file"),
    ],
)
def test_generate_errors(tiny_llama, args, needle):
    if "--engine" not in args:
        args = ["--engine", str(tiny_llama)] + args
    code, out = invoke(run_main, ["generate"] + args)
    assert_one_line_error(code, out, needle)


def test_chat_commands(tiny_llama):
    result = CliRunner().invoke(
        run_main,
        ["chat", "--engine", str(tiny_llama), "--max-tokens", "4"],
        input="hello\n/stats\n/reset\n/stats\n/quit\n",
    )
    assert result.exit_code == 0, result.output
    assert "assistant>" in result.output and "last reply" in result.output and "no reply yet" in result.output


def test_console_scripts_installed():
    bin_dir = Path(sys.executable).parent
    assert (bin_dir / "sedac-build").is_file()
    done = subprocess.run(
        [str(bin_dir / "sedac-run"), "generate", "--engine", "/nonexistent", "--prompt", "x"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1 and done.stderr.strip().count("\n") == 0 and "not found" in done.stderr


def test_build_from_cached_hub_id(tmp_path, tiny_models):
    """A hub id resolves from the local HF cache layout (models--org--name/snapshots/REV), offline."""
    import os
    import shutil

    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    snapshot = repo / "snapshots" / "0123456789abcdef"
    shutil.copytree(tiny_models["llama"], snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "sedac-build"),
            "--model",
            "tiny-org/tiny-llama",
            "--output",
            str(tmp_path / "eng"),
            "--max-seq-len",
            "128",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "eng" / "build_report.json").read_text())
    assert report["source"].endswith("0123456789abcdef") and report["architecture"] == "llama"
