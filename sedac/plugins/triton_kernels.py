"""Triton kernels for the SEDAC ops (CUDA; tested on CPU with TRITON_INTERPRET=1)."""

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


@triton.jit
def _linear_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    scale_ptr,
    out_ptr,
    M,
    N,
    K,
    sxm,
    sxk,
    swk,
    swn,
    som,
    son,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    # out = (x @ w) [* scale per column] [+ bias]; w may be int8 (converted in registers).
    rm, rn = _tile(BM, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        a = tl.load(
            x_ptr + rm[:, None] * sxm + (k0 + rk)[None, :] * sxk,
            mask=(rm[:, None] < M) & ((k0 + rk)[None, :] < K),
            other=0.0,
        )
        b = tl.load(
            w_ptr + (k0 + rk)[:, None] * swk + rn[None, :] * swn,
            mask=((k0 + rk)[:, None] < K) & (rn[None, :] < N),
            other=0.0,
        )
        acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    _store(out_ptr, acc, b_ptr, rm, rn, M, N, som, son, HAS_BIAS)


@triton.jit
def _tile(BM: tl.constexpr, BN: tl.constexpr):
    """This program's output rows and columns."""
    return tl.program_id(0) * BM + tl.arange(0, BM), tl.program_id(1) * BN + tl.arange(0, BN)


@triton.jit
def _store(out_ptr, acc, b_ptr, rm, rn, M, N, som, son, HAS_BIAS: tl.constexpr):
    """acc [+ bias per column] into out, masked to [M, N]."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out_ptr + rm[:, None] * som + rn[None, :] * son,
        acc.to(out_ptr.dtype.element_ty),
        mask=(rm[:, None] < M) & (rn[None, :] < N),
    )


def _linear(x: torch.Tensor, weight: torch.Tensor, swk: int, swn: int, n: int, bias, scale) -> torch.Tensor:
    m, k = x.shape
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        grid = (triton.cdiv(m, 32), triton.cdiv(n, 64))
        _linear_kernel[grid](
            x,
            weight,
            bias if bias is not None else out,
            scale if scale is not None else out,
            out,
            m,
            n,
            k,
            x.stride(0),
            x.stride(1),
            swk,
            swn,
            out.stride(0),
            out.stride(1),
            HAS_BIAS=bias is not None,
            HAS_SCALE=scale is not None,
            BM=32,
            BN=64,
            BK=32,
        )
    return out


def kv_predict(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return _linear(hidden, weight, weight.stride(0), weight.stride(1), weight.shape[1], bias, None)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """weight int8 [O, K] read as its transpose [K, O]."""
    return _linear(x, weight, weight.stride(1), weight.stride(0), weight.shape[0], bias, scale)


@triton.jit
def _block_linear_kernel(
    x_ptr,
    c_ptr,
    s_ptr,
    m_ptr,
    b_ptr,
    out_ptr,
    M,
    N,
    K,
    sxm,
    sxk,
    scn,
    ssn,
    som,
    son,
    GROUP: tl.constexpr,
    BITS: tl.constexpr,
    HAS_MIN: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    # out = x @ w.T with w dequantized in registers per tile: q * scale (+ minimum) of the input's group;
    # 4-bit codes two a byte (input 2k low nibble, 2k + 1 high), 8-bit codes int8.
    rm, rn = _tile(BM, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + rk
        kmask = (k[:, None] < K) & (rn[None, :] < N)
        a = tl.load(x_ptr + rm[:, None] * sxm + k[None, :] * sxk, mask=(rm[:, None] < M) & (k[None, :] < K), other=0.0)
        if BITS == 4:
            byte = tl.load(c_ptr + rn[None, :] * scn + (k // 2)[:, None], mask=kmask, other=0).to(tl.int32)
            q = (byte >> ((k % 2) * 4)[:, None]) & 15
        else:
            q = tl.load(c_ptr + rn[None, :] * scn + k[:, None], mask=kmask, other=0).to(tl.int32)
        g = (k // GROUP)[:, None]
        w = q.to(tl.float32) * tl.load(s_ptr + rn[None, :] * ssn + g, mask=kmask, other=0.0).to(tl.float32)
        if HAS_MIN:
            w += tl.load(m_ptr + rn[None, :] * ssn + g, mask=kmask, other=0.0).to(tl.float32)
        acc += tl.dot(a.to(tl.float32), w, input_precision="ieee")
    _store(out_ptr, acc, b_ptr, rm, rn, M, N, som, son, HAS_BIAS)


def block_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, minimum, bias) -> torch.Tensor:
    """x [M, K] against block weights by rows (sedac.plugins.reference.block_linear) -> [M, N]."""
    m, k = x.shape
    n, bits = codes.shape[0], 4 if codes.dtype == torch.uint8 else 8
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        grid = (triton.cdiv(m, 32), triton.cdiv(n, 64))
        _block_linear_kernel[grid](
            x,
            codes,
            scale,
            minimum if minimum is not None else scale,
            bias if bias is not None else out,
            out,
            m,
            n,
            k,
            x.stride(0),
            x.stride(1),
            codes.stride(0),
            scale.stride(0),
            out.stride(0),
            out.stride(1),
            GROUP=k // scale.shape[1],
            BITS=bits,
            HAS_MIN=minimum is not None,
            HAS_BIAS=bias is not None,
            BM=32,
            BN=64,
            BK=32,
        )
    return out
