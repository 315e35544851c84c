"""CUDA-graph bookkeeping that runs without a GPU: capture sizes, the staged inputs of a decode step (its rows
and the padding rows that write only the scratch block), the runner returning only the rows that sample when
a graph serves the step, and the device options' checks."""

import pytest
import torch

from sedac import LLM
from sedac.config import DeviceOptions
from sedac.runtime.cuda_graphs import INPUTS, StagedInputs, batch_sizes
from sedac.runtime.model_runner import kv_budget
from sedac.runtime.sampling_params import SamplingParams
from sedac.runtime.scheduler import ScheduledBatch
from sedac.runtime.sequence import Sequence


def test_capture_sizes_hold_max_num_seqs():
    assert batch_sizes(1) == [1] and batch_sizes(5) == [1, 2, 4, 5] and batch_sizes(8) == [1, 2, 4, 8]
    assert batch_sizes(20) == [1, 2, 4, 8, 16, 32] and batch_sizes(64)[-1] == 64


def _seq(tokens: list[int], table: list[int], computed: int) -> Sequence:
    seq = Sequence("r", tokens, SamplingParams())
    seq.block_table, seq.num_computed_tokens = table, computed
    return seq


def test_staged_rows_and_padding():
    """Row i: the newest token at its position, its slot, context length and block table; rows past the batch
    read token 0 at position 0 and write the scratch block's first slot."""
    rows, width, bs, scratch = 4, 3, 4, 9
    staged = StagedInputs(rows, width, bs, scratch, pinned=False)
    a = _seq(list(range(10, 16)), [7, 2], computed=5)  # position 5: block 2, offset 1
    b = _seq([3, 4], [5], computed=1)
    used = staged.stage(ScheduledBatch([a, b], [1, 1]))
    ids, positions, slots, lens, tables = torch.from_numpy(staged.staged).split([rows] * INPUTS + [rows * width])
    tables = tables.view(rows, width)
    assert ids.tolist() == [15, 4, 0, 0] and positions.tolist() == [5, 1, 0, 0]
    assert slots.tolist() == [2 * bs + 1, 5 * bs + 1, scratch * bs, scratch * bs] and lens.tolist() == [6, 2, 1, 1]
    assert tables[0, :2].tolist() == [7, 2] and tables[1, 0] == 5 and tables[2:, 0].tolist() == [scratch] * 2
    assert used == INPUTS * rows + 2 * width  # the copy stops after the batch's own tables
    staged.stage(ScheduledBatch([b], [1]))  # a smaller batch next: the old second row is padding again
    assert staged.staged[1] == 0 and staged.staged[2 * rows + 1] == scratch * bs


class _Graphs:
    """Stands in for DecodeGraphs: a row of logits per sequence, row i filled with i."""

    def fits(self, batch):
        return True

    def replay(self, batch):
        return torch.arange(len(batch.seqs), dtype=torch.float32)[:, None].expand(-1, 5)


def test_a_graph_step_returns_only_the_rows_that_sample(tiny_llama):
    """A one-token prompt chunk rides in a decode graph but does not sample: its row must not be handed on."""
    runner = LLM(str(tiny_llama), device="cpu").engine.runner
    runner.graphs = _Graphs()
    batch = ScheduledBatch([_seq([1, 2], [0], 1) for _ in range(4)], [1, 1, 1, 1])
    assert runner.forward(batch, [0, 2, 3])[:, 0].tolist() == [0.0, 2.0, 3.0]
    assert runner.forward(batch, [0, 1, 2, 3])[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(max_num_seqs=0), "max_num_seqs must be a positive integer"),
        (dict(max_num_batched_tokens=-1), "max_num_batched_tokens must be a positive integer"),
        (dict(gpu_memory_utilization=0.5, kv_cache_free_gpu_memory_fraction=0.5), "not both"),
        (dict(gpu_memory_utilization=1.5), r"gpu_memory_utilization must be in \(0, 1\]"),
    ],
)
def test_device_options_are_checked(options, message):
    with pytest.raises(ValueError, match=message):
        DeviceOptions(**{"max_num_seqs": 8, "max_num_batched_tokens": 64, **options})


def test_engine_options_are_checked(tiny_llama):
    with pytest.raises(ValueError, match="max_num_seqs must be a positive integer"):
        LLM(str(tiny_llama), device="cpu", max_num_seqs=-1)
    with pytest.raises(ValueError, match=r"max_model_len must be in \[1, 256\]"):
        LLM(str(tiny_llama), device="cpu", max_model_len=257)
    assert LLM(str(tiny_llama), device="cpu", max_model_len=100).engine.config.build.max_seq_len == 100


def test_kv_budget_rules():
    gib = 2**30
    vllm = DeviceOptions(max_num_seqs=8, max_num_batched_tokens=64, gpu_memory_utilization=0.5)
    budget, rule = kv_budget(vllm, free=60 * gib, total=100 * gib, peak=2 * gib)
    assert budget == 50 * gib - 40 * gib - 2 * gib and rule == "gpu_memory_utilization 0.5 of 100.0 GiB"
    default = DeviceOptions(max_num_seqs=8, max_num_batched_tokens=64)
    assert kv_budget(default, free=60 * gib, total=100 * gib, peak=0)[0] == 90 * gib - 40 * gib
    trt = DeviceOptions(max_num_seqs=8, max_num_batched_tokens=64, kv_cache_free_gpu_memory_fraction=0.5)
    assert kv_budget(trt, free=60 * gib, total=100 * gib, peak=2 * gib)[0] == 29 * gib


class _EagerGraph:
    """A CUDA graph stand-in that replays by running the step again (the bookkeeping around it is real)."""

    def __init__(self, step):
        self.step = step

    def replay(self):
        self.step()

    def pool(self):
        return None


class _Event:
    def record(self):
        pass

    def synchronize(self):
        pass


def test_graph_decode_bookkeeping_end_to_end_on_cpu(tiny_llama, monkeypatch):
    """DecodeGraphs as on CUDA (staging, padding rows on the scratch block, the shared logits buffer, the
    runner's graph branch), with the graph itself replaced by an eager rerun: the CPU path's greedy tokens
    while sequences finish at different steps (padding rows write beside live blocks), then again on the
    prefix cache."""
    from sedac import SamplingParams
    from sedac.runtime import cuda_graphs

    prompts = [[5, 6, 7], list(range(40, 60)), [9] * 5, list(range(100, 133))]
    greedy = [SamplingParams(max_tokens=n, temperature=0.0) for n in (8, 5, 3, 8)]  # batches of 4, 3 (padded), 2
    expected = [o.token_ids for o in LLM(str(tiny_llama), device="cpu").generate(prompts, greedy)]
    monkeypatch.setattr(cuda_graphs.DecodeGraphs, "_capture", lambda self, size, pool: _EagerGraph(
        lambda: self._step(size)))  # fmt: skip
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "Event", _Event)
    llm = LLM(str(tiny_llama), device="cpu")
    runner = llm.engine.runner
    runner.varlen = True
    runner._set_kv_pool(runner.num_blocks + 1)  # the scratch block a CUDA pool has
    runner.graphs = cuda_graphs.DecodeGraphs(runner, 4)
    assert sorted(runner.graphs.graphs) == [1, 2, 4]
    outs = llm.generate(prompts, greedy)
    assert [o.token_ids for o in outs] == expected and runner.graphs.replays > 0
    replays = runner.graphs.replays
    outs = llm.generate(prompts[:3], greedy[:3])
    assert [o.token_ids for o in outs] == expected[:3] and runner.graphs.replays > replays
