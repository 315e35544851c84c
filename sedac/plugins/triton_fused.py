"""Fused elementwise kernels of a decoder layer on CUDA: RMSNorm (with the residual add before it), rotary
and SiLU-and-multiply, one launch each where PyTorch takes four to eight.

A batch-1 decode step of an 8B model streams ~15 GB in ~3.5 ms on an H200; its ~900 small kernels cost
~1.5 us each even inside a CUDA graph. Each kernel rounds where HF transformers' PyTorch code rounds (to
the model dtype after each op); sums may add in another order and products may fuse into FMAs, so results
match that code to within a rounding step, not bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr, delta_ptr, w_ptr, out_ptr, sum_ptr, n_cols, eps, sx, sd, so, ss,
    ADD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # One program per row: [h = x + delta (stored, rounded to the dtype)], then w * (h / rms(h)) as HF:
    # normalize in fp32, round to the dtype, then scale (rounded again).
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * sx + cols, mask=mask, other=0.0)
    if ADD:
        x = (x.to(tl.float32) + tl.load(delta_ptr + row * sd + cols, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(sum_ptr + row * ss + cols, x, mask=mask)
    xf = x.to(tl.float32)
    normed = xf * tl.math.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * so + cols, (w * normed.to(x.dtype).to(tl.float32)).to(x.dtype), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, delta: torch.Tensor | None = None):
    """x [T, H] -> norm(x); with delta: (x + delta, norm(x + delta))."""
    t, h = x.shape
    assert x.stride(1) == 1 and (delta is None or delta.stride(1) == 1), "rows must be contiguous"
    out = torch.empty_like(x)
    total = torch.empty_like(x) if delta is not None else out
    d = delta if delta is not None else x
    if t:
        _rms_norm_kernel[(t,)](
            x, d, weight, out, total, h, eps, x.stride(0), d.stride(0), out.stride(0), total.stride(0),
            ADD=delta is not None, BLOCK=triton.next_power_of_2(h),
        )  # fmt: skip
    return out if delta is None else (total, out)


@triton.jit
def _rotate(src, cos_ptr, sin_ptr, t, sct, HALF: tl.constexpr):
    """A head's two halves at src, rotated: x * cos + roll(x, D/2) * signed_sin, each product and the sum
    rounded to the dtype as PyTorch's three ops do."""
    lo = tl.arange(0, HALF)
    x1, x2 = tl.load(src + lo), tl.load(src + HALF + lo)
    dt = x1.dtype
    c1, c2 = tl.load(cos_ptr + t * sct + lo), tl.load(cos_ptr + t * sct + HALF + lo)
    s1, s2 = tl.load(sin_ptr + t * sct + lo), tl.load(sin_ptr + t * sct + HALF + lo)
    return _sum(_mul(x1, c1, dt), _mul(x2, s1, dt), dt), _sum(_mul(x2, c2, dt), _mul(x1, s2, dt), dt)


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, sxt, sxh, sct, sot, soh, HALF: tl.constexpr):
    # One program per (token, head).
    t = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    first, second = _rotate(x_ptr + t * sxt + head * sxh, cos_ptr, sin_ptr, t, sct, HALF)
    lo = tl.arange(0, HALF)
    tl.store(out_ptr + t * sot + head * soh + lo, first)
    tl.store(out_ptr + t * sot + head * soh + HALF + lo, second)


@triton.jit
def _rotary_and_cache_kernel(
    qkv_ptr, cos_ptr, sin_ptr, slot_ptr, q_ptr, k_cache_ptr, v_cache_ptr, s_qkv, sct, sqt, sqh, sks, skh, svs, svh,
    HEADS: tl.constexpr, D: tl.constexpr,
):  # fmt: skip
    # One program per (token, head of q and k): q heads rotate into q; k heads rotate into the cache at the
    # token's slot, their V head copied beside (as the cache's dtype: the pool may be stored narrower).
    t = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    lo = tl.arange(0, D // 2)
    src = qkv_ptr + t * s_qkv + head * D
    first, second = _rotate(src, cos_ptr, sin_ptr, t, sct, D // 2)
    if head < HEADS:
        dst = q_ptr + t * sqt + head * sqh
        tl.store(dst + lo, first)
        tl.store(dst + D // 2 + lo, second)
    else:
        kv_head = head - HEADS
        slot = tl.load(slot_ptr + t).to(tl.int64)
        dst = k_cache_ptr + slot * sks + kv_head * skh
        tl.store(dst + lo, first.to(k_cache_ptr.dtype.element_ty))
        tl.store(dst + D // 2 + lo, second.to(k_cache_ptr.dtype.element_ty))
        v = tl.load(src + (tl.num_programs(1) - HEADS) * D + tl.arange(0, D))  # V heads follow the K heads
        tl.store(v_cache_ptr + slot * svs + kv_head * svh + tl.arange(0, D), v.to(v_cache_ptr.dtype.element_ty))


def rotary_and_cache(qkv, cos, signed_sin, slots, k_cache, v_cache, heads: int) -> torch.Tensor:
    """qkv [T, (heads + 2 KV) * D] (q | k | v before rotary), tables [T, 1, D], slots [T] -> q [T, heads, D]
    rotated; K rotated and V written to the caches [num_slots, KV, D] at slots."""
    t = qkv.shape[0]
    kv, d = k_cache.shape[1], k_cache.shape[2]
    assert qkv.stride(1) == 1 and k_cache.stride(2) == 1 and v_cache.stride(2) == 1, "rows must be contiguous"
    q = torch.empty(t, heads, d, dtype=qkv.dtype, device=qkv.device)
    if t:
        cos, signed_sin = cos.contiguous(), signed_sin.contiguous()
        _rotary_and_cache_kernel[(t, heads + kv)](
            qkv, cos, signed_sin, slots, q, k_cache, v_cache, qkv.stride(0), cos.stride(0), q.stride(0),
            q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
            HEADS=heads, D=d,
        )  # fmt: skip
    return q


@triton.jit
def _mul(a, b, dt: tl.constexpr):
    return (a.to(tl.float32) * b.to(tl.float32)).to(dt)


@triton.jit
def _sum(a, b, dt: tl.constexpr):
    return (a.to(tl.float32) + b.to(tl.float32)).to(dt)


def rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] (rows may be strided), tables [T, 1, D] -> [T, heads, D]."""
    t, heads, d = x.shape
    assert x.stride(2) == 1, "heads must be contiguous"
    out = torch.empty(t, heads, d, dtype=x.dtype, device=x.device)
    if t:
        cos, signed_sin = cos.contiguous(), signed_sin.contiguous()
        _rotary_kernel[(t, heads)](
            x, cos, signed_sin, out, x.stride(0), x.stride(1), cos.stride(0), out.stride(0), out.stride(1),
            HALF=d // 2,
        )  # fmt: skip
    return out


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, n, sx, so, BLOCK: tl.constexpr):
    # silu(gate) rounded to the dtype, then times up (rounded): F.silu(gate) * up.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    gate = tl.load(x_ptr + row * sx + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * sx + n + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    tl.store(out_ptr + row * so + cols, _mul(act, up, gate.dtype), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2I] (gate | up) -> silu(gate) * up [T, I]."""
    t, width = gate_up.shape
    assert gate_up.stride(1) == 1, "rows must be contiguous"
    out = torch.empty(t, width // 2, dtype=gate_up.dtype, device=gate_up.device)
    if t:
        grid = (t, triton.cdiv(width // 2, 1024))
        _silu_and_mul_kernel[grid](gate_up, out, width // 2, gate_up.stride(0), out.stride(0), BLOCK=1024)
    return out
