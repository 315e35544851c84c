"""SEDAC lossless mode: self-speculative decoding with the trained early exit as the drafter.

A cycle runs the last token through layers [0, E) and the exit head, and keeps drafting (each
draft through [0, E) in turn) while the head is confident and fewer than k drafts exist. The
verify pass reuses all of that: only layers [E, L) run, over the k + 1 rows in one pass (which
writes the true KV); a low-confidence token simply continues as a normal decode, so the gate costs
only the exit head. Greedy keeps the longest prefix the full
model agrees with, plus the full model's own next token, so output is token-identical to `off`;
sampled requests use standard speculative acceptance (accept d with min(1, p(d)/q(d)), else draw
from the residual max(p - q, 0)), which leaves the output distribution exactly the full model's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sedac.plugins import ops  # noqa: F401  (registers torch.ops.sedac)
from sedac.runtime.sampler import draw, filtered_probs, process, sample, token_logprobs
from sedac.runtime.sequence import Sequence


@dataclass
class CycleResult:
    tokens: list[int]
    logprobs: list
    drafted: int
    accepted: int
    layer_rows: int          # decoder-layer passes this cycle spent on the sequence


class _Extended(Sequence):
    """A sequence seen as if `extra` tokens were already appended: what the sampler sees at a draft.
    Only what the sampler reads is set; the token-count properties come from Sequence."""

    def __init__(self, seq: Sequence, extra: list[int]):   # noqa: super().__init__ would start a new sequence
        self.params, self.generator, self.bad_words_ids = seq.params, seq.generator, seq.bad_words_ids
        self.num_prompt_tokens = seq.num_prompt_tokens
        self.token_ids = seq.token_ids + extra


@torch.inference_mode()
def speculative_step(runner, seqs, draft_lens: list[int], layer: int, max_entropy: float,
                     min_drafting: float = 0.0) -> list[CycleResult]:
    """One draft-and-verify cycle for decoding sequences (each has k + 1 KV slots reserved). A draft
    round streams layers [0, E) once for all rows that draft; it runs only while at least
    min_drafting of the batch drafts, the share whose saved full passes pay for that stream."""
    starts = [s.num_tokens - 1 for s in seqs]             # position of each one's unprocessed last token
    drafts, qs, exit_hidden = _draft(runner, seqs, starts, draft_lens, layer, max_entropy,
                                     min_drafting * len(seqs))
    hidden = torch.stack([h for rows in exit_hidden for h in rows])
    positions, ctx = runner.span_context([(s.block_table, p, len(d) + 1) for s, p, d in zip(seqs, starts, drafts)])
    logits = runner.model.logits(runner.run(None, hidden, positions, ctx, layer, None)).float()
    results, row, num_layers = [], 0, runner.config.model.num_layers
    for seq, d, q in zip(seqs, drafts, qs):
        k = len(d)
        views = [_Extended(seq, d[:j]) for j in range(k + 1)]
        rows = logits[row:row + k + 1]
        row += k + 1
        tokens, lps = (_accept_greedy if seq.params.greedy else _accept_sampled)(rows, views, d, q)
        results.append(CycleResult(tokens, lps, k, len(tokens) - 1, (k + 1) * num_layers))
    return results


def _draft(runner, seqs, starts, draft_lens, layer, max_entropy, min_rows):
    """Run each sequence's last token, then its drafts, through layers [0, E) in lockstep; a sequence
    keeps drafting while the exit head is confident (entropy <= max_entropy) and under its k, and
    all stop once fewer than min_rows would draft."""
    head, vocab = runner.exit_heads[layer], runner.config.model.vocab_size
    drafts, qs, exit_hidden = [[] for _ in seqs], [[] for _ in seqs], [[] for _ in seqs]
    last = [s.token_ids[-1] for s in seqs]
    active = list(range(len(seqs)))
    for j in range(max(draft_lens, default=0) + 1):
        positions, ctx = runner.context([(seqs[i].block_table, starts[i] + j) for i in active])
        h = runner.run(torch.tensor([last[i] for i in active], device=runner.device), None, positions, ctx, 0, layer)
        for r, i in enumerate(active):
            exit_hidden[i].append(h[r])
        active_rows = [r for r, i in enumerate(active) if j < draft_lens[i]]
        if not active_rows:
            break
        reduced = head(h[active_rows]).float()
        confident = (torch.ops.sedac.entropy(reduced) <= max_entropy).tolist()
        if sum(confident) < min_rows:
            break
        views = [_Extended(seqs[active[r]], drafts[active[r]]) for r in active_rows]
        logits = process(head.full_vocab_logits(reduced, vocab), views)
        greedy = logits.argmax(-1).tolist()
        still = []
        for n, r in enumerate(active_rows):
            i = active[r]
            if not confident[n]:
                continue
            if seqs[i].params.greedy:
                token = greedy[n]
            else:
                q = filtered_probs(logits[n:n + 1], [seqs[i].params])[0]
                token = draw(q, seqs[i].generator)
                qs[i].append(q)
            drafts[i].append(token)
            last[i] = token
            still.append(i)
        active = still
        if not active:
            break
    return drafts, qs, exit_hidden


def _accept_greedy(logits, views, drafts, _qs):
    targets, lps = sample(logits, views)     # exactly what `off` would pick after each draft prefix
    m = 0
    while m < len(drafts) and drafts[m] == targets[m]:
        m += 1
    return drafts[:m] + [targets[m]], lps[:m + 1]


def _accept_sampled(logits, views, drafts, qs):
    raw = torch.log_softmax(logits, dim=-1) if views[0].params.logprobs is not None else None
    probs = filtered_probs(process(logits, views), [v.params for v in views])
    gen, tokens = views[0].generator, []
    for j, (d, q) in enumerate(zip(drafts, qs)):
        p = probs[j]
        if torch.rand((), generator=gen) * q[d] <= p[d]:     # accept with probability min(1, p/q)
            tokens.append(d)
            continue
        residual = (p - q).clamp(min=0)
        tokens.append(draw(residual if residual.sum() > 0 else p, gen))
        break
    else:
        tokens.append(draw(probs[len(drafts)], gen))
    return tokens, token_logprobs(raw, tokens, views[:len(tokens)])
