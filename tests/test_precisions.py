"""Engine precisions on CPU: fp16 and bf16 weights are widened in the kernels' registers and computed in
fp32, so a half-precision panel gives bit for bit the fp32 kernel's result on the widened weights (any
batch), and an fp16/bf16 engine decodes greedy tokens identical to HF transformers at fp32 on the same
rounded weights. int8 engines store weight-only int8 projections (one scale per output; the head stays
fp16) and decode like HF on the dequantized weights; without the kernels every precision still runs. Every
precision takes the fused decode layer."""

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from sedac import LLM, SamplingParams
from sedac.builder import build_engine
from sedac.builder.hf_export import load_hf_model
from sedac.cli.build import main as build_main
from sedac.config import BuildConfig
from sedac.models import cpu_kernels, decoder
from sedac.models.layers import Linear
from tests.conftest import hf_greedy
from tests.test_parity_tiny import PROMPTS

HALF = [torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _kernels():
    assert cpu_kernels.available()  # every precision must take the C++ path here, not fall back


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape", [(44, 13), (576, 960)])
@pytest.mark.parametrize("batch", [17, 300])  # 300 rows: bf16 panels are widened once per task (kWidenRows)
def test_half_panels_equal_fp32_panels_on_widened_weights(dtype, shape, batch):
    torch.manual_seed(0)
    n_in, n_out = shape
    half, wide = Linear(n_in, n_out, bias=True), Linear(n_in, n_out, bias=True)
    half.weight.data = torch.randn(n_in, n_out).to(dtype)
    wide.weight.data = half.weight.data.float()
    half.bias.data = wide.bias.data = torch.randn(n_out)
    half.pack_for_cpu()
    wide.pack_for_cpu()
    assert half.packed.dtype == dtype  # streamed at half the bytes
    x = torch.randn(batch, n_in)
    with torch.inference_mode():
        y = half(x)
        assert torch.equal(y, wide(x))
        for rows in (1, 2, 3, 5, 6, 7):
            assert torch.equal(half(x[:rows]), y[:rows])  # batch-invariant


def test_panel_linear_rejects_other_dtypes():
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16 panels"):
        torch.ops.sedac_cpu.panel_linear(torch.randn(1, 4), torch.zeros(1, 4, 16, dtype=torch.float64), None, 16)


def _engine(tmp_path, source, precision: str):
    path = tmp_path / precision
    build_engine(
        str(source),
        path,
        BuildConfig(precision=precision, max_batch_size=8, max_seq_len=256, max_num_tokens=256, kv_block_size=4),
    )
    return path


def fused_steps(monkeypatch) -> list[int]:
    """Counts fused decode-layer calls, to show decode steps took the fast path."""
    calls, original = [], decoder.fused_decode
    monkeypatch.setattr(decoder, "fused_decode", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_half_engine_matches_hf_fp32_on_its_rounded_weights(tmp_path, tiny_models, precision, arch, monkeypatch):
    from transformers import AutoModelForCausalLM

    engine = _engine(tmp_path, tiny_models[arch], precision)
    assert load_file(str(engine / "model.safetensors"))["layers.0.qkv_proj.weight"].dtype == getattr(
        torch, {"fp16": "float16", "bf16": "bfloat16"}[precision]
    )
    hf = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.to(load_file(str(engine / "model.safetensors"))["norm.weight"].dtype).float())
    llm = LLM(str(engine), device="cpu")
    fused = fused_steps(monkeypatch)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=24, temperature=0.0))
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == hf_greedy(hf, prompt, 24)
    assert fused  # the decode steps ran the fused C++ layer
    assert llm.engine.runner.model.layers[0].qkv_proj.packed.dtype != torch.float32


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_int8_engine_matches_hf_on_dequantized_weights(tmp_path, tiny_models, arch, monkeypatch):
    engine = _engine(tmp_path, tiny_models[arch], "int8")
    weights = load_file(str(engine / "model.safetensors"))
    assert weights["layers.0.gate_up_proj.weight"].dtype == torch.int8
    assert weights["layers.0.qkv_proj.weight_scale"].shape == (weights["layers.0.qkv_proj.weight"].shape[0],)
    assert weights.get("lm_head.weight", weights["embed_tokens.weight"]).dtype == torch.float16  # head excluded
    hf = load_hf_model(engine)
    assert LLM(str(engine), device="cpu").engine.runner.kv_dtype == torch.float16  # "auto" for int8 on CPU
    llm = LLM(str(engine), device="cpu", kv_cache_dtype="fp32")  # the weights' arithmetic, K/V as HF keeps them
    model = llm.engine.runner.model
    codes = model.layers[0].qkv_proj.int8[0]  # int8_linear_a8's offset codes where the CPU has VNNI
    assert model.int8_weights and codes.dtype == (torch.uint8 if cpu_kernels.integer_dot_products() else torch.int8)
    fused = fused_steps(monkeypatch)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=24, temperature=0.0))
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == hf_greedy(hf, prompt, 24)
    assert fused
    # and the logits (not only the argmax) are HF's on the dequantized weights, up to summation order and
    # the activations' 15-bit grid (csrc/int8_activations.h)
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=5)
    ours = llm.generate([PROMPTS[0]], params)[0].outputs[0].logprobs[0]
    with torch.inference_mode():
        theirs = hf(torch.tensor([PROMPTS[0]])).logits[0, -1].log_softmax(-1)
    for token, logprob in ours.items():
        assert abs(logprob - theirs[token].item()) < 1e-3


def test_precision_errors(tmp_path, tiny_models):
    runner = CliRunner()
    base = ["--model", str(tiny_models["llama"]), "--output", str(tmp_path / "e")]
    out = runner.invoke(build_main, [*base, "--precision", "int3"])
    assert out.exit_code != 0 and "int3" in out.output and "int8" in out.output and "bf16" in out.output
    out = runner.invoke(
        build_main,
        [*base, "--precision", "int8", "--sedac", "--draft-precision", "int8"],
    )
    assert out.exit_code != 0 and "--draft-precision int8 over a int8 base: choose auto or one of int4" in out.output
    assert not (tmp_path / "e").exists()


def test_engine_size_follows_precision(tmp_path, tiny_models):
    sizes = {
        p: json.loads((_engine(tmp_path, tiny_models["llama"], p) / "build_report.json").read_text())["weights_bytes"]
        for p in ("fp32", "fp16", "int8")
    }
    assert sizes["int8"] < sizes["fp16"] < sizes["fp32"]


def test_precision_bench_reports_every_precision(tmp_path, tiny_models):
    from sedac.cli.precision_bench import run_precision_bench

    reference = _engine(tmp_path, tiny_models["qwen2"], "fp32")
    results = run_precision_bench(
        reference,
        "cpu",
        ["fp32", "bf16", "int8", "int4"],
        num_prompts=3,
        output_len=6,
        batch1_prompts=2,
        max_prompt_len=64,
        report=tmp_path / "report",
        answers=2,
        answer_len=48,
        prefill_len=80,
    )
    rows = results["precisions"]
    assert list(rows) == ["fp32", "bf16", "int8", "int4"]
    assert (tmp_path / "fp32-int8" / "config.json").is_file()  # built beside the reference
    assert rows["fp32"]["agreement_vs_fp32"] == 1.0 and rows["fp32"]["batch1_decode_vs_fp32"] == 1.0
    assert 0.5 < rows["bf16"]["agreement_vs_fp32"] <= 1.0 and rows["int8"]["perplexity"] > 1
    mb = {p: r["resident_weight_mb"] for p, r in rows.items()}
    assert mb["int4"] < mb["int8"] < mb["bf16"] < mb["fp32"]
    assert all(r["batch1_tok_s"] > 0 and r["concurrent3_tok_s"] > 0 and r["prefill80_tok_s"] > 0 for r in rows.values())
    assert "| int8 |" in (tmp_path / "report" / "report.md").read_text()
    assert (tmp_path / "report" / "speed_vs_quality.png").is_file()
    with pytest.raises(ValueError, match="unknown int3"):
        run_precision_bench(reference, "cpu", ["fp32", "int3"], 1, 1, 1, 64, tmp_path / "r")


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_without_kernels_every_precision_runs_the_torch_path(tmp_path, tiny_models, monkeypatch, precision):
    engine = _engine(tmp_path, tiny_models["llama"], precision)
    with_kernels = [
        o.token_ids
        for o in LLM(str(engine), device="cpu").generate(PROMPTS, SamplingParams(max_tokens=16, temperature=0.0))
    ]
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    llm = LLM(str(engine), device="cpu")
    assert llm.engine.runner.model.layers[0].qkv_proj.packed is None  # nothing packed: torch ops
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=16, temperature=0.0))
    assert [o.token_ids for o in outs] == with_kernels


def test_sedac_over_a_half_base(tmp_path, tiny_models):
    """The exits train and calibrate on a bf16 engine's fp32 compute, and lossless stays lossless."""
    from sedac.builder import SedacOptions
    from tests.conftest import TINY_SEDAC

    path = tmp_path / "sedac-bf16"
    build_engine(
        str(tiny_models["llama"]),
        path,
        BuildConfig(precision="bf16", max_batch_size=8, max_seq_len=256, max_num_tokens=256, kv_block_size=4),
        SedacOptions(**TINY_SEDAC),
    )
    from tests.test_sedac import always_draft

    llm = LLM(str(path), device="cpu")
    always_draft(llm.engine)
    runs = {
        m: llm.generate(PROMPTS, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, sedac_mode=m))
        for m in ("off", "lossless")
    }
    assert [o.token_ids for o in runs["lossless"]] == [o.token_ids for o in runs["off"]]
    assert llm.engine.stats()["sedac_drafted_tokens"] > 0  # the build's int8 or int4 drafter over bf16 ran


def _near_tie_divergences(outs, reference) -> list[float]:
    """For each completion, where it first leaves the reference: how far below the reference's token
    its token was in the reference's own distribution (0 where it never leaves)."""
    gaps = []
    for out, ref in zip(outs, reference):
        i = next((i for i, (a, b) in enumerate(zip(out.token_ids, ref.token_ids)) if a != b), None)
        top = ref.logprobs[i] if i is not None else {}
        gaps.append(top[ref.token_ids[i]] - top.get(out.token_ids[i], float("-inf")) if i is not None else 0.0)
    return gaps


def test_half_kv_cache(tiny_llama, monkeypatch):
    """--kv-cache-dtype fp16/bf16: the pool holds half the bytes, decode and cached-prefix steps read it
    (kernel and torch path), and greedy tokens leave the fp32 pool's only at near-ties (a random tiny
    model has many: its logits are nearly flat)."""
    params = SamplingParams(max_tokens=24, temperature=0.0, logprobs=5)
    full = LLM(str(tiny_llama), device="cpu")
    reference = [o.outputs[0] for o in full.generate(PROMPTS, params)]
    for dtype, tie in (("fp16", 0.01), ("bf16", 0.05)):
        llm = LLM(str(tiny_llama), device="cpu", kv_cache_dtype=dtype)
        runner = llm.engine.runner
        assert runner.model.layers[0].k_cache.dtype == getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[dtype])
        assert 2 * runner.kv_bytes_per_block() == full.engine.runner.kv_bytes_per_block()
        outs = [o.outputs[0] for o in llm.generate(PROMPTS, params)]
        again = llm.generate([PROMPTS[2] + [7, 7]], params)[0]  # a prefix-cache hit reads the half pool
        assert again.metrics.num_cached_tokens > 0
        assert max(_near_tie_divergences(outs, reference)) < tie, dtype
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    torch_path = LLM(str(tiny_llama), device="cpu", kv_cache_dtype="fp16")
    outs = [o.outputs[0] for o in torch_path.generate(PROMPTS, params)]
    assert max(_near_tie_divergences(outs, reference)) < 0.01
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        LLM(str(tiny_llama), device="cpu", kv_cache_dtype="fp8")


def test_llama_cpp_baseline_runs_llama_bench_on_the_source_and_its_conversions(tmp_path, tiny_models):
    """The plumbing around llama.cpp's tools (a real llama.cpp build is optional and not in CI): stand-in
    llama-quantize / llama-bench record their calls; each format gets a decode run per round (interleaved
    with ours by the caller), their mean, and a prefill run."""
    from sedac.builder.sources import smollm2_gguf_path
    from sedac.cli.llama_cpp_baseline import LlamaCppBaseline
    from sedac.cli.precision_bench import _llama_cpp

    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    (bin_dir / "llama-quantize").write_text(f'#!/bin/sh\necho "quantize $4" >> {calls}\ntouch "$3"\n')
    (bin_dir / "llama-bench").write_text(  # prefill runs have -p N > 0 ($6), decode runs -p 0
        f'#!/bin/sh\necho "bench $2 $4 $6" >> {calls}\n'
        'if [ "$6" = 0 ]; then echo \'[{"n_prompt": 0, "n_gen": 8, "avg_ts": 140.26}]\'; '
        'else echo \'[{"n_prompt": 64, "n_gen": 0, "avg_ts": 500.04}]\'; fi\n'
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    baseline = LlamaCppBaseline(str(bin_dir), smollm2_gguf_path(), tmp_path / "conversions", 2)
    for _ in range(3):
        baseline.decode_round(8)
    rows = baseline.rows(64)
    assert list(rows) == ["llama.cpp Q4_1", "llama.cpp F32", "llama.cpp BF16", "llama.cpp Q8_0"]
    assert rows["llama.cpp Q4_1"] == {"batch1_decode_tok_s": 140.3, "prefill64_tok_s": 500.0, "engine_mb": 93.8}
    logged = calls.read_text().splitlines()
    assert [line for line in logged if line.startswith("quantize")] == [
        "quantize F32",
        "quantize BF16",
        "quantize Q8_0",
    ]
    assert sum(line.startswith("bench") and line.endswith(" 2 0") for line in logged) == 12  # 3 rounds x 4, -t 2
    assert sum(line.startswith("bench") and line.endswith(" 2 64") for line in logged) == 4
    LlamaCppBaseline(str(bin_dir), smollm2_gguf_path(), tmp_path / "conversions", 2)
    assert sum(line.startswith("quantize") for line in calls.read_text().splitlines()) == 3  # conversions reused
    with pytest.raises(ValueError, match="no llama-bench in"):
        LlamaCppBaseline(str(tmp_path), smollm2_gguf_path(), tmp_path / "c", 2)
    with pytest.raises(ValueError, match="--llama-cpp needs an engine built from a GGUF file"):
        _llama_cpp(str(bin_dir), _engine(tmp_path, tiny_models["llama"], "fp32"))
