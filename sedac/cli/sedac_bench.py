"""`sedac-run bench --sedac-modes off,lossless,lossy`: the SEDAC modes side by side, in one run.

Per mode, on held-out ShareGPT prompts (bench split, never used to train or calibrate): decode
tokens/s at batch 1 and batch 8 (greedy, fixed output length) and the ratio to `off`; agreement
with the full model (each generated token vs the full model's argmax on the same prefix, scored by
one teacher-forced pass over the mode's own output), also on HumanEval prompts (code: a distribution
shift from the ShareGPT chats calibration saw, where the guarantee is not claimed but measured);
exact match with `off`'s output; perplexity on held-out assistant text; skip ratio, layers per token,
draft acceptance.
"""

from __future__ import annotations

import math
import re
import statistics
import time

import torch

from sedac.builder.datasets import humaneval_prompts, sharegpt_conversations, sharegpt_prompts
from sedac.builder.exit_training import teacher_pass
from sedac.cli.report import labelled_scatter, write_report


def run_sedac_bench(
    engine,
    device,
    modes,
    output_len,
    batch1_prompts,
    batch_size,
    max_prompt_len,
    agreement,
    report,
    kv_fill="deferred",
    lossy_exit=None,
):
    from sedac import LLM, SamplingParams

    llm = LLM(engine, device=device, sedac_kv_fill=kv_fill, sedac_lossy_exit=lossy_exit)
    if any(m != "off" for m in modes) and llm.engine.config.sedac is None:
        raise ValueError(f"{engine} was built without --sedac; rebuild it with sedac-build --sedac")
    prompts = sharegpt_prompts(llm.tokenizer, "bench", max(batch1_prompts, batch_size), max_prompt_len)
    code = humaneval_prompts(llm.tokenizer, batch_size, llm.engine.config.build.max_seq_len - output_len)
    params = {
        m: SamplingParams(
            max_tokens=output_len, temperature=0.0, ignore_eos=True, sedac_mode=m, sedac_agreement=agreement
        )
        for m in modes
    }
    for mode in modes:  # warm-up: a mode's first call at a batch size pays one-off costs (the custom
        for batch in (prompts[:1], prompts[:batch_size]):  # ops' first dispatch, per-shape allocations)
            llm.generate(batch, SamplingParams(max_tokens=4, temperature=0.0, sedac_mode=mode))
    results = {
        "engine": str(engine),
        "device": str(llm.engine.runner.device),
        "threads": torch.get_num_threads(),
        "output_len": output_len,
        "agreement_target": agreement,
        "kv_fill": kv_fill,
        "lossy_exit": llm.engine.sedac.lossy_exit,
        "modes": {},
    }
    # Interleaved, prompt by prompt, so the modes share the machine's drifts in speed (a noisy VM).
    b1 = {m: [] for m in modes}
    for p in prompts[:batch1_prompts]:
        for mode in modes:
            b1[mode].append(_timed(llm, [p], params[mode]))
    b8 = {m: _timed(llm, prompts[:batch_size], params[m]) for m in modes}
    outputs = {}
    for mode in modes:
        outs = [o for _, o in b1[mode]] + b8[mode][1]
        outputs[mode] = [o.token_ids for o in outs]
        results["modes"][mode] = {
            "batch1_tok_s": round(sum(len(o.token_ids) for _, o in b1[mode]) / sum(dt for dt, _ in b1[mode]), 2),
            f"batch{batch_size}_tok_s": round(sum(len(o.token_ids) for o in b8[mode][1]) / b8[mode][0], 2),
            "agreement": _agreement(llm, prompts[:batch1_prompts] + prompts[:batch_size], outputs[mode]),
            **_distribution_shift(llm, code, params[mode]),
            "skip_ratio": round(statistics.mean(o.metrics.skip_ratio for o in outs), 4),
            "layers_per_token": round(statistics.mean(o.metrics.layers_per_token for o in outs), 2),
            "acceptance_rate": _mean([o.metrics.acceptance_rate for o in outs]),
            "perplexity": _perplexity(llm, mode, agreement),
        }
    for mode, r in results["modes"].items():
        base = results["modes"].get("off")
        if base:
            for key in ("batch1_tok_s", f"batch{batch_size}_tok_s"):
                r[key.replace("tok_s", "ratio")] = round(r[key] / base[key], 3)
        if "off" in outputs:
            r["identical_to_off"] = sum(a == b for a, b in zip(outputs[mode], outputs["off"])) / len(outputs["off"])
    _write(results, report)
    return results


def _distribution_shift(llm, prompts, params) -> dict:
    """Agreement and skip ratio on prompts unlike calibration's, each decoded alone (batch 1, where the
    exits and drafts run)."""
    outs = [llm.generate([p], params)[0] for p in prompts]
    return {
        "humaneval_agreement": _agreement(llm, prompts, [o.token_ids for o in outs]),
        "humaneval_skip_ratio": round(statistics.mean(o.metrics.skip_ratio for o in outs), 4),
    }


def _timed(llm, prompts, params):
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    return time.perf_counter() - start, outs if len(prompts) > 1 else outs[0]


def _mean(values):
    values = [v for v in values if v is not None]
    return round(statistics.mean(values), 4) if values else None


@torch.inference_mode()
def _agreement(llm, prompts, generated) -> float:
    """Fraction of generated tokens equal to the full model's greedy choice on the same prefix."""
    model, agree, total = llm.engine.runner.model, 0, 0
    for prompt, tokens in zip(prompts, generated):
        ids = list(prompt) + list(tokens)
        _, final = teacher_pass(model, ids, [])
        best = model.logits(final[len(prompt) - 1 : -1]).argmax(-1)
        agree += int((best == torch.tensor(tokens)).sum())
        total += len(tokens)
    return round(agree / total, 4)


@torch.inference_mode()
def _perplexity(llm, mode, agreement, documents: int = 8, max_len: int = 256, floor: float = 1e-6) -> dict:
    """Teacher-forced perplexity of held-out assistant answers. Lossy: each position takes its exit's
    distribution where the calibrated threshold lets it exit; an exit head gives 0 to tokens outside
    its vocabulary, so probabilities are floored at 1e-6."""
    engine = llm.engine
    level = engine.sedac.exit_controller.level(agreement) if mode == "lossy" else None
    exits = _precision_exits if engine.sedac.lossy_exit == "precision" else _depth_exits
    nll, count, exited = 0.0, 0, 0
    for messages in held_out_answers(documents):
        ids = llm.tokenizer.encode(messages, add_special_tokens=False)[:max_len]
        logp, done = exits(engine, ids, level)
        target = torch.tensor(ids[1:])
        nll -= logp[torch.arange(len(target)), target].clamp(min=math.log(floor)).sum().item()
        count += len(target)
        exited += int(done.sum())
    return {"ppl": round(math.exp(nll / count), 3), "tokens": count, "exited": round(exited / count, 4)}


def _depth_exits(engine, ids, level):
    """-> (log-probs [T-1, V], exited [T-1]): each position takes its first exit whose entropy is under
    the threshold (the KV stays the full model's: this scores exit decisions alone)."""
    model, layers = engine.runner.model, (engine.config.sedac or {}).get("lossy_layers", [])
    states, final = teacher_pass(model, ids, layers)
    logp = torch.log_softmax(model.logits(final[:-1]).float(), -1)
    done = torch.zeros(len(ids) - 1, dtype=torch.bool)
    taus = engine.sedac.exit_controller.thresholds(level, len(layers)) if engine.sedac.exit_controller else []
    for layer, tau in zip(layers, taus):
        head = engine.runner.exit_heads[layer]
        reduced = head(states[layer][:-1]).float()
        go = (torch.ops.sedac.entropy(reduced) <= tau) & ~done
        logp[go] = torch.log_softmax(head.full_vocab_logits(reduced[go], logp.shape[1]), -1)
        done |= go
    return logp, done


def _precision_exits(engine, ids, level):
    """-> (log-probs [T-1, V], exited [T-1]): positions whose draft distribution is confident take it.
    The draft pass runs the whole text on draft K/V (at run time only exited tokens' K/V are the draft's)."""
    model = engine.runner.model
    _, final = teacher_pass(model, ids, [])
    logp = torch.log_softmax(model.logits(final[:-1]).float(), -1)
    _, draft_final = teacher_pass(model, ids, [], draft=True)
    draft_logits = model.logits(draft_final[:-1], draft=True).float()
    done = 1 - torch.ops.sedac.margin(draft_logits) <= engine.sedac.exit_controller.thresholds(level, 1)[0]
    logp[done] = torch.log_softmax(draft_logits[done], -1)
    return logp, done


def held_out_answers(count):
    texts = []
    for messages in sharegpt_conversations("bench"):
        answer = next((m["content"] for m in messages if m["role"] == "assistant"), None)
        if answer:
            texts.append(answer)
            if len(texts) == count:
                break
    return texts


def _write(results: dict, report) -> None:
    keys = [k for k in next(iter(results["modes"].values())) if k != "perplexity"]
    title = (
        f"sedac-run bench --sedac-modes: {results['engine']} on {results['device']} "
        f"({results['threads']} threads, {results['output_len']} greedy tokens, agreement target "
        f"{results['agreement_target']}, lossy exit {results['lossy_exit']}"
        + (f", KV fill {results['kv_fill']})" if results["lossy_exit"] == "depth" else ")")
    )
    lines = ["| mode | " + " | ".join(keys) + " | perplexity |", "|---" * (len(keys) + 2) + "|"]
    for mode, r in results["modes"].items():
        lines.append(f"| {mode} | " + " | ".join(str(r.get(k)) for k in keys) + f" | {r['perplexity']['ppl']} |")
    write_report(report, title, results, "\n".join(lines), figures(results))


def figures(results: dict) -> dict:
    """Per mode, decode tok/s against agreement with the full model; one series per workload (batch 1, batch N)."""
    modes = results["modes"]
    workloads = [k for k in next(iter(modes.values())) if re.fullmatch(r"batch\d+_tok_s", k)]
    series = {
        k.removesuffix("_tok_s").replace("batch", "batch "): [(m, r["agreement"], r[k]) for m, r in modes.items()]
        for k in workloads
    }
    return {
        "speed_vs_agreement": labelled_scatter(
            "SEDAC modes: speed vs agreement",
            "agreement with the full model's greedy token (fraction)",
            "output tokens/s",
            series,
        )
    }
