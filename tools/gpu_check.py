"""One prepared GPU check for a lent machine (tools/gpu_check.sh runs it): engines of SmolLM2's shapes with
random weights (no weights travel there) at fp32, fp16, bf16, int8 and int4, built and run on CUDA.

Per precision: batch-1 decode tok/s (2 prompts x 128 greedy tokens), 32-concurrent output tok/s, and greedy
agreement with the fp32 engine on the same prompts; for fp32 also token agreement with HF transformers'
generate on the same weights on the GPU. Each section records its error instead of stopping the run.
Writes $OUT/gpu_check.json.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CARRY = ROOT / ".gpu_carry"  # the tokenizer files (and packages the machine lacks), carried beside the tree
OUT = Path(os.environ.get("OUT", "/tmp/gpu_check"))
WORK = Path(tempfile.mkdtemp(prefix="gpu_check_"))  # the random model and its engines (not sent back)
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")
SHAPES = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    rope_theta=100000.0,
)


def random_hf_model(path: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **SHAPES), dtype=torch.float32)
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (path / name).write_bytes((CARRY / name).read_bytes())
    return path


def timed(llm, prompts, params):
    torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    torch.cuda.synchronize()
    return time.perf_counter() - start, outs


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for p, q in zip(a, b) for x, y in zip(p, q)]
    return round(sum(x == y for x, y in pairs) / max(1, len(pairs)), 4)


def run_precision(hf_dir: Path, precision: str, prompts, reference) -> dict:
    from sedac import LLM, SamplingParams
    from sedac.builder import build_engine
    from sedac.config import BuildConfig

    engine = WORK / f"engine-{precision}"
    start = time.perf_counter()
    build_engine(
        str(hf_dir), engine, BuildConfig(precision=precision, max_batch_size=32, max_seq_len=512, max_num_tokens=4096)
    )
    built = time.perf_counter() - start
    llm = LLM(str(engine), device="cuda")
    params = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))  # warm-up
    batch1 = [timed(llm, [p], params) for p in prompts[:2]]
    concurrent_s, outs = timed(llm, prompts, params)
    tokens = [o.outputs[0].token_ids for o in outs]
    row = {
        "build_s": round(built, 1),
        "batch1_tok_s": round(sum(len(o[0].outputs[0].token_ids) for _, o in batch1) / sum(t for t, _ in batch1), 1),
        "concurrent32_tok_s": round(sum(map(len, tokens)) / concurrent_s, 1),
        "agreement_vs_fp32": agreement(tokens, reference) if reference else 1.0,
    }
    del llm
    torch.cuda.empty_cache()
    return row, tokens


def hf_agreement(hf_dir: Path, prompts, ours) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).cuda().eval()
    theirs = []
    with torch.inference_mode():
        for p in prompts[:4]:
            ids = torch.tensor([p], device="cuda")
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False)
            theirs.append(out[0, len(p) :].tolist())
    return agreement([o[:32] for o in ours[:4]], theirs)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    results = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "precisions": {}, "errors": {}}
    hf_dir = random_hf_model(WORK / "hf-random")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, SHAPES["vocab_size"], (128,), generator=g).tolist() for _ in range(32)]
    reference = None
    for precision in PRECISIONS:
        try:
            row, tokens = run_precision(hf_dir, precision, prompts, reference)
            results["precisions"][precision] = row
            if precision == "fp32":
                reference = tokens
                row["agreement_vs_hf_generate"] = hf_agreement(hf_dir, prompts, tokens)
        except Exception:
            results["errors"][precision] = traceback.format_exc()[-1500:]
        print(json.dumps(results["precisions"].get(precision) or results["errors"][precision]), flush=True)
    (OUT / "gpu_check.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
