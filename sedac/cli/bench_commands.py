"""`sedac-run bench`: the offline benches (vs HF, --precisions, --sedac-modes, --o1) and `bench serve`
against a running server; each writes a report directory."""

from __future__ import annotations

import click

from sedac.cli.common import DEVICE, KV_DTYPE, KV_FILL, LOSSY_EXIT, clean_errors
from sedac.runtime.sampling_params import SEDAC_MODES


@click.group(invoke_without_command=True)
@click.option("--engine", type=click.Path(), help="engine directory from sedac-build (offline benches)")
@DEVICE
@click.option("--num-prompts", type=int, default=32, show_default=True, help="concurrent requests")
@click.option("--output-len", type=int, default=128, show_default=True)
@click.option("--batch1-prompts", type=int, default=4, show_default=True)
@click.option("--max-prompt-len", type=int, default=256, show_default=True)
@click.option("--baseline/--no-baseline", default=True, show_default=True, help="also run HF transformers generate")
@click.option(
    "--report",
    help="directory for report.md, report.json and PNG plots  [default: reports/bench, or "
    "reports/sedac_bench, reports/precision_bench, reports/o1_bench with those options]",
)
@click.option("--sedac-modes", help="compare SEDAC modes instead, e.g. off,lossless,lossy")
@click.option(
    "--precisions",
    help="compare precisions instead, e.g. fp32,fp16,bf16,int8 (ENGINE is the fp32 one; "
    "the others are ENGINE-PRECISION, built when missing)",
)
@click.option(
    "--llama-cpp",
    type=click.Path(),
    help="with --precisions: a llama.cpp build's bin directory; its llama-bench runs on the same GGUF in the same run",
)
@click.option(
    "--o1",
    "o1",
    is_flag=True,
    help="o1 reasoning control instead: accuracy vs generated tokens on "
    "generated arithmetic (greedy, self-consistency, adaptive)",
)
@click.option("--o1-questions", type=int, default=100, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True, help="batched workload of --sedac-modes")
@click.option("--agreement", type=float, default=0.99, show_default=True, help="lossy target agreement")
@KV_FILL
@LOSSY_EXIT
@KV_DTYPE
@click.pass_context
@clean_errors
def bench(
    ctx,
    engine,
    device,
    sedac_modes,
    precisions,
    llama_cpp,
    o1,
    o1_questions,
    batch_size,
    agreement,
    sedac_kv_fill,
    sedac_lossy_exit,
    kv_cache_dtype,
    **options,
):
    """Offline benchmark: batch-1 decode and N concurrent requests vs HF transformers generate,
    or with --sedac-modes the SEDAC modes, with --precisions the precisions side by side.
    `bench serve --url URL` benchmarks a running server instead."""
    if ctx.invoked_subcommand is not None:
        return
    if engine is None:
        raise ValueError("--engine is required (or run `sedac-run bench serve --url URL` against a server)")
    if sum(map(bool, (sedac_modes, precisions, o1))) > 1:
        raise ValueError("give one of --sedac-modes, --precisions or --o1")
    if llama_cpp and not precisions:
        raise ValueError("--llama-cpp goes with --precisions")
    kind = "o1_bench" if o1 else "precision_bench" if precisions else "sedac_bench" if sedac_modes else "bench"
    report = options.pop("report") or f"reports/{kind}"
    if o1:
        from sedac.cli.o1_bench import run_o1_bench

        if o1_questions < 1:
            raise ValueError("--o1-questions must be >= 1")
        run_o1_bench(engine, device, o1_questions, report=report)
        return
    if precisions:
        from sedac.cli.precision_bench import run_precision_bench

        run_precision_bench(
            engine,
            device,
            [p.strip() for p in precisions.split(",") if p.strip()],
            options["num_prompts"],
            options["output_len"],
            options["batch1_prompts"],
            options["max_prompt_len"],
            report,
            kv_cache_dtype,
            llama_cpp=llama_cpp,
        )
        return
    if sedac_modes:
        if kv_cache_dtype != "auto":
            raise ValueError("--kv-cache-dtype applies to the plain and --precisions benches, not --sedac-modes")
        from sedac.cli.sedac_bench import run_sedac_bench

        modes = [m.strip() for m in sedac_modes.split(",") if m.strip()]
        if not modes or set(modes) - set(SEDAC_MODES):
            raise ValueError(f"--sedac-modes takes off, lossless and lossy, got {sedac_modes!r}")
        run_sedac_bench(
            engine,
            device,
            modes,
            options["output_len"],
            options["batch1_prompts"],
            batch_size,
            options["max_prompt_len"],
            agreement,
            report,
            sedac_kv_fill,
            sedac_lossy_exit,
        )
        return
    from sedac.cli.bench import run_bench

    run_bench(engine, device, report=report, kv_cache_dtype=kv_cache_dtype, **options)


@bench.command("serve")
@click.option("--url", required=True, help="http://HOST:PORT of an OpenAI-compatible server")
@click.option("--tokenizer", required=True, type=click.Path(), help="engine or HF tokenizer directory (prompt lengths)")
@click.option("--dataset-name", type=click.Choice(["sharegpt", "random"]), default="sharegpt", show_default=True)
@click.option("--num-prompts", type=int, default=100, show_default=True)
@click.option("--sharegpt-output-len", type=int, help="output tokens per request (default: the dataset answer's)")
@click.option("--random-input-len", type=int, default=128, show_default=True)
@click.option("--random-output-len", type=int, default=128, show_default=True)
@click.option("--max-prompt-len", type=int, default=1024, show_default=True, help="sharegpt: longest prompt kept")
@click.option(
    "--request-rate", type=float, default=float("inf"), show_default=True, help="requests/s (inf: all at once)"
)
@click.option("--burstiness", type=float, default=1.0, show_default=True, help="gamma shape of arrivals (1 = Poisson)")
@click.option(
    "--max-concurrency",
    help="requests in flight at most; a comma list (1,4,16) runs a sweep, one run per level, and plots it",
)
@click.option("--goodput", multiple=True, help="SLO as METRIC:MS (ttft, tpot, e2el), repeatable")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--api-key")
@click.option(
    "--report",
    default="reports/bench_serve",
    show_default=True,
    help="directory for report.md, report.json and PNG plots",
)
@clean_errors
def bench_serve(
    url,
    tokenizer,
    dataset_name,
    num_prompts,
    sharegpt_output_len,
    random_input_len,
    random_output_len,
    max_prompt_len,
    request_rate,
    burstiness,
    max_concurrency,
    goodput,
    seed,
    api_key,
    report,
):
    """vLLM's `bench serve` against any OpenAI-compatible server: its datasets, arrivals and metric names."""
    import asyncio

    from transformers import AutoTokenizer

    from sedac.cli.report import write_report
    from sedac.serving import bench_serve as bs

    levels = _concurrency_levels(max_concurrency)
    if num_prompts < 1 or request_rate <= 0 or burstiness <= 0:
        raise ValueError("need --num-prompts >= 1, --request-rate > 0, --burstiness > 0")
    slo = bs.parse_goodput(goodput)
    tok = AutoTokenizer.from_pretrained(tokenizer)
    requests = (
        bs.sharegpt_requests(tok, num_prompts, sharegpt_output_len, max_prompt_len)
        if dataset_name == "sharegpt"
        else bs.random_requests(tok, num_prompts, random_input_len, random_output_len, seed)
    )
    runs = [
        asyncio.run(bs.run_bench_serve(url, requests, request_rate, burstiness, level, slo, api_key, seed))
        for level in levels
    ]
    title = f"sedac-run bench serve: {url}, {dataset_name}, {num_prompts} prompts"
    if len(runs) == 1:
        write_report(
            report, title, {"url": url, "dataset": dataset_name, **runs[0]}, bs.markdown(runs[0]), bs.figures(runs[0])
        )
    else:
        write_report(
            report,
            f"{title}, max concurrency {max_concurrency}",
            {"url": url, "dataset": dataset_name, "sweep": runs},
            bs.sweep_markdown(runs),
            bs.sweep_figures(runs),
        )


def _concurrency_levels(value: str | None) -> list[int | None]:
    """--max-concurrency: none (unlimited), one level, or a comma list of levels (a sweep)."""
    if value is None:
        return [None]
    try:
        levels = [int(v) for v in value.split(",")]
    except ValueError:
        raise ValueError(f"--max-concurrency takes N or a comma list like 1,4,16, got {value!r}") from None
    if any(level < 1 for level in levels):
        raise ValueError("--max-concurrency levels must be >= 1")
    return levels
