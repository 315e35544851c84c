"""Exact greedy decoding without the full-precision LM head: an int8 screen with a proven error bound.

A batch-1 CPU decode streams every weight once per token, and the LM head is a fifth of SmolLM2's
bytes (49152 x 576 fp32, 113 MB, ~4 ms of a ~20 ms token). A greedy step only needs the argmax, so the head first runs
on an int8 copy (a quarter of the bytes) and bounds each logit's error: for a weight row w and its
dequantized copy w~, |x.w - x.w~| <= |x| |w - w~| (Cauchy-Schwarz), with |w - w~| stored per row.
Every token whose int8 logit plus its bound reaches the best lower bound may be the argmax; only
those (a handful per token on SmolLM2: tools/greedy_screen_probe.py) get their exact fp32 logit. The
true argmax is always among them, so the choice is the full head's, not an approximation of it.
"""

from __future__ import annotations

import torch

# Measured on 2 AVX2 cores (SmolLM2 head, panel kernels): screen 1.5 / 1.9 / 3.4 ms vs the fp32 head
# 3.4 / 3.2 / 4.6 ms at 1 / 2 / 4 rows; 5.4 vs 6.8 at 8 and 22 vs 19 at 32, where the int8 kernel is
# compute-bound (4 keeps a margin on this noisy VM).
MAX_SCREEN_ROWS = 4


class GreedyScreen:
    def __init__(self, head):
        """head: the LM head Linear, with its int8 copy (quantize_int8); the screen reads its rows in
        place, so no second copy of the head is kept."""
        self.head = head
        rows, int8 = head.dense_rows().double(), head.int8_rows().double()  # [V, H], at start-up only
        error = (rows - int8).norm(dim=1)
        # fp32 rounding of the two dot products, each within hidden * eps of |x| |w| (with room to spare)
        rounding = 4 * rows.shape[1] * torch.finfo(torch.float32).eps * rows.norm(dim=1)
        self.row_bound = (error + rounding).float()  # [V]
        # On int8 activations (the VNNI kernel at two levels, csrc/int8_activations.h) each input is also off
        # by at most max |x| / (2 * 127 * 254), so a logit by at most that times sqrt(hidden) |w~|
        # (Cauchy-Schwarz); 64,000 leaves room for the fp32 rounding of the quantization itself.
        self.activation_bound = None
        if head.int8[0].dtype == torch.uint8:
            self.activation_bound = (int8.norm(dim=1) * rows.shape[1] ** 0.5 / 64_000).float()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [R, H] (final-normed) -> [R, V]: the exact logits of every token that may be the argmax,
        -inf elsewhere."""
        approx = self.head.int8_linear(x, activation_levels=2)  # [R, V] on the int8 copy
        # per row: tokens with approx + bound >= max(approx - bound), bound = |x| row_bound (+ activations')
        rows, cols = torch.ops.sedac_cpu.screen_candidates(approx, x, self.row_bound, self.activation_bound)
        out = torch.full_like(approx, float("-inf"))
        out[rows, cols] = (x[rows] * self.head.output_rows(cols)).sum(dim=1)
        return out
