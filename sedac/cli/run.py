"""sedac-run: drive an engine (generate, chat, bench)."""

from __future__ import annotations

import json
import sys
import time

import click

from sedac.cli.bench_commands import bench
from sedac.cli.common import DEVICE, ENGINE, GPU_KEYS, KV_DTYPE, KV_FILL, LOSSY_EXIT, clean_errors, gpu_options
from sedac.runtime.sampling_params import O1_BRANCHES, O1_MODES, SEDAC_MODES


def sampling_options(fn):
    for opt in reversed(
        [
            click.option("--max-tokens", type=int, default=128, show_default=True),
            click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy"),
            click.option("--top-k", type=int, default=0),
            click.option("--top-p", type=float, default=1.0),
            click.option("--seed", type=int),
            click.option("--stop", multiple=True, help="stop string (repeatable)"),
            click.option(
                "--sedac-mode",
                type=click.Choice(SEDAC_MODES),
                default="off",
                show_default=True,
                help="SEDAC early exit (lossless/lossy need an engine built with --sedac)",
            ),
            click.option("--sedac-agreement", type=float, help="lossy mode's target agreement (default: the engine's)"),
            click.option(
                "--o1-mode",
                type=click.Choice(O1_MODES),
                help="adaptive: branch at uncertain tokens and answer by a confidence-weighted vote of the branches",
            ),
            click.option("--o1-max-branches", type=int, default=O1_BRANCHES, show_default=True),
            click.option(
                "--o1-probe-interval",
                type=int,
                help="reasoning models: a certainty probe every N reasoning tokens; reasoning ends once 3 agree",
            ),
        ]
    ):
        fn = opt(fn)
    return fn


def make_params(max_tokens, temperature, top_k, top_p, seed, stop, sedac_mode="off", sedac_agreement=None, **extra):
    from sedac import SamplingParams

    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop=list(stop),
        sedac_mode=sedac_mode,
        sedac_agreement=sedac_agreement,
        **extra,
    )


def _print_version(ctx, _param, value):
    if not value or ctx.resilient_parsing:
        return
    from sedac import __version__
    from sedac.models import cpu_kernels

    click.echo(f"sedac-run {__version__}\n{cpu_kernels.status().line()}")
    ctx.exit()


@click.group()
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="the version and the C++ kernels this installation runs",
)
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
@gpu_options
@sampling_options
@clean_errors
def generate(engine, device, kv_cache_dtype, prompt, input_file, output_file, chat, **sampling):
    """Generate for one prompt (streamed) or a JSONL batch."""
    from sedac import LLM

    if bool(prompt) == bool(input_file):
        raise ValueError("give exactly one of --prompt or --input")
    if input_file and not output_file:
        raise ValueError("--input needs --output")
    gpu = {key: sampling.pop(key) for key in GPU_KEYS}
    params = make_params(**sampling)
    llm = LLM(engine, device=device, kv_cache_dtype=kv_cache_dtype, **gpu)
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
    click.echo(
        f"[{n} tokens in {elapsed:.2f}s, {n / elapsed:.1f} tok/s, ttft {1000 * (m.ttft or 0):.0f} ms, "
        f"tpot {1000 * (m.tpot or 0):.1f} ms, finish {stats.finish_reason if stats else '?'}"
        + (
            f", {params.sedac_mode}: {m.layers_per_token:.1f} layers/token, skip {m.skip_ratio:.0%}"
            + (f", acceptance {m.acceptance_rate:.0%}" if m.acceptance_rate is not None else "")
            if m and params.sedac_mode != "off"
            else ""
        )
        + "]",
        err=True,
    )


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
@click.option(
    "--sedac-mode",
    type=click.Choice(SEDAC_MODES),
    default="off",
    show_default=True,
    help="default SEDAC mode for requests that do not set one",
)
@KV_FILL
@LOSSY_EXIT
@KV_DTYPE
@gpu_options
@click.option(
    "--o1-mode",
    type=click.Choice(O1_MODES),
    default="off",
    show_default=True,
    help="default o1 mode for requests that do not set one",
)
@click.option(
    "--speculative-disable-by-batch-size",
    type=int,
    help="lossless requests decode without drafts in steps with more sequences than this",
)
@click.option("--max-n", type=int, default=64, show_default=True, help="choices one request may ask for (n)")
@click.option(
    "--max-tokens-cap", type=int, help="max_tokens one request may ask for (default: what fits in max_seq_len)"
)
@click.option("--max-body-bytes", type=int, default=1 << 20, show_default=True, help="larger request bodies get 413")
@clean_errors
def serve(
    engine,
    device,
    host,
    port,
    api_key,
    max_queue,
    served_model_name,
    max_n,
    max_tokens_cap,
    max_body_bytes,
    **engine_options,
):
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
    click.echo(json.dumps(asyncio.run(run_load(url, clients, duration, max_tokens, api_key, conversations)), indent=2))


main.add_command(bench)
