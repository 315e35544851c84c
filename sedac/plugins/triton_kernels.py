"""Triton kernels of the SEDAC exit ops: entropy, exit decision, margin (CUDA; tested on CPU with
TRITON_INTERPRET=1). The weight-only linears are in triton_linear.py."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _entropy_kernel(
    logits_ptr,
    row_stride,
    n_cols,
    thresholds_ptr,
    entropy_ptr,
    exit_ptr,
    HAS_THRESHOLD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program per row, one pass over the vocabulary with an online max:
    # H = m + log(s) - t / s with s = sum(exp(x - m)), t = sum(exp(x - m) * x).
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * row_stride
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)
    for start in range(0, n_cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < n_cols
        x = tl.load(base + offs, mask=valid, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        scale = tl.exp(m - m_new)
        e = tl.where(valid, tl.exp(x - m_new), 0.0)
        s = s * scale + tl.sum(e, axis=0)
        t = t * scale + tl.sum(e * tl.where(valid, x, 0.0), axis=0)  # masked lanes: e = 0, x -> 0
        m = m_new
    h = m + tl.log(s) - t / s
    tl.store(entropy_ptr + row, h)
    if HAS_THRESHOLD:
        tl.store(exit_ptr + row, (h <= tl.load(thresholds_ptr + row)).to(tl.int8))


def _entropy_launch(logits: torch.Tensor, thresholds: torch.Tensor | None):
    n, v = logits.shape
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    out = torch.empty(n, dtype=torch.float32, device=logits.device)
    exits = torch.empty(n, dtype=torch.int8, device=logits.device)
    thr = thresholds.float().contiguous() if thresholds is not None else out
    if n:
        _entropy_kernel[(n,)](
            logits, logits.stride(0), v, thr, out, exits, HAS_THRESHOLD=thresholds is not None, BLOCK=1024
        )
    return out, exits.bool()


def entropy(logits: torch.Tensor) -> torch.Tensor:
    return _entropy_launch(logits, None)[0]


def exit_decision(logits: torch.Tensor, thresholds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _entropy_launch(logits, thresholds)


@triton.jit
def _margin_kernel(logits_ptr, row_stride, n_cols, out_ptr, BLOCK: tl.constexpr):
    # One program per row, one pass: the two largest logits m1 >= m2 (a repeated maximum is its own
    # runner-up) and s = sum(exp(x - m1)) under an online max; p1 - p2 = (1 - exp(m2 - m1)) / s.
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * row_stride
    idx = tl.arange(0, BLOCK)
    m1 = tl.full((), float("-inf"), tl.float32)
    m2 = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    for start in range(0, n_cols, BLOCK):
        offs = start + idx
        valid = offs < n_cols
        x = tl.load(base + offs, mask=valid, other=float("-inf")).to(tl.float32)
        b1 = tl.max(x, axis=0)
        first = tl.min(tl.where(x == b1, idx, BLOCK), axis=0)  # drop one copy of the block max
        b2 = tl.max(tl.where(idx == first, float("-inf"), x), axis=0)
        m_new = tl.maximum(m1, b1)
        s = s * tl.exp(m1 - m_new) + tl.sum(tl.where(valid, tl.exp(x - m_new), 0.0), axis=0)
        m2 = tl.maximum(tl.minimum(m1, b1), tl.maximum(m2, b2))
        m1 = m_new
    tl.store(out_ptr + row, (1.0 - tl.exp(m2 - m1)) / s)


def margin(logits: torch.Tensor) -> torch.Tensor:
    n, v = logits.shape
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    out = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n:
        _margin_kernel[(n,)](logits, logits.stride(0), v, out, BLOCK=1024)
    return out
