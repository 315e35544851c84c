"""Learn-then-Test calibration of lossy-mode exit thresholds, and the cost model that picks exits.

Risk of a threshold setting = the fraction of generated tokens whose early-exit prediction differs
from the full model's (1 - token agreement). The calibration documents (the engine's own answers to
held-out prompts) are split in two by document (`document_split`), so no conversation informs both:
the "learn" half chooses everything (the exit layer, precision exit vs depth exit, and the map from a
scalar t to per-layer thresholds, each layer exiting only where its own error rate among exiting
tokens is <= t); the "test" half only tests: fixed-sequence testing over increasing t with an exact
one-sided binomial p-value on its tokens (Angelopoulos et al., Learn then Test; CALM's use of it).
What is guaranteed, exactly as computed: the chosen thresholds pass a level-epsilon binomial test of
"token disagreement > delta" on the test documents' tokens, treating those tokens as independent
draws from the calibration distribution (prompts of the calib split, the engine's greedy answers).
Tokens of one document are correlated, so the nominal 1 - epsilon is approximate, and it says
nothing about other distributions (`sedac-run bench --sedac-modes` measures a shifted one).
"""

from __future__ import annotations

import torch

from sedac.runtime.early_exit import NEVER, binomial_cdf  # NEVER: the threshold of a layer that never exits
from sedac.runtime.speculative import pass_cost

AGREEMENT_LEVELS = (0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)
T_GRID = [0.0] + [10 ** (e / 8) for e in range(-32, -3)]  # 1e-4 .. ~0.42, increasing


def thresholds_for(t: float, entropy: torch.Tensor, agree: torch.Tensor) -> float:
    """Largest entropy threshold whose exiting tokens (entropy <= it) have error rate <= t."""
    order = entropy.argsort()
    errors = (~agree[order]).float().cumsum(0)
    rate = errors / torch.arange(1, len(order) + 1)
    ok = (rate <= t).nonzero()
    return float(entropy[order][ok.max()]) if len(ok) else NEVER


def cascade(thresholds: list[float], entropy: list[torch.Tensor], agree: list[torch.Tensor]):
    """Exit each token at the first layer under its threshold -> (exit layer index or -1 [N], wrong [N])."""
    n = len(entropy[0])
    where = torch.full((n,), -1, dtype=torch.long)
    wrong = torch.zeros(n, dtype=torch.bool)
    for i, (tau, h, a) in enumerate(zip(thresholds, entropy, agree)):
        exits = (where < 0) & (h <= tau)
        where[exits] = i
        wrong |= exits & ~a
    return where, wrong


def document_split(documents: torch.Tensor) -> torch.Tensor:
    """The learn half as a mask over positions [N]: even-numbered documents learn, odd ones test, so a
    document's tokens are all on one side (an interleaved token split let both halves see each one)."""
    return documents % 2 == 0


def learn_then_test(
    entropy: list[torch.Tensor], agree: list[torch.Tensor], delta: float, learn: torch.Tensor, epsilon: float = 0.05
) -> dict:
    """Per-layer thresholds chosen on the `learn` positions and tested on the others (the module doc says
    what that guarantees), and the curve they came from."""
    test = ~learn
    chosen, curve = [NEVER] * len(entropy), []
    for t in T_GRID:
        taus = [thresholds_for(t, h[learn], a[learn]) for h, a in zip(entropy, agree)]
        where, wrong = cascade(taus, [h[test] for h in entropy], [a[test] for a in agree])
        m, errors = int(test.sum()), int(wrong.sum())
        p_value = binomial_cdf(errors, m, delta)
        curve.append(
            {
                "t": t,
                "thresholds": taus,
                "agreement": 1 - errors / m,
                "exit_fraction": [float((where == i).float().mean()) for i in range(len(entropy))],
                "p_value": p_value,
            }
        )
        if p_value > epsilon:  # fixed-sequence testing stops at the first non-rejection
            break
        chosen = taus
    return {"thresholds": chosen, "curve": curve}


def lossless_speedup(
    entropy: torch.Tensor, agree: torch.Tensor, draft_len: int, max_entropy: float, costs: dict
) -> float:
    """Batch-1 speedup of gated self-speculative decoding with the draft copies, replayed over
    calibration tokens in order (entropy and agree: the draft model's next-token prediction given the
    true prefix). A cycle runs draft passes while they are confident, then one verify pass over the
    drafts; pass costs as measured by sedac.runtime.pass_costs (a batch-1 full pass = 1)."""
    confident, correct = (entropy <= max_entropy).tolist(), agree.tolist()
    i, n, tokens, cost = 0, len(correct), 0, 0.0
    while i < n:
        drafts, accepted, j = 0, 0, i
        while drafts < draft_len and j < n and confident[j]:
            accepted += drafts == accepted and correct[j]  # only an unbroken prefix counts
            drafts, j = drafts + 1, j + 1
        passes = drafts + (drafts < draft_len and j < n)  # the unconfident pass is paid too
        cost += passes * pass_cost(costs, "draft", 1) + pass_cost(costs, "full", drafts + 1)
        tokens += accepted + 1
        i += accepted + 1
    return tokens / cost


def lossy_cost(where: torch.Tensor, exit_layers: list[int], costs: dict) -> float:
    """Mean per-token cost (in decoder-layer units) of a cascade's exit pattern over tokens."""
    total, n = 0.0, len(where)
    for i, layer in enumerate(exit_layers):
        count = int((where == i).sum())
        total += count * (layer + (i + 1) * costs["exit_head"] + (costs["layers"] - layer) * costs["kv_fill"])
    stay = int((where < 0).sum())
    total += stay * (costs["layers"] + costs["lm_head"] + len(exit_layers) * costs["exit_head"])
    return total / n


def cost_units(cfg, adapter_rank: int, kept_vocab: int) -> dict:
    """Parameter counts relative to one decoder layer: the bytes each part streams per decode step."""
    h, kv = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim
    q = cfg.num_heads * cfg.head_dim
    layer = h * (q + 2 * kv) + q * h + 3 * h * cfg.intermediate_size
    return {
        "layers": cfg.num_layers,
        "lm_head": h * cfg.vocab_size / layer,
        "exit_head": (2 * h * adapter_rank + h * kept_vocab) / layer,
        "kv_fill": h * (q + 2 * kv) / layer,
    }
