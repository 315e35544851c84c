"""One sampled continuation: its tokens, how many of them have KV, its blocks and its output state."""

from __future__ import annotations

import copy
import itertools
import time
from enum import Enum, auto

import torch

from sedac.runtime.sampling_params import SamplingParams

_ids = itertools.count()


class Status(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        index: int = 0,
        arrival: float | None = None,
        bad_words_ids: list[list[int]] | None = None,
        stop_ids: list[int] | None = None,
    ):
        self.seq_id = next(_ids)
        self.request_id, self.index, self.params = request_id, index, params
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0  # tokens whose KV is in the cache
        self.num_cached_tokens = 0  # of those, found in the prefix cache at admission
        self.block_table: list[int] = []
        self.num_hashed_blocks = 0  # leading full blocks registered in the prefix cache
        self.block_hashes: list[int] = []
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.output_text = ""
        self.logprobs: list[dict[int, float]] = []
        self.arrival = arrival if arrival is not None else time.perf_counter()
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        self.generator = _generator(params.seed, index)
        self.pending_forks = params.n - 1 if index == 0 else 0  # children forked after the prompt
        self.detok_state: object = None
        self.bad_words_ids = bad_words_ids or []  # token sequences whose last token is banned after the rest
        self.stop_ids = stop_ids or []  # EOS and stop_token_ids: held back until params.min_tokens outputs
        self.exit_hidden: list = []  # lossy mode: exit states of exited tokens whose deeper layers are pending
        # lossy precision exit: (position, exit's greedy token, level) since the last full pass
        self.precision_exits: list = []
        self.approximate_kv_from: int | None = None  # first position whose K/V is not the full model's

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def fork(self, index: int) -> "Sequence":
        """A sibling sample sharing this sequence's prompt and blocks (the caller bumps block refs)."""
        child = Sequence(
            self.request_id, self.token_ids, self.params, index, self.arrival, self.bad_words_ids, self.stop_ids
        )
        child.num_prompt_tokens = self.num_prompt_tokens
        child.num_computed_tokens = self.num_computed_tokens
        child.block_table = list(self.block_table)
        child.num_hashed_blocks, child.block_hashes = self.num_hashed_blocks, list(self.block_hashes)
        child.status = self.status
        return child

    def branch(self, index: int) -> "Sequence":
        """A fork mid-generation (o1 branching): it also takes the text, logprobs and detokenizer state so far."""
        child = self.fork(index)
        child.output_text, child.logprobs, child.first_token_time = (
            self.output_text,
            list(self.logprobs),
            self.first_token_time,
        )
        child.detok_state = copy.copy(self.detok_state)
        return child

    def mark_approximate_kv(self, position: int) -> None:
        """A lossy exit left K/V at position that the full model would not write: from there on the
        sequence's blocks never enter the prefix cache, so no other request (in `off` mode, say)
        reuses them as if they were exact."""
        if self.approximate_kv_from is None or position < self.approximate_kv_from:
            self.approximate_kv_from = position

    def reset_for_recompute(self) -> None:
        """Preemption by recompute: drop all KV; the tokens stay and are prefilled again."""
        self.num_computed_tokens = 0
        self.block_table, self.block_hashes, self.num_hashed_blocks = [], [], 0
        self.exit_hidden, self.precision_exits, self.approximate_kv_from = [], [], None
        self.status = Status.WAITING


def _generator(seed: int | None, index: int) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed + index)
    return g
