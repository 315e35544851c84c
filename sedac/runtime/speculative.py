"""SEDAC lossless mode: self-speculative decoding with the trained early exit as the drafter.

A cycle drafts k tokens through layers [0, E) and the exit head, then verifies them in one pass
that reuses those layers' work: only the last draft runs layers [0, E), and layers [E, L) run over
all k + 1 rows as one chunk (which writes the true KV). Greedy keeps the longest prefix the full
model agrees with, plus the full model's own next token, so output is token-identical to `off`;
sampled requests use standard speculative acceptance (accept d with min(1, p(d)/q(d)), else draw
from the residual max(p - q, 0)), which leaves the output distribution exactly the full model's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sedac.runtime.sampler import draw, filtered_probs, process, sample, token_logprobs


@dataclass
class CycleResult:
    tokens: list[int]
    logprobs: list
    drafted: int
    accepted: int
    layer_rows: int          # decoder-layer passes this cycle spent on the sequence


class _Extended:
    """A sequence seen as if `extra` tokens were already appended: what the sampler sees at a draft."""

    def __init__(self, seq, extra: list[int]):
        self.params, self.generator, self.bad_words_ids = seq.params, seq.generator, seq.bad_words_ids
        self.num_prompt_tokens = seq.num_prompt_tokens
        self.token_ids = seq.token_ids + extra

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


@torch.inference_mode()
def speculative_step(runner, seqs, draft_lens: list[int], layer: int) -> list[CycleResult]:
    """One draft-and-verify cycle for decoding sequences (each has k + 1 KV slots reserved)."""
    starts = [s.num_tokens - 1 for s in seqs]             # position of each one's unprocessed last token
    drafts, qs, exit_hidden = _draft(runner, seqs, starts, draft_lens, layer)
    last = [d[-1] if d else s.token_ids[-1] for s, d in zip(seqs, drafts)]
    positions, ctx = runner.context([(s.block_table, p + k) for s, p, k in zip(seqs, starts, draft_lens)])
    h_last = runner.run(torch.tensor(last, device=runner.device), None, positions, ctx, 0, layer)
    hidden = torch.stack([h for i in range(len(seqs)) for h in exit_hidden[i] + [h_last[i]]])
    positions, ctx = runner.context([], [(s.block_table, p, k + 1) for s, p, k in zip(seqs, starts, draft_lens)])
    logits = runner.model.logits(runner.run(None, hidden, positions, ctx, layer, None)).float()
    results, row, num_layers = [], 0, runner.config.model.num_layers
    for seq, d, q, k in zip(seqs, drafts, qs, draft_lens):
        views = [_Extended(seq, d[:j]) for j in range(k + 1)]
        rows = logits[row:row + k + 1]
        row += k + 1
        tokens, lps = (_accept_greedy if seq.params.greedy else _accept_sampled)(rows, views, d, q)
        results.append(CycleResult(tokens, lps, k, len(tokens) - 1, (k + 1) * num_layers))
    return results


def _draft(runner, seqs, starts, draft_lens, layer):
    """Up to k drafts per sequence, in lockstep: one batched pass through layers [0, E) per draft."""
    head, vocab = runner.exit_heads[layer], runner.config.model.vocab_size
    drafts = [[] for _ in seqs]
    qs = [[] for _ in seqs]
    exit_hidden = [[] for _ in seqs]
    last = [s.token_ids[-1] for s in seqs]
    for j in range(max(draft_lens, default=0)):
        rows = [i for i, k in enumerate(draft_lens) if j < k]
        positions, ctx = runner.context([(seqs[i].block_table, starts[i] + j) for i in rows])
        h = runner.run(torch.tensor([last[i] for i in rows], device=runner.device), None, positions, ctx, 0, layer)
        views = [_Extended(seqs[i], drafts[i]) for i in rows]
        logits = process(head.full_vocab_logits(head(h).float(), vocab), views)
        greedy = logits.argmax(-1).tolist()
        for r, i in enumerate(rows):
            exit_hidden[i].append(h[r])
            if seqs[i].params.greedy:
                token = greedy[r]
            else:
                q = filtered_probs(logits[r:r + 1], [seqs[i].params])[0]
                token = draw(q, seqs[i].generator)
                qs[i].append(q)
            drafts[i].append(token)
            last[i] = token
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
