"""sedac-run: drive an engine (generate, chat, bench)."""
from __future__ import annotations

import json
import sys
import time

import click

from sedac.cli.common import clean_errors
from sedac.config import KV_CACHE_DTYPES
from sedac.runtime.sampling_params import O1_BRANCHES, O1_MODES, SEDAC_KV_FILLS, SEDAC_LOSSY_EXITS, SEDAC_MODES

ENGINE = click.option("--engine", required=True, type=click.Path(), help="engine directory from sedac-build")
DEVICE = click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda")
KV_FILL = click.option("--sedac-kv-fill", type=click.Choice(SEDAC_KV_FILLS), default="deferred", show_default=True,
                       help="how lossy mode's depth exit fills exited tokens' deeper KV (engine-wide)")
KV_DTYPE = click.option("--kv-cache-dtype", type=click.Choice(list(KV_CACHE_DTYPES)), default="auto", show_default=True,
                        help="KV cache dtype; auto: the compute dtype (fp32 on CPU). fp16 halves the KV bytes "
                             "long contexts stream")
LOSSY_EXIT = click.option("--sedac-lossy-exit", type=click.Choice(SEDAC_LOSSY_EXITS),
                          help="where lossy mode's tokens exit (engine-wide; default: the build's choice)")


def sampling_options(fn):
    for opt in reversed([
        click.option("--max-tokens", type=int, default=128, show_default=True),
        click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy"),
        click.option("--top-k", type=int, default=0), click.option("--top-p", type=float, default=1.0),
        click.option("--seed", type=int), click.option("--stop", multiple=True, help="stop string (repeatable)"),
        click.option("--sedac-mode", type=click.Choice(SEDAC_MODES), default="off", show_default=True,
                     help="SEDAC early exit (lossless/lossy need an engine built with --sedac)"),
        click.option("--sedac-agreement", type=float, help="lossy mode's target agreement (default: the engine's)"),
        click.option("--o1-mode", type=click.Choice(O1_MODES), help="adaptive: branch at uncertain tokens and answer "
                                                                   "by a confidence-weighted vote of the branches"),
        click.option("--o1-max-branches", type=int, default=O1_BRANCHES, show_default=True)]):
        fn = opt(fn)
    return fn


def make_params(max_tokens, temperature, top_k, top_p, seed, stop, sedac_mode="off", sedac_agreement=None, **extra):
    from sedac import SamplingParams
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          seed=seed, stop=list(stop), sedac_mode=sedac_mode, sedac_agreement=sedac_agreement, **extra)


def _print_version(ctx, _param, value):
    if not value or ctx.resilient_parsing:
        return
    from sedac import __version__
    from sedac.models import cpu_kernels
    click.echo(f"sedac-run {__version__}\n{cpu_kernels.status().line()}")
    ctx.exit()


@click.group()
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="the version and the C++ kernels this installation runs")
def main():
    """Run a SEDAC engine."""


@main.command()
def env():
    """What this installation runs on: torch, CPU and its flags, the C++ kernels, triton, GPU."""
    from sedac.cli.env import environment
    for key, value in environment().items():
        click.echo(f"{key + ':':13}{value}")


@main.command()
@ENGINE
@DEVICE
@KV_DTYPE
@click.option("--prompt", help="one prompt, streamed to the terminal")
@click.option("--input", "input_file", type=click.Path(), help="JSONL with a 'prompt' (or 'messages') per line")
@click.option("--output", "output_file", type=click.Path(), help="JSONL results for --input")
@click.option("--chat/--raw", default=True, show_default=True, help="apply the chat template to --prompt")
@sampling_options
@clean_errors
def generate(engine, device, kv_cache_dtype, prompt, input_file, output_file, chat, **sampling):
    """Generate for one prompt (streamed) or a JSONL batch."""
    from sedac import LLM
    if bool(prompt) == bool(input_file):
        raise ValueError("give exactly one of --prompt or --input")
    if input_file and not output_file:
        raise ValueError("--input needs --output")
    params = make_params(**sampling)
    llm = LLM(engine, device=device, kv_cache_dtype=kv_cache_dtype)
    if prompt:
        return _stream_one(llm, prompt, params, chat)
    from sedac.cli.batch import run_batch
    summary = run_batch(llm, input_file, output_file, params)
    click.echo(json.dumps(summary), err=True)


def _stream_one(llm, prompt, params, chat):
    ids = llm.apply_chat_template([{"role": "user", "content": prompt}]) if chat else prompt
    started = time.perf_counter()
    for delta in llm.stream(ids, params):
        click.echo(delta, nl=False)
        sys.stdout.flush()
    click.echo()
    stats = llm.engine.last_finished
    m = stats.metrics if stats else None
    elapsed = time.perf_counter() - started
    n = m.num_generated_tokens if m else 0
    click.echo(f"[{n} tokens in {elapsed:.2f}s, {n / elapsed:.1f} tok/s, ttft {1000 * (m.ttft or 0):.0f} ms, "
               f"tpot {1000 * (m.tpot or 0):.1f} ms, finish {stats.finish_reason if stats else '?'}"
               + (f", {params.sedac_mode}: {m.layers_per_token:.1f} layers/token, skip {m.skip_ratio:.0%}"
                  + (f", acceptance {m.acceptance_rate:.0%}" if m.acceptance_rate is not None else "")
                  if m and params.sedac_mode != "off" else "") + "]", err=True)


@main.command()
@ENGINE
@DEVICE
@KV_DTYPE
@sampling_options
@clean_errors
def chat(engine, device, kv_cache_dtype, **sampling):
    """Interactive chat: /stats, /reset, /quit."""
    from sedac import LLM
    from sedac.cli.chat import chat_loop
    chat_loop(LLM(engine, device=device, kv_cache_dtype=kv_cache_dtype), make_params(**sampling))


@main.command()
@ENGINE
@DEVICE
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--api-key", help="require 'Authorization: Bearer KEY'")
@click.option("--max-queue", type=int, help="waiting requests before answering 503")
@click.option("--max-num-seqs", type=int, help="running sequences per step (default: the engine's max batch size)")
@click.option("--served-model-name", help="model id in the API (default: the engine directory name)")
@click.option("--sedac-mode", type=click.Choice(SEDAC_MODES), default="off", show_default=True,
              help="default SEDAC mode for requests that do not set one")
@KV_FILL
@LOSSY_EXIT
@KV_DTYPE
@click.option("--o1-mode", type=click.Choice(O1_MODES), default="off", show_default=True,
              help="default o1 mode for requests that do not set one")
@click.option("--speculative-disable-by-batch-size", type=int,
              help="lossless requests decode without drafts in steps with more sequences than this")
@click.option("--max-n", type=int, default=64, show_default=True, help="choices one request may ask for (n)")
@click.option("--max-tokens-cap", type=int,
              help="max_tokens one request may ask for (default: what fits in max_seq_len)")
@click.option("--max-body-bytes", type=int, default=1 << 20, show_default=True, help="larger request bodies get 413")
@clean_errors
def serve(engine, device, host, port, api_key, max_queue, served_model_name, max_n, max_tokens_cap, max_body_bytes,
          **engine_options):
    """OpenAI-compatible HTTP server with Prometheus metrics."""
    from sedac.serving.app import RequestLimits
    from sedac.serving.app import serve as run_server
    limits = RequestLimits(max_n, max_tokens_cap, max_body_bytes)
    run_server(engine, host, port, api_key, max_queue, device, served_model_name, engine_options, limits)


@main.group()
def triton():
    """Triton Inference Server: export a model repository, launch tritonserver."""


@triton.command("export")
@ENGINE
@click.option("--repo", required=True, type=click.Path(), help="model repository directory to write")
@click.option("--name", default="sedac", show_default=True, help="model name (sedac flavour)")
@click.option("--flavour", type=click.Choice(["sedac", "tensorrtllm"]), default="sedac", show_default=True)
@click.option("--trtllm-engine-dir", help="TensorRT-LLM engine directory (tensorrtllm flavour)")
@clean_errors
def triton_export(engine, repo, name, flavour, trtllm_engine_dir):
    """Write a Triton model repository for ENGINE (every config.pbtxt validated)."""
    from sedac.serving.triton_repo import export_sedac, export_tensorrtllm
    if flavour == "tensorrtllm":
        if not trtllm_engine_dir:
            raise ValueError("--flavour tensorrtllm needs --trtllm-engine-dir")
        written = export_tensorrtllm(engine, repo, trtllm_engine_dir)
    else:
        written = export_sedac(engine, repo, name)
    for path in written:
        click.echo(f"wrote {path}")


@triton.command("serve")
@click.option("--repo", required=True, type=click.Path(), help="model repository from `triton export`")
@click.option("--http-port", type=int, default=8000, show_default=True)
@click.option("--grpc-port", type=int, default=8001, show_default=True)
@click.option("--metrics-port", type=int, default=8002, show_default=True)
@clean_errors
def triton_serve(repo, http_port, grpc_port, metrics_port):
    """Launch tritonserver (on PATH, else the one bundled in nvidia-pytriton) on 127.0.0.1."""
    from sedac.serving.triton_launcher import run_tritonserver
    sys.exit(run_tritonserver(repo, http_port, grpc_port, metrics_port))


@main.command()
@click.option("--url", required=True, help="http://HOST:PORT (sedac server) or grpc://HOST:PORT (Triton)")
@click.option("--prompt", required=True)
@click.option("--stream/--no-stream", default=False)
@click.option("--model", help="model name (default: the server's only model / 'sedac' on Triton)")
@click.option("--api-key")
@sampling_options
@clean_errors
def client(url, prompt, stream, model, api_key, **sampling):
    """Send one prompt to a sedac server (OpenAI API) or to Triton (tritonclient gRPC)."""
    from sedac.serving.client import run_client
    run_client(url, prompt, stream, model, api_key, sampling)


@main.command()
@click.option("--url", required=True, help="http://HOST:PORT of a running `sedac-run serve`")
@click.option("--clients", type=int, default=8, show_default=True)
@click.option("--duration", type=float, default=30.0, show_default=True, help="seconds to keep sending")
@click.option("--max-tokens", type=int, default=32, show_default=True)
@click.option("--api-key")
@clean_errors
def load(url, clients, duration, max_tokens, api_key):
    """Bounded load run: CLIENTS streaming clients for DURATION seconds on ShareGPT prompts."""
    import asyncio

    from sedac.builder.datasets import sharegpt_conversations
    from sedac.serving.loadtest import run_load
    if clients < 1 or duration <= 0 or duration > 3600:
        raise ValueError("need --clients >= 1 and 0 < --duration <= 3600")
    conversations = [m[:1] for m, _ in zip(sharegpt_conversations("bench"), range(256))]
    click.echo(json.dumps(asyncio.run(run_load(url, clients, duration, max_tokens, api_key, conversations)),
                          indent=2))


@main.group(invoke_without_command=True)
@click.option("--engine", type=click.Path(), help="engine directory from sedac-build (offline benches)")
@DEVICE
@click.option("--num-prompts", type=int, default=32, show_default=True, help="concurrent requests")
@click.option("--output-len", type=int, default=128, show_default=True)
@click.option("--batch1-prompts", type=int, default=4, show_default=True)
@click.option("--max-prompt-len", type=int, default=256, show_default=True)
@click.option("--baseline/--no-baseline", default=True, show_default=True, help="also run HF transformers generate")
@click.option("--report", help="directory for report.md, report.json and PNG plots  [default: reports/bench, or "
                                "reports/sedac_bench, reports/precision_bench, reports/o1_bench with those options]")
@click.option("--sedac-modes", help="compare SEDAC modes instead, e.g. off,lossless,lossy")
@click.option("--precisions", help="compare precisions instead, e.g. fp32,fp16,bf16,int8 (ENGINE is the fp32 one; "
                                   "the others are ENGINE-PRECISION, built when missing)")
@click.option("--llama-cpp", type=click.Path(), help="with --precisions: a llama.cpp build's bin directory; its "
                                                       "llama-bench runs on the same GGUF in the same run")
@click.option("--o1", "o1", is_flag=True, help="o1 reasoning control instead: accuracy vs generated tokens on "
                                                "generated arithmetic (greedy, self-consistency, adaptive)")
@click.option("--o1-questions", type=int, default=100, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True, help="batched workload of --sedac-modes")
@click.option("--agreement", type=float, default=0.99, show_default=True, help="lossy target agreement")
@KV_FILL
@LOSSY_EXIT
@KV_DTYPE
@click.pass_context
@clean_errors
def bench(ctx, engine, device, sedac_modes, precisions, llama_cpp, o1, o1_questions, batch_size, agreement,
          sedac_kv_fill, sedac_lossy_exit, kv_cache_dtype, **options):
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
        run_precision_bench(engine, device, [p.strip() for p in precisions.split(",") if p.strip()],
                            options["num_prompts"], options["output_len"], options["batch1_prompts"],
                            options["max_prompt_len"], report, kv_cache_dtype, llama_cpp=llama_cpp)
        return
    if sedac_modes:
        if kv_cache_dtype != "auto":
            raise ValueError("--kv-cache-dtype applies to the plain and --precisions benches, not --sedac-modes")
        from sedac.cli.sedac_bench import run_sedac_bench
        modes = [m.strip() for m in sedac_modes.split(",") if m.strip()]
        if not modes or set(modes) - set(SEDAC_MODES):
            raise ValueError(f"--sedac-modes takes off, lossless and lossy, got {sedac_modes!r}")
        run_sedac_bench(engine, device, modes, options["output_len"], options["batch1_prompts"], batch_size,
                        options["max_prompt_len"], agreement, report, sedac_kv_fill, sedac_lossy_exit)
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
@click.option("--request-rate", type=float, default=float("inf"), show_default=True,
              help="requests/s (inf: all at once)")
@click.option("--burstiness", type=float, default=1.0, show_default=True, help="gamma shape of arrivals (1 = Poisson)")
@click.option("--max-concurrency", type=int, help="requests in flight at most")
@click.option("--goodput", multiple=True, help="SLO as METRIC:MS (ttft, tpot, e2el), repeatable")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--api-key")
@click.option("--report", default="reports/bench_serve", show_default=True,
              help="directory for report.md, report.json and PNG plots")
@clean_errors
def bench_serve(url, tokenizer, dataset_name, num_prompts, sharegpt_output_len, random_input_len, random_output_len,
                max_prompt_len, request_rate, burstiness, max_concurrency, goodput, seed, api_key, report):
    """vLLM's `bench serve` against any OpenAI-compatible server: its datasets, arrivals and metric names."""
    import asyncio

    from transformers import AutoTokenizer

    from sedac.cli.report import write_report
    from sedac.serving import bench_serve as bs
    if num_prompts < 1 or request_rate <= 0 or burstiness <= 0 or (max_concurrency is not None and max_concurrency < 1):
        raise ValueError("need --num-prompts >= 1, --request-rate > 0, --burstiness > 0, --max-concurrency >= 1")
    slo = bs.parse_goodput(goodput)
    tok = AutoTokenizer.from_pretrained(tokenizer)
    requests = (bs.sharegpt_requests(tok, num_prompts, sharegpt_output_len, max_prompt_len)
                if dataset_name == "sharegpt"
                else bs.random_requests(tok, num_prompts, random_input_len, random_output_len, seed))
    result = asyncio.run(bs.run_bench_serve(url, requests, request_rate, burstiness, max_concurrency, slo,
                                            api_key, seed))
    write_report(report, f"sedac-run bench serve: {url}, {dataset_name}, {num_prompts} prompts",
                 {"url": url, "dataset": dataset_name, **result}, bs.markdown(result), bs.figures(result))
