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

O1_MODES = ("off", "adaptive")
# nats. On 60 generated arithmetic questions (the tuning seed of `sedac-run bench --o1`, SmolLM2-135M):
# 1.0-3.0 branched nearly every reply and up to 8 branches lost accuracy (0.60 greedy -> 0.43-0.57: the
# runner-up token mostly starts a worse reply); 4.0 branched 1.5 times per question and kept 0.62.
DEFAULT_ENTROPY_THRESHOLD = 4.0
ESC_WINDOW = 3          # finished branches that, all agreeing, end the vote (ESC's window)


def check_o1(mode: str | None, max_branches: int, threshold: float | None, answer_regex: str | None) -> None:
    """Field checks of SamplingParams' o1 fields (ValueError on any bad value)."""
    if mode is not None and mode not in O1_MODES:
        raise ValueError(f"o1_mode must be off or adaptive, got {mode!r}")
    if isinstance(max_branches, bool) or not isinstance(max_branches, int) or not 1 <= max_branches <= 64:
        raise ValueError(f"o1_max_branches must be an integer in [1, 64], got {max_branches!r}")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not threshold >= 0):
        raise ValueError(f"o1_entropy_threshold must be a number >= 0 (nats), got {threshold!r}")
    if answer_regex is not None:
        try:
            re.compile(answer_regex)
        except (re.error, TypeError) as e:
            raise ValueError(f"answer_regex is not a valid regular expression: {e}") from None


def with_engine_o1_mode(params, engine_mode: str):
    """params with the engine's o1 mode when they set none (requests it cannot serve adaptively run off)."""
    if params.o1_mode is not None or engine_mode == "off" or params.o1_blocker or params.sedac_mode not in (None, "off"):
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
    """One adaptive request: its branch budget and threshold, and each branch's log-probability sum."""
    max_branches: int
    threshold: float
    answer_regex: str | None
    logprob_sums: dict = field(default_factory=dict)   # seq -> (sum of chosen-token logprobs, count)
    decided: bool = False

    def confidence(self, seq) -> float:
        total, count = self.logprob_sums.get(seq, (0.0, 0))
        return math.exp(total / count) if count else 0.0


@dataclass
class Fork:
    parent: object
    token: int              # the branch's first token, at the parent's newest position
    logprob: float
    history: tuple          # the branch's (logprob sum, count) including its token


@dataclass
class Vote:
    chosen: object          # the sequence whose completion is returned
    confidence: float       # the confidence of the branches agreeing with it, per branch
    weights: dict           # answer -> summed branch confidence


class AdaptiveCompute:
    """The engine's o1 strategy: which rows fork after sampling, and how a finished request's branches vote."""

    def __init__(self, default_threshold: float):
        self.default_threshold = default_threshold
        self.trees: dict = {}                  # request id -> _Tree
        self.counters = {"o1_requests": 0, "o1_branches": 0, "o1_early_stops": 0}

    def start(self, request_id: str, params) -> None:
        threshold = params.o1_entropy_threshold
        self.trees[request_id] = _Tree(params.o1_max_branches, self.default_threshold if threshold is None else threshold,
                                       params.answer_regex)
        self.counters["o1_requests"] += 1

    def release(self, request_id: str) -> None:
        self.trees.pop(request_id, None)

    def branch_points(self, seqs, logits: torch.Tensor, tokens: list[int], num_branches) -> list[Fork]:
        """After sampling: logits [R, V] (raw) and the tokens chosen for seqs. Records each adaptive row's
        chosen-token logprob and returns the forks to make: at a high-entropy row of a request below its
        budget (num_branches(request id): its sequences so far)."""
        rows = [i for i, s in enumerate(seqs) if s.request_id in self.trees]
        if not rows:
            return []
        logprobs = torch.log_softmax(logits[rows].float(), dim=-1)          # [r, V]
        entropies = torch.ops.sedac.entropy(logits[rows].float()).tolist()
        forks = []
        for logp, entropy, i in zip(logprobs, entropies, rows):
            seq, tree = seqs[i], self.trees[seqs[i].request_id]
            total, count = tree.logprob_sums.get(seq, (0.0, 0))
            tree.logprob_sums[seq] = (total + float(logp[tokens[i]]), count + 1)
            siblings = sum(f.parent.request_id == seq.request_id for f in forks)
            if entropy > tree.threshold and not tree.decided and num_branches(seq.request_id) + siblings < tree.max_branches:
                token = _alternative(logp, tokens[i], seq)
                lp = float(logp[token])
                forks.append(Fork(seq, token, lp, (total + lp, count + 1)))
        self.counters["o1_branches"] += len(forks)
        return forks

    def add_branch(self, child, fork: Fork) -> None:
        """The branch's confidence: its parent's token log-probabilities up to the fork, then its own."""
        self.trees[fork.parent.request_id].logprob_sums[child] = fork.history

    def vote(self, request_id: str, seqs) -> Vote:
        """The voted completion among the branches that ended on their own (all of them if none did)."""
        tree = self.trees[request_id]
        seqs = [s for s in seqs if s.finish_reason != "abort"] or seqs
        weights: dict[str, float] = {}
        for seq in seqs:
            answer = extract_answer(seq.output_text, tree.answer_regex)
            weights[answer] = weights.get(answer, 0.0) + tree.confidence(seq)
        best = max(weights, key=lambda a: (weights[a], -_first(seqs, a, tree)))
        agreeing = [s for s in seqs if extract_answer(s.output_text, tree.answer_regex) == best]
        chosen = max(agreeing, key=tree.confidence)
        return Vote(chosen, weights[best] / len(seqs), weights)

    def returned(self, request_id: str, seqs, done: bool) -> list[tuple]:
        """(sequence, confidence) of the voted completion once the request is done; nothing before."""
        if not done:
            return []
        vote = self.vote(request_id, seqs)
        return [(vote.chosen, vote.confidence)]

    def stop_early(self, request_id: str, seqs) -> bool:
        """Whether the vote has just been decided (ESC-style early stop): the caller ends the other branches."""
        tree = self.trees[request_id]
        if tree.decided or not self._decided(tree, request_id, seqs, tree.max_branches - len(seqs)):
            return False
        tree.decided = True
        self.counters["o1_early_stops"] += 1
        return True

    def _decided(self, tree: _Tree, request_id: str, seqs, pending_budget: int) -> bool:
        done = [s for s in seqs if s.is_finished and s.finish_reason != "abort"]
        running = len(seqs) - len(done)
        if not done or not running:
            return False
        answers = [extract_answer(s.output_text, tree.answer_regex) for s in done]
        if len(done) >= ESC_WINDOW and len(set(answers)) == 1:
            return True
        weights = sorted(self.vote(request_id, done).weights.values(), reverse=True) + [0.0]
        return weights[0] > weights[1] + running + pending_budget      # confidences are at most 1 each


def _alternative(logp: torch.Tensor, chosen: int, seq) -> int:
    """Another token of this distribution: the most likely one besides the chosen for greedy requests,
    a draw on the request's own generator (chosen excluded) for sampled ones."""
    logp = logp.clone()
    logp[chosen] = float("-inf")
    if seq.params.greedy:
        return int(logp.argmax())
    noise = torch.empty(logp.shape[0]).exponential_(generator=seq.generator).to(logp.device)
    return int((logp.exp() / noise).argmax())


def _first(seqs, answer: str, tree: _Tree) -> int:
    """Index of the first branch (root first) giving answer: ties go to the earliest branch."""
    return next(i for i, s in enumerate(seqs) if extract_answer(s.output_text, tree.answer_regex) == answer)
