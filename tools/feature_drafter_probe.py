"""Probe: would an EAGLE-style feature drafter beat SEDAC's early-exit drafts on this model?

    .venv/bin/python tools/feature_drafter_probe.py --engine engines/smollm2-sedac [--train-tokens 65536] [--epochs 12]

The drafter EAGLE uses: the full model's last hidden state at token t and the embedding of token t+1
-> a linear fuse -> one causal decoder layer -> the final norm and a reduced-vocabulary head, trained
to predict the full model's next token (and its next hidden state, so it can draft on). It costs ~2.3
decoder layers per draft, against ~25 for SEDAC's layer-24 exit, so it pays off only if its drafts
agree with the model about as often. Trained here on the same teacher-forced ShareGPT train tokens a
`--sedac` build uses; measured on the model's own greedy answers to held-out (calib) prompts, like the
exit-layer agreement α in the engine's build. Prints the first draft's agreement and the second's
(given the first was right, drafted from the predicted hidden state).
"""

from __future__ import annotations

import time

import click
import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from sedac import LLM, SamplingParams
from sedac.builder import exit_training as et
from sedac.builder.datasets import sharegpt_prompts
from sedac.builder.hf_export import hf_config


class FeatureDrafter(nn.Module):
    def __init__(self, model, vocab_ids: torch.Tensor):
        super().__init__()
        cfg, hidden = model.cfg, model.cfg.hidden_size
        self.embed = model.embed_tokens.weight.detach()
        self.fuse = nn.Linear(2 * hidden, hidden, bias=False)
        self.layer = LlamaDecoderLayer(hf_config(cfg), 0)
        self.rotary = LlamaRotaryEmbedding(hf_config(cfg))
        self.norm = nn.RMSNorm(hidden, eps=cfg.rms_norm_eps)
        self.head = nn.Linear(hidden, len(vocab_ids), bias=False)
        with torch.no_grad():  # start from "the next hidden state is this one" and the model's own head
            self.fuse.weight.zero_()
            self.fuse.weight[:, :hidden].copy_(torch.eye(hidden))
            self.norm.weight.copy_(model.norm.weight.detach())
            self.head.weight.copy_(et._lm_head_weight(model)[:, vocab_ids].t())

    def forward(self, features: torch.Tensor, next_ids: torch.Tensor):
        """features [T, H] of tokens 0..T-1, next_ids [T] = tokens 1..T -> (hidden [T, H], logits [T, V])."""
        x = self.fuse(torch.cat([features, self.embed[next_ids]], -1))[None]
        positions = torch.arange(1, x.shape[1] + 1)[None]
        mask = torch.full((x.shape[1], x.shape[1]), float("-inf")).triu(1)[None, None]
        h = self.layer(x, attention_mask=mask, position_ids=positions, position_embeddings=self.rotary(x, positions))
        h = (h[0] if isinstance(h, tuple) else h)[0]
        return h, self.head(self.norm(h))


def teacher_documents(model, documents, limit: int) -> list[tuple]:
    """(ids [T], last hidden [T, H], the full model's next-token argmax [T], first answer position)."""
    out, total = [], 0
    for ids, first in documents:
        if len(ids) < 8:
            continue
        _, final = et.teacher_pass(model, ids, [])
        with torch.inference_mode():
            top = model.logits(final).argmax(-1)
        # clones outside inference mode: trainable inputs
        out.append((torch.tensor(ids), final.clone(), top.clone(), first))
        total += len(ids)
        if total >= limit:
            break
    return out


def train(drafter, docs, position, epochs: int, lr: float) -> None:
    optim = torch.optim.AdamW([p for p in drafter.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(optim, max_lr=lr, total_steps=epochs * len(docs), pct_start=0.1)
    for epoch in range(epochs):
        start, total = time.time(), 0.0
        for i in torch.randperm(len(docs)).tolist():
            ids, final, top, _ = docs[i]
            h, logits = drafter(final[:-1], ids[1:])
            target = position[top[1:]]
            kept = target >= 0
            loss = F.cross_entropy(logits[kept], target[kept]) + 0.1 * F.smooth_l1_loss(h, final[1:])
            optim.zero_grad()
            loss.backward()
            optim.step()
            sched.step()
            total += loss.item()
        click.echo(f"epoch {epoch}: loss {total / len(docs):.3f} ({time.time() - start:.0f} s)")


@torch.no_grad()
def agreement(drafter, docs, vocab_ids) -> tuple[float, float]:
    first_ok = first_n = second_ok = second_n = 0
    for ids, final, top, answer in docs:
        h, logits = drafter(final[:-1], ids[1:])
        ok = vocab_ids[logits.argmax(-1)] == top[1:]
        first_ok, first_n = first_ok + int(ok[answer:].sum()), first_n + len(ok) - answer
        drafted = final[:-1].clone()
        drafted[1:] = h[:-1]  # the second draft sees the drafter's own hidden states
        _, logits2 = drafter(drafted, ids[1:])
        ok2 = (vocab_ids[logits2.argmax(-1)] == top[1:])[1:] & ok[:-1]
        second_ok, second_n = second_ok + int(ok2[answer:].sum()), second_n + int(ok[:-1][answer:].sum())
    return first_ok / first_n, second_ok / max(second_n, 1)


@click.command()
@click.option("--engine", default="engines/smollm2-sedac", show_default=True)
@click.option("--train-tokens", default=65536, show_default=True)
@click.option("--epochs", default=12, show_default=True)
@click.option("--lr", default=3e-3, show_default=True)
@click.option("--test-prompts", default=24, show_default=True)
@click.option("--vocab", default=8192, show_default=True, help="kept vocabulary, as the exit heads")
def main(engine, train_tokens, epochs, lr, test_prompts, vocab):
    torch.manual_seed(0)
    llm = LLM(engine, device="cpu")
    model = llm.engine.runner.model
    docs = teacher_documents(model, et.training_texts(llm.tokenizer, "sharegpt", "train", 512), train_tokens)
    prompts = sharegpt_prompts(llm.tokenizer, "calib", test_prompts, 256)
    answers = llm.generate(prompts, SamplingParams(max_tokens=96, temperature=0.0))
    test = teacher_documents(model, ((p + a.token_ids, len(p)) for p, a in zip(prompts, answers)), 10**9)
    vocab_ids = et.choose_vocab(torch.cat([d[2] for d in docs]), vocab, model.cfg.eos_token_ids)
    position = torch.full((model.cfg.vocab_size,), -1)
    position[vocab_ids] = torch.arange(len(vocab_ids))
    drafter = FeatureDrafter(model, vocab_ids)
    train(drafter, docs, position, epochs, lr)
    first, second = agreement(drafter, test, vocab_ids)
    click.echo(
        f"feature drafter, {sum(len(d[0]) for d in docs)} train tokens, {epochs} epochs: first-draft "
        f"agreement {first:.3f}, second draft given the first {second:.3f}"
    )


if __name__ == "__main__":
    main()
