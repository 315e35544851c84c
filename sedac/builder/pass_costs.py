"""Measure what a decode pass costs on the build machine, for the lossless drafter's cost model.

A decode pass streams the weights once (a fixed cost) and does arithmetic per row (a cost per row
that dominates once a batch is compute-bound). Both are measured for the full-precision pass and
the draft pass (on the draft copies), at 1 and 8 rows, and fitted as fixed + per_row * rows, in units of a batch-1
full pass. The build's replay (k and the gate at batch 1) and the engine's draft length per batch
size (sedac.runtime.speculative.draft_plan) both read them.
"""

from __future__ import annotations

import time
from functools import partial

import torch

from sedac.builder.exit_training import scratch_kv

CONTEXT = 128  # context length of each measured row (a typical chat turn)
ROWS = (1, 8)


@torch.inference_mode()
def measure_pass_costs(runner, repeats: int = 20) -> dict:
    """-> {"full": [fixed, per_row], "draft": [fixed, per_row]}, a full pass at 1 row = 1. The four
    passes are timed in turn, each its fastest of `repeats` (the least disturbed by other work)."""
    bs = runner.block_size
    per_seq = CONTEXT // bs + 1
    passes = {}
    for rows in ROWS:
        positions, ctx = runner.context([(list(range(i * per_seq, (i + 1) * per_seq)), CONTEXT) for i in range(rows)])
        ids = torch.zeros(rows, dtype=torch.long, device=runner.device)
        for draft in (False, True):
            passes[(rows, draft)] = partial(_decode_pass, runner, ids, positions, ctx, draft)
    seconds = {key: float("inf") for key in passes}
    with scratch_kv(runner.model, max(ROWS) * per_seq * bs):
        for fn in passes.values():
            fn()  # warm-up
        for _ in range(repeats):
            for key, fn in passes.items():
                start = time.perf_counter()
                fn()
                seconds[key] = min(seconds[key], time.perf_counter() - start)
    unit = seconds[(1, False)]
    costs = {}
    for name, draft in (("full", False), ("draft", True)):
        per_row = (seconds[(ROWS[1], draft)] - seconds[(ROWS[0], draft)]) / (ROWS[1] - ROWS[0]) / unit
        costs[name] = [seconds[(1, draft)] / unit - per_row, per_row]
    return costs


def _decode_pass(runner, ids, positions, ctx, draft: bool) -> torch.Tensor:
    return runner.model.logits(runner.run(ids, None, positions, ctx, draft=draft), draft=draft)
