"""The int8-screened greedy head: its argmax is the full fp32 head's, on random heads and on near-ties
that the int8 copy alone gets wrong; the engine takes it only for plain greedy rows, and greedy output
is the same with and without it."""

import pytest
import torch

from sedac import LLM, SamplingParams
from sedac.models import cpu_kernels
from sedac.models.greedy_head import MAX_SCREEN_ROWS, GreedyScreen
from sedac.models.layers import Linear


def _screen(rows: torch.Tensor, layout: str) -> GreedyScreen:
    """The screen on a head as the engine keeps it on CPU (packed into panels; with VNNI, its int8 copy on
    int8 activations) or plain."""
    head = Linear(rows.shape[1], rows.shape[0])
    head.weight.data = rows.t().contiguous()
    if layout != "plain":
        head.pack_for_cpu()
    head.quantize_int8(int8_activations=layout == "int8 activations")
    screen = GreedyScreen(head)
    assert (screen.activation_bound is not None) == (layout == "int8 activations")
    return screen, head


LAYOUTS = ["plain", "packed"] + (["int8 activations"] if cpu_kernels.integer_dot_products() else [])


@pytest.fixture(autouse=True)
def _inference():
    assert cpu_kernels.available()
    with torch.inference_mode():
        yield


@pytest.mark.parametrize("layout", LAYOUTS)
def test_screen_argmax_is_the_full_heads_on_random_heads(layout):
    torch.manual_seed(0)
    rows = torch.randn(4096, 64) * 0.05
    screen, head = _screen(rows, layout)
    x = torch.randn(MAX_SCREEN_ROWS, 64) * 20
    out = screen.logits(x)
    exact = x @ rows.t()
    assert torch.equal(out.argmax(-1), exact.argmax(-1))
    kept = out > float("-inf")
    assert torch.allclose(out[kept], exact[kept], atol=1e-4, rtol=1e-5)  # candidates carry exact logits
    assert kept.sum(-1).max() < 4096 // 10  # and few tokens are candidates


@pytest.mark.parametrize("layout", LAYOUTS)
def test_screen_resolves_near_ties_the_int8_copy_gets_wrong(layout):
    """Pairs of rows a hair apart: int8 rounding alone often picks the wrong one of the pair."""
    torch.manual_seed(1)
    base = torch.randn(512, 32) * 0.1
    rows = torch.cat([base, base + torch.randn(512, 32) * 1e-4])
    screen, head = _screen(rows, layout)
    x = torch.randn(2000, 32) * 10
    exact = (x @ rows.t()).argmax(-1)
    assert not torch.equal(head.draft(x).argmax(-1), exact)  # the test has teeth
    screened = torch.cat([screen.logits(chunk).argmax(-1) for chunk in x.split(MAX_SCREEN_ROWS)])
    assert torch.equal(screened, exact)


def test_engine_screens_only_plain_greedy_rows_and_output_is_unchanged(tiny_llama, monkeypatch):
    llm = LLM(str(tiny_llama), device="cpu")
    model = llm.engine.runner.model
    assert model.greedy_screen is not None
    calls = []
    screen_logits = model.greedy_screen.logits
    monkeypatch.setattr(model.greedy_screen, "logits", lambda *a: calls.append(1) or screen_logits(*a))
    prompts = ["The quick brown fox", "Hello"]
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    screened = [o.token_ids for o in llm.generate(prompts, greedy)]
    assert calls
    calls.clear()
    llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0, logprobs=2))
    llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0, repetition_penalty=1.3))
    assert not calls  # those need the whole distribution
    model.greedy_screen = None
    assert [o.token_ids for o in llm.generate(prompts, greedy)] == screened


@pytest.mark.parametrize("activations", [False, True])
def test_screen_candidates_are_the_torch_reference(activations):
    """The C++ op picks exactly the tokens whose bound reaches the best lower bound, row by row."""
    torch.manual_seed(2)
    approx, x = torch.randn(3, 1000), torch.randn(3, 64)
    row_bound, activation_bound = torch.rand(1000) * 0.05, torch.rand(1000) * 0.5 if activations else None
    bound = x.norm(dim=1, keepdim=True) * row_bound
    if activations:
        bound = bound + x.abs().amax(dim=1, keepdim=True) * activation_bound
    best_lower = (approx - bound).amax(dim=1, keepdim=True)
    expected = torch.nonzero(approx + bound >= best_lower, as_tuple=True)
    rows, cols = torch.ops.sedac_cpu.screen_candidates(approx, x, row_bound, activation_bound)
    assert torch.equal(rows, expected[0]) and torch.equal(cols, expected[1])
    assert len(set(rows.tolist())) == 3 and 3 < len(cols) < 3000  # every row keeps some, not all
