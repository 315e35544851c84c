"""`sedac-run client`: one prompt to a sedac OpenAI server (openai client) or to Triton (tritonclient)."""

from __future__ import annotations

import queue
import sys
from functools import partial
from urllib.parse import urlparse

import click
import numpy as np


def run_client(url: str, prompt: str, stream: bool, model: str | None, api_key: str | None, sampling: dict) -> None:
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        _openai(url, prompt, stream, model, api_key, sampling)
    elif parsed.scheme == "grpc":
        _triton(parsed.netloc, prompt, stream, model or "sedac", sampling)
    else:
        raise ValueError("--url must start with http:// (sedac server) or grpc:// (Triton)")


def _openai(url, prompt, stream, model, api_key, sampling) -> None:
    import openai

    client = openai.OpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key or "none", max_retries=0)
    try:
        model = model or client.models.list().data[0].id
        extra = {"top_k": sampling["top_k"], **_sedac_fields(sampling)}
        kwargs = dict(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=sampling["max_tokens"],
            temperature=sampling["temperature"],
            top_p=sampling["top_p"],
            seed=sampling["seed"],
            stop=list(sampling["stop"]) or None,
            extra_body=extra,
        )
        if not stream:
            click.echo(client.chat.completions.create(**kwargs).choices[0].message.content)
            return
        for chunk in client.chat.completions.create(stream=True, **kwargs):
            if chunk.choices and chunk.choices[0].delta.content:
                click.echo(chunk.choices[0].delta.content, nl=False)
                sys.stdout.flush()
        click.echo()
    except openai.APIError as e:
        raise ValueError(f"server error: {e}") from None


def _sedac_fields(sampling: dict) -> dict:
    """This server's own request fields the options set (SEDAC and o1 modes)."""
    fields = {name: sampling.get(name) for name in ("sedac_mode", "sedac_agreement", "o1_mode", "o1_probe_interval")}
    fields = {k: v for k, v in fields.items() if v not in (None, "off")}
    if "o1_mode" in fields:
        fields["o1_max_branches"] = sampling["o1_max_branches"]
    return fields


def triton_inputs(grpcclient, prompt: str, stream: bool, sampling: dict) -> list:
    """tensorrtllm_backend-style request tensors."""
    values = {
        "text_input": np.array([prompt.encode()], dtype=np.object_),
        "max_tokens": np.array([sampling["max_tokens"]], dtype=np.int32),
        "temperature": np.array([sampling["temperature"]], dtype=np.float32),
        "top_k": np.array([sampling["top_k"]], dtype=np.int32),
        "top_p": np.array([sampling["top_p"]], dtype=np.float32),
        "stream": np.array([stream], dtype=bool),
    }
    if sampling.get("seed") is not None:
        values["random_seed"] = np.array([sampling["seed"]], dtype=np.uint64)
    if sampling.get("stop"):
        values["stop_words"] = np.array([s.encode() for s in sampling["stop"]], dtype=np.object_)
    if sampling.get("o1_mode") is not None:
        values["o1_mode"] = np.array([sampling["o1_mode"].encode()], dtype=np.object_)
        values["o1_max_branches"] = np.array([sampling["o1_max_branches"]], dtype=np.int32)
    if sampling.get("o1_probe_interval") is not None:
        values["o1_probe_interval"] = np.array([sampling["o1_probe_interval"]], dtype=np.int32)
    types = {np.object_: "BYTES", np.int32: "INT32", np.float32: "FP32", np.bool_: "BOOL", np.uint64: "UINT64"}
    inputs = []
    for name, value in values.items():
        value = value[None]  # [batch = 1, ...], as tensorrtllm_backend's clients send it
        tensor = grpcclient.InferInput(name, list(value.shape), types[value.dtype.type])
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    return inputs


def _triton(address, prompt, stream, model, sampling) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(address)
    try:
        if not client.is_model_ready(model):
            raise ValueError(f"model {model!r} is not ready on Triton at {address}")
    except InferenceServerException as e:
        raise ValueError(f"cannot reach Triton at {address}: {e.message()}") from None
    client.start_stream(callback=partial(lambda q, result, error: q.put((result, error)), results))
    try:
        client.async_stream_infer(
            model, triton_inputs(grpcclient, prompt, stream, sampling), enable_empty_final_response=True
        )
        while True:
            result, error = results.get(timeout=600)
            if error is not None:
                raise ValueError(f"triton error: {error}")
            response = result.get_response()
            if result.as_numpy("text_output") is not None:
                click.echo(result.as_numpy("text_output").reshape(-1)[0].decode(), nl=not stream)
                sys.stdout.flush()
            if response.parameters["triton_final_response"].bool_param:
                break
    finally:
        client.stop_stream()
    if stream:
        click.echo()
