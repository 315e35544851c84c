"""SEDAC lossy mode: per-token early exit at calibrated entropy thresholds.

Decode tokens run layer by layer; at each exit layer the exit head's entropy decides (the
`sedac::exit_decision` op). Exited tokens leave the batch for the deeper layers, and those layers'
K/V for them are filled by state propagation from the exit hidden state, so later tokens attend
to them. An adaptive controller audits a few exits (runs them to the end anyway) and tightens the
thresholds when the audited agreement falls below the target; it never loosens past calibration.
"""
from __future__ import annotations

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
def early_exit_step(runner, seqs, levels: list[float | None], controller: ExitController,
                    exit_layers: list[int]) -> list[ExitResult]:
    """One decode step for sequences in lossy mode (one new token each)."""
    model, vocab = runner.model, runner.config.model.vocab_size
    num_layers = runner.config.model.num_layers
    positions, ctx = runner.context([(s.block_table, s.num_tokens - 1) for s in seqs])
    ids = torch.tensor([s.token_ids[-1] for s in seqs], device=runner.device)
    rows = list(range(len(seqs)))
    taus = [controller.thresholds(lv, len(exit_layers)) for lv in levels]
    logits: list = [None] * len(seqs)
    exit_at, audited = [num_layers] * len(seqs), {}
    h, start = None, 0
    for li, layer in enumerate(exit_layers):
        h = runner.run(ids if h is None else None, h, positions, ctx, start, layer)
        start = layer
        head = runner.exit_heads[layer]
        reduced = head(h).float()
        _, go = torch.ops.sedac.exit_decision(reduced, torch.tensor([taus[i][li] for i in rows], device=h.device))
        leaving = []
        for r, goes in enumerate(go.tolist()):
            if goes and rows[r] not in audited:
                if controller.should_audit():
                    audited[rows[r]] = int(head.vocab_ids[reduced[r].argmax()])
                else:
                    leaving.append(r)
        if leaving:
            out = head.full_vocab_logits(reduced[leaving], vocab)
            for r, row_logits in zip(leaving, out):
                logits[rows[r]], exit_at[rows[r]] = row_logits, layer
            model.propagate_kv(h[leaving], positions[leaving], ctx.slot_mapping[leaving], layer)
            keep = torch.tensor([r for r in range(len(rows)) if r not in set(leaving)], dtype=torch.long)
            if len(keep) == 0:
                break
            h, positions, ctx = h[keep], positions[keep], ctx.select_decodes(keep)
            rows = [rows[r] for r in keep.tolist()]
    else:
        final = model.logits(runner.run(None, h, positions, ctx, start, None)).float()
        for r, row_logits in zip(rows, final):
            logits[r] = row_logits
    for i, predicted in audited.items():
        controller.record(levels[i], predicted == int(logits[i].argmax()))
    tokens, lps = sample(torch.stack(logits), seqs)
    return [ExitResult(t, lp, layer) for t, lp, layer in zip(tokens, lps, exit_at)]
