"""SEDAC lossy mode: per-token early exit at calibrated entropy thresholds.

Decode tokens run layers [0, E); the exit head's entropy decides (the `sedac::exit_decision` op).
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
An adaptive controller audits a few exits (runs them to the end anyway) and tightens the
thresholds when the audited agreement falls below the target; it never loosens past calibration.
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass

import torch

from sedac.plugins import ops  # noqa: F401  (registers torch.ops.sedac)
from sedac.runtime.sampler import sample

NEVER = -1.0     # entropy is >= 0: a threshold no token meets


@dataclass
class ExitResult:
    token: int
    logprob: dict | None
    exit_layer: int          # layers the token ran (num_layers when it did not exit)


class ExitController:
    """Calibrated per-layer thresholds for each agreement level, scaled by audit feedback."""

    def __init__(self, sedac: dict, audit_every: int = 16, window: int = 256, min_audits: int = 32):
        self.levels = sorted((float(a), t) for a, t in sedac["thresholds"].items())
        self.default_agreement = float(sedac.get("default_agreement", 0.99))
        self.audit_every, self.min_audits = audit_every, min_audits
        self.scale = {a: 1.0 for a, _ in self.levels}
        self.audits = {a: deque(maxlen=window) for a, _ in self.levels}
        self._exits = 0

    def level(self, agreement: float | None) -> float | None:
        """The least strict calibrated level that still meets the request (None: never exit)."""
        want = self.default_agreement if agreement is None else agreement
        return next((a for a, _ in self.levels if a >= want - 1e-9), None)

    def thresholds(self, level: float | None, num_layers: int) -> list[float]:
        if level is None:
            return [NEVER] * num_layers
        return [t * self.scale[level] if t >= 0 else NEVER for t in dict(self.levels)[level]]

    def should_audit(self) -> bool:
        self._exits += 1
        return self._exits % self.audit_every == 0

    def record(self, level: float, agreed: bool) -> None:
        audits = self.audits[level]
        audits.append(agreed)
        if len(audits) < self.min_audits:
            return
        agreement = sum(audits) / len(audits)
        if agreement < level:                       # off target: tighten, and judge afresh
            self.scale[level] *= 0.8
            audits.clear()
        elif agreement >= 1 - (1 - level) / 2:      # comfortably on target: relax back toward calibration
            self.scale[level] = min(1.0, self.scale[level] * 1.05)

    def stats(self) -> dict:
        return {str(a): {"scale": self.scale[a], "audits": len(self.audits[a]),
                         "audited_agreement": sum(self.audits[a]) / len(self.audits[a]) if self.audits[a] else None}
                for a, _ in self.levels}


@torch.inference_mode()
def early_exit_step(runner, seqs, levels: list[float | None], controller: ExitController, layer: int,
                    kv_fill: str = "deferred") -> list[ExitResult]:
    """One decode step for sequences in lossy mode: each runs its last token; with deferred fill, the
    exit states it keeps (seq.exit_hidden) ride along when that token does not exit."""
    model, vocab = runner.model, runner.config.model.vocab_size
    positions, ctx = runner.context([(s.block_table, s.num_tokens - 1) for s in seqs])
    h = runner.run(torch.tensor([s.token_ids[-1] for s in seqs], device=runner.device), None, positions, ctx, 0, layer)
    head = runner.exit_heads[layer]
    reduced = head(h).float()
    taus = torch.tensor([controller.thresholds(lv, 1)[0] for lv in levels], device=h.device)
    _, go = torch.ops.sedac.exit_decision(reduced, taus)
    leaving, staying, audited = [], [], {}
    for i, goes in enumerate(go.tolist()):
        if goes and controller.should_audit():
            audited[i] = int(head.vocab_ids[reduced[i].argmax()])
        (leaving if goes and i not in audited else staying).append(i)
    logits: list = [None] * len(seqs)
    for i, row in zip(leaving, head.full_vocab_logits(reduced[leaving], vocab)):
        logits[i] = row
    if leaving and kv_fill != "deferred":
        _predict_kv(runner, h[leaving], positions[leaving], ctx.slot_mapping[leaving], layer, kv_fill)
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


def ghost_input(model, h: torch.Tensor) -> torch.Tensor:
    """The Ghost KV predictor's input, at fit and at run time: the exit state RMS-normalized with no
    gain (each deeper layer's own gain is folded into the predictor's weight)."""
    return torch.nn.functional.rms_norm(h, (h.shape[-1],), eps=model.cfg.rms_norm_eps)


def predicted_kv(model, h: torch.Tensor, layer: int, kv_fill: str, ghost: tuple | None = None) -> list[torch.Tensor]:
    """K/V [T, 2 * KV * D] (before rotary) of layers [E, L), predicted from exit states h [T, hidden]."""
    deeper = model.layers[layer:]
    if kv_fill == "ghost":      # one GEMV for all deeper layers (see sedac.builder.ghost_kv)
        predicted = torch.ops.sedac.kv_predict(ghost_input(model, h), *ghost)
        return list(predicted.view(len(h), len(deeper), -1).unbind(1))
    return [block.kv_projection(block.input_norm(h)) for block in deeper]   # CALM state propagation


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
    return runner.model.logits(out[last]).float()

