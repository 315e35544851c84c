"""Probe: which confidence signal of the draft copies (int8 or int4, the build's choice) best tells
their agreeing tokens from their mistakes?

    .venv/bin/python tools/draft_confidence_probe.py --engine engines/smollm2-sedac [--prompts 48]

On the model's own greedy answers to held-out (calib) prompts, teacher-forced like the build's
calibration, each position gets the full model's argmax and the draft copies' distribution. For each
signal (entropy, max probability, top-2 probability margin) it prints the share of tokens that may
exit with the overall disagreement at most 0.5%, 1% and 2%, the threshold picked on these same tokens
(an upper bound on what Learn-then-Test's held-out split grants). The build uses the best: the margin.
"""

from __future__ import annotations

import click
import torch

from sedac import LLM, SamplingParams
from sedac.builder import exit_training as et
from sedac.builder.datasets import sharegpt_prompts

RISKS = (0.005, 0.01, 0.02)


def exit_share(confidence: torch.Tensor, agree: torch.Tensor, risk: float) -> float:
    """Largest share of most-confident tokens whose errors stay within risk of all tokens."""
    errors = (~agree[confidence.argsort(descending=True)]).float().cumsum(0) / len(agree)
    ok = (errors <= risk).nonzero()
    return (int(ok.max()) + 1) / len(agree) if len(ok) else 0.0


@torch.inference_mode()
def signals(llm: LLM, prompts) -> tuple[dict, torch.Tensor]:
    model, rows, agree = llm.engine.runner.model, [], []
    for prompt, out in zip(prompts, llm.generate(prompts, SamplingParams(max_tokens=128, temperature=0.0))):
        ids, first = prompt + list(out.token_ids), len(prompt) - 1
        _, full = et.teacher_pass(model, ids, [])
        _, draft = et.teacher_pass(model, ids, [], draft=True)
        logits = model.logits(draft[first:], draft=True).float()
        top2 = logits.softmax(-1).topk(2, -1).values
        rows.append(torch.stack([-torch.ops.sedac.entropy(logits), top2[:, 0], torch.ops.sedac.margin(logits)], 1))
        agree.append(logits.argmax(-1) == model.logits(full[first:]).argmax(-1))
    table = torch.cat(rows)
    return {"entropy": table[:, 0], "max probability": table[:, 1], "top-2 margin": table[:, 2]}, torch.cat(agree)


@click.command()
@click.option("--engine", required=True, help="an engine built with --sedac (it holds the draft copies)")
@click.option("--prompts", type=int, default=48, show_default=True)
def main(engine, prompts):
    llm = LLM(engine, device="cpu")
    by_signal, agree = signals(llm, sharegpt_prompts(llm.tokenizer, "calib", prompts, 384))
    click.echo(f"{len(agree)} tokens, draft agreement {agree.float().mean():.4f}")
    click.echo("signal: exit share at overall risk " + ", ".join(f"{r:.1%}" for r in RISKS))
    for name, confidence in by_signal.items():
        click.echo(f"{name}: " + ", ".join(f"{exit_share(confidence, agree, r):.3f}" for r in RISKS))


if __name__ == "__main__":
    main()
