"""Shared CLI behaviour: a clear one-line error and a nonzero exit instead of a traceback; the options
several commands take."""

from __future__ import annotations

import functools
import os

import click

from sedac.config import KV_CACHE_DTYPES
from sedac.runtime.sampling_params import SEDAC_KV_FILLS, SEDAC_LOSSY_EXITS

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing downloads at run time
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def clean_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, OSError) as e:
            raise click.ClickException(str(e).splitlines()[0] if str(e) else type(e).__name__) from None

    return wrapper


ENGINE = click.option("--engine", required=True, type=click.Path(), help="engine directory from sedac-build")
DEVICE = click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda")
GPU_KEYS = ("gpu_memory_utilization", "kv_cache_free_gpu_memory_fraction", "enforce_eager", "max_model_len")


def gpu_options(fn):
    """vLLM's and TensorRT-LLM's engine options for CUDA (and --max-model-len anywhere), passed to the engine
    as GPU_KEYS."""
    for opt in reversed(
        [
            click.option(
                "--gpu-memory-utilization",
                type=float,
                help="CUDA: the share of the GPU's memory the engine may hold; the KV pool gets what the weights and "
                "a full step leave (vLLM's; default 0.9)",
            ),
            click.option(
                "--kv-cache-free-gpu-memory-fraction",
                type=float,
                help="CUDA: instead, the share of the memory free after the weights and a full step that the KV pool "
                "takes (TensorRT-LLM's)",
            ),
            click.option("--enforce-eager", is_flag=True, help="CUDA: no CUDA graphs for decode steps"),
            click.option("--max-model-len", type=int, help="a shorter context than the engine's max_seq_len"),
        ]
    ):
        fn = opt(fn)
    return fn


KV_FILL = click.option(
    "--sedac-kv-fill",
    type=click.Choice(SEDAC_KV_FILLS),
    default="deferred",
    show_default=True,
    help="how lossy mode's depth exit fills exited tokens' deeper KV (engine-wide)",
)
KV_DTYPE = click.option(
    "--kv-cache-dtype",
    type=click.Choice(list(KV_CACHE_DTYPES)),
    default="auto",
    show_default=True,
    help="KV cache dtype; auto: the compute dtype (fp32 on CPU; fp16 for int8 and int4 engines on CPU). fp16 halves "
    "the KV bytes long contexts stream",
)
LOSSY_EXIT = click.option(
    "--sedac-lossy-exit",
    type=click.Choice(SEDAC_LOSSY_EXITS),
    help="where lossy mode's tokens exit (engine-wide; default: the build's choice)",
)
