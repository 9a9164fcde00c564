"""Block allocator and prefix cache: full blocks are content-hashed and reused, free blocks evicted LRU,
a sequence's tail rolled back after rejected speculative tokens."""
from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

from ember.engine.sequence import Sequence

BlockKey = tuple[int | None, tuple[int, ...]]  # (parent block hash, token ids of the block)
EVICTED = -1  # a block_table entry whose block a long-context mode freed (no query sees it again)


class BlockEvents(Protocol):
    """What the KV storage (the attention backend) is told about blocks."""

    def block_filled(self, block: int) -> None: ...

    def block_freed(self, block: int) -> None: ...


class _NoEvents:
    def block_filled(self, block: int) -> None:
        pass

    def block_freed(self, block: int) -> None:
        pass


class BlockManager:
    """Owns block ids, their reference counts and the hash -> block map; never touches KV tensors."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 events: BlockEvents | None = None) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.block_key: list[BlockKey | None] = [None] * num_blocks
        # Blocks nobody holds, oldest-to-evict first; hashed ones can still be revived by a prefix hit.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found
        self.events: BlockEvents = events or _NoEvents()
        self.peak_used = 0  # most blocks held at once
        # Long-context modes (set_window): sequences keep their first sink_blocks blocks plus private copies of
        # them, and free the blocks behind every future query's window of `window` keys.
        self.window: int | None = None
        self.sink_blocks = 0

    def set_window(self, window: int, sink_blocks: int) -> None:
        self.window, self.sink_blocks = window, sink_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        total = -(-(seq.num_computed + num_tokens) // self.block_size)
        return max(0, total - len(seq.block_table)) + self.extra_blocks(seq)

    def extra_blocks(self, seq: Sequence) -> int:
        """Blocks seq needs besides its table's: the private sink copies of a long-context mode, until it has them."""
        return 0 if seq.sink_blocks else self.sink_blocks

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= len(self.free)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Give `seq` enough blocks to hold `num_tokens` more tokens (caller checked can_allocate)."""
        for _ in range(self.extra_blocks(seq)):
            seq.sink_blocks.append(self._take_new())
        for _ in range(self.blocks_needed(seq, num_tokens)):
            seq.block_table.append(self._take_new())
        self.peak_used = max(self.peak_used, self.num_used_blocks)

    def _take_new(self) -> int:
        block = self._take_free()
        self.ref_count[block] = 1
        return block

    def match_prefix(self, seq: Sequence) -> None:
        """Before a sequence's first step: reuse cached blocks for its longest known full-block prefix."""
        if not self.enable_prefix_caching or seq.block_table or seq.first_computed == 0:
            return
        tokens = seq.token_ids
        bs = self.block_size
        parent = seq.cache_salt
        # The rows the sequence needs (at least the last token's, for logits) must be computed.
        found: list[int] = []
        for i in range(seq.first_computed // bs):
            key = (parent, tuple(tokens[i * bs:(i + 1) * bs]))
            h = hash(key)
            block = self.cached.get(h)
            if block is None or self.block_key[block] != key:
                break
            found.append(block)
            seq.block_hashes.append(h)
            parent = h
        seq.num_computed = seq.num_cached_tokens = len(found) * bs
        # Under a long-context mode, blocks no query of the sequence will see again are left where they are.
        behind = range(0) if self.window is None else range(
            self.sink_blocks, max(self.sink_blocks, (seq.num_computed - self.window + 1) // bs))
        for i, block in enumerate(found):
            if i in behind:
                seq.block_table.append(EVICTED)
                seq.evicted_blocks += 1
                continue
            if self.ref_count[block] == 0:
                del self.free[block]
            self.ref_count[block] += 1
            seq.block_table.append(block)
        self.prefix_queries += len(tokens)
        self.prefix_hits += seq.num_computed

    def commit(self, seq: Sequence) -> None:
        """After a step (and after any rollback): hash the blocks that became full of accepted tokens so later
        sequences can share them."""
        bs = self.block_size
        for i in range(len(seq.block_hashes), seq.num_computed // bs):
            parent = seq.block_hashes[-1] if seq.block_hashes else seq.cache_salt
            key = (parent, tuple(seq.tokens(i * bs, (i + 1) * bs)))
            h = hash(key)
            seq.block_hashes.append(h)
            block = seq.block_table[i]
            self.events.block_filled(block)
            if self.enable_prefix_caching and h not in self.cached:
                self.cached[h] = block
                self.block_key[block] = key
        if self.window is not None:
            self._evict(seq)

    def _evict(self, seq: Sequence) -> None:
        """Free the blocks past the sinks that lie wholly before the window of seq's next query (at position
        num_computed, seeing keys from num_computed - window + 1 on); hashed ones stay revivable."""
        assert self.window is not None
        first_seen = seq.num_computed - self.window + 1
        for i in range(self.sink_blocks + seq.evicted_blocks, first_seen // self.block_size):
            self._release(seq.block_table[i])
            seq.block_table[i] = EVICTED
            seq.evicted_blocks += 1

    def free_seq(self, seq: Sequence) -> None:
        """Release a sequence's blocks; hashed ones stay revivable until evicted (tail blocks first)."""
        for block in reversed(seq.block_table + seq.sink_blocks):
            if block != EVICTED:
                self._release(block)
        seq.block_table = []
        seq.block_hashes = []
        seq.sink_blocks = []
        seq.sinks_copied = False
        seq.num_computed = seq.evicted_blocks = 0

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Keep only the KV of `seq`'s first num_tokens positions (rejected speculative tokens roll back): the
        blocks past them are freed. Never reaches a hashed block: those hold accepted tokens only."""
        if not len(seq.block_hashes) * self.block_size <= num_tokens <= seq.num_computed:
            raise ValueError(f"cannot roll back to {num_tokens} tokens: {seq.num_computed} computed, "
                             f"{len(seq.block_hashes) * self.block_size} in hashed blocks")
        keep = -(-num_tokens // self.block_size)
        for block in reversed(seq.block_table[keep:]):
            self._release(block)
        del seq.block_table[keep:]
        seq.num_computed = num_tokens

    def _release(self, block: int) -> None:
        self.ref_count[block] -= 1
        if self.ref_count[block] == 0:
            self.events.block_freed(block)
            self.free[block] = None
            if self.block_key[block] is None:  # nothing to revive: reuse it first
                self.free.move_to_end(block, last=False)

    def fork(self, parent: Sequence, child: Sequence) -> tuple[int, int] | None:
        """Let `child` share `parent`'s blocks; a partial last block is copied (returns (src, dst))."""
        bs = self.block_size
        full = parent.num_computed // bs
        self.share(child, parent.block_table[:full])
        child.block_hashes = parent.block_hashes[:full]
        child.num_computed = parent.num_computed
        child.num_cached_tokens = parent.num_cached_tokens
        child.evicted_blocks = parent.evicted_blocks
        child.sink_blocks = [self._take_new() for _ in parent.sink_blocks]
        if parent.num_computed % bs == 0:
            return None
        dst = self._take_new()
        child.block_table.append(dst)
        return parent.block_table[full], dst

    def share(self, seq: Sequence, blocks: list[int]) -> None:
        """Make full `blocks` the start of seq's table, shared (counted until seq is freed; never written)."""
        for block in blocks:
            if block != EVICTED:
                self.ref_count[block] += 1
        seq.block_table = list(blocks)

    def _take_free(self) -> int:
        if not self.free:
            raise RuntimeError("KV cache out of blocks: the scheduler must check can_allocate first")
        block, _ = self.free.popitem(last=False)
        key = self.block_key[block]
        if key is not None:  # evicting a cached block: forget its hash
            h = hash(key)
            if self.cached.get(h) == block:
                del self.cached[h]
            self.block_key[block] = None
        return block

    def reset_prefix_cache(self) -> None:
        for block in self.free:
            key = self.block_key[block]
            if key is not None:
                self.cached.pop(hash(key), None)
                self.block_key[block] = None
