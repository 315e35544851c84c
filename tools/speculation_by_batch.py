"""Where self-speculation stops paying: off vs lossless decode tokens/s by batch size, interleaved.

    .venv/bin/python tools/speculation_by_batch.py --engine engines/smollm2-sedac [--batches 1,2,4,8]

Speculation always on (speculative_disable_by_batch_size=None); use the crossover to set
`sedac-run serve --speculative-disable-by-batch-size`.
"""

from __future__ import annotations

import time

import click


@click.command()
@click.option("--engine", default="engines/smollm2-sedac", show_default=True)
@click.option("--batches", default="1,2,4,8", show_default=True)
@click.option("--tokens", default=64, show_default=True)
@click.option("--rounds", default=2, show_default=True)
def main(engine, batches, tokens, rounds):
    from sedac import LLM, SamplingParams
    from sedac.builder.datasets import sharegpt_prompts

    sizes = [int(b) for b in batches.split(",")]
    llm = LLM(engine)
    prompts = sharegpt_prompts(llm.tokenizer, "bench", max(sizes) * rounds, 256)
    for mode in ("off", "lossless"):
        llm.generate(prompts[:1], SamplingParams(max_tokens=4, sedac_mode=mode))  # warm-up
    tok_s = {}
    for r in range(rounds):
        for b in sizes:
            for mode in ("off", "lossless"):  # the same prompts, back to back
                params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True, sedac_mode=mode)
                start = time.perf_counter()
                outs = llm.generate(prompts[r * b : (r + 1) * b], params)
                tok_s.setdefault((b, mode), []).append(
                    sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start)
                )
    for b in sizes:
        off, lossless = (sum(tok_s[(b, m)]) / rounds for m in ("off", "lossless"))
        click.echo(f"batch {b}: off {off:.1f} tok/s, lossless {lossless:.1f} tok/s, ratio {lossless / off:.2f}")


if __name__ == "__main__":
    main()
