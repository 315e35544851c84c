"""Incremental detokenization (vLLM's offsets scheme): emit text only once it is whole UTF-8."""

from __future__ import annotations

from dataclasses import dataclass

# Decode a few tokens before the new ones: SentencePiece-style tokenizers drop a leading space
# when a token is decoded alone.
_CONTEXT_TOKENS = 5


@dataclass
class DetokState:
    prefix_offset: int
    read_offset: int


def start(num_prompt_tokens: int) -> DetokState:
    return DetokState(max(num_prompt_tokens - _CONTEXT_TOKENS, 0), num_prompt_tokens)


def decode_new_text(tokenizer, token_ids: list[int], state: DetokState, skip_special: bool) -> str:
    """Text added by the tokens after state.read_offset; '' while a character is still incomplete."""
    prefix = tokenizer.decode(token_ids[state.prefix_offset : state.read_offset], skip_special_tokens=skip_special)
    full = tokenizer.decode(token_ids[state.prefix_offset :], skip_special_tokens=skip_special)
    if len(full) <= len(prefix) or full.endswith("\ufffd"):
        return ""
    state.prefix_offset, state.read_offset = state.read_offset, len(token_ids)
    return full[len(prefix) :]


def load_tokenizer(engine_dir):
    """The engine directory's tokenizer (ValueError when it cannot be loaded)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(engine_dir))
    except Exception as e:
        raise ValueError(f"engine tokenizer cannot be loaded from {engine_dir}: {e}") from None
