"""Block manager unit tests: allocation, prefix hashing, ref counts, LRU reuse, copy-on-write."""

from sedac.runtime.block_manager import BlockManager
from sedac.runtime.sampling_params import SamplingParams
from sedac.runtime.sequence import Sequence


def seq_of(tokens):
    return Sequence("r", list(tokens), SamplingParams())


def computed(bm, seq, n):
    assert bm.ensure_slots(seq, n)
    seq.num_computed_tokens += n
    bm.register_computed(seq)


def test_allocate_and_release_all():
    bm = BlockManager(8, 4)
    s = seq_of(range(10))
    computed(bm, s, 10)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 5
    bm.release(s)
    assert bm.num_free_blocks == 8 and bm.ref_counts == [0] * 8


def test_prefix_hit_shares_full_blocks_only_after_compute():
    bm = BlockManager(8, 4)
    a = seq_of(range(10))
    assert bm.ensure_slots(a, 10)  # allocated, not yet computed: nothing to hit
    b = seq_of(range(10))
    bm.match_prefix(b)
    assert b.num_computed_tokens == 0 and not b.block_table
    a.num_computed_tokens = 10
    bm.register_computed(a)
    bm.match_prefix(b)
    assert b.block_table == a.block_table[:2] and b.num_computed_tokens == 8
    assert bm.ref_counts[a.block_table[0]] == 2


def test_full_prompt_hit_keeps_last_token_to_compute():
    bm = BlockManager(8, 4)
    a = seq_of(range(8))
    computed(bm, a, 8)
    b = seq_of(range(8))
    bm.match_prefix(b)
    assert b.num_computed_tokens == 4  # the block holding the last token is recomputed


def test_freed_blocks_stay_hittable_until_reused_lru():
    bm = BlockManager(4, 2)
    a = seq_of([1, 2, 3, 4, 5])
    computed(bm, a, 5)
    bm.release(a)
    b = seq_of([1, 2, 3, 4, 9])
    bm.match_prefix(b)
    assert b.num_computed_tokens == 4  # hit after release
    bm.release(b)
    c = seq_of(range(100, 108))  # needs all 4 blocks: evicts the cached ones
    computed(bm, c, 8)
    d = seq_of([1, 2, 3, 4, 9])
    bm.release(c)
    bm.match_prefix(d)
    assert d.num_computed_tokens == 0


def test_copy_on_write_for_forks():
    bm = BlockManager(8, 4)
    parent = seq_of(range(6))
    computed(bm, parent, 6)
    child = parent.fork(1)
    bm.share(child)
    shared_tail = parent.block_table[1]
    assert bm.ref_counts[shared_tail] == 2
    parent.token_ids.append(99)
    assert bm.ensure_slots(parent, 1)
    assert bm.pending_copies == [(shared_tail, parent.block_table[1])]
    assert parent.block_table[0] == child.block_table[0] and parent.block_table[1] != shared_tail
    assert bm.ref_counts[shared_tail] == 1
    child.token_ids.append(98)
    assert bm.ensure_slots(child, 1) and child.block_table[1] == shared_tail  # sole owner: writes in place
    bm.release(parent)
    bm.release(child)
    assert bm.num_free_blocks == 8


def test_ensure_slots_refuses_beyond_pool():
    bm = BlockManager(2, 4)
    s = seq_of(range(12))
    assert not bm.ensure_slots(s, 12)
    assert bm.num_free_blocks == 2 and not s.block_table
