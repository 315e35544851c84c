"""SEDAC exit head: a small residual adapter and a reduced-vocabulary LM head on an exit layer.

Trained by self-distillation against the full model with the backbone frozen (sedac.builder.exit_training).
Initialised as the training-free exit (identity adapter, the final norm, the shared head's columns for
the kept vocabulary), so training only ever starts from the plain early exit and improves on it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sedac.models.layers import Linear, RMSNorm


class ExitHead(nn.Module):
    def __init__(self, hidden_size: int, adapter_rank: int, vocab_ids: torch.Tensor, eps: float):
        super().__init__()
        self.norm_in = RMSNorm(hidden_size, eps)
        self.up = Linear(hidden_size, adapter_rank)
        self.down = Linear(adapter_rank, hidden_size)
        self.norm_out = RMSNorm(hidden_size, eps)
        self.head = Linear(hidden_size, len(vocab_ids))  # [hidden, kept vocab]
        self.register_buffer("vocab_ids", vocab_ids.long())  # kept vocab index -> token id

    def init_from_model(self, final_norm: torch.Tensor, lm_head: torch.Tensor) -> None:
        """final_norm [hidden], lm_head [hidden, vocab]: start as the training-free exit."""
        with torch.no_grad():
            nn.init.normal_(self.up.weight, std=self.up.weight.shape[0] ** -0.5)
            self.down.weight.zero_()
            self.norm_out.weight.copy_(final_norm)
            self.head.weight.copy_(lm_head[:, self.vocab_ids])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h [N, hidden] exit-layer hidden states -> logits over the kept vocabulary [N, V_kept]."""
        x = h + self.down(F.silu(self.up(self.norm_in(h))))
        return self.head(self.norm_out(x))

    def full_vocab_logits(self, reduced: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """[N, V_kept] -> [N, vocab] with -inf outside the kept vocabulary (for the shared sampler)."""
        out = reduced.new_full((reduced.shape[0], vocab_size), float("-inf"))
        return out.index_copy_(1, self.vocab_ids, reduced)
