"""Structured outputs with xgrammar (the grammar engine vLLM, SGLang and TensorRT-LLM use): JSON schema,
any JSON object, regex, a choice of strings, or an EBNF grammar per request.

The engine step calls this strategy: each constrained sequence has a grammar matcher; before sampling,
its logits row is masked to the tokens the grammar allows next (xgrammar's token bitmask, applied in
place on CPU or CUDA); after sampling, the matcher advances by the chosen token. The grammar's end is
reached only through an end-of-sequence token, so a constrained sequence stops exactly when its text is
complete. Grammars are compiled once per distinct request (xgrammar caches them). JSON is compact (no
free whitespace between tokens, vLLM's disable-any-whitespace): small models otherwise pad it with
whitespace until max_tokens.

SEDAC lossless drafts are masked too (the matcher advances by each draft and rolls back after the cycle),
and each verify row is masked by the grammar's state after its draft prefix, so the target tokens are
exactly the ones a constrained `off` step would pick.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import torch


@dataclass
class StructuredOutputsParams:
    """vLLM's StructuredOutputsParams: exactly one of json (a JSON schema, dict or string), regex,
    choice (a list of strings), grammar (EBNF, GBNF syntax), json_object (any JSON object)."""

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False

    def __post_init__(self):
        given = [n for n in ("json", "regex", "choice", "grammar") if getattr(self, n) is not None]
        given += ["json_object"] if self.json_object is True else []
        if len(given) != 1:
            raise ValueError(
                "structured_outputs needs exactly one of json, regex, choice, grammar, json_object"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise ValueError("structured_outputs.json must be a JSON schema (object or string)")
        for name in ("regex", "grammar"):
            if getattr(self, name) is not None and not (isinstance(getattr(self, name), str) and getattr(self, name)):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string")
        if self.choice is not None and not (
            isinstance(self.choice, list) and self.choice and all(isinstance(c, str) and c for c in self.choice)
        ):
            raise ValueError("structured_outputs.choice must be a non-empty list of non-empty strings")
        if not isinstance(self.json_object, bool):
            raise ValueError("structured_outputs.json_object must be a boolean")

    @classmethod
    def coerce(cls, value) -> "StructuredOutputsParams | None":
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = set(value) - {"json", "regex", "choice", "grammar", "json_object"}
            if unknown:
                raise ValueError(f"structured_outputs: unknown fields {sorted(unknown)}")
            return cls(**value)
        raise ValueError("structured_outputs must be a StructuredOutputsParams or a dict")

    def key(self) -> str:
        """Identifies the grammar (for the compile cache)."""
        return json.dumps([self.json, self.regex, self.choice, self.grammar, self.json_object], sort_keys=True)


class StructuredOutputs:
    def __init__(self, tokenizer, vocab_size: int, eos_ids: list[int]):
        self.tokenizer, self.vocab_size, self.eos_ids = tokenizer, vocab_size, eos_ids
        self._compiler = None
        self.matchers: dict[object, object] = {}  # Sequence -> xgrammar.GrammarMatcher

    def compile(self, params: StructuredOutputsParams):
        """The compiled grammar; a bad schema, regex or grammar raises ValueError naming it."""
        compiler = self._grammar_compiler()
        try:
            if params.json is not None:
                schema = params.json if isinstance(params.json, str) else json.dumps(params.json)
                return compiler.compile_json_schema(schema, any_whitespace=False)
            if params.json_object:
                return compiler.compile_builtin_json_grammar()
            if params.regex is not None:
                return compiler.compile_regex(params.regex)
            if params.choice is not None:
                return compiler.compile_regex("|".join(_regex_escape(c) for c in params.choice))
            return compiler.compile_grammar(params.grammar)
        except (RuntimeError, ValueError, TypeError) as e:  # xgrammar's parse errors
            kind = (
                next(n for n in ("json", "regex", "choice", "grammar") if getattr(params, n) is not None)
                if not params.json_object
                else "json_object"
            )
            detail = re.sub(r"^\[[^\]]*\] \S+:\d+: ", "", str(e).strip().splitlines()[0])  # xgrammar's log prefix
            raise ValueError(f"structured_outputs.{kind} is invalid: {detail[:300]}") from None

    def _grammar_compiler(self):
        if self._compiler is None:
            import xgrammar

            info = xgrammar.TokenizerInfo.from_huggingface(
                self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.eos_ids
            )
            self._compiler = xgrammar.GrammarCompiler(info, max_threads=1)
        return self._compiler

    def start(self, seq, compiled) -> None:
        import xgrammar

        self.matchers[seq] = xgrammar.GrammarMatcher(compiled)

    def release(self, seq) -> None:
        self.matchers.pop(seq, None)

    def mask(self, logits: torch.Tensor, seqs: list) -> torch.Tensor:
        """logits [R, V], one row per sequence: rows of constrained sequences keep only the tokens their
        grammar allows next (the others -inf), in place."""
        rows = [i for i, s in enumerate(seqs) if s in self.matchers]
        if not rows:
            return logits
        import xgrammar

        bitmask = xgrammar.allocate_token_bitmask(len(seqs), self.vocab_size)
        for i in rows:
            self.matchers[seqs[i]].fill_next_token_bitmask(bitmask, i)
        # A grammar no token can continue (a choice or pattern this vocabulary cannot spell) leaves its row
        # as it is: the sequence then ends as a dead end (accept), instead of sampling from nothing.
        live = [i for i in rows if bitmask[i].any()]
        if live:
            xgrammar.apply_token_bitmask_inplace(
                logits, bitmask.to(logits.device), vocab_size=self.vocab_size, indices=live
            )
        return logits

    def mask_after_drafts(self, logits: torch.Tensor, seq, drafts: list[int]) -> torch.Tensor:
        """logits [k + 1, V]: seq's verify rows after each prefix of its k drafts; row j keeps what the
        grammar allows after drafts[:j], in place. Rows past a draft the grammar refuses stay as they
        are (acceptance stops at that draft, so they are never read). The matcher ends where it began."""
        matcher = self.matchers.get(seq)
        if matcher is None:
            return logits
        import xgrammar

        bitmask = xgrammar.allocate_token_bitmask(len(logits), self.vocab_size)
        live, taken = [], 0
        for j in range(len(logits)):
            if matcher.is_terminated():  # a draft ended the grammar: acceptance stops there
                break
            matcher.fill_next_token_bitmask(bitmask, j)
            if bitmask[j].any():
                live.append(j)
            if j == len(drafts) or not matcher.accept_token(drafts[j]):
                break
            taken += 1
        if taken:
            matcher.rollback(taken)
        if live:
            xgrammar.apply_token_bitmask_inplace(
                logits, bitmask.to(logits.device), vocab_size=self.vocab_size, indices=live
            )
        return logits

    def rollback(self, seq, num_tokens: int) -> None:
        """Undo seq's last num_tokens accepts (drafts, once a cycle has drafted)."""
        if num_tokens and seq in self.matchers:
            self.matchers[seq].rollback(num_tokens)

    def accept(self, seq, token: int) -> str | None:
        """Advance seq's matcher by its new token (or a draft): "end" when the grammar has ended (the token
        was an end-of-sequence token the completed grammar allowed), "dead end" when the grammar cannot take it."""
        matcher = self.matchers.get(seq)
        if matcher is None:
            return None
        if not matcher.accept_token(token):
            return "dead end"
        return "end" if matcher.is_terminated() else None


def _regex_escape(text: str) -> str:
    """A literal string as a regex for xgrammar (ECMAScript-style escapes)."""
    return "".join("\\" + c if c in r"\^$.|?*+()[]{}/" else c for c in text)
