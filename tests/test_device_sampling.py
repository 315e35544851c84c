"""The device sampler (sedac.plugins.triton_sampling): on CPU under TRITON_INTERPRET=1, on the GPU when there is one.
Its contract: a row's token depends on its probabilities and seed alone, and follows the probabilities."""

import math

import pytest
import torch

from sedac.plugins.triton_sampling import exponential_race

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _probs(rows: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=g) * 2).softmax(-1).to(DEVICE)


def test_same_seed_same_token_whatever_the_batch():
    probs, seeds = _probs(6, 1500), torch.tensor([11, 12, 13, 14, 15, 16], device=DEVICE)
    batch = exponential_race(probs, seeds)
    alone = [int(exponential_race(probs[i : i + 1], seeds[i : i + 1])) for i in range(6)]
    order = torch.tensor([5, 3, 0, 1, 4, 2], device=DEVICE)
    shuffled = exponential_race(probs[order], seeds[order])
    assert batch.tolist() == alone == shuffled[torch.argsort(order)].tolist()
    other_seeds = exponential_race(probs, seeds + 1000)
    assert other_seeds.tolist() != batch.tolist()  # the seed is what decides, not the row


def test_draws_follow_the_distribution_and_never_pick_a_zero():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0, 0.0])
    n = 600
    tokens = exponential_race(p.repeat(n, 1).to(DEVICE), torch.arange(n, device=DEVICE)).cpu()
    counts = torch.bincount(tokens, minlength=6)
    assert counts[4:].sum() == 0
    expected = p[:4] * n
    stat = float(((counts[:4] - expected) ** 2 / expected).sum())
    assert stat < 16.27, (counts.tolist(), stat)  # chi-square, 3 degrees of freedom, p = 0.001


def test_a_skewed_distribution_is_not_sampled_uniformly():
    """The test above must be able to fail: a uniform draw over the support is rejected by the same statistic."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    uniform = torch.full((4,), 150.0)
    assert float(((uniform - p * 600) ** 2 / (p * 600)).sum()) > 16.27


@pytest.mark.parametrize("vocab", [1, 1024, 1025])
def test_block_edges(vocab):
    probs = torch.zeros(3, vocab, device=DEVICE)
    probs[:, vocab - 1] = 1.0  # the last column, in the last (possibly partial) block
    assert exponential_race(probs, torch.tensor([1, 2, 3], device=DEVICE)).tolist() == [vocab - 1] * 3
    assert math.isfinite(float(exponential_race(probs[:0], torch.tensor([], dtype=torch.int64)).sum()))
