"""Engine configuration: what `sedac-build` writes to config.json and the runtime reads back.

One dataclass for the model's shape (ModelConfig) and one for the build settings (BuildConfig);
EngineConfig bundles them with a format version so old engines fail loudly instead of silently.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"  # converted weights inside an engine directory
SEDAC_WEIGHTS_FILE = "sedac.safetensors"  # trained exit heads (engines built with --sedac)
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
# precision -> the dtype an engine stores its float tensors in (on CPU every step computes in fp32)
PRECISIONS = {
    "fp32": "float32",
    "fp16": "float16",
    "bf16": "bfloat16",
    "int8": "float16",
    "int4": "float16",
    "w8a8": "float16",
    "w4a8": "float16",
    "gguf": "float32",
}
# weight-only precisions: linear weights stored quantized (int8: one scale per output channel; int4:
# a scale and a minimum per group of inputs; gguf: the source file's own blocks)
WEIGHT_ONLY = ("int8", "int4", "gguf")
# w8a8 and w4a8 store int8's and int4's weights; the CPU's integer (VNNI) kernels quantize their activations
# to one int8 level per group of 32 inputs, as llama.cpp does (half the dot products of a batched step, at
# some accuracy), where int8 and int4 take a 16-bit grid (csrc/int8_activations.h)
INT8_ACTIVATION_PRECISIONS = {"w8a8": "int8", "w4a8": "int4"}


def weight_format(precision: str) -> str:
    """The precision an engine's weights are stored at: w8a8's and w4a8's are int8's and int4's."""
    return INT8_ACTIVATION_PRECISIONS.get(precision, precision)


# --kv-cache-dtype -> the KV pool's dtype; "auto": the compute dtype (fp32 on CPU, the weights' on CUDA), except
# HALF_KV_PRECISIONS on CPU (sedac.runtime.model_runner._kv_dtype)
KV_CACHE_DTYPES = {
    "auto": None,
    "fp32": "float32",
    "fp16": "float16",
    "bf16": "bfloat16",
    "float32": "float32",
    "float16": "float16",
    "bfloat16": "bfloat16",
}
SCALE_SUFFIX = ".weight_scale"  # a quantized linear's scales beside its "<name>.weight"
MIN_SUFFIX = ".weight_min"  # and a 4-bit block weight's minimums
DEFAULT_GROUP_SIZE = 32  # int4's inputs per scale and minimum: GGUF Q4_1's block


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    rope_scaling: dict | None = None  # HF rope_parameters when not the default rotary


@dataclass
class BuildConfig:
    precision: str = "fp32"
    max_batch_size: int = 32
    max_seq_len: int = 2048
    max_num_tokens: int = 2048
    kv_block_size: int = 16
    group_size: int | None = None  # int4: inputs per scale and minimum (None: DEFAULT_GROUP_SIZE)

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}")
        for name in ("max_batch_size", "max_seq_len", "max_num_tokens", "kv_block_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be a positive integer")
        if self.group_size is not None and (weight_format(self.precision) != "int4" or int(self.group_size) <= 0):
            raise ValueError("group_size (--group-size) applies to precisions int4 and w4a8 only, a positive integer")
        if self.max_num_tokens < self.max_batch_size:
            raise ValueError("max_num_tokens must be at least max_batch_size")


@dataclass(frozen=True)
class DeviceOptions:
    """How the engine sizes its steps and uses its device, under vLLM's and TensorRT-LLM's names."""

    max_num_seqs: int  # sequences a step (and decode batch sizes to capture graphs for)
    max_num_batched_tokens: int  # tokens a step (the activation peak the KV budget leaves room for)
    # KV pool bytes; None: max_batch_size full sequences, on CUDA at most what the memory options below leave
    kv_cache_memory: int | None = None
    kv_cache_dtype: str = "auto"
    gpu_memory_utilization: float | None = None  # vLLM: the share of the GPU's memory the engine may hold (0.9)
    kv_cache_free_gpu_memory_fraction: float | None = None  # TensorRT-LLM: the share of what is free after
    # the weights and a step's activations that the KV pool takes
    enforce_eager: bool = False  # no CUDA graphs

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        fractions = {k: getattr(self, k) for k in ("gpu_memory_utilization", "kv_cache_free_gpu_memory_fraction")}
        if None not in fractions.values():
            raise ValueError("give gpu_memory_utilization or kv_cache_free_gpu_memory_fraction, not both")
        for name, value in fractions.items():
            if value is not None and not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value}")

    @staticmethod
    def context_length(max_model_len: int | None, built: int) -> int:
        """vLLM's max_model_len: a shorter context than the engine was built for (never a longer one)."""
        if max_model_len is None:
            return built
        if not 0 < max_model_len <= built:
            raise ValueError(f"max_model_len must be in [1, {built}] (the engine's max_seq_len), got {max_model_len}")
        return max_model_len


@dataclass
class EngineConfig:
    model: ModelConfig
    build: BuildConfig
    format_version: int = FORMAT_VERSION
    sedac: dict | None = None  # exit components and thresholds, present when built with --sedac
    reasoning: dict | None = None  # the model's reasoning markers {"start", "end"}, when it has them

    def save(self, engine_dir: Path) -> None:
        (Path(engine_dir) / "config.json").write_text(json.dumps(dataclasses.asdict(self), indent=2))

    @classmethod
    def load(cls, engine_dir: Path) -> "EngineConfig":
        path = Path(engine_dir) / "config.json"
        if not path.is_file():
            raise ValueError(f"not an engine directory (no config.json): {engine_dir}")
        try:
            raw = json.loads(path.read_text())
            version = raw.get("format_version")
            if version != FORMAT_VERSION:
                raise ValueError(f"engine format version {version} is not {FORMAT_VERSION}; rebuild it")
            return cls(
                model=ModelConfig(**raw["model"]),
                build=BuildConfig(**raw["build"]),
                format_version=version,
                sedac=raw.get("sedac"),
                reasoning=raw.get("reasoning"),
            )
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"corrupt engine config {path}: {e}") from None
