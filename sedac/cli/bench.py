"""`sedac-run bench`: our engine and HF transformers generate on the same prompts, in one run.

Metrics follow trtllm-bench: output tokens/s overall, per-user decode tokens/s, TTFT and TPOT.
Batch 1: each prompt alone, a fixed output length. Concurrent: all prompts at once, greedy, each
stopping at its own EOS (or the length cap); HF runs them as one padded batch, as generate does.
"""

from __future__ import annotations

import platform
import statistics
import time

import torch

from sedac.builder.datasets import sharegpt_prompts
from sedac.cli.report import grouped_bars, write_report


def run_bench(
    engine, device, num_prompts, output_len, batch1_prompts, max_prompt_len, baseline, report, kv_cache_dtype="auto"
):
    from sedac import LLM, SamplingParams

    llm = LLM(engine, device=device, kv_cache_dtype=kv_cache_dtype)
    prompts = sharegpt_prompts(llm.tokenizer, "bench", max(num_prompts, batch1_prompts), max_prompt_len)
    fixed = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    natural = SamplingParams(max_tokens=output_len, temperature=0.0)
    llm.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0.0))  # warm-up
    results = {
        "engine": str(engine),
        "device": str(llm.engine.runner.device),
        "host": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "output_len": output_len,
        "num_prompts": num_prompts,
        "batch1": {"sedac": _ours_batch1(llm, prompts[:batch1_prompts], fixed)},
        "concurrent": {"sedac": _ours_concurrent(llm, prompts[:num_prompts], natural)},
    }
    if baseline:
        from sedac.builder.hf_export import load_hf_model

        hf = load_hf_model(engine).to(llm.engine.runner.device)
        pad = (
            llm.tokenizer.pad_token_id
            if llm.tokenizer.pad_token_id is not None
            else llm.engine.config.model.eos_token_ids[0]
        )
        results["batch1"]["hf"] = _hf_batch1(hf, prompts[:batch1_prompts], output_len)
        results["concurrent"]["hf"] = _hf_concurrent(
            hf, prompts[:num_prompts], output_len, pad, set(llm.engine.config.model.eos_token_ids)
        )
        for key in ("batch1", "concurrent"):
            ours, theirs = results[key]["sedac"], results[key]["hf"]
            results[key]["ratio"] = round(ours["output_tok_s"] / theirs["output_tok_s"], 2)
        ours_tokens = results["concurrent"]["sedac"].pop("tokens")
        hf_tokens = results["concurrent"]["hf"].pop("tokens")
        results["concurrent"]["greedy_match"] = sum(a == b for a, b in zip(ours_tokens, hf_tokens)) / len(ours_tokens)
    else:
        results["concurrent"]["sedac"].pop("tokens")
    _write(results, report)


def _ours_batch1(llm, prompts, params) -> dict:
    tok_s, tpot, ttft, total, elapsed = [], [], [], 0, 0.0
    for p in prompts:
        start = time.perf_counter()
        out = llm.generate([p], params)[0]
        dt = time.perf_counter() - start
        total, elapsed = total + len(out.token_ids), elapsed + dt
        tok_s.append(len(out.token_ids) / dt)
        tpot.append(out.metrics.tpot)
        ttft.append(out.metrics.ttft)
    return {
        "output_tok_s": round(total / elapsed, 2),
        "decode_tok_s": round(1 / statistics.mean(tpot), 2),
        "ttft_ms": round(1000 * statistics.mean(ttft), 1),
        "tpot_ms": round(1000 * statistics.mean(tpot), 2),
    }


def _ours_concurrent(llm, prompts, params) -> dict:
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    dt = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outs)
    ttft = sorted(o.metrics.ttft for o in outs)
    tpot = sorted(o.metrics.tpot for o in outs if o.metrics.tpot)
    return {
        "output_tok_s": round(tokens / dt, 2),
        "generated_tokens": tokens,
        "seconds": round(dt, 2),
        "ttft_p50_ms": round(1000 * ttft[len(ttft) // 2], 1),
        "tpot_p50_ms": round(1000 * tpot[len(tpot) // 2], 2),
        "tokens": [o.token_ids for o in outs],
    }


@torch.inference_mode()
def _hf_batch1(model, prompts, output_len) -> dict:
    dev = model.device
    total, elapsed = 0, 0.0
    model.generate(torch.tensor([prompts[0]], device=dev), max_new_tokens=4, do_sample=False)  # warm-up
    for p in prompts:
        ids = torch.tensor([p], device=dev)
        start = time.perf_counter()
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=output_len,
            min_new_tokens=output_len,
            do_sample=False,
        )
        elapsed += time.perf_counter() - start
        total += out.shape[1] - len(p)
    return {"output_tok_s": round(total / elapsed, 2)}


@torch.inference_mode()
def _hf_concurrent(model, prompts, output_len, pad_id, eos_ids) -> dict:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=model.device)  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=output_len, do_sample=False, pad_token_id=pad_id)
    dt = time.perf_counter() - start
    tokens = [_until_eos(row, eos_ids) for row in out[:, width:].tolist()]
    generated = sum(map(len, tokens))
    return {
        "output_tok_s": round(generated / dt, 2),
        "generated_tokens": generated,
        "seconds": round(dt, 2),
        "tokens": tokens,
    }


def _until_eos(row: list[int], eos_ids: set[int]) -> list[int]:
    for i, t in enumerate(row):
        if t in eos_ids:
            return row[: i + 1]
    return row


def _workloads(results: dict) -> list[tuple[str, str]]:
    return [("batch1", "batch 1"), ("concurrent", f"{results['num_prompts']} concurrent")]


def _write(results: dict, report) -> None:
    title = f"sedac-run bench: {results['engine']} on {results['device']} ({results['threads']} threads)"
    lines = ["| workload | engine | output tok/s | ratio vs HF | details |", "|---|---|---|---|---|"]
    for key, label in _workloads(results):
        r = results[key]
        for name in ("sedac", "hf"):
            if name in r:
                details = ", ".join(f"{k}={v}" for k, v in r[name].items() if k != "output_tok_s")
                ratio = r.get("ratio", "") if name == "sedac" else ""
                lines.append(f"| {label} | {name} | {r[name]['output_tok_s']} | {ratio} | {details} |")
    if "greedy_match" in results["concurrent"]:
        lines += [
            "",
            f"Greedy outputs identical to HF on {results['concurrent']['greedy_match']:.0%} of concurrent requests.",
        ]
    write_report(report, title, results, "\n".join(lines), figures(results))


def figures(results: dict) -> dict:
    """Output tok/s per workload, sedac beside HF transformers when the baseline ran."""
    workloads = _workloads(results)
    engines = {"sedac": "sedac", "hf": "HF transformers"}
    series = {
        label: [results[key][name]["output_tok_s"] for key, _ in workloads]
        for name, label in engines.items()
        if name in results["batch1"]
    }
    return {
        "throughput": grouped_bars(
            f"Output throughput: {results['engine']}",
            "workload (requests in flight)",
            "output tokens/s",
            [label for _, label in workloads],
            series,
        )
    }
