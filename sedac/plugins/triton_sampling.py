"""Sampling on the device: one exponential race per row, its noise from Philox keyed by the row's seed.

argmax(p / E) with E ~ Exp(1) i.i.d. per token is an exact draw from p (the CPU path's `draw` does the
same with the request's torch.Generator). Here E = -log(U), U = Philox(seed, token id): the draw depends on
this row's probabilities and seed alone, never on the batch around it, and no noise crosses the bus.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _exponential_race_kernel(probs_ptr, row_stride, n_cols, seeds_ptr, out_ptr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = probs_ptr + row.to(tl.int64) * row_stride
    seed = tl.load(seeds_ptr + row)
    best = tl.full((), -1.0, tl.float32)
    best_id = tl.zeros((), tl.int32)
    for start in range(0, n_cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        p = tl.load(base + offs, mask=offs < n_cols, other=0.0).to(tl.float32)
        u = tl.rand(seed, offs)  # [0, 1): u = 0 gives E = inf, a score of 0 (never the winner of p > 0)
        score = p / -tl.log(u)
        block_best = tl.max(score, axis=0)
        block_id = tl.argmax(score, axis=0).to(tl.int32) + start
        best_id = tl.where(block_best > best, block_id, best_id)
        best = tl.maximum(best, block_best)
    tl.store(out_ptr + row, best_id.to(tl.int64))


def exponential_race(probs: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """probs [R, V] (rows sum to 1), seeds [R] int64 -> one token id per row [R] int64."""
    r, v = probs.shape
    probs = probs if probs.stride(1) == 1 else probs.contiguous()
    out = torch.empty(r, dtype=torch.int64, device=probs.device)
    if r:
        _exponential_race_kernel[(r,)](probs, probs.stride(0), v, seeds, out, BLOCK=1024)
    return out
