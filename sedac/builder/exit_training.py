"""Train SEDAC exit heads by self-distillation: the frozen backbone teaches its own early exits.

One teacher pass over the data records, per candidate exit layer, the hidden state after that layer,
and the full model's top-k next-token distribution. Each exit head (sedac.models.exit_head) then
learns to match that distribution from its layer's hidden state alone; the backbone never changes,
so the full model (sedac_mode off, and every lossless verify) stays exactly the model that was built.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from sedac.models import AttentionContext, PrefillChunk, set_context
from sedac.models.exit_head import ExitHead
from sedac.plugins import ops  # noqa: F401  (registers torch.ops.sedac)
from sedac.runtime.pass_costs import scratch_kv

TEACHER_TOP_K = 8


@dataclass
class Features:
    hidden: dict[int, torch.Tensor]  # exit layer -> [N, hidden] fp16 hidden state after that many layers
    top_ids: torch.Tensor  # [N, k] the full model's most likely next tokens
    top_probs: torch.Tensor  # [N, k] their probabilities
    documents: torch.Tensor  # [N] which document (conversation) each position came from

    @property
    def argmax(self) -> torch.Tensor:
        return self.top_ids[:, 0]


def training_texts(tokenizer, source: str, split: str, seq_len: int):
    """(token ids, 0) documents: ShareGPT conversations with the chat template, or a local file's lines."""
    if source == "sharegpt":
        from sedac.builder.datasets import sharegpt_conversations

        for messages in sharegpt_conversations(split):
            ids = tokenizer.apply_chat_template(messages, tokenize=True)
            yield list(ids["input_ids"] if hasattr(ids, "keys") else ids)[:seq_len], 0
        return
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"--calib-data must be 'sharegpt' or an existing file, got {source!r}")
    for line in path.read_text().splitlines():  # one document a line; split by a stable hash like ShareGPT
        if line.strip() and zlib.crc32(line.encode()) % 10 in {"train": range(8), "calib": (8,), "bench": (9,)}[split]:
            yield tokenizer.encode(line, add_special_tokens=False)[:seq_len], 0


@torch.inference_mode()
def collect_features(model, documents, exit_layers: list[int], num_tokens: int, desc: str) -> Features:
    """Run the frozen model over (ids, first) documents; keep positions >= first (the ones predicting
    what follows them) until num_tokens positions are collected."""
    hidden = {layer: [] for layer in exit_layers}
    top_ids, top_probs, doc_of, total = [], [], [], 0
    bar = tqdm(total=num_tokens, desc=desc, unit="tok")
    for ids, first in documents:
        t = len(ids)
        if t - first < 2:
            continue
        states, final = teacher_pass(model, ids, exit_layers)
        for layer in exit_layers:
            hidden[layer].append(states[layer][first:].half())
        probs, idx = model.logits(final[first:]).float().softmax(-1).topk(TEACHER_TOP_K, dim=-1)
        top_ids.append(idx)
        top_probs.append(probs)
        doc_of.append(torch.full((t - first,), len(doc_of)))
        total += t - first
        bar.update(t - first)
        if total >= num_tokens:
            break
    bar.close()
    if total == 0:
        raise ValueError("calibration data yielded no usable documents")
    return Features(
        {k: torch.cat(v)[:num_tokens] for k, v in hidden.items()},
        torch.cat(top_ids)[:num_tokens],
        torch.cat(top_probs)[:num_tokens],
        torch.cat(doc_of)[:num_tokens],
    )


def teacher_pass(model, ids: list[int], exit_layers: list[int], draft: bool = False):
    """One causal pass over a whole document -> ({exit layer: hidden [T, H]}, last hidden [T, H]);
    draft: on the draft copies (SEDAC's drafter)."""
    t, states = len(ids), {}
    dev = model.norm.weight.device
    with scratch_kv(model, t):
        set_context(
            AttentionContext(
                torch.arange(t, device=dev),
                block_size=1,
                prefills=[PrefillChunk(0, t, torch.empty(0, dtype=torch.long))],
            )
        )
        try:
            h, start, positions = model.embed(torch.tensor(ids, device=dev)), 0, torch.arange(t, device=dev)
            for layer in sorted(exit_layers) + [model.cfg.num_layers]:
                h = model.run_layers(h, positions, start, layer, draft)
                start = layer
                states[layer] = h
        finally:
            set_context(None)
    return states, h


def choose_vocab(argmax: torch.Tensor, size: int, always: list[int]) -> torch.Tensor:
    """The exit heads' kept vocabulary: the tokens the full model predicts most often (argmax [N], its
    next-token choices), plus `always`."""
    counts = torch.bincount(argmax, minlength=max(always, default=0) + 1)
    order = counts.argsort(descending=True)
    kept = [t for t in always] + [t for t in order[:size].tolist() if t not in always and counts[t] > 0]
    return torch.tensor(sorted(kept[:size]))


def train_exit_head(
    model,
    layer: int,
    features: Features,
    vocab_ids: torch.Tensor,
    adapter_rank: int,
    epochs: int,
    batch_size: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
) -> ExitHead:
    """Distil the full model's top-k distribution into an exit head on `layer` (backbone frozen)."""
    torch.manual_seed(seed)
    cfg = model.cfg
    head = ExitHead(cfg.hidden_size, adapter_rank, vocab_ids, cfg.rms_norm_eps)
    head.init_from_model(model.norm.weight.detach(), _lm_head_weight(model))
    for p in head.parameters():
        p.requires_grad_(True)
    targets = _kept_targets(features, vocab_ids)
    x = features.hidden[layer]
    optim = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    steps = epochs * -(-len(x) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(optim, max_lr=lr, total_steps=steps, pct_start=0.1)
    bar = tqdm(total=steps, desc=f"exit head @ layer {layer}", unit="step")
    for _ in range(epochs):
        for rows in torch.randperm(len(x)).split(batch_size):
            logp = F.log_softmax(head(x[rows].float()), dim=-1)
            loss = -(targets[rows] * logp).sum(-1).mean()
            optim.zero_grad()
            loss.backward()
            optim.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    for p in head.parameters():
        p.requires_grad_(False)
    return head.eval()


def _lm_head_weight(model) -> torch.Tensor:
    return model.lm_head.dense_rows().detach().t()  # [hidden, vocab], packed into panels or not


def _kept_targets(features: Features, vocab_ids: torch.Tensor) -> torch.Tensor:
    """Teacher top-k probabilities scattered onto the kept vocabulary, renormalised: [N, V_kept]."""
    position = torch.full((int(vocab_ids.max()) + 1,), -1, dtype=torch.long)
    position[vocab_ids] = torch.arange(len(vocab_ids))
    ids = features.top_ids.clamp(max=len(position) - 1)
    cols = torch.where(features.top_ids < len(position), position[ids], -1)
    probs = torch.where(cols >= 0, features.top_probs, 0.0)
    dense = torch.zeros(len(cols), len(vocab_ids))
    dense.scatter_add_(1, cols.clamp(min=0), probs)
    return dense / dense.sum(-1, keepdim=True).clamp(min=1e-6)


@torch.inference_mode()
def evaluate_exit_head(head: ExitHead, hidden: torch.Tensor, teacher_argmax: torch.Tensor, batch: int = 2048):
    """-> (entropy [N], agrees [N] bool): the exit's confidence signal and whether its top-1 is the model's."""
    entropies, agrees = [], []
    for rows in torch.arange(len(hidden)).split(batch):
        logits = head(hidden[rows].float())
        entropies.append(torch.ops.sedac.entropy(logits))
        agrees.append(head.vocab_ids[logits.argmax(-1)] == teacher_argmax[rows])
    return torch.cat(entropies), torch.cat(agrees)
