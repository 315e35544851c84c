"""SEDAC lossless mode: self-speculative decoding, drafting with a cheaper copy of the model's own weights.

A cycle drafts up to k tokens, each by one pass through the whole model on its draft copies (int8
or int4, the build's choice: a quarter or less of the bytes an fp32 CPU decode streams) while the
draft distribution is confident (entropy <= the build's gate), then one full-precision verify pass
runs the last token and the drafts as k + 1 rows and writes the true KV. Greedy keeps the longest
prefix the full model agrees with, plus the full model's own next token, so output is token-identical
to `off`; sampled requests
use standard speculative acceptance (accept d with min(1, p(d)/q(d)), else draw from the residual
max(p - q, 0)), which leaves the output distribution exactly the full model's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sedac.plugins import ops  # noqa: F401  (registers torch.ops.sedac)
from sedac.runtime.sampler import (
    argmax_only,
    draw,
    filtered_probs,
    greedy_tokens,
    process,
    sample,
    token_logprobs,
)
from sedac.runtime.sequence import Sequence


@dataclass
class CycleResult:
    tokens: list[int]
    logprobs: list
    drafted: int
    accepted: int
    draft_passes: tuple  # rows of each draft pass the sequence ran in (its cost share)


class _Extended(Sequence):
    """A sequence seen as if `extra` tokens were already appended: what the sampler sees at a draft.
    Only what the sampler reads is set; the token-count properties come from Sequence."""

    def __init__(self, seq: Sequence, extra: list[int]):  # not super().__init__: it would start a new sequence
        self.params, self.generator, self.bad_words_ids = seq.params, seq.generator, seq.bad_words_ids
        self.stop_ids = seq.stop_ids
        self.num_prompt_tokens = seq.num_prompt_tokens
        self.token_ids = seq.token_ids + extra


def pass_cost(costs: dict, kind: str, rows: int) -> float:
    """A decode pass of `rows` rows on the "full" weights or the "draft" copies, by the build's measured costs
    (sedac.runtime.pass_costs: fixed + per_row * rows, a batch-1 full pass = 1)."""
    fixed, per_row = costs[kind]
    return fixed + per_row * rows


def draft_plan(costs: dict, alpha: float, max_draft_len: int, max_batch: int) -> list[int]:
    """Drafts per sequence for each batch size B (index B; 0: decode without drafting). Each draft is
    accepted with probability alpha (the drafter's agreement), so k drafts yield
    1 + alpha + ... + alpha^k tokens per sequence for k draft passes and one verify pass over B (k + 1)
    rows, at the build's measured pass costs (fixed + per_row * rows); k maximizes tokens per cost,
    and 0 wins where a batch is compute-bound enough that plain decoding is cheaper."""
    plan = [0]
    for b in range(1, max_batch + 1):
        best, best_k = b / pass_cost(costs, "full", b), 0
        for k in range(1, max_draft_len + 1):
            tokens = b * sum(alpha**j for j in range(k + 1))
            rate = tokens / (k * pass_cost(costs, "draft", b) + pass_cost(costs, "full", b * (k + 1)))
            if rate > best:
                best, best_k = rate, k
        plan.append(best_k)
    return plan


@torch.inference_mode()
def speculative_step(
    runner, seqs, draft_lens: list[int], max_entropy: float, min_drafting: float = 0.0, grammar=None
) -> list[CycleResult]:
    """One draft-and-verify cycle for decoding sequences (each has k + 1 KV slots reserved). A draft
    round is one draft pass for all rows that draft; it runs only while at least min_drafting of the
    batch drafts, the share whose saved full passes pay for it. grammar: the engine's StructuredOutputs
    (drafts and targets of constrained sequences are masked by it)."""
    starts = [s.num_tokens - 1 for s in seqs]  # position of each one's unprocessed last token
    drafts, qs, passes = _draft(runner, seqs, starts, draft_lens, max_entropy, min_drafting * len(seqs), grammar)
    ids = torch.tensor([t for s, d in zip(seqs, drafts) for t in [s.token_ids[-1], *d]], device=runner.device)
    positions, ctx = runner.span_context([(s.block_table, p, len(d) + 1) for s, p, d in zip(seqs, starts, drafts)])
    hidden = runner.run(ids, None, positions, ctx)  # verify: writes the true KV
    logits = runner.model.logits(hidden, argmax_only=argmax_only(seqs)).float()
    results, row = [], 0
    for i, (seq, d, q) in enumerate(zip(seqs, drafts, qs)):
        k = len(d)
        views = [_Extended(seq, d[:j]) for j in range(k + 1)]
        rows = logits[row : row + k + 1]
        row += k + 1
        constrain = (lambda lg, _views: grammar.mask_after_drafts(lg, seq, d)) if grammar else _unconstrained
        tokens, lps = (_accept_greedy if seq.params.greedy else _accept_sampled)(rows, views, d, q, constrain)
        results.append(CycleResult(tokens, lps, k, len(tokens) - 1, tuple(len(p) for p in passes if i in p)))
    return results


def _draft(runner, seqs, starts, draft_lens, max_entropy, min_rows, grammar):
    """Draft in lockstep on the draft copies: each pass runs every drafting sequence's newest token
    through the whole model; a sequence keeps drafting while the draft is confident (entropy <=
    max_entropy) and under its k, and all stop once fewer than min_rows would draft. The draft
    passes' K/V are overwritten by the verify pass. -> drafts, their distributions (sampled requests),
    and the rows (sequence indices) of every pass that ran, drafts kept or not. A constrained
    sequence drafts what its grammar allows, until the grammar ends; its matcher is rolled back after."""
    drafts, qs, passes = [[] for _ in seqs], [[] for _ in seqs], []
    last = [s.token_ids[-1] for s in seqs]
    active = [i for i, k in enumerate(draft_lens) if k > 0]
    for j in range(max(draft_lens, default=0)):
        if not active or len(active) < min_rows:
            break
        positions, ctx = runner.context([(seqs[i].block_table, starts[i] + j) for i in active])
        h = runner.run(torch.tensor([last[i] for i in active], device=runner.device), None, positions, ctx, draft=True)
        passes.append(set(active))
        raw = runner.model.logits(h, draft=True).float()
        confident = (torch.ops.sedac.entropy(raw) <= max_entropy).tolist()
        if sum(confident) < min_rows:
            break
        logits = process(raw, [_Extended(seqs[i], drafts[i]) for i in active])
        if grammar:
            grammar.mask(logits, [seqs[i] for i in active])  # their matchers stand after their drafts
        greedy = greedy_tokens(logits).tolist()
        still = []
        for n, i in enumerate(active):
            if not confident[n]:
                continue
            if seqs[i].params.greedy:
                token = greedy[n]
            else:
                q = filtered_probs(logits[n : n + 1], [seqs[i].params])[0]
                token = draw(q, seqs[i].generator)
                qs[i].append(q)
            state = grammar.accept(seqs[i], token) if grammar else None
            if state == "dead end":
                continue
            drafts[i].append(token)
            last[i] = token
            if len(drafts[i]) < draft_lens[i] and state != "end":
                still.append(i)
        active = still
    if grammar:
        for seq, d in zip(seqs, drafts):
            grammar.rollback(seq, len(d))
    return drafts, qs, passes


def _unconstrained(logits, _views):
    return logits


def _accept_greedy(logits, views, drafts, _qs, constrain):
    targets, lps = sample(logits, views, constrain)  # exactly what `off` would pick after each draft prefix
    m = 0
    while m < len(drafts) and drafts[m] == targets[m]:
        m += 1
    return drafts[:m] + [targets[m]], lps[: m + 1]


def _accept_sampled(logits, views, drafts, qs, constrain):
    raw = torch.log_softmax(logits, dim=-1) if views[0].params.logprobs is not None else None
    probs = filtered_probs(constrain(process(logits, views), views), [v.params for v in views])
    gen, tokens = views[0].generator, []
    for j, (d, q) in enumerate(zip(drafts, qs)):
        p = probs[j]
        if torch.rand((), generator=gen) * q[d] <= p[d]:  # accept with probability min(1, p/q)
            tokens.append(d)
            continue
        residual = (p - q).clamp(min=0)
        tokens.append(draw(residual if residual.sum() > 0 else p, gen))
        break
    else:
        tokens.append(draw(probs[len(drafts)], gen))
    return tokens, token_logprobs(raw, tokens, views[: len(tokens)])
