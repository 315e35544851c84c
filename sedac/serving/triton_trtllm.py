"""Filled configs of tensorrtllm_backend's inflight_batcher_llm repository (preprocessing,
tensorrt_llm, postprocessing, ensemble), for TensorRT-LLM engines on GPU hosts."""

from __future__ import annotations

from pathlib import Path

from sedac.serving.triton_repo import parameter_block, tensor_block

_S, _I, _F, _B, _U = "TYPE_STRING", "TYPE_INT32", "TYPE_FP32", "TYPE_BOOL", "TYPE_UINT64"
_SAMPLING = [
    ("temperature", _F),
    ("repetition_penalty", _F),
    ("presence_penalty", _F),
    ("frequency_penalty", _F),
    ("random_seed", _U),
]


def _head(name: str, backend: str, batch: int, decoupled: bool = False) -> str:
    policy = "model_transaction_policy {\n  decoupled: true\n}\n" if decoupled else ""
    return f'name: "{name}"\nbackend: "{backend}"\nmax_batch_size: {batch}\n{policy}'


def _steps(steps) -> str:
    out = []
    for model, inputs, outputs in steps:
        maps = "".join(f'      input_map {{\n        key: "{k}"\n        value: "{v}"\n      }}\n' for k, v in inputs)
        maps += "".join(
            f'      output_map {{\n        key: "{k}"\n        value: "{v}"\n      }}\n' for k, v in outputs
        )
        out.append(f'    {{\n      model_name: "{model}"\n      model_version: -1\n{maps}    }}')
    return "ensemble_scheduling {\n  step [\n" + ",\n".join(out) + "\n  ]\n}\n"


def trtllm_configs(tokenizer_dir: Path, trtllm_engine_dir: str, batch: int, max_seq_len: int) -> dict[str, str]:
    cpu = "instance_group [\n  {\n    count: 1\n    kind: KIND_CPU\n  }\n]\n"
    preprocessing = (
        _head("preprocessing", "python", batch)
        + tensor_block(
            "input",
            [
                ("QUERY", _S, "[ 1 ]"),
                ("REQUEST_OUTPUT_LEN", _I, "[ 1 ]"),
                ("BAD_WORDS_DICT", _S, "[ -1 ]", True),
                ("STOP_WORDS_DICT", _S, "[ -1 ]", True),
                ("END_ID", _I, "[ 1 ]", True),
                ("PAD_ID", _I, "[ 1 ]", True),
            ],
        )
        + tensor_block(
            "output",
            [
                ("INPUT_ID", _I, "[ -1 ]"),
                ("REQUEST_INPUT_LEN", _I, "[ 1 ]"),
                ("BAD_WORDS_IDS", _I, "[ 2, -1 ]"),
                ("STOP_WORDS_IDS", _I, "[ 2, -1 ]"),
                ("REQUEST_OUTPUT_LEN", _I, "[ -1 ]"),
                ("OUT_END_ID", _I, "[ 1 ]"),
                ("OUT_PAD_ID", _I, "[ 1 ]"),
            ],
        )
        + parameter_block({"tokenizer_dir": tokenizer_dir, "add_special_tokens": "False"})
        + cpu
    )
    tensorrt_llm = (
        _head("tensorrt_llm", "tensorrtllm", batch, decoupled=True)
        + tensor_block(
            "input",
            [
                ("input_ids", _I, "[ -1 ]"),
                ("input_lengths", _I, "[ 1 ]"),
                ("request_output_len", _I, "[ 1 ]"),
                ("end_id", _I, "[ 1 ]", True),
                ("pad_id", _I, "[ 1 ]", True),
                ("stop_words_list", _I, "[ 2, -1 ]", True),
                ("bad_words_list", _I, "[ 2, -1 ]", True),
                ("runtime_top_k", _I, "[ 1 ]", True),
                ("runtime_top_p", _F, "[ 1 ]", True),
                ("streaming", _B, "[ 1 ]", True),
            ]
            + [(n, t, "[ 1 ]", True) for n, t in _SAMPLING],
        )
        + tensor_block(
            "output",
            [
                ("output_ids", _I, "[ -1, -1 ]"),
                ("sequence_length", _I, "[ -1 ]"),
                ("cum_log_probs", _F, "[ -1 ]"),
                ("output_log_probs", _F, "[ -1, -1 ]"),
            ],
        )
        + "instance_group [\n  {\n    count: 1\n    kind: KIND_GPU\n  }\n]\n"
        + parameter_block(
            {
                "gpt_model_type": "inflight_fused_batching",
                "gpt_model_path": trtllm_engine_dir,
                "batch_scheduler_policy": "max_utilization",
                "enable_kv_cache_reuse": "true",
                "kv_cache_free_gpu_mem_fraction": "0.9",
                "max_attention_window_size": max_seq_len,
            }
        )
    )
    postprocessing = (
        _head("postprocessing", "python", batch)
        + tensor_block("input", [("TOKENS_BATCH", _I, "[ -1, -1 ]"), ("SEQUENCE_LENGTH", _I, "[ -1 ]")])
        + tensor_block("output", [("OUTPUT", _S, "[ -1 ]")])
        + parameter_block({"tokenizer_dir": tokenizer_dir, "skip_special_tokens": "True"})
        + cpu
    )
    ensemble = (
        f'name: "ensemble"\nplatform: "ensemble"\nmax_batch_size: {batch}\n'
        + tensor_block(
            "input",
            [
                ("text_input", _S, "[ 1 ]"),
                ("max_tokens", _I, "[ 1 ]"),
                ("bad_words", _S, "[ -1 ]", True),
                ("stop_words", _S, "[ -1 ]", True),
                ("end_id", _I, "[ 1 ]", True),
                ("pad_id", _I, "[ 1 ]", True),
                ("top_k", _I, "[ 1 ]", True),
                ("top_p", _F, "[ 1 ]", True),
                ("stream", _B, "[ 1 ]", True),
            ]
            + [(n, t, "[ 1 ]", True) for n, t in _SAMPLING],
        )
        + tensor_block("output", [("text_output", _S, "[ -1 ]")])
        + _steps(
            [
                (
                    "preprocessing",
                    [
                        ("QUERY", "text_input"),
                        ("REQUEST_OUTPUT_LEN", "max_tokens"),
                        ("BAD_WORDS_DICT", "bad_words"),
                        ("STOP_WORDS_DICT", "stop_words"),
                        ("END_ID", "end_id"),
                        ("PAD_ID", "pad_id"),
                    ],
                    [
                        ("INPUT_ID", "_INPUT_ID"),
                        ("REQUEST_INPUT_LEN", "_REQUEST_INPUT_LEN"),
                        ("BAD_WORDS_IDS", "_BAD_WORDS_IDS"),
                        ("STOP_WORDS_IDS", "_STOP_WORDS_IDS"),
                        ("REQUEST_OUTPUT_LEN", "_REQUEST_OUTPUT_LEN"),
                        ("OUT_END_ID", "_END_ID"),
                        ("OUT_PAD_ID", "_PAD_ID"),
                    ],
                ),
                (
                    "tensorrt_llm",
                    [
                        ("input_ids", "_INPUT_ID"),
                        ("input_lengths", "_REQUEST_INPUT_LEN"),
                        ("request_output_len", "_REQUEST_OUTPUT_LEN"),
                        ("end_id", "_END_ID"),
                        ("pad_id", "_PAD_ID"),
                        ("stop_words_list", "_STOP_WORDS_IDS"),
                        ("bad_words_list", "_BAD_WORDS_IDS"),
                        ("runtime_top_k", "top_k"),
                        ("runtime_top_p", "top_p"),
                        ("streaming", "stream"),
                    ]
                    + [(n, n) for n, _ in _SAMPLING],
                    [("output_ids", "_TOKENS_BATCH"), ("sequence_length", "_SEQUENCE_LENGTH")],
                ),
                (
                    "postprocessing",
                    [("TOKENS_BATCH", "_TOKENS_BATCH"), ("SEQUENCE_LENGTH", "_SEQUENCE_LENGTH")],
                    [("OUTPUT", "text_output")],
                ),
            ]
        )
    )
    return {
        "preprocessing": preprocessing,
        "tensorrt_llm": tensorrt_llm,
        "postprocessing": postprocessing,
        "ensemble": ensemble,
    }
