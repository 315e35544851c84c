"""`sedac-run chat`: an interactive conversation using the engine's chat template."""

from __future__ import annotations

import sys
import time

import click


def chat_loop(llm, params) -> None:
    history: list[dict] = []
    last = None
    click.echo("chat: type a message; /stats, /reset, /quit", err=True)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        command = line.strip()
        if command == "/quit":
            break
        if command == "/reset":
            history, last = [], None
            click.echo("(conversation cleared)", err=True)
            continue
        if command == "/stats":
            click.echo(_stats_line(llm, last), err=True)
            continue
        if not command:
            continue
        history.append({"role": "user", "content": line})
        click.echo("assistant> ", nl=False)
        reply, started = "", time.perf_counter()
        for delta in llm.stream(llm.apply_chat_template(history), params):
            reply += delta
            click.echo(delta, nl=False)
            sys.stdout.flush()
        click.echo()
        last = (llm.engine.last_finished, time.perf_counter() - started)
        history.append({"role": "assistant", "content": reply})


def _stats_line(llm, last) -> str:
    s = llm.engine.stats()
    if last is None or last[0] is None:
        return f"no reply yet; kv cache usage {s['kv_cache_usage']:.1%}"
    out, elapsed = last
    m = out.metrics
    return (
        f"last reply: {m.num_generated_tokens} tokens, {m.num_generated_tokens / elapsed:.1f} tok/s, "
        f"ttft {1000 * (m.ttft or 0):.0f} ms; prompt {m.num_prompt_tokens} tokens "
        f"({m.num_cached_tokens} from prefix cache); kv cache usage {s['kv_cache_usage']:.1%}"
    )
