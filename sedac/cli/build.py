"""sedac-build: compile a Hugging Face causal LM into an engine directory."""

from __future__ import annotations

import json
from dataclasses import fields

import click
import yaml

from sedac.cli.common import clean_errors
from sedac.config import PRECISIONS, BuildConfig

_BUILD_KEYS = {f.name for f in fields(BuildConfig)}


def load_preset(path: str | None) -> dict:
    if path is None:
        return {}
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read config {path}: {e}") from None
    unknown = set(data) - _BUILD_KEYS
    if not isinstance(data, dict) or unknown:
        raise ValueError(f"config {path}: unknown keys {sorted(unknown)}; allowed: {sorted(_BUILD_KEYS)}")
    return data


@click.command()
@click.option("--model", required=True, help="HF model dir, .gguf file, cached hub id, or smollm2-135m-instruct")
@click.option("--output", required=True, help="engine directory to write")
@click.option("--config", "config_file", help="YAML preset (see configs/); flags override it")
@click.option("--precision", type=click.Choice(sorted(PRECISIONS)))
@click.option("--max-batch-size", type=int)
@click.option("--max-seq-len", type=int)
@click.option("--max-num-tokens", type=int)
@click.option("--kv-block-size", type=int)
@click.option("--group-size", type=int, help="int4: inputs per scale and minimum (default 32, GGUF Q4_1's)")
@click.option("--sedac", is_flag=True, help="train SEDAC exit heads and calibrate early-exit thresholds")
@click.option("--exit-layers", default="auto", show_default=True, help="'auto' or comma-separated exit layers")
@click.option(
    "--calib-data", default="sharegpt", show_default=True, help="'sharegpt' or a text file, one document a line"
)
@click.option("--calib-tokens", default=8192, show_default=True, help="generated tokens for calibration")
@click.option("--train-tokens", default=65536, show_default=True, help="teacher-forced tokens for exit training")
@click.option("--exit-epochs", default=2, show_default=True)
@click.option(
    "--draft-precision",
    type=click.Choice(["auto", "int8", "int4"]),
    default="auto",
    show_default=True,
    help="SEDAC's draft copies (lossless drafter, precision exit); auto: each cheaper one measured, the best kept",
)
@click.option(
    "--reasoning-start", help="text that opens the model's reasoning (default: <think> if the template has it)"
)
@click.option("--reasoning-end", help="text that closes it (thinking_token_budget forces it)")
@clean_errors
def main(
    model,
    output,
    config_file,
    sedac,
    exit_layers,
    calib_data,
    calib_tokens,
    train_tokens,
    exit_epochs,
    draft_precision,
    reasoning_start,
    reasoning_end,
    **flags,
):
    """Compile MODEL into a self-contained engine directory."""
    from sedac.builder import SedacOptions, build_engine
    from sedac.runtime.reasoning import ReasoningMarkers

    settings = {**load_preset(config_file), **{k: v for k, v in flags.items() if v is not None}}
    options = (
        SedacOptions(exit_layers, calib_data, calib_tokens, train_tokens, exit_epochs, draft_precision=draft_precision)
        if sedac
        else None
    )
    if (reasoning_start is None) != (reasoning_end is None):
        raise ValueError("give both --reasoning-start and --reasoning-end, or neither")
    markers = ReasoningMarkers(reasoning_start, reasoning_end) if reasoning_start is not None else None
    report = build_engine(model, output, BuildConfig(**settings), options, markers)
    click.echo(json.dumps(report, indent=2))
    click.echo(f"engine written to {output}")
