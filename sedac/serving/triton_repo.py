"""`sedac-run triton export`: Triton model repositories, each config.pbtxt checked with Triton's own
model_config protobuf (shipped by tritonclient).

Flavour "sedac": one decoupled Python-backend model driving the SEDAC engine.
Flavour "tensorrtllm": the tensorrtllm_backend inflight_batcher_llm layout (preprocessing,
tensorrt_llm, postprocessing, ensemble) with filled configs, for users who have TensorRT-LLM engines;
it needs a GPU, TensorRT-LLM and tensorrtllm_backend's model.py files, and is not run in CI.
"""

from __future__ import annotations

from pathlib import Path

from sedac.config import EngineConfig

_STRING, _INT32, _FP32, _BOOL, _UINT64 = "TYPE_STRING", "TYPE_INT32", "TYPE_FP32", "TYPE_BOOL", "TYPE_UINT64"
# (name, type, dims, optional) in tensorrtllm_backend's ensemble naming
REQUEST_INPUTS = [
    ("text_input", _STRING, "[ 1 ]", False),
    ("max_tokens", _INT32, "[ 1 ]", True),
    ("stream", _BOOL, "[ 1 ]", True),
    ("temperature", _FP32, "[ 1 ]", True),
    ("top_k", _INT32, "[ 1 ]", True),
    ("top_p", _FP32, "[ 1 ]", True),
    ("random_seed", _UINT64, "[ 1 ]", True),
    ("repetition_penalty", _FP32, "[ 1 ]", True),
    ("presence_penalty", _FP32, "[ 1 ]", True),
    ("frequency_penalty", _FP32, "[ 1 ]", True),
    ("stop_words", _STRING, "[ -1 ]", True),
    ("bad_words", _STRING, "[ -1 ]", True),
    ("end_id", _INT32, "[ 1 ]", True),
    ("pad_id", _INT32, "[ 1 ]", True),
    ("return_log_probs", _BOOL, "[ 1 ]", True),
    ("exclude_input_in_output", _BOOL, "[ 1 ]", True),
    ("beam_width", _INT32, "[ 1 ]", True),
]
SEDAC_INPUTS = [
    ("sedac_mode", _STRING, "[ 1 ]", True),
    ("sedac_agreement", _FP32, "[ 1 ]", True),
    ("thinking_token_budget", _INT32, "[ 1 ]", True),
    ("o1_mode", _STRING, "[ 1 ]", True),
    ("o1_max_branches", _INT32, "[ 1 ]", True),
    ("o1_entropy_threshold", _FP32, "[ 1 ]", True),
    ("answer_regex", _STRING, "[ 1 ]", True),
    ("o1_probe_interval", _INT32, "[ 1 ]", True),
    ("o1_probe_certainty", _INT32, "[ 1 ]", True),
]
SEDAC_OUTPUTS = [
    ("text_output", _STRING, "[ -1 ]"),
    ("finish_reason", _STRING, "[ 1 ]"),
    ("output_tokens", _INT32, "[ 1 ]"),
    ("layers_per_token", _FP32, "[ 1 ]"),
    ("sedac_skip_ratio", _FP32, "[ 1 ]"),
    ("cum_log_probs", _FP32, "[ 1 ]"),
    ("output_log_probs", _FP32, "[ -1 ]"),
    ("confidence", _FP32, "[ 1 ]"),
]

MODEL_PY = '''"""Triton Python backend entry point, written by sedac-run triton export."""
import json
import os
import sys

# The backend stub ignores PYTHONPATH; `sedac-run triton serve` passes its environment this way.
sys.path[:0] = [p for p in os.environ.get("SEDAC_PYTHONPATH", "").split(os.pathsep) if p]

import triton_python_backend_utils as pb_utils  # noqa: E402

from sedac.serving.triton_model import SedacTritonModel  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.model = SedacTritonModel(config["parameters"]["engine_dir"]["string_value"], pb_utils)

    def execute(self, requests):
        self.model.execute(requests)
        return None

    def finalize(self):
        self.model.finalize()
'''


def tensor_block(kind: str, specs) -> str:
    items = []
    for name, dtype, dims, *optional in specs:
        opt = "\n    optional: true" if optional and optional[0] else ""
        items.append(f'  {{\n    name: "{name}"\n    data_type: {dtype}\n    dims: {dims}{opt}\n  }}')
    return f"{kind} [\n" + ",\n".join(items) + "\n]\n"


def parameter_block(values: dict) -> str:
    return "".join(f'parameters {{\n  key: "{k}"\n  value: {{ string_value: "{v}" }}\n}}\n' for k, v in values.items())


def sedac_config(name: str, engine_dir: Path, max_batch_size: int) -> str:
    """Batched tensors as tensorrtllm_backend's clients send them ([batch, ...], max_batch_size > 0); the
    dynamic batcher hands requests over together and the engine batches them inflight."""
    return (
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: {max_batch_size}\n'
        "model_transaction_policy {\n  decoupled: true\n}\ndynamic_batching {\n}\n"
        + tensor_block("input", REQUEST_INPUTS + SEDAC_INPUTS)
        + tensor_block("output", SEDAC_OUTPUTS)
        + "instance_group [\n  {\n    count: 1\n    kind: KIND_CPU\n  }\n]\n"
        + parameter_block({"engine_dir": str(engine_dir.resolve())})
    )


def validate_config(text: str, path: Path):
    """Parse with Triton's ModelConfig protobuf; a typo or unknown field raises ValueError."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as e:
        raise ValueError(f"invalid Triton config {path}: {e}") from None


def _write(path: Path, text: str, config: bool = True) -> None:
    if config:
        validate_config(text, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def export_sedac(engine_dir: str | Path, repo: str | Path, name: str = "sedac") -> list[Path]:
    engine_dir, repo = Path(engine_dir), Path(repo)
    build = EngineConfig.load(engine_dir).build  # a clear error now rather than at server start
    _write(repo / name / "config.pbtxt", sedac_config(name, engine_dir, build.max_batch_size))
    _write(repo / name / "1" / "model.py", MODEL_PY, config=False)
    return [repo / name / "config.pbtxt"]


def export_tensorrtllm(
    engine_dir: str | Path, repo: str | Path, trtllm_engine_dir: str, max_batch_size: int | None = None
) -> list[Path]:
    from sedac.serving.triton_trtllm import trtllm_configs

    engine_dir, repo = Path(engine_dir), Path(repo)
    build = EngineConfig.load(engine_dir).build
    written = []
    for model, text in trtllm_configs(
        engine_dir.resolve(), trtllm_engine_dir, max_batch_size or build.max_batch_size, build.max_seq_len
    ).items():
        _write(repo / model / "config.pbtxt", text)
        (repo / model / "1").mkdir(exist_ok=True)
        written.append(repo / model / "config.pbtxt")
    return written
