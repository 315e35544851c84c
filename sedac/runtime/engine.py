"""LLMEngine: add requests, step the batch, abort; the loop that LLM and the servers drive."""

from __future__ import annotations

import time
from pathlib import Path

from sedac.config import DeviceOptions, EngineConfig
from sedac.runtime import detokenizer
from sedac.runtime.block_manager import BlockManager
from sedac.runtime.model_runner import ModelRunner, resolve_device
from sedac.runtime.o1 import DEFAULT_ENTROPY_THRESHOLD, AdaptiveCompute, Fork, with_engine_o1_mode
from sedac.runtime.outputs import RequestMetrics, RequestOutput
from sedac.runtime.probes import CertaintyProbes
from sedac.runtime.reasoning import UNLIMITED, ReasoningMarkers, ThinkingBudgets
from sedac.runtime.request import Request, RequestOutputs, allowance, stop_reason
from sedac.runtime.sampler import argmax_only, sample
from sedac.runtime.sampling_params import SamplingParams, check_o1, check_sedac_mode
from sedac.runtime.scheduler import ScheduledBatch, Scheduler
from sedac.runtime.sedac_steps import SedacSteps
from sedac.runtime.sequence import Sequence, Status
from sedac.runtime.structured_outputs import StructuredOutputs

# running totals in stats() (sedac_cost and sedac_off_cost sum fractional pass costs)
COUNTERS = (
    "prompt_tokens",
    "generation_tokens",
    "requests_finished",
    "sedac_drafted_tokens",
    "sedac_accepted_tokens",
    "sedac_lossy_tokens",
    "structured_output_requests",
    "sedac_cost",
    "sedac_off_cost",
)


class LLMEngine:
    def __init__(
        self,
        engine_dir: str | Path,
        device: str = "auto",
        kv_cache_memory: int | None = None,
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | None = None,
        sedac_mode: str = "off",
        sedac_kv_fill: str = "deferred",
        sedac_lossy_exit: str | None = None,
        speculative_disable_by_batch_size: int | None = None,
        kv_cache_dtype: str = "auto",
        o1_mode: str = "off",
        reasoning_markers: tuple[str, str] | None = None,
        gpu_memory_utilization: float | None = None,
        kv_cache_free_gpu_memory_fraction: float | None = None,
        enforce_eager: bool = False,
        max_model_len: int | None = None,
    ):
        self.engine_dir = Path(engine_dir)
        if not self.engine_dir.is_dir():
            raise ValueError(f"engine directory not found: {engine_dir}")
        self.config = EngineConfig.load(self.engine_dir)
        if self.config.sedac and "draft_precision" not in self.config.sedac:
            raise ValueError(
                f"{engine_dir} has SEDAC components from an older sedac-build (no draft precision); "
                "rebuild it with sedac-build --sedac"
            )
        self.tokenizer = detokenizer.load_tokenizer(self.engine_dir)
        b = self.config.build
        options = DeviceOptions(
            kv_cache_memory=kv_cache_memory,
            kv_cache_dtype=kv_cache_dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_free_gpu_memory_fraction=kv_cache_free_gpu_memory_fraction,
            enforce_eager=enforce_eager,
            max_num_seqs=b.max_batch_size if max_num_seqs is None else max_num_seqs,
            max_num_batched_tokens=b.max_num_tokens if max_num_batched_tokens is None else max_num_batched_tokens,
        )
        b.max_seq_len = options.context_length(max_model_len, b.max_seq_len)
        self.runner = ModelRunner(self.engine_dir, self.config, resolve_device(device), options)
        self.blocks = BlockManager(self.runner.num_blocks, b.kv_block_size)
        self.scheduler = Scheduler(
            self.blocks, options.max_num_seqs, options.max_num_batched_tokens, lookahead=self._draft_len
        )
        self.sedac_mode = self._check_mode(sedac_mode)
        check_o1(o1_mode, 1, None, None)
        if o1_mode == "adaptive" and self.sedac_mode not in (None, "off"):
            raise ValueError("o1_mode adaptive runs with sedac_mode off: give one of them as the engine default")
        self.o1_mode, self.o1 = o1_mode, AdaptiveCompute(DEFAULT_ENTROPY_THRESHOLD)
        self.sedac = SedacSteps(
            self.runner,
            self.scheduler.max_num_seqs,
            sedac_kv_fill,
            sedac_lossy_exit,
            speculative_disable_by_batch_size,
            engine_dir,
        )
        self.requests: dict[str, Request] = {}
        self.eos_ids = set(self.config.model.eos_token_ids)
        self.structured = StructuredOutputs(self.tokenizer, self.config.model.vocab_size, sorted(self.eos_ids))
        # reasoning_markers (start, end) stand in for the engine's own, as vLLM's --reasoning-parser does
        own = self.config.reasoning and ReasoningMarkers(**self.config.reasoning)
        markers = ReasoningMarkers(*reasoning_markers) if reasoning_markers else own
        self.reasoning = ThinkingBudgets(self.tokenizer, markers or None)
        self.probes = CertaintyProbes(self.tokenizer, self.reasoning, self.config.build.max_seq_len)
        self.outputs = RequestOutputs(self.reasoning, self.o1, self.probes, self.config.model.num_layers)
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.last_finished: RequestOutput | None = None

    # ---- requests -------------------------------------------------------------------------------
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
            if any(t < 0 or t >= self.config.model.vocab_size for t in ids):
                raise ValueError(f"prompt token ids must be in [0, {self.config.model.vocab_size})")
        else:
            raise ValueError("prompt must be a string or a list of token ids")
        if not ids:
            raise ValueError("prompt is empty")
        max_len = self.config.build.max_seq_len
        if len(ids) >= max_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens but max_seq_len is {max_len} (at least one token must fit after it)"
            )
        return ids

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
    ) -> None:
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError("params must be a SamplingParams")
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self._check_mode(params.sedac_mode)
        params = with_engine_o1_mode(params, self.o1_mode)
        self._sedac_capable(params)
        ids = self.tokenize(prompt)
        grammar = self._grammar(params)
        self.reasoning.check(params.thinking_token_budget)
        self.probes.check(params)
        self._check_token_ids(params)
        seq = Sequence(
            request_id,
            ids,
            params,
            arrival=arrival_time,
            bad_words_ids=self._bad_words_ids(params),
            stop_ids=self._held_stops(params),
        )
        seq.detok_state = detokenizer.start(len(ids))
        metrics = RequestMetrics(
            seq.arrival, num_prompt_tokens=len(ids), layers_per_token=float(self.config.model.num_layers)
        )  # the full model
        self.requests[request_id] = Request(
            request_id, prompt if isinstance(prompt, str) else None, ids, params, [seq], metrics, grammar=grammar
        )
        if grammar is not None:
            self.structured.start(seq, grammar)
            self.counters["structured_output_requests"] += 1
        if params.thinking_token_budget is not None or params.o1_probe_interval is not None:
            budget = params.thinking_token_budget
            self.reasoning.start(seq, UNLIMITED if budget is None else budget, ids)
        if params.o1_probe_interval is not None:
            self.probes.start(seq, params)
        if params.o1_mode == "adaptive":
            opened = self.reasoning.opened_by(ids)
            self.o1.start(request_id, params, answer_text=lambda s: self.reasoning.split(s.output_text, opened)[1])
        self.scheduler.add(seq)

    def _grammar(self, params: SamplingParams):
        if params.structured_outputs is None:
            return None
        return self.structured.compile(params.structured_outputs)

    @staticmethod
    def _sedac_capable(params: SamplingParams) -> None:
        blocker = params.sedac_blocker(params.sedac_mode)
        if blocker:
            raise ValueError(
                f"sedac_mode {params.sedac_mode} does not take {blocker} yet; drop sedac_mode or choose another"
            )

    def _check_mode(self, mode: str | None) -> str | None:
        check_sedac_mode(mode)
        if mode not in (None, "off") and self.config.sedac is None:
            raise ValueError(f"sedac_mode={mode!r} needs an engine built with --sedac")
        return mode

    def mode_of(self, seq: Sequence) -> str:
        """The request's SEDAC mode, else the engine's; off where the request has a field that mode does not take."""
        mode = seq.params.sedac_mode or self.sedac_mode
        return "off" if seq.params.sedac_blocker(mode) else mode

    def _draft_len(self, seq: Sequence) -> int:
        """Drafts this lossless decode step (0 for other modes): the KV slots the scheduler reserves."""
        if self.mode_of(seq) != "lossless" or seq.pending_forks or seq.num_computed_tokens != seq.num_tokens - 1:
            return 0
        return self.sedac.draft_len(seq)

    def _held_stops(self, params: SamplingParams) -> list[int] | None:
        """min_tokens: the stop tokens held back until then (EOS too unless ignore_eos, as vLLM)."""
        if not params.min_tokens:
            return None
        return sorted(set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids))

    def _check_token_ids(self, params: SamplingParams) -> None:
        vocab = self.config.model.vocab_size
        for name in ("stop_token_ids", "logit_bias"):
            if any(t >= vocab for t in getattr(params, name) or ()):
                raise ValueError(f"{name} has token ids outside the vocabulary [0, {vocab})")

    def _bad_words_ids(self, params: SamplingParams) -> list[list[int]]:
        """Each bad word as token ids, with and without a leading space (as vLLM does)."""
        variants = {
            tuple(self.tokenizer.encode(form, add_special_tokens=False))
            for word in params.bad_words
            for form in (word, " " + word.lstrip())
        }
        return [list(v) for v in variants if v]

    def abort_request(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.is_finished:
                self._finish(seq, "abort")
        req.aborted = True  # unforked siblings will never exist
        req.metrics.finish_time = time.perf_counter()
        output = self.outputs.build(req)
        self._release(request_id, output)
        return output

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- the step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        batch.order_decodes_first()
        self.runner.copy_blocks(self.blocks.pending_copies)
        self.blocks.pending_copies.clear()
        full, lossless, lossy = self.sedac.split(batch, self.mode_of)
        new_tokens = self._full_step(full) if full.seqs else []
        if lossless:
            new_tokens += self._record(lossless, self.sedac.lossless(lossless, self.structured))
        if lossy:
            self.counters["sedac_lossy_tokens"] += len(lossy)
            new_tokens += self._record(lossy, self.sedac.lossy(lossy))
        now = time.perf_counter()
        for seq, tokens, logprobs in new_tokens:
            for token, lp in zip(tokens, logprobs):
                if not seq.is_finished:  # a stop inside an accepted draft ends it there
                    self._append_token(seq, token, lp, now)
        touched = {seq.request_id for seq in batch.seqs}
        self._o1_early_stop(touched)
        finished = self._collect_finished(touched)  # pops them: one output per request per step
        return [self.outputs.build(self.requests[rid]) for rid in touched if rid in self.requests] + finished

    def _full_step(self, batch: ScheduledBatch):
        samplers, rows = self._sampling_rows(batch)
        logits = self.runner.forward(batch, rows, argmax_only(samplers))
        self._computed(batch.seqs, batch.num_new_tokens)
        samplers, logit_rows = self._fork_children(samplers)
        # A copy only where needed: forks share their parent's row, and grammars mask the rows in place.
        if logit_rows != list(range(len(logits))) or self.structured.matchers:
            logits = logits[logit_rows]
        tokens, logprobs = sample(logits, samplers, self.structured.mask)
        self._full_costs(samplers, sum(batch.num_new_tokens))
        forks = self.o1.branch_points(samplers, logits, tokens, lambda rid: len(self.requests[rid].seqs))
        return [(seq, [t], [lp]) for seq, t, lp in zip(samplers, tokens, logprobs)] + [
            (self._branch(f), [f.token], [f.logprobs]) for f in forks
        ]

    def _full_costs(self, samplers: list[Sequence], rows: int) -> None:
        """A full pass's token costs what off's does; a SEDAC request's count in the engine-wide ratio too."""
        share = self.sedac.off_cost(rows)
        for seq in samplers:
            req = self.requests[seq.request_id]
            req.cost, req.off_cost = req.cost + share, req.off_cost + share
            if self.mode_of(seq) != "off":
                self.counters["sedac_cost"] += share
                self.counters["sedac_off_cost"] += share

    def _branch(self, fork: Fork) -> Sequence:
        """o1: a branch of fork.parent from its newest position, sharing every block so far (copy-on-write)."""
        child = fork.parent.branch(len(self.requests[fork.parent.request_id].seqs))
        self._adopt(fork.parent, child)
        self.o1.add_branch(child, fork)
        return child

    def _adopt(self, parent: Sequence, child: Sequence) -> None:
        """A fork joins its request and the running batch; its blocks gain an owner."""
        self.reasoning.fork(parent, child)
        self._join(child)
        self.requests[parent.request_id].seqs.append(child)

    def _join(self, child: Sequence) -> None:
        """A fork (a sample, branch or probe) owns its share of the blocks and runs from the next step."""
        self.blocks.share(child)
        self.scheduler.add_running(child)

    def _o1_early_stop(self, request_ids: set[str]) -> None:
        """End an adaptive request's other branches once its vote is decided."""
        for rid in request_ids & self.o1.trees.keys():
            req = self.requests[rid]
            if self.o1.stop_early(rid, req.seqs, lambda seq: allowance(seq, self.config.build.max_seq_len)):
                req.metrics.o1_early_stopped = True
                for seq in req.seqs:
                    if not seq.is_finished:
                        self._finish(seq, "abort")

    def _record(self, seqs: list[Sequence], results):
        """Account a SEDAC path's results (computed tokens, layer rows, drafts) -> new tokens per seq."""
        self._computed(seqs, [r.computed for r in results])
        for seq, r in zip(seqs, results):
            req = self.requests[seq.request_id]
            req.cost, req.off_cost = req.cost + r.cost, req.off_cost + r.off_cost
            self.counters["sedac_cost"] += r.cost
            self.counters["sedac_off_cost"] += r.off_cost
            req.drafted += r.drafted
            req.accepted += r.accepted
            self.counters["sedac_drafted_tokens"] += r.drafted
            self.counters["sedac_accepted_tokens"] += r.accepted
        return [(seq, r.tokens, r.logprobs) for seq, r in zip(seqs, results)]

    def _computed(self, seqs: list[Sequence], counts: list[int]) -> None:
        for seq, n in zip(seqs, counts):
            seq.num_computed_tokens += n
            self.blocks.register_computed(seq)

    def _sampling_rows(self, batch):
        """Sequences whose scheduled tokens reach their end sample; their last row gives the logits."""
        samplers, rows, end = [], [], 0
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            end += n
            if seq.num_computed_tokens + n == seq.num_tokens:
                samplers.append(seq)
                rows.append(end - 1)
        return samplers, rows

    def _fork_children(self, samplers: list[Sequence]):
        """n > 1: once the prompt is computed, siblings share its blocks and sample from its logits."""
        out, logit_rows = [], []
        for row, seq in enumerate(samplers):
            out.append(seq)
            logit_rows.append(row)
            while seq.pending_forks:
                child = seq.fork(seq.params.n - seq.pending_forks)
                seq.pending_forks -= 1
                child.detok_state = detokenizer.start(child.num_tokens)
                if self.requests[seq.request_id].grammar is not None:
                    self.structured.start(child, self.requests[seq.request_id].grammar)
                self._adopt(seq, child)
                out.append(child)
                logit_rows.append(row)
        return out, logit_rows

    def _append_token(self, seq: Sequence, token: int, logprob, now: float) -> None:
        req = self.requests[seq.request_id]
        token = self.reasoning.override(seq, token)  # a spent thinking budget emits the end marker
        grammar = self.structured.accept(seq, token)
        if grammar == "dead end":  # no token could continue its grammar (a pattern nothing matches)
            self._finish(seq, "abort", "structured_outputs: no token of this vocabulary continues the grammar")
            return
        seq.token_ids.append(token)
        self.reasoning.observe(seq, seq.output_token_ids)
        if logprob is not None:
            seq.logprobs.append(logprob)
        if seq.first_token_time is None:
            seq.first_token_time = now
            req.metrics.first_token_time = req.metrics.first_token_time or now
        self.counters["generation_tokens"] += 1
        previous_len = len(seq.output_text)
        seq.output_text += detokenizer.decode_new_text(
            self.tokenizer, seq.token_ids, seq.detok_state, seq.params.skip_special_tokens
        )
        max_len = self.config.build.max_seq_len
        reason = ("stop", None) if grammar == "end" else stop_reason(seq, token, previous_len, self.eos_ids, max_len)
        if reason:
            self._finish(seq, *reason)
        elif self.probes.due(seq):
            self._join(self.probes.probe(seq, len(req.seqs)))

    def _finish(self, seq: Sequence, reason: str, stop_reason=None) -> None:
        seq.status, seq.finish_reason, seq.stop_reason = Status.FINISHED, reason, stop_reason
        seq.finish_time = time.perf_counter()
        self.structured.release(seq)
        self.reasoning.release(seq)
        self.scheduler.finish(seq)
        for probe in self.probes.finished(seq):  # a probe's answer is in; a finished sequence's probes stop
            self._finish(probe, "abort")

    def _collect_finished(self, touched: set[str]) -> list[RequestOutput]:
        done = [rid for rid in touched if rid in self.requests and self.requests[rid].is_done()]
        outputs = []
        for rid in done:
            req = self.requests.pop(rid)
            req.metrics.finish_time = max(s.finish_time for s in req.seqs)
            self.counters["prompt_tokens"] += len(req.prompt_token_ids)
            self.counters["requests_finished"] += 1
            outputs.append(self.outputs.build(req))
            self._release(rid, outputs[-1])
            self.last_finished = outputs[-1]
        return outputs

    def _release(self, request_id: str, output: RequestOutput) -> None:
        """A request is over: its o1 strategies forget it."""
        self.o1.release(request_id, output.metrics.o1_tokens)
        self.probes.release(request_id)

    def warm_up(self) -> None:
        """One short greedy request through prefill, decode and sampling (first-call costs: op dispatch
        setup, allocator growth), its output and its counts discarded."""
        counters, queries, hits = dict(self.counters), self.blocks.prefix_queries, self.blocks.prefix_hits
        self.add_request(
            "warm-up",
            [self.config.model.bos_token_id or 0] * 4,
            SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, o1_mode="off"),
        )
        while self.has_unfinished_requests():
            self.step()
        self.counters, self.blocks.prefix_queries, self.blocks.prefix_hits = counters, queries, hits
        self.last_finished = None

    # ---- introspection ----------------------------------------------------------------------------
    def stats(self) -> dict:
        b = self.blocks
        return {
            "num_requests_running": len(self.scheduler.running),
            "num_requests_waiting": len(self.scheduler.waiting),
            "kv_cache_usage": b.usage(),
            "kv_blocks_total": b.num_blocks,
            "kv_blocks_free": b.num_free_blocks,
            "kv_cache_bytes": self.runner.kv_cache_bytes,
            "prefix_cache_queries": b.prefix_queries,
            "prefix_cache_hits": b.prefix_hits,
            "num_preemptions": self.scheduler.num_preemptions,
            **self.counters,
            "thinking_budgets_exhausted": self.reasoning.exhausted,
            **self.o1.counters,
            **self.probes.counters,
            "sedac_exit_layer_tokens": dict(self.sedac.exit_histogram),
            **self.sedac.rates(self.counters),
            "sedac_controller": self.sedac.exit_controller.stats() if self.sedac.exit_controller else None,
        }
