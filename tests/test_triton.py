"""Triton: repository export (configs parsed by Triton's own protobuf) and a real tritonserver run."""

import json
import queue
import re
import signal
from functools import partial

import httpx
import pytest

from sedac import LLM, SamplingParams
from sedac.serving.client import triton_inputs
from sedac.serving.triton_repo import export_sedac, export_tensorrtllm, validate_config
from tests.servers import triton_server

ENSEMBLE_TENSORS = {"text_input", "max_tokens", "stream", "temperature", "top_k", "top_p", "stop_words", "bad_words"}


def test_export_both_flavours_parse_with_triton_protobuf(tmp_path, tiny_llama):
    configs = export_sedac(tiny_llama, tmp_path / "repo", name="mymodel")
    parsed = validate_config(configs[0].read_text(), configs[0])
    assert parsed.name == "mymodel" and parsed.model_transaction_policy.decoupled
    assert ENSEMBLE_TENSORS <= {i.name for i in parsed.input} and "text_output" in {o.name for o in parsed.output}
    assert (tmp_path / "repo" / "mymodel" / "1" / "model.py").is_file()
    trt = export_tensorrtllm(tiny_llama, tmp_path / "trt", "/engines/trtllm")
    assert sorted(p.parent.name for p in trt) == ["ensemble", "postprocessing", "preprocessing", "tensorrt_llm"]
    models = {p.parent.name: validate_config(p.read_text(), p) for p in trt}
    assert ENSEMBLE_TENSORS <= {i.name for i in models["ensemble"].input}
    assert [s.model_name for s in models["ensemble"].ensemble_scheduling.step] == [
        "preprocessing",
        "tensorrt_llm",
        "postprocessing",
    ]
    assert models["tensorrt_llm"].parameters["gpt_model_path"].string_value == "/engines/trtllm"
    with pytest.raises(ValueError, match="invalid Triton config"):
        validate_config('name: "x"\nbackend: "python"\nmax_batch_sise: 0\n', tmp_path / "bad")


@pytest.fixture(scope="module")
def triton(tiny_llama, tmp_path_factory):
    repo = tmp_path_factory.mktemp("triton") / "repo"
    export_sedac(tiny_llama, repo)
    with triton_server(repo) as handles:
        yield handles


def greedy_offline(engine, prompts, max_tokens):
    llm = LLM(str(engine), device="cpu")
    return [o.text for o in llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0))]


def test_generate_endpoints_match_offline(triton, tiny_llama):
    http, _, _, _ = triton
    body = {"text_input": "Hello world", "max_tokens": 10, "temperature": 0.0}
    r = httpx.post(http + "/v2/models/sedac/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    expected = greedy_offline(tiny_llama, ["Hello world"], 10)[0]
    assert r.json()["text_output"] == expected and r.json()["output_tokens"] >= 1
    with httpx.stream(
        "POST", http + "/v2/models/sedac/generate_stream", json={**body, "stream": True}, timeout=60
    ) as s:
        events = [json.loads(line[5:]) for line in s.iter_lines() if line.startswith("data:")]
    assert "".join(e["text_output"] for e in events) == expected and events[-1]["finish_reason"]


def test_o1_adaptive_inputs(triton, tiny_llama):
    http, _, _, _ = triton
    body = {
        "text_input": "Hello world",
        "max_tokens": 6,
        "temperature": 0.0,
        "o1_mode": "adaptive",
        "o1_max_branches": 3,
    }
    r = httpx.post(http + "/v2/models/sedac/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    offline = LLM(str(tiny_llama), device="cpu").generate(
        ["Hello world"], SamplingParams(max_tokens=6, temperature=0.0, o1_mode="adaptive", o1_max_branches=3)
    )
    assert r.json()["text_output"] == offline[0].text
    assert r.json()["confidence"] == pytest.approx(offline[0].outputs[0].confidence, rel=1e-4)


def test_64_concurrent_grpc_streams_and_kv_free(triton, tiny_llama):
    import tritonclient.grpc as grpcclient

    _, grpc_address, metrics_url, _ = triton
    prompts = [f"Request number {i} says" for i in range(64)]
    expected = greedy_offline(tiny_llama, prompts, 8)
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(grpc_address)
    client.start_stream(callback=partial(lambda q, result, error: q.put((result, error)), results))
    sampling = dict(max_tokens=8, temperature=0.0, top_k=0, top_p=1.0, seed=None, stop=())
    for i, p in enumerate(prompts):
        client.async_stream_infer("sedac", triton_inputs(grpcclient, p, True, sampling), request_id=str(i))
    texts, done = [""] * 64, 0
    while done < 64:
        result, error = results.get(timeout=300)
        assert error is None, error
        i = int(result.get_response().id)
        texts[i] += result.as_numpy("text_output").reshape(-1)[0].decode()
        done += result.as_numpy("finish_reason").reshape(-1)[0] != b""
    client.stop_stream()
    assert texts == expected
    metrics = httpx.get(metrics_url, timeout=10).text
    free = re.search(r'sedac_kv_blocks\{state="free"\} (\d+)', metrics).group(1)
    total = re.search(r'sedac_kv_blocks\{state="total"\} (\d+)', metrics).group(1)
    assert free == total


@pytest.mark.parametrize(
    "body",
    [
        {"max_tokens": 5},
        {"text_input": "hi", "max_tokens": -1},
        {"text_input": "hi", "temperature": -2.0},
        {"text_input": "word " * 400},
        {"text_input": "hi", "o1_mode": "sometimes"},
    ],
)
def test_bad_requests_fail_alone(triton, body):
    http, _, _, _ = triton
    r = httpx.post(http + "/v2/models/sedac/generate", json=body, timeout=60)
    assert 400 <= r.status_code < 500 and "error" in r.json()
    ok = httpx.post(http + "/v2/models/sedac/generate", json={"text_input": "hi", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200


def test_sigterm_stops_triton(tiny_llama, tmp_path):
    repo = tmp_path / "repo"
    export_sedac(tiny_llama, repo)
    with triton_server(repo) as (http, _, _, proc):
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


def test_client_cli_streams_from_triton(triton, tiny_llama):
    from click.testing import CliRunner

    from sedac.cli.run import main

    _, grpc_address, _, _ = triton
    expected = greedy_offline(tiny_llama, ["Hello world"], 6)[0]
    for flag in ("--stream", "--no-stream"):
        result = CliRunner().invoke(
            main, ["client", "--url", f"grpc://{grpc_address}", "--prompt", "Hello world", "--max-tokens", "6", flag]
        )
        assert result.exit_code == 0, result.output
        assert result.output.strip() == expected.strip()


def test_tritonclient_http_sees_the_model(triton):
    import tritonclient.http as httpclient

    http, _, _, _ = triton
    client = httpclient.InferenceServerClient(http.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("sedac")
    meta = client.get_model_metadata("sedac")
    assert {t["name"] for t in meta["inputs"]} >= ENSEMBLE_TENSORS
    assert {t["name"] for t in meta["outputs"]} >= {"text_output", "finish_reason", "sedac_skip_ratio"}
    config = client.get_model_config("sedac")
    assert config["model_transaction_policy"]["decoupled"] is True


def test_tensorrt_llm_shaped_requests(triton, tiny_llama):
    """A request as a TensorRT-LLM client builds it for the ensemble: [1, 1] tensors (batch dim first),
    end_id / pad_id, return_log_probs, exclude_input_in_output, beam_width 1; beam search and batch > 1
    per request are clear errors, and the model keeps serving."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    _, grpc_address, _, _ = triton
    client = grpcclient.InferenceServerClient(grpc_address)

    def request(prompts: list[str], **extra):
        values = {
            "text_input": np.array([[p.encode()] for p in prompts], dtype=np.object_),
            "max_tokens": np.array([[8]] * len(prompts), dtype=np.int32),
            "temperature": np.array([[0.0]] * len(prompts), dtype=np.float32),
            "end_id": np.array([[2]] * len(prompts), dtype=np.int32),
            "pad_id": np.array([[2]] * len(prompts), dtype=np.int32),
            **{
                k: np.array([[v]] * len(prompts), dtype=np.bool_ if isinstance(v, bool) else np.int32)
                for k, v in extra.items()
            },
        }
        types = {np.object_: "BYTES", np.int32: "INT32", np.float32: "FP32", np.bool_: "BOOL"}
        inputs = []
        for name, value in values.items():
            tensor = grpcclient.InferInput(name, list(value.shape), types[value.dtype.type])
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
        results: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        client.async_stream_infer("sedac", inputs)
        result, error = results.get(timeout=120)
        client.stop_stream()
        if error is not None:
            raise error
        return result

    expected = greedy_offline(tiny_llama, ["Hello world"], 8)[0]
    out = request(["Hello world"], return_log_probs=True, exclude_input_in_output=True, beam_width=1)
    assert out.as_numpy("text_output").shape == (1, 1) and out.as_numpy("text_output")[0, 0].decode() == expected
    logprobs = out.as_numpy("output_log_probs")
    assert logprobs.shape == (1, int(out.as_numpy("output_tokens")[0, 0])) and (logprobs <= 0).all()
    assert abs(out.as_numpy("cum_log_probs")[0, 0] - logprobs.sum()) < 1e-4
    echoed = request(["Hello world"], exclude_input_in_output=False)
    assert echoed.as_numpy("text_output")[0, 0].decode() == "Hello world" + expected  # TensorRT-LLM's default
    for prompts, extra, message in (
        (["Hello world"], {"beam_width": 2}, "beam_width 2 is not supported"),
        (["a", "b"], {}, "one prompt per request"),
    ):
        with pytest.raises(InferenceServerException, match=message):
            request(prompts, **extra)
    assert request(["Hello world"]).as_numpy("text_output")[0, 0].decode() == expected
