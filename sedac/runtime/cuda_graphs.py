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


class DecodeGraphs:
    def __init__(self, runner, max_num_seqs: int):
        """runner: the ModelRunner whose model, pool and scratch block (its last) the graphs use."""
        self.runner, self.block_size = runner, runner.block_size
        self.sizes = batch_sizes(max_num_seqs)
        n = self.rows = self.sizes[-1]
        self.width = -(-runner.config.build.max_seq_len // self.block_size)
        self.scratch = runner.num_blocks  # the pool's extra block: padding rows write their K/V there
        self.host = torch.zeros(n * (INPUTS + self.width), dtype=torch.int64, pin_memory=True)
        self.staged = self.host.numpy()  # filled in place, row by row
        self.inputs = torch.zeros_like(self.host, device=runner.device)
        self._pad(0)
        self.inputs.copy_(self.host)
        ids, positions, slots, lens, tables = self.inputs.split([n] * INPUTS + [n * self.width])
        self.ids, self.positions, self.slots, self.lens = ids, positions, slots, lens
        self.tables = tables.view(n, self.width)
        self.query_starts = torch.arange(n + 1, device=runner.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.replays = 0  # decode steps served by a graph
        self._capture_all()

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = None
        for size in reversed(self.sizes):  # the largest first: the smaller graphs reuse its memory pool
            self._step(size)  # warm-up: Triton compiles, the allocator grows outside the capture
            torch.cuda.synchronize(self.runner.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[size] = self._step(size)
            self.graphs[size], pool = graph, graph.pool()
        torch.cuda.synchronize(self.runner.device)

    def _step(self, size: int) -> torch.Tensor:
        """The captured work: [size] token ids -> fp32 logits [size, vocab]."""
        varlen = VarlenBatch(self.query_starts[: size + 1], self.lens[:size], self.tables[:size], max_query_len=1)
        ctx = AttentionContext(self.slots[:size], self.block_size, num_decodes=size, varlen=varlen)
        hidden = self.runner.run(self.ids[:size], None, self.positions[:size], ctx)
        return self.runner.model.logits(hidden).float()

    def fits(self, batch: ScheduledBatch) -> bool:
        """A pure decode step of at most the largest captured size."""
        return len(batch.seqs) <= self.rows and all(n == 1 for n in batch.num_new_tokens)

    def replay(self, batch: ScheduledBatch) -> torch.Tensor:
        """The step's logits [len(batch.seqs), vocab]: a view of the graph's output, valid until the next replay."""
        count = len(batch.seqs)
        size = next(s for s in self.sizes if s >= count)
        n, bs, staged = self.rows, self.block_size, self.staged
        for row, seq in enumerate(batch.seqs):
            pos = seq.num_computed_tokens
            table = seq.block_table[: pos // bs + 1]
            staged[row], staged[n + row] = seq.token_ids[pos], pos
            staged[2 * n + row], staged[3 * n + row] = table[-1] * bs + pos % bs, pos + 1
            start = INPUTS * n + row * self.width
            staged[start : start + len(table)] = table
        self._pad(count)
        self.inputs.copy_(self.host, non_blocking=True)
        self.graphs[size].replay()
        self.replays += 1
        return self.logits[size][:count]

    def _pad(self, first: int) -> None:
        """Rows from `first` on: token 0 at position 0, its K/V written to and read from the scratch block."""
        n, staged = self.rows, self.staged
        staged[first:n] = staged[n + first : 2 * n] = 0
        staged[2 * n + first : 3 * n] = self.scratch * self.block_size
        staged[3 * n + first : 4 * n] = 1
        staged[INPUTS * n + first * self.width : INPUTS * n + n * self.width : self.width] = self.scratch
