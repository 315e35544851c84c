"""Batch-1 decode floor: the engine's weight GEMVs alone, vs the engine and HF generate, in one run.

    .venv/bin/python tools/decode_floor.py --engine engines/smollm2 [--tokens 64] [--rounds 3]

At batch 1 a decode step must read every weight once; the floor is the time of exactly the engine's
matmuls (same shapes, same panel-packed Linear) with nothing else: no attention, norms, rotary,
sampling or Python scheduling. If HF generate already runs near this floor, no engine can be 2x
faster at the same precision without reading fewer bytes per token.
"""

from __future__ import annotations

import time

import click
import torch


def gemv_chain(cfg):
    from sedac.models.layers import Linear

    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = [
        (cfg.hidden_size, q + 2 * kv),
        (q, cfg.hidden_size),
        (cfg.hidden_size, 2 * cfg.intermediate_size),
        (cfg.intermediate_size, cfg.hidden_size),
    ] * cfg.num_layers + [(cfg.hidden_size, cfg.vocab_size)]
    chain = []
    for n_in, n_out in shapes:
        linear = Linear(n_in, n_out)
        linear.weight.data = torch.randn(n_in, n_out) * n_in**-0.5
        linear.pack_for_cpu()
        chain.append((linear, torch.randn(1, n_in)))
    return chain


@torch.inference_mode()
def floor_ms(chain) -> float:
    start = time.perf_counter()
    for linear, x in chain:
        linear(x)
    return 1000 * (time.perf_counter() - start)


@click.command()
@click.option("--engine", default="engines/smollm2", show_default=True)
@click.option("--tokens", default=64, show_default=True)
@click.option("--rounds", default=3, show_default=True)
def main(engine, tokens, rounds):
    from sedac import LLM, SamplingParams
    from sedac.builder.datasets import sharegpt_prompts
    from sedac.builder.hf_export import load_hf_model

    llm = LLM(engine, device="cpu")
    cfg = llm.engine.config.model
    chain = gemv_chain(cfg)
    hf = load_hf_model(engine)
    prompt = sharegpt_prompts(llm.tokenizer, "bench", 1, 256)[0]
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    ids = torch.tensor([prompt])
    for _ in range(2):
        floor_ms(chain)
    llm.generate([prompt], SamplingParams(max_tokens=4))
    for r in range(rounds):  # interleaved, so all three share the machine's drift
        floor = sum(floor_ms(chain) for _ in range(tokens)) / tokens
        ours = llm.generate([prompt], params)[0].metrics.tpot * 1000
        with torch.inference_mode():
            start = time.perf_counter()
            hf.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False
            )
        theirs = 1000 * (time.perf_counter() - start) / tokens
        click.echo(
            f"round {r}: GEMV floor {floor:.1f} ms/token ({1000 / floor:.1f} tok/s) | sedac decode "
            f"{ours:.1f} ms ({1000 / ours:.1f} tok/s) | HF generate {theirs:.1f} ms ({1000 / theirs:.1f} tok/s) "
            f"| sedac/HF {theirs / ours:.2f}x, floor/HF {theirs / floor:.2f}x"
        )


if __name__ == "__main__":
    main()
