"""`sedac-run bench --precisions fp32,fp16,bf16,int8,int4,gguf`: one engine per precision of the same model, in one run.

The fp32 `--engine` is the reference; each other precision's engine lies beside it (`ENGINE-PRECISION`), built
from the same source when missing. All engines are loaded together and the batch-1 prompts interleaved across
them, so they share the machine's drifts in speed. Per precision, on held-out ShareGPT prompts and answers
(bench split): batch-1 output and decode (1 / TPOT) tok/s and N-concurrent output tok/s (greedy, fixed
output length), prefill tok/s of one 1,024-token prompt (the answers' tokens) and decode tok/s after it
(attention over a long context), teacher-forced greedy
agreement with the fp32 engine and perplexity on the answers, engine size on disk, resident weight bytes.
With --llama-cpp DIR, llama.cpp's llama-bench runs on the same GGUF and its conversions, a batch-1 decode
round of theirs after each prompt of ours (sedac.cli.llama_cpp_baseline), and the report sets our fastest
batch-1 decode against theirs.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import click
import torch

from sedac.builder.datasets import sharegpt_prompts
from sedac.builder.exit_training import teacher_pass
from sedac.cli.report import grouped_bars, labelled_scatter, write_report
from sedac.config import PRECISIONS, WEIGHTS_FILE, BuildConfig, EngineConfig
from sedac.models.layers import Linear

KV_CACHE_BYTES = 1 << 30  # per engine: all of them stay loaded


def run_precision_bench(
    engine,
    device,
    precisions,
    num_prompts,
    output_len,
    batch1_prompts,
    max_prompt_len,
    report,
    kv_cache_dtype: str = "auto",
    answers: int = 8,
    answer_len: int = 256,
    prefill_len: int = 1024,
    long_decode_len: int = 64,
    llama_cpp: str | None = None,
) -> dict:
    from sedac import LLM, SamplingParams
    from sedac.cli.sedac_bench import held_out_answers

    llms = {
        p: LLM(str(path), device=device, kv_cache_memory=KV_CACHE_BYTES, kv_cache_dtype=kv_cache_dtype)
        for p, path in precision_engines(Path(engine), precisions).items()
    }
    tokenizer = llms["fp32"].tokenizer
    prompts = sharegpt_prompts(tokenizer, "bench", max(num_prompts, batch1_prompts), max_prompt_len)
    texts = [tokenizer.encode(t, add_special_tokens=False)[:answer_len] for t in held_out_answers(answers)]
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    for llm in llms.values():
        llm.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0.0))  # warm-up
    baseline = _llama_cpp(llama_cpp, Path(engine)) if llama_cpp else None
    batch1 = {p: [0, 0.0, 0.0] for p in llms}  # tokens, seconds, decode seconds (TPOT x tokens)
    for prompt in prompts[:batch1_prompts]:
        for p, llm in llms.items():
            dt, outs = _timed(llm, [prompt], params)
            batch1[p][0] += len(outs[0].token_ids)
            batch1[p][1] += dt
            batch1[p][2] += outs[0].metrics.tpot * (len(outs[0].token_ids) - 1)
        if baseline:
            baseline.decode_round(output_len)
    theirs = baseline.rows(prefill_len) if baseline else {}
    long_prompt = [t for text in texts for t in text][:prefill_len]
    prefill = {p: _timed(llm, [long_prompt], SamplingParams(max_tokens=1))[0] for p, llm in llms.items()}
    long_params = SamplingParams(max_tokens=long_decode_len, temperature=0.0, ignore_eos=True)
    long_decode = {p: _timed(llm, [long_prompt], long_params)[1][0].metrics.tpot for p, llm in llms.items()}
    forced = {p: _teacher_forced(llm, texts) for p, llm in llms.items()}  # (greedy choices, mean NLL)
    results = {
        "engine": str(engine),
        "device": str(llms["fp32"].engine.runner.device),
        "kv_cache_dtype": kv_cache_dtype,
        "threads": torch.get_num_threads(),
        "output_len": output_len,
        "num_prompts": num_prompts,
        "held_out_tokens": sum(len(t) - 1 for t in texts),
        "precisions": {},
    }
    for p, llm in llms.items():
        dt, outs = _timed(llm, prompts[:num_prompts], params)
        argmax, nll = forced[p]
        results["precisions"][p] = {
            "batch1_tok_s": round(batch1[p][0] / batch1[p][1], 2),
            "batch1_decode_tok_s": round((batch1[p][0] - len(prompts[:batch1_prompts])) / batch1[p][2], 2),
            f"concurrent{num_prompts}_tok_s": round(sum(len(o.token_ids) for o in outs) / dt, 2),
            f"prefill{len(long_prompt)}_tok_s": round(len(long_prompt) / prefill[p], 1),
            f"decode_after{len(long_prompt)}_tok_s": round(1 / long_decode[p], 1),
            "agreement_vs_fp32": round(float((argmax == forced["fp32"][0]).float().mean()), 4),
            "perplexity": round(math.exp(nll), 3),
            "engine_mb": round((Path(llm.engine.engine_dir) / WEIGHTS_FILE).stat().st_size / 2**20, 1),
            "resident_weight_mb": round(resident_weight_bytes(llm.engine.runner.model) / 2**20, 1),
        }
    base = results["precisions"]["fp32"]
    for r in results["precisions"].values():
        r["batch1_decode_vs_fp32"] = round(r["batch1_decode_tok_s"] / base["batch1_decode_tok_s"], 2)
    if theirs:
        ours = max(r["batch1_decode_tok_s"] for r in results["precisions"].values())
        results["llama.cpp"] = theirs
        results["fastest_vs_llama_cpp_fastest"] = round(
            ours / max(r["batch1_decode_tok_s"] for r in theirs.values()), 2
        )
    _write(results, report)
    return results


def _llama_cpp(bin_dir: str, reference: Path):
    """llama.cpp on the GGUF the fp32 engine was built from (conversions kept in ENGINE-llama.cpp)."""
    from sedac.cli.llama_cpp_baseline import LlamaCppBaseline

    source = json.loads((reference / "build_report.json").read_text())["source"]
    if not source.startswith("gguf:"):
        raise ValueError(f"--llama-cpp needs an engine built from a GGUF file; {reference} is from {source}")
    return LlamaCppBaseline(
        bin_dir,
        Path(source.split(":", 1)[1]),
        reference.with_name(f"{reference.name}-llama.cpp"),
        torch.get_num_threads(),
    )


def precision_engines(reference: Path, precisions: list[str]) -> dict[str, Path]:
    """{precision: engine dir}, fp32 first: the reference itself, the others beside it, built when missing."""
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise ValueError(f"--precisions: unknown {', '.join(unknown)}; supported: {', '.join(PRECISIONS)}")
    config = EngineConfig.load(reference)
    if config.build.precision != "fp32":
        raise ValueError(f"--precisions compares against an fp32 --engine; {reference} is {config.build.precision}")
    engines = {"fp32": reference}
    for p in [p for p in precisions if p != "fp32"]:
        engines[p] = reference.with_name(f"{reference.name}-{p}")
        if not (engines[p] / "config.json").is_file() or EngineConfig.load(engines[p]).build.precision != p:
            from sedac.builder import build_engine

            source = json.loads((reference / "build_report.json").read_text())["source"].split(":", 1)[1]
            click.echo(f"building {engines[p]} from {source}", err=True)
            build_engine(source, engines[p], BuildConfig(**{**vars(config.build), "precision": p}))
    return engines


def resident_weight_bytes(model) -> int:
    """Bytes of every weight tensor the model keeps (packed panels, int8 copies, block codes and scales,
    the greedy screen's bounds), each counted once; KV caches and rotary tables excluded."""
    tensors = [t for m in model.modules() for t in m._parameters.values()]
    tensors += [
        t
        for m in model.modules()
        if isinstance(m, Linear)
        for t in (m.packed, *(m.int8 or ()), *(m.blocks.tensors() if m.blocks else ()))
    ]
    if model.embed_blocks is not None:
        tensors += model.embed_blocks.tensors()
    if model.greedy_screen is not None:
        tensors.append(model.greedy_screen.row_bound)
    unique = {t.data_ptr(): t for t in tensors if t is not None}
    return sum(t.numel() * t.element_size() for t in unique.values())


def _timed(llm, prompts, params):
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    return time.perf_counter() - start, outs


@torch.inference_mode()
def _teacher_forced(llm, texts: list[list[int]]) -> tuple[torch.Tensor, float]:
    """Greedy choice at every position of the texts [N] and the mean next-token NLL."""
    model, choices, nll, count = llm.engine.runner.model, [], 0.0, 0
    for ids in texts:
        _, final = teacher_pass(model, ids, [])
        logp = model.logits(final[:-1]).float().log_softmax(-1)  # [T-1, V]
        target = torch.tensor(ids[1:], device=logp.device)
        choices.append(logp.argmax(-1).cpu())
        nll -= logp[torch.arange(len(target)), target].sum().item()
        count += len(target)
    return torch.cat(choices), nll / count


def _write(results: dict, report) -> None:
    keys = list(next(iter(results["precisions"].values())))
    title = (
        f"sedac-run bench --precisions: {results['engine']} on {results['device']} ({results['threads']} "
        f"threads, KV cache {results['kv_cache_dtype']}, {results['output_len']} greedy tokens; agreement and "
        f"perplexity teacher-forced on {results['held_out_tokens']} held-out tokens)"
    )
    lines = ["| precision | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for p, r in results["precisions"].items():
        lines.append(f"| {p} | " + " | ".join(str(r[k]) for k in keys) + " |")
    if "llama.cpp" in results:
        theirs = results["llama.cpp"]
        columns = list(next(iter(theirs.values())))
        lines += [
            "",
            f"llama.cpp's llama-bench on the same GGUF (same threads, same run): our fastest batch-1 decode "
            f"is {results['fastest_vs_llama_cpp_fastest']}x llama.cpp's fastest.",
            "",
            "| llama.cpp format | " + " | ".join(columns) + " |",
            "|---" * (len(columns) + 1) + "|",
        ]
        lines += [f"| {name} | " + " | ".join(str(r[k]) for k in columns) + " |" for name, r in theirs.items()]
    write_report(report, title, results, "\n".join(lines), figures(results))


def figures(results: dict) -> dict:
    """Decode throughput per precision (batch 1, N concurrent; llama.cpp's formats beside ours when measured),
    and batch-1 speed against agreement with fp32."""
    rows, concurrent = results["precisions"], f"concurrent{results['num_prompts']}_tok_s"
    everyone = {**rows, **results.get("llama.cpp", {})}
    throughput = grouped_bars(
        "Decode throughput per precision",
        "precision (weight format)",
        "output tokens/s",
        list(everyone),
        {
            "batch 1 (decode)": [r["batch1_decode_tok_s"] for r in everyone.values()],
            f"{results['num_prompts']} concurrent": [r.get(concurrent) for r in everyone.values()],
        },
    )
    tradeoff = labelled_scatter(
        "Speed vs quality per precision",
        "teacher-forced agreement with fp32 (fraction)",
        "batch-1 output tokens/s",
        {"precision": [(p, r["agreement_vs_fp32"], r["batch1_tok_s"]) for p, r in rows.items()]},
    )
    return {"throughput": throughput, "speed_vs_quality": tradeoff}
