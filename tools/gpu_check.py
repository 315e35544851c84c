"""The prepared GPU check (tools/gpu_check.sh runs it on a lent machine; no network, no real weights there).

1. The CUDA tests (pytest: test_cuda, the Triton kernels' tests) on the GPU.
2. The device's copy bandwidth (a 4 GiB device-to-device copy, bytes read + written per second): the
   roofline of a batch-1 decode step is the weight bytes it streams over that bandwidth.
3. Random weights of real shapes (SmolLM2-135M, Llama-3.1-8B, Qwen2.5-7B), built by sedac-build and run
   with CUDA graphs: batch-1 decode tok/s (decode only: first token to last) and its share of the
   roofline, 64-concurrent output tok/s (prefill included), and HF transformers' eager `generate` on
   the same weights in the same run (batch 1 decode-only, and 64 prompts batched).
4. fp32 parity with TF32 off: greedy tokens against HF generate at SmolLM2's full shape and at the 8B and
   7B shapes cut to 2 layers (the same matrices, a fraction of the time).
Writes $OUT/gpu_check.json after every section, so a run cut short still reports what it measured.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CARRY = ROOT / ".gpu_carry"  # tokenizer files (and packages the machine lacks), carried beside the tree
OUT = Path(os.environ.get("OUT", "/tmp/gpu_check"))
WORK = Path(tempfile.mkdtemp(prefix="gpu_check_"))
COMMON = dict(bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5)
SHAPES = {
    "smollm2-135m": dict(
        arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0,
        max_position_embeddings=8192,
    ),
    "llama-3.1-8b": dict(
        arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False, rope_theta=500000.0,
        max_position_embeddings=131072,
    ),
    "qwen2.5-7b": dict(
        arch="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False, rope_theta=1000000.0,
        max_position_embeddings=32768,
    ),
}  # fmt: skip
BENCH = {"smollm2-135m": ("fp32", "fp16", "bf16", "int8", "int4"), "llama-3.1-8b": ("bf16",), "qwen2.5-7b": ("bf16",)}
PROMPT_LEN, DECODE_TOKENS, CONCURRENT = 128, 128, 64
CUDA_TESTS = ("test_cuda", "test_triton_attention", "test_triton_fused", "test_device_sampling", "test_plugins")
CUDA_TESTS = tuple(f"tests/{name}.py" for name in CUDA_TESTS)  # GPU_CHECK_TESTS: another selection
RESULTS: dict = {"errors": {}, "skipped": []}
# No section starts later than this (GPU_CHECK_DEADLINE_S): the check fits one device call.
STARTED, DEADLINE_S = time.perf_counter(), float(os.environ.get("GPU_CHECK_DEADLINE_S", 420))


def save() -> None:
    (OUT / "gpu_check.json").write_text(json.dumps(RESULTS, indent=2))


def section(name: str):
    """Run fn as a named section: its result or its error lands in RESULTS, and the file is rewritten. Past
    the deadline a section is skipped (and says so), so the whole check fits one device call."""

    def wrap(fn):
        def run(*args):
            start = time.perf_counter()
            if start - STARTED > DEADLINE_S:
                RESULTS["skipped"].append(name)
                save()
                return None
            try:
                RESULTS[name] = fn(*args)
            except Exception:
                RESULTS["errors"][name] = traceback.format_exc()[-2000:]
            print(f"[{time.perf_counter() - STARTED:6.1f} s] {name}: {RESULTS.get(name, 'ERROR')}", flush=True)
            if name in RESULTS["errors"]:
                print(RESULTS["errors"][name], flush=True)
            save()
            return RESULTS.get(name)

        return run

    return wrap


def cuda_tests() -> dict:
    files = os.environ.get("GPU_CHECK_TESTS", " ".join(CUDA_TESTS)).split()
    env = {**os.environ, "SEDAC_TEST_TOKENIZER": str(CARRY), "SEDAC_TEST_SEDAC_ENGINE": str(CARRY / "tiny-sedac")}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    tail = proc.stdout[-3000:] + proc.stderr[-1000:]
    print(tail, flush=True)
    return {"returncode": proc.returncode, "summary": proc.stdout.strip().splitlines()[-1:], "tail": tail[-1500:]}


def copy_bandwidth() -> float:
    """GB/s of a 4 GiB device-to-device copy, bytes read + written (the HBM figure a GEMV can approach)."""
    src = torch.empty(2**30, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return round(2 * src.numel() * 4 * 10 / (start.elapsed_time(end) / 1e3) / 1e9, 1)


def hf_model(name: str, dtype: torch.dtype, layers: int | None = None):
    """A random HF model of the shape on the GPU, and its checkpoint directory (with the carried tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(SHAPES[name], **COMMON)
    arch = spec.pop("arch")
    if layers:
        spec["num_hidden_layers"] = layers
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **spec), dtype=dtype).eval()
    path = WORK / f"{name}-{layers or 'full'}-{str(dtype)[6:]}"
    model.save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(CARRY / f, path / f)
    return model, path


def build(hf_dir: Path, precision: str) -> Path:
    from sedac.builder import build_engine
    from sedac.config import BuildConfig

    engine = WORK / f"{hf_dir.name}-{precision}"
    config = BuildConfig(precision=precision, max_batch_size=CONCURRENT, max_seq_len=1024, max_num_tokens=8192)
    build_engine(str(hf_dir), engine, config)
    return engine


def streamed_bytes(engine: Path, tied: bool) -> int:
    """Bytes a batch-1 decode step reads: every weight but the embedding table (one row of it), unless tied."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(engine / "model.safetensors"), "pt") as f:
        for key in f.keys():
            if key.startswith("embed_tokens") and not tied:
                continue
            piece = f.get_slice(key)
            count = 1
            for n in piece.get_shape():
                count *= n
            total += count * torch.empty(0, dtype=_dtype(piece.get_dtype())).element_size()
    return total


def _dtype(name: str) -> torch.dtype:
    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I8": torch.int8, "U8": torch.uint8}[
        name
    ]


def prompts(vocab: int, n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, min(vocab, 49152), (PROMPT_LEN,), generator=g).tolist() for _ in range(n)]


def ours(engine: Path, batch: list[list[int]], enforce_eager: bool = False) -> dict:
    from sedac import LLM, SamplingParams

    llm = LLM(str(engine), device="cuda", gpu_memory_utilization=0.45, enforce_eager=enforce_eager)
    greedy = SamplingParams(max_tokens=DECODE_TOKENS, temperature=0.0, ignore_eos=True)
    llm.generate(batch[:2], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))  # warm-up
    rates = []
    for p in batch[:3]:
        m = llm.generate([p], greedy)[0].metrics
        rates.append((DECODE_TOKENS - 1) / (m.finish_time - m.first_token_time))
    graphs = llm.engine.runner.graphs
    step_ms = _replay_ms(graphs.graphs[1]) if graphs else None  # the GPU's share of a batch-1 step
    torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate(batch, greedy)
    elapsed = time.perf_counter() - start
    row = {
        "batch1_decode_tok_s": round(sorted(rates)[1], 1),
        "batch1_graph_replay_ms": step_ms,
        f"concurrent{len(batch)}_tok_s": round(sum(len(o.outputs[0].token_ids) for o in outs) / elapsed, 1),
        "graph_replays": llm.engine.runner.graphs.replays if llm.engine.runner.graphs else 0,
        "kv_cache_gib": round(llm.engine.runner.kv_cache_bytes / 2**30, 2),
    }
    tokens = [o.outputs[0].token_ids for o in outs]
    del llm, outs
    gc.collect()
    torch.cuda.empty_cache()
    return row, tokens


def _replay_ms(graph) -> float:
    """Milliseconds one replay of the batch-1 decode graph takes on the GPU (its last inputs, rewritten alike)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(20):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) / 20, 3)


@torch.inference_mode()
def hf_generate(model, batch: list[list[int]], new_tokens: int, until_eos: bool = False):
    """-> (seconds, generated ids); exactly new_tokens each unless until_eos (then as our engine stops)."""
    ids = torch.tensor(batch, device="cuda")
    least = None if until_eos else new_tokens
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=least, do_sample=False
    )
    torch.cuda.synchronize()
    return time.perf_counter() - start, out[:, ids.shape[1] :].tolist()


def hf_figures(model, batch: list[list[int]]) -> dict:
    hf_generate(model, batch[:1], 4)  # warm-up
    first, _ = hf_generate(model, batch[:1], 1)
    full, _ = hf_generate(model, batch[:1], DECODE_TOKENS)
    batched, outs = hf_generate(model, batch, DECODE_TOKENS)
    return {
        "hf_batch1_decode_tok_s": round((DECODE_TOKENS - 1) / (full - first), 1),
        f"hf_batched{len(batch)}_tok_s": round(sum(map(len, outs)) / batched, 1),
    }


def bench_shape(name: str, bandwidth: float | None) -> dict:
    dtype = torch.float32 if "fp32" in BENCH[name] else torch.bfloat16
    model, hf_dir = hf_model(name, dtype)
    batch = prompts(SHAPES[name]["vocab_size"], CONCURRENT)
    rows, reference = {}, None
    for precision in BENCH[name]:
        engine = build(hf_dir, precision)
        row, tokens = ours(engine, batch)
        reference = reference or tokens
        row["agreement_vs_first"] = agreement(tokens, reference)
        if bandwidth:
            ideal = bandwidth * 1e9 / streamed_bytes(engine, SHAPES[name]["tie_word_embeddings"])
            row["roofline_tok_s"], row["roofline_fraction"] = (
                round(ideal, 1),
                round(row["batch1_decode_tok_s"] / ideal, 3),
            )
        rows[precision] = row
        if name == "smollm2-135m" and precision == BENCH[name][0]:  # CUDA graphs' effect, where a reload is cheap
            row["eager_batch1_decode_tok_s"] = ours(engine, batch[:4], enforce_eager=True)[0]["batch1_decode_tok_s"]
        shutil.rmtree(engine)
        print(name, precision, row, flush=True)
    hf = hf_figures(model, batch)
    first = rows[BENCH[name][0]]
    hf["ours_vs_hf_batch1"] = round(first["batch1_decode_tok_s"] / hf["hf_batch1_decode_tok_s"], 2)
    hf[f"ours_vs_hf_batched{CONCURRENT}"] = round(
        first[f"concurrent{CONCURRENT}_tok_s"] / hf[f"hf_batched{CONCURRENT}_tok_s"], 2
    )
    del model
    shutil.rmtree(hf_dir)
    gc.collect()
    torch.cuda.empty_cache()
    return {"precisions": rows, "hf_eager": hf}


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for p, q in zip(a, b) for x, y in zip(p, q)]
    return round(sum(x == y for x, y in pairs) / max(1, len(pairs)), 4)


def fp32_parity(name: str, layers: int | None) -> dict:
    """Greedy tokens of the fp32 engine against HF generate on the same weights, TF32 off."""
    from sedac import LLM, SamplingParams

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model, hf_dir = hf_model(name, torch.float32, layers)
    batch = prompts(SHAPES[name]["vocab_size"], 4)
    theirs = [hf_generate(model, [p], 32, until_eos=True)[1][0] for p in batch]
    del model
    engine = build(hf_dir, "fp32")
    llm = LLM(str(engine), device="cuda", gpu_memory_utilization=0.45)
    mine = [o.outputs[0].token_ids for o in llm.generate(batch, SamplingParams(max_tokens=32, temperature=0.0))]
    del llm
    shutil.rmtree(engine)
    shutil.rmtree(hf_dir)
    gc.collect()
    torch.cuda.empty_cache()
    return {
        "layers": layers or SHAPES[name]["num_hidden_layers"],
        "identical": mine == theirs,
        "agreement": agreement(mine, theirs),
    }


def prepare_carry() -> None:
    """Here, before the device call: .gpu_carry/ with the gguf package (absent there), the SmolLM2 tokenizer
    files and the tiny SEDAC engine test_cuda uses (its build reads ShareGPT, absent there)."""
    import gguf
    from transformers import AutoTokenizer

    from sedac.builder import SedacOptions, build_engine
    from sedac.builder.sources import smollm2_gguf_path
    from sedac.config import BuildConfig
    from tests.conftest import TINY_SEDAC, make_tiny_hf_model

    shutil.rmtree(CARRY, ignore_errors=True)
    shutil.copytree(Path(gguf.__file__).parent, CARRY / "gguf")
    gguf_file = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    tokenizer.save_pretrained(CARRY)
    hf = make_tiny_hf_model(WORK, "llama", tokenizer)
    config = BuildConfig(max_batch_size=8, max_seq_len=256, max_num_tokens=256, kv_block_size=4)
    build_engine(str(hf), CARRY / "tiny-sedac", config, SedacOptions(**TINY_SEDAC))
    shutil.rmtree(WORK, ignore_errors=True)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    import transformers
    import triton

    RESULTS.update(
        gpu=torch.cuda.get_device_name(0),
        torch=torch.__version__,
        triton=triton.__version__,
        transformers=transformers.__version__,
    )
    section("cuda_tests")(cuda_tests)()
    bandwidth = section("copy_bandwidth_GBps")(copy_bandwidth)()
    section("bench_llama-3.1-8b")(bench_shape)("llama-3.1-8b", bandwidth)
    section("parity_fp32_smollm2-135m")(fp32_parity)("smollm2-135m", None)
    section("bench_smollm2-135m")(bench_shape)("smollm2-135m", bandwidth)
    section("parity_fp32_llama-3.1-8b_2_layers")(fp32_parity)("llama-3.1-8b", 2)
    section("bench_qwen2.5-7b")(bench_shape)("qwen2.5-7b", bandwidth)
    section("parity_fp32_qwen2.5-7b_2_layers")(fp32_parity)("qwen2.5-7b", 2)
    RESULTS["seconds"] = round(time.perf_counter() - STARTED, 1)
    save()
    shutil.rmtree(WORK, ignore_errors=True)
    failed = RESULTS["errors"] or (RESULTS.get("cuda_tests") or {}).get("returncode") != 0
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    prepare_carry() if sys.argv[1:] == ["--carry"] else main()
