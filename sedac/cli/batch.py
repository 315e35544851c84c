"""`sedac-run generate --input`: a JSONL batch where a bad line fails alone."""

from __future__ import annotations

import json
import time


def read_prompts(llm, path: str) -> list:
    """Each line: {"prompt": str | [ids]} or {"messages": [...]}; a bad line becomes an error string."""
    items = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if "messages" in record:
                    items.append(llm.apply_chat_template(record["messages"]))
                else:
                    items.append(record["prompt"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                items.append(ValueError(f"line {number}: {e}"))
    return items


def run_batch(llm, input_file: str, output_file: str, params) -> dict:
    items = read_prompts(llm, input_file)
    started = time.perf_counter()
    good = [i for i, item in enumerate(items) if not isinstance(item, Exception)]
    outputs = dict(zip(good, llm.generate([items[i] for i in good], params, use_tqdm=True)))
    tokens = errors = 0
    with open(output_file, "w") as f:
        for i, item in enumerate(items):
            out = outputs.get(i)
            if out is None or out.error:
                errors += 1
                f.write(json.dumps({"index": i, "error": str(item) if out is None else out.error}) + "\n")
                continue
            tokens += len(out.token_ids)
            f.write(
                json.dumps(
                    {
                        "index": i,
                        "text": out.text,
                        "token_ids": out.token_ids,
                        "finish_reason": out.finish_reason,
                        "metrics": out.metrics.as_dict(),
                    }
                )
                + "\n"
            )
    elapsed = time.perf_counter() - started
    return {
        "requests": len(items),
        "errors": errors,
        "generated_tokens": tokens,
        "seconds": round(elapsed, 2),
        "tokens_per_s": round(tokens / elapsed, 1),
    }
