"""Property tests of the block allocator and prefix cache (hypothesis drives random operation sequences)."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ember.engine.kv_cache import BlockManager
from ember.engine.sampling_params import SamplingParams
from ember.engine.sequence import Sequence
from ember.ops.attention import RowSpan
from ember.ops.paged_kivi import KiviBackend

PARAMS = SamplingParams()


def _seq(tokens: list[int]) -> Sequence:
    return Sequence("r", 0, tokens, PARAMS, 0.0)


def _check_invariants(bm: BlockManager, live: list[Sequence]) -> None:
    held: dict[int, int] = {}
    for s in live:
        assert len(set(s.block_table)) == len(s.block_table)
        for b in s.block_table:
            held[b] = held.get(b, 0) + 1
    for b in range(bm.num_blocks):
        assert bm.ref_count[b] == held.get(b, 0)
        assert (b in bm.free) == (bm.ref_count[b] == 0)
    for h, b in bm.cached.items():
        assert bm.block_key[b] is not None and hash(bm.block_key[b]) == h
    kivi = bm.events
    if isinstance(kivi, KiviBackend):  # exactly the incomplete tail blocks hold residual slots, each its own
        tails = {s.block_table[s.num_computed // bm.block_size] for s in live if s.num_computed % bm.block_size}
        assert set(kivi.residual_of) == tails
        slots = list(kivi.residual_of.values()) + kivi.free_slots
        assert sorted(slots) == list(range(kivi.num_residual))


def _run_prompt(bm: BlockManager, seq: Sequence, chunk: int) -> bool:
    """Prefix-match then 'compute' the prompt chunk by chunk; False if the cache ran out."""
    bm.match_prefix(seq)
    while seq.num_computed < len(seq):
        n = min(chunk, len(seq) - seq.num_computed)
        if not bm.can_allocate(seq, n):
            return False
        bm.allocate(seq, n)
        if isinstance(bm.events, KiviBackend):  # the KV layout assigns residual slots when it plans a step
            bm.events.finish(bm.events.plan([RowSpan(seq.block_table, seq.num_computed, n, 0)]))
        seq.num_computed += n
        bm.commit(seq)
    return True


prompts = st.lists(st.integers(0, 3), min_size=1, max_size=40)  # tiny alphabet: many shared prefixes


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["add", "free"]), prompts, st.integers(1, 9)), max_size=40),
       num_blocks=st.integers(1, 24), block_size=st.sampled_from([1, 2, 4]), caching=st.booleans(),
       num_residual=st.sampled_from([0, 1, 3]))
def test_allocator_invariants(ops, num_blocks: int, block_size: int, caching: bool, num_residual: int) -> None:
    kivi = KiviBackend(1, num_blocks, block_size, 1, 8, 4, num_residual) if num_residual else None
    bm = BlockManager(num_blocks, block_size, caching, kivi)
    live: list[Sequence] = []
    for op, tokens, chunk in ops:
        if op == "add":
            seq = _seq(tokens)
            if _run_prompt(bm, seq, chunk):
                live.append(seq)
                assert len(seq.block_table) == -(-len(seq) // block_size)
            else:
                bm.free_seq(seq)
        elif live:
            bm.free_seq(live.pop(chunk % len(live)))
        _check_invariants(bm, live)
    for seq in live:
        bm.free_seq(seq)
    _check_invariants(bm, [])
    assert bm.num_free_blocks == num_blocks
    assert kivi is None or not kivi.residual_of


@settings(max_examples=100, deadline=None)
@given(common=st.lists(st.integers(0, 50), min_size=0, max_size=30),
       tail_a=prompts, tail_b=prompts, block_size=st.sampled_from([1, 2, 4, 8]))
def test_prefix_hits_are_exactly_the_shared_full_blocks(common, tail_a, tail_b, block_size) -> None:
    bm = BlockManager(64, block_size, True)
    a, b = _seq(common + tail_a), _seq(common + tail_b)
    assert _run_prompt(bm, a, 5)
    bm.free_seq(a)  # cached-free blocks stay revivable
    assert _run_prompt(bm, b, 3)
    shared = 0
    while shared < min(len(a), len(b)) and a.token_ids[shared] == b.token_ids[shared]:
        shared += 1
    expected = min(shared // block_size, (len(b) - 1) // block_size) * block_size
    assert b.num_cached_tokens == expected


def test_lru_evicts_oldest_cached_blocks_first() -> None:
    bm = BlockManager(4, 2, True)
    old, new = _seq([1, 1, 1, 1]), _seq([2, 2, 2, 2])
    for s in (old, new):
        assert _run_prompt(bm, s, 4)
        bm.free_seq(s)
    taker = _seq([9, 9])  # needs one block: must evict from `old`, not `new`
    assert _run_prompt(bm, taker, 2)
    probe = _seq([2, 2, 2, 2, 7])
    bm.match_prefix(probe)
    assert probe.num_cached_tokens == 4
    probe_old = _seq([1, 1, 1, 1, 7])
    bm.match_prefix(probe_old)
    assert probe_old.num_cached_tokens < 4
