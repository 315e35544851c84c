"""Paged KV blocks: allocation, prefix caching by hashing full blocks, ref counts, LRU, copy-on-write.

A block's hash chains its parent's hash with its tokens, so equal hashes mean equal prefixes.
Blocks are registered in the prefix cache only once their KV is computed (never before, so no one
can hit a block whose KV is still being written). Freed blocks keep their hash and stay hittable
until they are reused, least recently freed first.
"""

from __future__ import annotations

from collections import OrderedDict

from sedac.runtime.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # hash -> block id
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.pending_copies: list[tuple[int, int]] = []  # (src, dst) for the runner to apply
        self.prefix_queries = self.prefix_hits = 0  # in blocks, for the hit-rate metric

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

    def match_prefix(self, seq: Sequence) -> None:
        """Take the cached full blocks that start seq's tokens; at least one token stays to compute."""
        assert not seq.block_table
        bs, parent = self.block_size, None
        for i in range((seq.num_tokens - 1) // bs):
            h = hash((parent, tuple(seq.token_ids[i * bs : (i + 1) * bs])))
            self.prefix_queries += 1
            block = self.cached.get(h)
            if block is None:
                break
            self.prefix_hits += 1
            self._take(block)
            seq.block_table.append(block)
            seq.block_hashes.append(h)
            parent = h
        seq.num_hashed_blocks = len(seq.block_table)
        seq.num_computed_tokens = seq.num_cached_tokens = len(seq.block_table) * bs

    def ensure_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Make room for seq's next num_new_tokens KV slots (copy-on-write if the tail is shared)."""
        needed_blocks = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        extra = needed_blocks - len(seq.block_table)
        tail = seq.num_computed_tokens // self.block_size
        cow = tail < len(seq.block_table) and self.ref_counts[seq.block_table[tail]] > 1
        if extra + cow > len(self.free):
            return False
        if cow:
            src, dst = seq.block_table[tail], self._allocate()
            self.pending_copies.append((src, dst))
            self.ref_counts[src] -= 1
            seq.block_table[tail] = dst
        seq.block_table.extend(self._allocate() for _ in range(extra))
        return True

    def register_computed(self, seq: Sequence) -> None:
        """Publish seq's newly completed full blocks to the prefix cache (those with exact K/V only)."""
        bs = self.block_size
        exact = (
            seq.num_computed_tokens
            if seq.approximate_kv_from is None
            else min(seq.num_computed_tokens, seq.approximate_kv_from)
        )
        while seq.num_hashed_blocks < exact // bs:
            i = seq.num_hashed_blocks
            parent = seq.block_hashes[i - 1] if i else None
            h = hash((parent, tuple(seq.token_ids[i * bs : (i + 1) * bs])))
            block = seq.block_table[i]
            if h not in self.cached and self.block_hash[block] is None:
                self.cached[h], self.block_hash[block] = block, h
            seq.block_hashes.append(h)
            seq.num_hashed_blocks += 1

    def share(self, seq: Sequence) -> None:
        """seq is a fork that copied its parent's block table: the blocks gain one more owner."""
        for block in seq.block_table:
            self.ref_counts[block] += 1

    def release(self, seq: Sequence) -> None:
        # Tail blocks first, so they are evicted before the prefix blocks others are likelier to hit.
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
        seq.block_table = []

    def _take(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free[block]
        self.ref_counts[block] += 1

    def _allocate(self) -> int:
        block, _ = self.free.popitem(last=False)
        h = self.block_hash[block]
        if h is not None:
            del self.cached[h]
            self.block_hash[block] = None
        self.ref_counts[block] = 1
        return block
