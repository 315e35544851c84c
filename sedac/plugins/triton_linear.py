"""Triton kernels of the weight-only linears (CUDA; tested on CPU with TRITON_INTERPRET=1): int8 rows,
int4 / GGUF blocks, and the dense linear of SEDAC's KV predictor.

Decode (M <= GEMV_MAX_M rows) is a GEMV: a tl.dot tile has 16+ rows, mostly padding there, and wide output
tiles leave most SMs idle on a 576-wide projection. Each GEMV program converts its weight tile once for all
rows and reduces in fp32; above GEMV_MAX_M the tl.dot kernels.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

GEMV_MAX_M = 16
GEMV_TILE = 4096  # weights a GEMV program converts a step: 32 a thread at 4 warps (int8: two 16-byte loads)
GEMV_MAX_BK = 1024  # inputs a step: one step covers a 576- or 1024-wide input, fewer serial round trips
SPLIT_MIN_STEPS = 3  # split K only when a program would take this many serial steps (worth a second launch)
SPLIT_PROGRAMS = 4  # ... and the outputs alone give fewer than this many programs an SM
CPU_SM_COUNT = 132  # an H200's: the interpreter (CPU tensors) runs the tiles the GPU would


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return CPU_SM_COUNT
    return torch.cuda.get_device_properties(device).multi_processor_count


def _gemv_grid(n: int, k: int, group: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BN, BK, K_SPLIT, SPLIT): BN outputs a program, as many as keep >= one program an SM; BK inputs a
    step (a multiple of the block group); K split into SPLIT slices of K_SPLIT inputs when the outputs give
    too few programs to keep enough loads in flight and each would loop long (long K, narrow N)."""
    sms = _sm_count(device)
    bk = max(group, min(GEMV_MAX_BK, triton.next_power_of_2(k)))
    bn = max(1, min(GEMV_TILE // bk, triton.next_power_of_2(n)))
    while bn > 1 and triton.cdiv(n, bn) < sms:
        bn //= 2
    tiles, steps = triton.cdiv(n, bn), triton.cdiv(k, bk)
    per = steps
    if steps >= SPLIT_MIN_STEPS and tiles < SPLIT_PROGRAMS * sms:
        per = triton.cdiv(steps, triton.cdiv(SPLIT_PROGRAMS * sms, tiles))
    return bn, bk, per * bk, triton.cdiv(steps, per)


@triton.jit
def _put_row(acc, part, i, BM: tl.constexpr):
    """acc [BM, BN] with part [BN] added to row i (a register tile's rows can't be indexed)."""
    return tl.where(tl.arange(0, BM)[:, None] == i, acc + part[None, :], acc)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, scale_ptr, swn, swk, b_ptr, out_ptr, M, N, K, K_SPLIT, sxm, sxk, sos, som, son,
    HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    # out[:, n] = (x @ w[n]) [* scale[n]] [+ bias[n]] for BN outputs over inputs [pid1 * K_SPLIT, + K_SPLIT)
    # (slice pid1 of out at pid1 * sos); w [BN, BK] read K-contiguous (coalesced), int8 converted in registers.
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    k_lo = tl.program_id(1) * K_SPLIT
    k_hi = tl.minimum(K, k_lo + K_SPLIT)
    w_rows = w_ptr + rn[:, None].to(tl.int64) * swn  # int64: a vocabulary head's N * K passes 2**31
    if BM == 1:  # one row: the products kept elementwise, reduced once after the loop
        acc = tl.zeros((BN, BK), dtype=tl.float32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        k = k0 + rk
        kmask = k < k_hi
        w = tl.load(w_rows + k[None, :] * swk, mask=(rn[:, None] < N) & kmask[None, :], other=0).to(tl.float32)
        if BM == 1:
            acc += w * tl.load(x_ptr + k * sxk, mask=kmask, other=0.0).to(tl.float32)[None, :]
        else:
            for i in tl.static_range(BM):
                if i < M:
                    x = tl.load(x_ptr + i * sxm + k * sxk, mask=kmask, other=0.0).to(tl.float32)
                    acc = _put_row(acc, tl.sum(w * x[None, :], axis=1), i, BM)
    if BM == 1:
        acc = tl.sum(acc, axis=1)[None, :]
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    _store(out_ptr + tl.program_id(1) * sos, acc, b_ptr, tl.arange(0, BM), rn, M, N, som, son, HAS_BIAS)


@triton.jit
def _dequant(q, d, mn, HAS_MIN: tl.constexpr):
    """q * scale (+ minimum), fp32: the product of a code and an fp16 scale is exact, so this rounds once."""
    w = q.to(tl.float32) * d
    if HAS_MIN:
        w += mn
    return w


@triton.jit
def _block_products(w_lo, w_hi, x_row, xk, xmask, sxk, BITS: tl.constexpr):
    """One row's products with a [BN, G, H] weight tile: w_lo against inputs xk [G, H] (4-bit: the even
    ones), w_hi against xk + 1 (4-bit only)."""
    p = w_lo * tl.load(x_row + xk * sxk, mask=xmask, other=0.0).to(tl.float32)[None, :, :]
    if BITS == 4:
        p += w_hi * tl.load(x_row + (xk + 1) * sxk, mask=xmask, other=0.0).to(tl.float32)[None, :, :]
    return p


@triton.jit
def _gemv_block_kernel(
    x_ptr, c_ptr, s_ptr, m_ptr, scn, ssn, b_ptr, out_ptr, M, N, K, K_SPLIT, sxm, sxk, sos, som, son,
    GROUP: tl.constexpr, BITS: tl.constexpr, HAS_MIN: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    # _gemv_kernel on block weights. The tile is [BN, G groups, H code bytes a group] (groups whole: K and
    # K_SPLIT are multiples of GROUP) so each (output, group) scale and minimum is loaded once and broadcast
    # over its codes; a 4-bit byte holds inputs 2j (low nibble) and 2j + 1 (high), taken as two tiles.
    G: tl.constexpr = BK // GROUP  # groups a step
    H: tl.constexpr = GROUP * BITS // 8  # code bytes a group
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rg = tl.arange(0, G)
    rh = tl.arange(0, H)
    g_lo = tl.program_id(1) * (K_SPLIT // GROUP)
    g_hi = tl.minimum(K // GROUP, g_lo + K_SPLIT // GROUP)
    c_rows = c_ptr + rn[:, None, None].to(tl.int64) * scn  # int64: a vocabulary head's N * K passes 2**31
    s_rows = rn[:, None] * ssn
    if BM == 1:  # one row: the products kept elementwise, reduced once after the loop
        acc = tl.zeros((BN, G, H), dtype=tl.float32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    for g0 in range(g_lo, g_hi, G):
        g = g0 + rg
        gmask = (rn[:, None] < N) & (g < g_hi)[None, :]  # [BN, G]
        d = tl.load(s_ptr + s_rows + g[None, :], mask=gmask, other=0.0).to(tl.float32)[:, :, None]
        mn = d
        if HAS_MIN:
            mn = tl.load(m_ptr + s_rows + g[None, :], mask=gmask, other=0.0).to(tl.float32)[:, :, None]
        q = tl.load(c_rows + (g * H)[None, :, None] + rh[None, None, :], mask=gmask[:, :, None], other=0)
        q = q.to(tl.int32)  # uint8 zero-extends, int8 sign-extends
        if BITS == 4:
            w_lo = _dequant(q & 15, d, mn, HAS_MIN)
            w_hi = _dequant(q >> 4, d, mn, HAS_MIN)
        else:
            w_lo = _dequant(q, d, mn, HAS_MIN)
            w_hi = w_lo
        xk = (g * GROUP)[:, None] + rh[None, :] * (8 // BITS)  # [G, H]: each byte's first input
        xmask = (g < g_hi)[:, None]
        if BM == 1:
            acc += _block_products(w_lo, w_hi, x_ptr, xk, xmask, sxk, BITS)
        else:
            for i in tl.static_range(BM):
                if i < M:
                    p = _block_products(w_lo, w_hi, x_ptr + i * sxm, xk, xmask, sxk, BITS)
                    acc = _put_row(acc, tl.sum(tl.sum(p, axis=2), axis=1), i, BM)
    if BM == 1:
        acc = tl.sum(tl.sum(acc, axis=2), axis=1)[None, :]
    _store(out_ptr + tl.program_id(1) * sos, acc, b_ptr, tl.arange(0, BM), rn, M, N, som, son, HAS_BIAS)


@triton.jit
def _split_sum_kernel(part_ptr, b_ptr, out_ptr, MN, N, SPLIT, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    # out [M, N] (contiguous) = the SPLIT partial sums [SPLIT, M, N] added in a fixed order (deterministic,
    # unlike atomics) [+ bias], in out's dtype.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLIT):
        acc += tl.load(part_ptr + s * MN + offs, mask=valid, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=valid, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=valid)


def _gemv(kernel, x: torch.Tensor, n: int, group: int, bias, weights: tuple, **consts) -> torch.Tensor:
    """x [M <= GEMV_MAX_M, K] -> [M, N] in x's dtype on a GEMV kernel; weights: its pointers and strides
    between x and the bias. Split K goes through an fp32 [SPLIT, M, N] buffer and one more launch."""
    m, k = x.shape
    bn, bk, k_split, split = _gemv_grid(n, k, group, x.device)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    part = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    kernel[(triton.cdiv(n, bn), split)](
        x,
        *weights,
        bias if bias is not None else out,
        part,
        m,
        n,
        k,
        k_split,
        x.stride(0),
        x.stride(1),
        *((0, out.stride(0), out.stride(1)) if split == 1 else (m * n, n, 1)),
        HAS_BIAS=bias is not None and split == 1,
        BM=triton.next_power_of_2(m),
        BN=bn,
        BK=bk,
        **consts,
    )
    if split > 1:
        block = 1024
        _split_sum_kernel[(triton.cdiv(m * n, block),)](
            part, bias if bias is not None else out, out, m * n, n, split, HAS_BIAS=bias is not None, BLOCK=block
        )
    return out


def _is_half(x: torch.Tensor) -> bool:
    return x.dtype in (torch.float16, torch.bfloat16)


def _dot_tiles(m: int, half: bool) -> dict:
    """Prefill (and decode above GEMV_MAX_M) tiles: half activations dot on tensor cores, where a deeper
    K step is cheap; fp32 ones in "ieee" on the FMA units."""
    return dict(BM=32 if m <= 32 else 64, BN=64, BK=64 if half else 32)


@triton.jit
def _dot(a, w, HALF: tl.constexpr):
    """a @ w accumulated in fp32: on tensor cores in a's half dtype (w converted), else exact fp32 ("ieee")."""
    if HALF:
        out = tl.dot(a, w.to(a.dtype))
    else:
        out = tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
    return out


@triton.jit
def _linear_kernel(
    x_ptr, w_ptr, b_ptr, scale_ptr, out_ptr, M, N, K, sxm, sxk, swk, swn, som, son, HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr, HALF: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
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
        acc += _dot(a, b, HALF)
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


def _tiled(kernel, x: torch.Tensor, out: torch.Tensor, half: bool, pointers: tuple, strides: tuple, **consts):
    """x [M, K] -> out [M, N] on a tl.dot kernel: pointers (the weights', bias or out) go between x and out,
    the weights' strides between x's and out's."""
    (m, k), n = x.shape, out.shape[1]
    tiles = _dot_tiles(m, half)
    if m:
        kernel[(triton.cdiv(m, tiles["BM"]), triton.cdiv(n, tiles["BN"]))](
            x, *pointers, out, m, n, k, x.stride(0), x.stride(1), *strides, out.stride(0), out.stride(1),
            HALF=half, **consts, **tiles,
        )  # fmt: skip
    return out


def _linear(x: torch.Tensor, weight: torch.Tensor, swk: int, swn: int, n: int, bias, scale) -> torch.Tensor:
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    half = _is_half(x) and weight.dtype in (x.dtype, torch.int8)  # int8 is exact in fp16 and bf16
    pointers = (weight, bias if bias is not None else out, scale if scale is not None else out)
    return _tiled(
        _linear_kernel, x, out, half, pointers, (swk, swn), HAS_BIAS=bias is not None, HAS_SCALE=scale is not None
    )


def kv_predict(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return _linear(hidden, weight, weight.stride(0), weight.stride(1), weight.shape[1], bias, None)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """weight int8 [O, K]: decode rows on the GEMV (rows of weight K-contiguous), more on tl.dot tiles of
    its transpose [K, O]."""
    if 0 < x.shape[0] <= GEMV_MAX_M:
        weights = (weight, scale, weight.stride(0), weight.stride(1))
        return _gemv(_gemv_kernel, x, weight.shape[0], 1, bias, weights, HAS_SCALE=True)
    return _linear(x, weight, weight.stride(1), weight.stride(0), weight.shape[0], bias, scale)


@triton.jit
def _block_linear_kernel(
    x_ptr, c_ptr, s_ptr, m_ptr, b_ptr, out_ptr, M, N, K, sxm, sxk, scn, ssn, som, son, GROUP: tl.constexpr,
    BITS: tl.constexpr, HAS_MIN: tl.constexpr, HAS_BIAS: tl.constexpr, HALF: tl.constexpr, BM: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
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
        acc += _dot(a, w, HALF)
    _store(out_ptr, acc, b_ptr, rm, rn, M, N, som, son, HAS_BIAS)


def block_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, minimum, bias) -> torch.Tensor:
    """x [M, K] against block weights by rows (sedac.plugins.reference.block_linear) -> [M, N]: decode rows
    on the GEMV (a power-of-two group), more on tl.dot tiles."""
    m, k = x.shape
    n, bits, group = codes.shape[0], 4 if codes.dtype == torch.uint8 else 8, k // scale.shape[1]
    consts = dict(GROUP=group, BITS=bits, HAS_MIN=minimum is not None)
    if 0 < m <= GEMV_MAX_M and group & (group - 1) == 0:  # a tile's groups and bytes a group: powers of two
        weights = (codes, scale, minimum if minimum is not None else scale, codes.stride(0), scale.stride(0))
        return _gemv(_gemv_block_kernel, x, n, group, bias, weights, **consts)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    pointers = (codes, scale, minimum if minimum is not None else scale, bias if bias is not None else out)
    strides = (codes.stride(0), scale.stride(0))
    return _tiled(_block_linear_kernel, x, out, _is_half(x), pointers, strides, HAS_BIAS=bias is not None, **consts)
