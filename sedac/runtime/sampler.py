"""Batched sampling: penalties, temperature, top-k, top-p, min-p, per-request seeded generators."""

from __future__ import annotations

import torch

from sedac.models import cpu_kernels
from sedac.plugins.ops import HAS_TRITON
from sedac.runtime.sequence import Sequence

SEED_RANGE = 2**62  # a draw's Philox seed (device sampling), taken from the request's generator


def sample(
    logits: torch.Tensor, seqs: list[Sequence], constrain=None
) -> tuple[list[int], list[dict[int, float] | None]]:
    """logits [R, V] (fp32), one row per sequence -> chosen token ids and optional logprobs (of the
    model's raw distribution). constrain(logits, seqs): masks rows in place (structured outputs)."""
    raw_logprobs = torch.log_softmax(logits, dim=-1) if any(s.params.logprobs is not None for s in seqs) else None
    logits = process(logits, seqs)
    if constrain is not None:
        logits = constrain(logits, seqs)
    tokens = greedy_tokens(logits)
    random_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if random_rows:
        probs = filtered_probs(logits[random_rows], [seqs[i].params for i in random_rows])
        if probs.is_cuda and HAS_TRITON:
            tokens = _draw_on_device(tokens, probs, random_rows, seqs)
        else:
            for row, i in enumerate(random_rows):
                tokens[i] = draw(probs[row], seqs[i].generator)
    token_list = tokens.tolist()  # the step's one device-to-host copy
    return token_list, token_logprobs(raw_logprobs, token_list, seqs)


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """[R, V] -> each row's argmax [R]: the C++ kernel on CPU (torch's took ~44 us a 49,152-token row)."""
    on_kernel = logits.device.type == "cpu" and logits.dtype == torch.float32 and cpu_kernels.available()
    if on_kernel and logits.dim() == 2 and logits.stride(-1) == 1:  # autograd may be on here: argmax has no gradient
        return torch.ops.sedac_cpu.argmax_rows(logits)
    return logits.argmax(dim=-1)


def argmax_only(seqs: list[Sequence]) -> bool:
    """Whether every sequence's choice is the plain argmax of its logits: greedy, no logprobs, no
    penalties, banned words, grammar or o1 branching (those read or change logits beyond the argmax)."""
    return all(
        s.params.greedy
        and s.params.logprobs is None
        and not s.bad_words_ids
        and s.params.structured_outputs is None
        and s.params.o1_mode != "adaptive"
        and not s.params.logit_bias
        and not s.params.min_tokens
        and s.params.repetition_penalty == 1.0
        and not s.params.presence_penalty
        and not s.params.frequency_penalty
        for s in seqs
    )


def process(logits: torch.Tensor, seqs) -> torch.Tensor:
    """Penalties, logit bias, held stops and bad words: the logits every decision (greedy or sampled) is taken from."""
    return _ban_bad_words(_hold_stops(_bias(_apply_penalties(logits, seqs), seqs), seqs), seqs)


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token from probs [V]. Exponential race: argmax(p / E), E ~ Exp(1), on the request's own RNG."""
    noise = torch.empty(probs.shape[0]).exponential_(generator=generator).to(probs.device)
    return int((probs / noise).argmax())


def _draw_on_device(tokens: torch.Tensor, probs: torch.Tensor, rows: list[int], seqs) -> torch.Tensor:
    """Every sampled row drawn in one kernel (sedac.plugins.triton_sampling), each with a seed from its
    request's own generator: reproducible per seed, whatever else is in the batch."""
    from sedac.plugins.triton_sampling import exponential_race

    seeds = [int(torch.randint(SEED_RANGE, (), generator=seqs[i].generator)) for i in rows]
    rows_and_seeds = torch.tensor([rows, seeds], dtype=torch.int64).to(probs.device, non_blocking=True)
    return tokens.index_copy(0, rows_and_seeds[0], exponential_race(probs, rows_and_seeds[1]))


def _apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    rows = [
        i
        for i, s in enumerate(seqs)
        if s.params.repetition_penalty != 1.0 or s.params.presence_penalty or s.params.frequency_penalty
    ]
    if not rows:
        return logits
    logits = logits.clone()
    for i in rows:
        p, seq = seqs[i].params, seqs[i]
        if p.repetition_penalty != 1.0:  # HF/vLLM: over prompt and output tokens
            seen = torch.tensor(sorted(set(seq.token_ids)), device=logits.device)
            vals = logits[i, seen]
            logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and seq.num_output_tokens:  # OpenAI: output only
            out = torch.tensor(seq.output_token_ids, device=logits.device)
            counts = torch.bincount(out, minlength=logits.shape[1]).to(logits.dtype)
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def _bias(logits: torch.Tensor, seqs) -> torch.Tensor:
    rows = [i for i, s in enumerate(seqs) if s.params.logit_bias]
    if not rows:
        return logits
    logits = logits.clone()
    for i in rows:
        bias = seqs[i].params.logit_bias
        logits[i, list(bias)] += torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)
    return logits


def _hold_stops(logits: torch.Tensor, seqs) -> torch.Tensor:
    """min_tokens: a sequence's stop tokens (EOS and stop_token_ids) are banned until it has that many outputs."""
    held = [i for i, s in enumerate(seqs) if s.num_output_tokens < s.params.min_tokens]
    if not held:
        return logits
    logits = logits.clone()
    for i in held:
        logits[i, seqs[i].stop_ids] = float("-inf")
    return logits


def _ban_bad_words(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    banned = [
        (i, ids[-1])
        for i, s in enumerate(seqs)
        for ids in s.bad_words_ids
        if len(ids) == 1 or s.token_ids[-(len(ids) - 1) :] == ids[:-1]
    ]
    if not banned:
        return logits
    logits = logits.clone()
    rows, cols = zip(*banned)
    logits[list(rows), list(cols)] = float("-inf")
    return logits


def filtered_probs(logits: torch.Tensor, params: list) -> torch.Tensor:
    dev = logits.device
    temps = torch.tensor([p.temperature for p in params], device=dev)[:, None]
    logits = logits / temps
    top_k = torch.tensor([p.top_k or logits.shape[1] for p in params], device=dev)
    top_p = torch.tensor([p.top_p for p in params], device=dev)
    min_p = torch.tensor([p.min_p for p in params], device=dev)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[1], device=dev)[None, :]
    sorted_probs = sorted_logits.softmax(dim=-1)
    drop = ranks >= top_k[:, None]
    # top-p keeps the smallest head whose mass reaches p (the token that crosses p stays).
    drop |= (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p[:, None]
    drop |= sorted_probs < min_p[:, None] * sorted_probs[:, :1]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits).softmax(dim=-1)


def token_logprobs(raw, tokens: list[int], seqs: list[Sequence]):
    if raw is None:
        return [None] * len(seqs)
    out = []
    for i, (tok, seq) in enumerate(zip(tokens, seqs)):
        k = seq.params.logprobs
        if k is None:
            out.append(None)
            continue
        entry = {tok: raw[i, tok].item()}
        if k:
            values, ids = raw[i].topk(k)
            entry.update(zip(ids.tolist(), values.tolist()))
        out.append(entry)
    return out
