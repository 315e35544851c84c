"""Inflight batching: each step mixes running decodes with chunked prefills under a token budget.

Running sequences go first (each wants one token, or the next chunk of its prompt); waiting ones
join while the budget, max_num_seqs and free blocks allow. When blocks run out, the running
sequence with the lowest priority (latest arrival among equals) is preempted and recomputed later.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sedac.runtime.block_manager import BlockManager
from sedac.runtime.sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: int = 0

    def add(self, seq: Sequence, n: int) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(n)

    def order_decodes_first(self) -> None:
        """The runner lays out single-token work first so decode attention is one batched call."""
        pairs = sorted(zip(self.seqs, self.num_new_tokens), key=lambda p: p[1] != 1)
        self.seqs, self.num_new_tokens = [p[0] for p in pairs], [p[1] for p in pairs]


def _order(seq: Sequence):
    return seq.params.priority, seq.arrival, seq.seq_id


class Scheduler:
    def __init__(
        self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, lookahead=lambda seq: 0
    ):
        self.blocks = block_manager
        self.lookahead = lookahead  # seq -> extra KV slots its step may write (lossless drafts)
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        self.waiting.sort(key=_order)

    def add_running(self, seq: Sequence) -> None:
        """A fork joins its parent in the running set (its blocks are already shared)."""
        self.running.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch, budget = ScheduledBatch(), self.max_num_batched_tokens
        self.running.sort(key=_order)
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            slots = self._slots(seq, n)
            if not self._make_room(seq, slots, batch):
                continue
            batch.add(seq, n)
            budget -= min(budget, slots)
        if not batch.preempted:
            self._admit_waiting(batch, budget)
        return batch

    def _make_room(self, seq: Sequence, n: int, batch: ScheduledBatch) -> bool:
        while not self.blocks.ensure_slots(seq, n):
            victim = max((s for s in self.running if s not in batch.seqs), key=_order)
            self._preempt(victim)
            batch.preempted += 1
            if victim is seq:
                return False
        return True

    def _admit_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            self.blocks.match_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            slots = self._slots(seq, n)
            if not self.blocks.ensure_slots(seq, slots):
                self.blocks.release(seq)
                seq.reset_for_recompute()
                break
            self.waiting.pop(0)
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.add(seq, n)
            budget -= min(budget, slots)

    def _slots(self, seq: Sequence, n: int) -> int:
        """KV slots a step of n tokens may write: one token may be a lossless decode that drafts too
        (so may a prompt the prefix cache holds up to its last token, which joins as one token)."""
        return n + (self.lookahead(seq) if n == 1 else 0)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.reset_for_recompute()
        self.num_preemptions += 1
        self.add(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq)
