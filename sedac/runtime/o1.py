"""O1 adaptive compute: a request branches at its uncertain tokens and answers by a vote of its branches.

At each generated token of an `o1_mode="adaptive"` request the engine reads the entropy of the model's
distribution there (`sedac::entropy`); above the request's threshold, while its branch budget lasts,
the sequence forks (copy-on-write: the branch shares every block of the prompt and of the text so far)
and the branch takes another token of that distribution: the next most likely one for greedy requests
(EAGer-style; so the result stays deterministic), a fresh draw for sampled ones. Branches finish as usual.
The answer is picked by a vote over the branches' final answers (a request's `answer_regex`, else the
normalized text) weighted by each branch's confidence (its geometric-mean token probability, as
DeepConf weights traces), and the vote stops early (ESC-style) once it is decided: either no branch
still running or still to come could change it, or the first ESC_WINDOW finished branches agree.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

import torch

from sedac.plugins import ops  # noqa: F401  (registers torch.ops.sedac.entropy)
from sedac.runtime.sampler import draw, filtered_probs, process, token_logprobs

# nats. On 60 generated arithmetic questions (the tuning seed of `sedac-run bench --o1`, SmolLM2-135M):
# 1.0-3.0 branched nearly every reply and up to 8 branches lost accuracy (0.60 greedy -> 0.43-0.57: the
# runner-up token mostly starts a worse reply); 4.0 branched 1.5 times per question and kept 0.62 (the
# default branch count: sampling_params.O1_BRANCHES).
DEFAULT_ENTROPY_THRESHOLD = 4.0
ESC_WINDOW = 3  # finished branches that, all agreeing, end the vote (ESC's window)


def with_engine_o1_mode(params, engine_mode: str):
    """params with the engine's o1 mode when they set none; requests it cannot serve adaptively (n > 1, a
    grammar, a SEDAC mode) run off, as they would on an engine without the default."""
    if (
        params.o1_mode is not None
        or engine_mode == "off"
        or params.o1_blocker
        or params.sedac_mode not in (None, "off")
    ):
        return params
    return dataclasses.replace(params, o1_mode=engine_mode)


def normalize(text: str) -> str:
    """The answer a branch gives when no answer_regex picks it: lower case, single spaces, no closing period."""
    return " ".join(text.lower().split()).rstrip(".!。 ")


def extract_answer(text: str, pattern: str | None) -> str:
    """The last match of pattern (its first group if it has one), normalized; the whole text without one."""
    if pattern is None:
        return normalize(text)
    matches = list(re.finditer(pattern, text))
    if not matches:
        return ""
    last = matches[-1]
    return normalize(last.group(1) if last.groups() else last.group(0))


@dataclass
class _Tree:
    """One adaptive request: its budget and threshold, how a branch's answer is read (answer_text(seq): the
    text after any reasoning block), and each branch's log-probability sum."""

    max_branches: int
    threshold: float
    answer_regex: str | None
    answer_text: object
    logprob_sums: dict = field(default_factory=dict)  # seq -> (sum of chosen-token logprobs, count)
    decided: bool = False

    def confidence(self, seq) -> float:
        total, count = self.logprob_sums.get(seq, (0.0, 0))
        return math.exp(total / count) if count else 0.0

    def answer(self, seq) -> str:
        return extract_answer(self.answer_text(seq), self.answer_regex)


@dataclass
class Fork:
    parent: object
    token: int  # the branch's first token, at the parent's newest position
    logprobs: dict | None  # its logprobs entry (the request's top-k), None when the request asks none
    history: tuple  # the branch's (logprob sum, count) including its token


@dataclass
class Vote:
    chosen: object  # the sequence whose completion is returned
    confidence: float  # the confidence of the branches agreeing with it, per branch
    weights: dict  # answer -> summed branch confidence


class AdaptiveCompute:
    """The engine's o1 strategy: which rows fork after sampling, and how a finished request's branches vote."""

    def __init__(self, default_threshold: float):
        self.default_threshold = default_threshold
        self.trees: dict = {}  # request id -> _Tree
        self.counters = dict.fromkeys(("o1_requests", "o1_branches", "o1_early_stops", "o1_tokens"), 0)
        self.counters["o1_early_stop_tokens_saved"] = 0  # what the branches a decided vote ended could still make

    def start(self, request_id: str, params, answer_text) -> None:
        threshold = params.o1_entropy_threshold
        self.trees[request_id] = _Tree(
            params.o1_max_branches,
            self.default_threshold if threshold is None else threshold,
            params.answer_regex,
            answer_text,
        )
        self.counters["o1_requests"] += 1

    def release(self, request_id: str, tokens: int) -> None:
        """The request is over, having generated `tokens` over all its branches."""
        if self.trees.pop(request_id, None) is not None:
            self.counters["o1_tokens"] += tokens

    def branch_points(self, seqs, logits: torch.Tensor, tokens: list[int], num_branches) -> list[Fork]:
        """After sampling: logits [R, V] (raw) and the tokens chosen for seqs. Records each adaptive row's
        chosen-token logprob and returns the forks to make: at a high-entropy row of a request below its
        budget (num_branches(request id): its sequences so far)."""
        rows = [i for i, s in enumerate(seqs) if s.request_id in self.trees]
        if not rows:
            return []
        raw = logits[rows].float()
        logprobs, entropies = torch.log_softmax(raw, dim=-1), torch.ops.sedac.entropy(raw).tolist()  # [r, V], [r]
        forks = []
        for n, (entropy, i) in enumerate(zip(entropies, rows)):
            seq, tree, logp = seqs[i], self.trees[seqs[i].request_id], logprobs[n]
            total, count = tree.logprob_sums.get(seq, (0.0, 0))
            tree.logprob_sums[seq] = (total + float(logp[tokens[i]]), count + 1)
            siblings = sum(f.parent.request_id == seq.request_id for f in forks)
            if (
                entropy > tree.threshold
                and not tree.decided
                and num_branches(seq.request_id) + siblings < tree.max_branches
            ):
                token = _alternative(raw[n : n + 1], tokens[i], seq)
                forks.append(
                    Fork(
                        seq,
                        token,
                        token_logprobs(logp[None], [token], [seq])[0],
                        (total + float(logp[token]), count + 1),
                    )
                )
        self.counters["o1_branches"] += len(forks)
        return forks

    def add_branch(self, child, fork: Fork) -> None:
        """The branch's confidence: its parent's token log-probabilities up to the fork, then its own."""
        self.trees[fork.parent.request_id].logprob_sums[child] = fork.history

    def vote(self, request_id: str, seqs) -> Vote:
        """The voted completion among the branches that ended on their own (all of them if none did). A
        branch without an answer (its answer_regex never matched) votes only if none has one."""
        tree = self.trees[request_id]
        seqs = [s for s in seqs if s.finish_reason != "abort"] or seqs
        answers = {s: tree.answer(s) for s in seqs}
        voters = [s for s in seqs if answers[s]] or seqs
        weights: dict[str, float] = {}
        for seq in voters:
            weights[answers[seq]] = weights.get(answers[seq], 0.0) + tree.confidence(seq)
        best = max(weights, key=lambda a: (weights[a], -next(i for i, s in enumerate(voters) if answers[s] == a)))
        chosen = max((s for s in voters if answers[s] == best), key=tree.confidence)
        return Vote(chosen, weights[best] / len(seqs), weights)

    def returned(self, request_id: str, seqs, done: bool) -> list[tuple]:
        """(sequence, confidence) of the voted completion once the request is done; nothing before."""
        if not done:
            return []
        vote = self.vote(request_id, seqs)
        return [(vote.chosen, vote.confidence)]

    def stop_early(self, request_id: str, seqs, allowance) -> bool:
        """Whether the vote has just been decided (ESC-style early stop): the caller ends the other branches.
        allowance(seq): the tokens a running branch could still generate (counted as saved)."""
        tree = self.trees[request_id]
        if tree.decided or not self._decided(tree, request_id, seqs):
            return False
        tree.decided = True
        self.counters["o1_early_stops"] += 1
        self.counters["o1_early_stop_tokens_saved"] += sum(allowance(s) for s in seqs if not s.is_finished)
        return True

    def _decided(self, tree: _Tree, request_id: str, seqs) -> bool:
        answers = {s: tree.answer(s) for s in seqs if s.is_finished and s.finish_reason != "abort"}
        done = [s for s, answer in answers.items() if answer]
        running = sum(not s.is_finished for s in seqs)
        if not done or not running:
            return False
        if len(done) >= ESC_WINDOW and len({answers[s] for s in done}) == 1:
            return True
        weights = sorted(self.vote(request_id, done).weights.values(), reverse=True) + [0.0]
        future = running + tree.max_branches - len(seqs)  # branches that may still vote, at most 1 each
        return weights[0] > weights[1] + future


def _alternative(raw: torch.Tensor, chosen: int, seq) -> int:
    """Another token of the distribution the request samples from (penalties, bad words, temperature,
    top-k/p, min-p applied; the chosen token excluded): its argmax for greedy requests, else a draw on the
    request's own generator. raw: the row's logits [1, V]."""
    logits = process(raw, [seq])
    if seq.params.greedy:
        return int(logits[0].index_fill(0, torch.tensor([chosen], device=logits.device), float("-inf")).argmax())
    allowed = filtered_probs(logits, [seq.params])[0]
    others = allowed.index_fill(0, torch.tensor([chosen], device=allowed.device), 0.0)
    return draw(others if others.sum() > 0 else allowed, seq.generator)
