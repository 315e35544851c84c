"""The device sampler (sedac.plugins.triton_sampling): on CPU under TRITON_INTERPRET=1, on the GPU when there is one.
Its contract: a row's token depends on its probabilities and seed alone, and follows the probabilities."""

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


def _chi_square(tokens: torch.Tensor, p: torch.Tensor) -> float:
    """Pearson's statistic of token counts against the probabilities p (all > 0)."""
    counts = torch.bincount(tokens.cpu(), minlength=len(p))[: len(p)].float()
    expected = p * len(tokens)
    return float(((counts - expected) ** 2 / expected).sum())


P = torch.tensor([0.5, 0.3, 0.15, 0.05])
CRITICAL = 16.27  # chi-square, 3 degrees of freedom, p = 0.001


def test_draws_follow_the_distribution_and_never_pick_a_zero():
    n = 600
    probs = torch.cat((P, torch.zeros(2))).repeat(n, 1).to(DEVICE)
    tokens = exponential_race(probs, torch.arange(n, device=DEVICE))
    assert int((tokens >= 4).sum()) == 0
    assert _chi_square(tokens, P) < CRITICAL


def test_the_chi_square_check_rejects_draws_from_another_distribution():
    """The check above can fail: the kernel's draws from a uniform distribution are rejected against P."""
    n = 600
    uniform = torch.full((n, 4), 0.25, device=DEVICE)
    assert _chi_square(exponential_race(uniform, torch.arange(n, device=DEVICE)), P) > CRITICAL


@pytest.mark.parametrize("vocab", [1, 1024, 1025])
def test_block_edges(vocab):
    probs = torch.zeros(3, vocab, device=DEVICE)
    probs[:, vocab - 1] = 1.0  # the last column, in the last (possibly partial) block
    assert exponential_race(probs, torch.tensor([1, 2, 3], device=DEVICE)).tolist() == [vocab - 1] * 3
    assert exponential_race(probs[:0], torch.tensor([], dtype=torch.int64, device=DEVICE)).shape == (0,)
