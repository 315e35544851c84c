"""SEDAC lossy mode: per-token early exit at calibrated thresholds, at one of two exits.

The precision exit (precision_exit_step): every token first runs the whole model on its draft copies
(int8 or int4, the build's choice: half a full pass or less on a bandwidth-bound CPU decode); a token
whose draft distribution is confident (1 - top-2 margin <= threshold, the `sedac::margin` op) keeps
that token and, for now, the K/V the draft pass wrote; the others run the full-precision pass as well,
with the sequence's exits since its last full pass as extra rows: the draft K/V is rewritten exactly
(the deferred fill below, for the precision exit) and every exit is audited.

The depth exit (early_exit_step): decode tokens run layers [0, E); the exit head's entropy decides
(the `sedac::exit_decision` op).
Exited tokens leave the batch for the deeper layers; later tokens need their deeper K/V, filled
one of three ways:
- "deferred" (default): the exit hidden state is kept and the deeper layers run for it as an extra
  row of the next token that does not exit (which streams those weights anyway, so on a
  bandwidth-bound decode the row is nearly free). The KV cache stays exactly the full model's, so
  the only difference from `off` is the exited tokens themselves, which is what calibration measures.
- "propagate" (CALM's state propagation): the deeper layers' K/V come from the exit hidden state
  through their K/V projections at once; approximate K/V, which later tokens then see.
- "ghost" (Ghost KV): a predictor trained at build time (sedac.builder.ghost_kv) maps the exit state
  to all deeper layers' K/V in one GEMV; approximate too, but fitted to the true K/V.
An adaptive controller audits every 16th exit (the full model's choice there: the depth exit runs
the token to the end anyway, the precision exit checks it in the next full pass) and tightens the
thresholds when the audits show significantly more errors than the level allows among exits; it
never loosens past calibration.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import dataclass

import torch

from sedac.plugins import ops  # noqa: F401  (registers torch.ops.sedac)
from sedac.runtime.sampler import argmax_only, greedy_tokens, sample
from sedac.runtime.speculative import pass_cost

NEVER = -1.0  # entropy is >= 0: a threshold no token meets


@dataclass
class ExitResult:
    token: int
    logprob: dict | None
    exit_layer: int  # layers the token ran (num_layers when it did not exit)


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(Bin(n, p) <= k), summed in log space (n up to ~1e6 is fine)."""
    if k < 0:
        return 0.0  # P(X <= -1): the p-value 1 - cdf(wrong - 1) of zero errors is 1
    if k >= n:
        return 1.0
    log_terms = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p) + (n - i) * math.log1p(-p)
        for i in range(k + 1)
    ]
    top = max(log_terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in log_terms))


class ExitController:
    """Calibrated per-layer thresholds for each agreement level, scaled by audit feedback. Audits see
    exits only, so the error rate they may show is the level's budget spread over the exiting share:
    (1 - level) / exit fraction (the precision exit lets most tokens out, a depth exit a third)."""

    def __init__(
        self, thresholds: dict, default_agreement: float, audit_every: int = 16, window: int = 256, min_audits: int = 32
    ):
        self.levels = sorted((float(a), t) for a, t in thresholds.items())
        self.default_agreement = float(default_agreement)
        self.audit_every, self.min_audits = audit_every, min_audits
        self.scale = {a: 1.0 for a, _ in self.levels}
        self.audits = {a: deque(maxlen=window) for a, _ in self.levels}
        self.tally = {a: [0, 0] for a, _ in self.levels}  # level -> [decisions, exits]
        self._exits = 0

    def level(self, agreement: float | None) -> float | None:
        """The least strict calibrated level that still meets the request (None: never exit)."""
        want = self.default_agreement if agreement is None else agreement
        return next((a for a, _ in self.levels if a >= want - 1e-9), None)

    def thresholds(self, level: float | None, num_layers: int) -> list[float]:
        if level is None:
            return [NEVER] * num_layers
        return [t * self.scale[level] if t >= 0 else NEVER for t in dict(self.levels)[level]]

    def should_audit(self, level: float | None, exits: bool) -> bool:
        """Count one lossy decision (the exit share that record() judges audits by); -> whether it is
        an exit to audit (every audit_every-th exit)."""
        if level is not None:
            self.tally[level][0] += 1
            self.tally[level][1] += exits
        if not exits:
            return False
        self._exits += 1
        return self._exits % self.audit_every == 0

    def record(self, level: float, agreed: bool) -> None:
        audits = self.audits[level]
        audits.append(agreed)
        if len(audits) < self.min_audits:
            return
        decisions, exits = self.tally[level]
        allowed = min(1.0, (1 - level) * decisions / max(1, exits))  # error rate among exits on target
        misses = audits.count(False)
        if misses and allowed < 1 and 1 - binomial_cdf(misses - 1, len(audits), allowed) < 0.05:
            self.scale[level] *= 0.8  # significantly off target: tighten, and judge afresh
            audits.clear()
        elif misses <= allowed * len(audits) / 2:  # comfortably on target: relax back toward calibration
            self.scale[level] = min(1.0, self.scale[level] * 1.05)

    def stats(self) -> dict:
        return {
            str(a): {
                "scale": self.scale[a],
                "audits": len(self.audits[a]),
                "exit_fraction": self.tally[a][1] / self.tally[a][0] if self.tally[a][0] else None,
                "audited_agreement": sum(self.audits[a]) / len(self.audits[a]) if self.audits[a] else None,
            }
            for a, _ in self.levels
        }


@torch.inference_mode()
def early_exit_step(
    runner, seqs, levels: list[float | None], controller: ExitController, layer: int, kv_fill: str = "deferred"
) -> list[ExitResult]:
    """One decode step for sequences in lossy mode: each runs its last token; with deferred fill, the
    exit states it keeps (seq.exit_hidden) ride along when that token does not exit."""
    vocab = runner.config.model.vocab_size
    positions, ctx = runner.context([(s.block_table, s.num_tokens - 1) for s in seqs])
    h = runner.run(torch.tensor([s.token_ids[-1] for s in seqs], device=runner.device), None, positions, ctx, 0, layer)
    head = runner.exit_heads[layer]
    reduced = head(h).float()
    _, go = torch.ops.sedac.exit_decision(reduced, _taus(controller, levels, h.device))
    leaving, staying, audited = _triage(
        go.tolist(), levels, controller, lambda i: int(head.vocab_ids[reduced[i].argmax()])
    )
    logits: list = [None] * len(seqs)
    for i, row in zip(leaving, head.full_vocab_logits(reduced[leaving], vocab)):
        logits[i] = row
    if leaving and kv_fill != "deferred":
        _predict_kv(runner, h[leaving], positions[leaving], ctx.slot_mapping[leaving], layer, kv_fill)
        for i in leaving:
            seqs[i].mark_approximate_kv(seqs[i].num_tokens - 1)
    elif leaving:
        for i in leaving:
            seqs[i].exit_hidden.append(h[i])
    if staying:
        for i, row in zip(staying, _finish_layers(runner, [seqs[i] for i in staying], h[staying], layer)):
            logits[i] = row
    for i, predicted in audited.items():
        controller.record(levels[i], predicted == int(logits[i].argmax()))
    tokens, lps = sample(torch.stack(logits), seqs)
    num_layers = runner.config.model.num_layers
    return [ExitResult(t, lp, layer if i in leaving else num_layers) for i, (t, lp) in enumerate(zip(tokens, lps))]


@torch.inference_mode()
def precision_exit_step(
    runner, seqs, levels: list[float | None], controller: ExitController, draft_pass: bool = True
) -> list[ExitResult]:
    """One lossy decode step at the precision exit; exit_layer counts full-precision layers at decision
    time (0 on exit). Each sequence keeps its exits since its last full pass (seq.precision_exits); the
    next full pass runs them again as extra rows, each a decode at its own position, which rewrites
    their K/V exactly (so the full model's tokens are computed on the exact cache, as calibration
    assumed) and audits every exit against the full model's choice there. draft_pass=False: the draft
    pass would not pay at this batch size, so every sequence takes the full pass."""
    logits = torch.empty(len(seqs), runner.config.model.vocab_size, device=runner.device)
    go = [False] * len(seqs)
    if draft_pass:
        positions, ctx = runner.context([(s.block_table, s.num_tokens - 1) for s in seqs])
        ids = torch.tensor([s.token_ids[-1] for s in seqs], device=runner.device)
        logits = runner.model.logits(runner.run(ids, None, positions, ctx, draft=True), draft=True).float()
        go = (1 - torch.ops.sedac.margin(logits) <= _taus(controller, levels, logits.device)).tolist()
    staying = [i for i, exits in enumerate(go) if not exits]
    if staying:
        logits[staying] = _full_pass(runner, [seqs[i] for i in staying], controller)
    tokens, lps = sample(logits, seqs)
    greedy = greedy_tokens(logits).tolist()
    for i, exits in enumerate(go):
        audit = controller.should_audit(levels[i], exits)  # checked against the exit's greedy choice
        if exits:
            seqs[i].precision_exits.append((seqs[i].num_tokens - 1, greedy[i] if audit else None, levels[i]))
            seqs[i].mark_approximate_kv(seqs[i].num_tokens - 1)
    num_layers = runner.config.model.num_layers
    return [ExitResult(t, lp, 0 if exits else num_layers) for t, lp, exits in zip(tokens, lps, go)]


def _full_pass(runner, seqs, controller: ExitController) -> torch.Tensor:
    """The full pass for staying tokens, each sequence's pending exits as extra rows before its own
    (K/V rewritten layer by layer, as a lossless verify does); -> logits [len(seqs), vocab] of the
    staying tokens. The sequences' caches are exact afterwards. Only audited exits' rows pay for
    the LM head."""
    rows = [(s, p, predicted, level) for s in seqs for p, predicted, level in s.precision_exits]
    audits = [(row, predicted, level) for row, (_, _, predicted, level) in enumerate(rows) if predicted is not None]
    rows += [(s, s.num_tokens - 1, None, None) for s in seqs]
    positions, ctx = runner.context([(s.block_table, p) for s, p, _, _ in rows])
    ids = torch.tensor([s.token_ids[p] for s, p, _, _ in rows], device=runner.device)
    h = runner.run(ids, None, positions, ctx)
    wanted = [row for row, _, _ in audits] + list(range(len(rows) - len(seqs), len(rows)))
    logits = runner.model.logits(h[wanted], argmax_only=argmax_only(seqs)).float()
    for (_, predicted, level), choice in zip(audits, greedy_tokens(logits[: len(audits)]).tolist()):
        controller.record(level, predicted == choice)
    for s in seqs:
        s.precision_exits, s.approximate_kv_from = [], None
    return logits[len(audits) :]


def precision_exit_pays(costs: dict, exit_fraction: float, rows: int) -> bool:
    """Whether a draft pass pays for `rows` lossy sequences. Every token runs one full-precision row
    either way (at once when it stays, with the next stay when it exits), so the draft pass buys only
    the fixed cost of the full passes that no longer run: it pays while it costs less than that,
    draft(rows) < P(all exit) * fixed. On a compute-bound batch it costs nearly a full pass, and does not."""
    return pass_cost(costs, "draft", rows) < exit_fraction**rows * costs["full"][0]


def _taus(controller: ExitController, levels: list[float | None], device) -> torch.Tensor:
    return torch.tensor([controller.thresholds(lv, 1)[0] for lv in levels], device=device)


def _triage(
    go: list[bool], levels: list[float | None], controller: ExitController, predicted
) -> tuple[list[int], list[int], dict]:
    """-> (leaving, staying, audited {row: its exit's token}): rows that may exit leave, except every
    audit_every-th, which stays so the controller can check the exit against the full model."""
    leaving, staying, audited = [], [], {}
    for i, (goes, level) in enumerate(zip(go, levels)):
        if controller.should_audit(level, goes):
            audited[i] = predicted(i)
        (leaving if goes and i not in audited else staying).append(i)
    return leaving, staying, audited


def ghost_input(model, h: torch.Tensor) -> torch.Tensor:
    """The Ghost KV predictor's input, at fit and at run time: the exit state RMS-normalized with no
    gain (each deeper layer's own gain is folded into the predictor's weight)."""
    return torch.nn.functional.rms_norm(h, (h.shape[-1],), eps=model.cfg.rms_norm_eps)


def predicted_kv(model, h: torch.Tensor, layer: int, kv_fill: str, ghost: tuple | None = None) -> list[torch.Tensor]:
    """K/V [T, 2 * KV * D] (before rotary) of layers [E, L), predicted from exit states h [T, hidden]."""
    deeper = model.layers[layer:]
    if kv_fill == "ghost":  # one GEMV for all deeper layers (see sedac.builder.ghost_kv)
        predicted = torch.ops.sedac.kv_predict(ghost_input(model, h), *ghost)
        return list(predicted.view(len(h), len(deeper), -1).unbind(1))
    return [block.kv_projection(block.input_norm(h)) for block in deeper]  # CALM state propagation


def _predict_kv(runner, h, positions, slots, layer, kv_fill) -> None:
    """Write the predicted layers [E, L) K/V of exited tokens into the cache at once."""
    model = runner.model
    cos, signed_sin = model.rotary.tables(positions, h.dtype)
    for block, kv in zip(model.layers[layer:], predicted_kv(model, h, layer, kv_fill, runner.ghost_kv)):
        block.write_kv(kv, cos, signed_sin, slots)


def _finish_layers(runner, seqs, h, layer) -> torch.Tensor:
    """Layers [E, L) for each sequence's pending exit states plus its current token, one span per
    sequence; -> logits [len(seqs), vocab] of the current tokens."""
    rows = torch.stack([x for s, cur in zip(seqs, h) for x in s.exit_hidden + [cur]])
    chunks = [(s.block_table, s.num_tokens - 1 - len(s.exit_hidden), len(s.exit_hidden) + 1) for s in seqs]
    positions, ctx = runner.span_context(chunks)
    out = runner.run(None, rows, positions, ctx, layer, None)
    last = torch.tensor(list(itertools.accumulate(n for _, _, n in chunks)), device=out.device) - 1
    for s in seqs:
        s.exit_hidden = []
    return runner.model.logits(out[last], argmax_only=argmax_only(seqs)).float()
