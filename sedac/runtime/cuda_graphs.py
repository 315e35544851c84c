"""CUDA graphs of decode steps: one graph per padded batch size, replayed with one input copy.

A decode step of an 8B model is ~30 layers x ~15 kernels; launched from Python that is milliseconds of
CPU time per token, more than the GPU needs to stream the weights. As in vLLM and nano-vllm, each
padded batch size's step (embedding, layers, final norm, LM head) is captured once at load and replayed;
prefill and mixed steps run eagerly. Every integer a step needs lives in one device buffer that one
asynchronous copy from pinned memory refills.
"""

from __future__ import annotations

import torch

from sedac.models import AttentionContext
from sedac.models.attention import VarlenBatch
from sedac.runtime.scheduler import ScheduledBatch

INPUTS = 4  # integers per row besides its block table: token id, position, slot, context length


def batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 16 up to the first that holds max_num_seqs (vLLM's capture sizes)."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs]
    return sizes + list(range(16, max_num_seqs + 16, 16)) if max_num_seqs > 8 else sizes + [max_num_seqs]


class StagedInputs:
    """The integers of up to `rows` decode rows in one pinned host buffer, laid out as the graphs read
    them: ids | positions | slots | context lengths (`rows` each) | block tables (`rows` x `width`)."""

    def __init__(self, rows: int, width: int, block_size: int, scratch_block: int, pinned: bool):
        self.rows, self.width, self.block_size, self.scratch = rows, width, block_size, scratch_block
        self.host = torch.zeros(rows * (INPUTS + width), dtype=torch.int64, pin_memory=pinned)
        self.staged = self.host.numpy()  # written in place, row by row
        self.pad(0)

    def stage(self, batch: ScheduledBatch) -> int:
        """Write each sequence's row (its newest token at its position), pad the rest; -> elements to copy."""
        n, bs, staged = self.rows, self.block_size, self.staged
        for row, seq in enumerate(batch.seqs):
            pos = seq.num_computed_tokens
            table = seq.block_table[: pos // bs + 1]
            staged[row], staged[n + row] = seq.token_ids[pos], pos
            staged[2 * n + row], staged[3 * n + row] = table[-1] * bs + pos % bs, pos + 1
            start = INPUTS * n + row * self.width
            staged[start : start + len(table)] = table
        self.pad(len(batch.seqs))
        return INPUTS * n + len(batch.seqs) * self.width  # tables of rows past the batch are never read

    def pad(self, first: int) -> None:
        """Rows from `first` on: token 0 at position 0, its K/V written to and read from the scratch block."""
        n, staged = self.rows, self.staged
        staged[first:n] = staged[n + first : 2 * n] = 0
        staged[2 * n + first : 3 * n] = self.scratch * self.block_size
        staged[3 * n + first : 4 * n] = 1
        staged[INPUTS * n + first * self.width : INPUTS * n + n * self.width : self.width] = self.scratch


class DecodeGraphs:
    def __init__(self, runner, max_num_seqs: int):
        """runner: the ModelRunner whose model, pool and scratch block (its last) the graphs use."""
        self.runner, self.block_size = runner, runner.block_size
        self.sizes = batch_sizes(max_num_seqs)
        n = self.rows = self.sizes[-1]
        width = -(-runner.config.build.max_seq_len // self.block_size)
        pinned = runner.device.type == "cuda"
        self.inputs_host = StagedInputs(n, width, self.block_size, runner.num_blocks, pinned)
        self.inputs = self.inputs_host.host.to(runner.device)
        ids, positions, slots, lens, tables = self.inputs.split([n] * INPUTS + [n * width])
        self.ids, self.positions, self.slots, self.lens = ids, positions, slots, lens
        self.tables = tables.view(n, width)
        self.query_starts = torch.arange(n + 1, device=runner.device)
        # One logits buffer every graph writes its rows of (a buffer per size would hold sizes x vocab floats).
        self.logits = torch.empty(n, runner.config.model.vocab_size, dtype=torch.float32, device=runner.device)
        self.copied = torch.cuda.Event()  # the last input copy: the host buffer is rewritten only after it
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.replays = 0  # decode steps served by a graph
        self._capture_all()

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = None
        for size in reversed(self.sizes):  # the largest first: the smaller graphs reuse its memory pool
            self._step(size)  # warm-up: Triton compiles, the allocator grows outside the capture
            torch.cuda.synchronize(self.runner.device)
            self.graphs[size] = self._capture(size, pool)
            pool = self.graphs[size].pool()
        torch.cuda.synchronize(self.runner.device)

    def _capture(self, size: int, pool) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            self._step(size)
        return graph

    def _step(self, size: int) -> None:
        """The captured work: [size] token ids -> logits[:size] (fp32)."""
        varlen = VarlenBatch(self.query_starts[: size + 1], self.lens[:size], self.tables[:size], max_query_len=1)
        ctx = AttentionContext(self.slots[:size], self.block_size, num_decodes=size, varlen=varlen)
        hidden = self.runner.run(self.ids[:size], None, self.positions[:size], ctx)
        self.logits[:size].copy_(self.runner.model.logits(hidden))

    def fits(self, batch: ScheduledBatch) -> bool:
        """One new token per sequence (decodes, or one-token prompt chunks), at most the largest size."""
        return len(batch.seqs) <= self.rows and all(n == 1 for n in batch.num_new_tokens)

    def replay(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits [len(batch.seqs), vocab], a row per sequence: a view valid until the next replay."""
        count = len(batch.seqs)
        size = next(s for s in self.sizes if s >= count)
        self.copied.synchronize()  # a step that sampled nothing has not waited for the last copy yet
        used = self.inputs_host.stage(batch)
        self.inputs[:used].copy_(self.inputs_host.host[:used], non_blocking=True)
        self.copied.record()
        self.graphs[size].replay()
        self.replays += 1
        return self.logits[:count]
