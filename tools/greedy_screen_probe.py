"""Probe: how many tokens does the int8-screened greedy head compute exactly, and does it ever differ?

    .venv/bin/python tools/greedy_screen_probe.py --engine engines/smollm2 [--prompts 16]

Runs the engine's greedy decode on held-out (bench) ShareGPT prompts, one at a time, with every
LM-head call also run on the full fp32 head: prints the candidates per token the screen computed
exactly (mean, 99th percentile, max) and how many of its choices differ from the full head's
argmax (the screen's bound says none can).
"""

from __future__ import annotations

import click
import torch

from sedac import LLM, SamplingParams
from sedac.builder.datasets import sharegpt_prompts


@click.command()
@click.option("--engine", default="engines/smollm2", show_default=True)
@click.option("--prompts", default=16, show_default=True)
@click.option("--tokens", default=128, show_default=True)
def main(engine, prompts, tokens):
    llm = LLM(engine, device="cpu")
    model = llm.engine.runner.model
    screen = model.greedy_screen
    if screen is None:
        raise click.ClickException("no greedy screen: it runs on CPU at fp32 with the C++ kernels")
    counts, differ, screened = [], 0, screen.logits

    def checked(x):
        nonlocal differ
        out = screened(x)
        counts.extend((out > float("-inf")).sum(-1).tolist())
        differ += int((out.argmax(-1) != model.lm_head(x).argmax(-1)).sum())
        return out

    screen.logits = checked
    params = SamplingParams(max_tokens=tokens, temperature=0.0)
    for prompt in sharegpt_prompts(llm.tokenizer, "bench", prompts, 256):
        llm.generate([prompt], params)
    c = torch.tensor(counts, dtype=torch.float)
    print(
        f"{len(counts)} screened tokens: candidates mean {c.mean():.1f}, p99 {c.quantile(0.99):.0f}, "
        f"max {c.max():.0f} of {model.cfg.vocab_size}; choices differing from the full head: {differ}"
    )


if __name__ == "__main__":
    main()
