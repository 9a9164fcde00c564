"""Block allocator and prefix cache: full blocks are content-hashed and reused, free blocks evicted LRU;
for quantized caches, residual slots for the blocks still filling."""
from __future__ import annotations

from collections import OrderedDict

from ember.engine.sequence import Sequence

BlockKey = tuple[int | None, tuple[int, ...]]  # (parent block hash, token ids of the block)


class BlockManager:
    """Owns block ids, their reference counts and the hash -> block map; never touches KV tensors."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 num_residual: int = 0) -> None:
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
        # Quantized caches only (num_residual > 0): a block still filling keeps its tokens in float in a
        # residual slot until it is full. Only a sequence's own tail block is ever incomplete (forks copy
        # it, prefix hits take full blocks), so slots are never shared.
        self.use_residual = num_residual > 0
        self.residual_of: dict[int, int] = {}  # block -> residual slot
        self.free_residual: list[int] = list(range(num_residual - 1, -1, -1))
        self.num_residual = num_residual

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        total = -(-(seq.num_computed + num_tokens) // self.block_size)
        return max(0, total - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= len(self.free)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Give `seq` enough blocks to hold `num_tokens` more tokens (caller checked can_allocate)."""
        for _ in range(self.blocks_needed(seq, num_tokens)):
            block = self._take_free()
            self.ref_count[block] = 1
            seq.block_table.append(block)
        end = seq.num_computed + num_tokens
        if self.use_residual and end % self.block_size:
            self._give_residual(seq.block_table[end // self.block_size])

    def match_prefix(self, seq: Sequence) -> None:
        """Before a sequence's first step: reuse cached blocks for its longest known full-block prefix."""
        if not self.enable_prefix_caching or seq.block_table or seq.wants_prompt_logprobs:
            return
        tokens = seq.token_ids
        bs = self.block_size
        parent: int | None = None
        # At least one token must be computed so the step produces logits.
        for i in range((len(tokens) - 1) // bs):
            key = (parent, tuple(tokens[i * bs:(i + 1) * bs]))
            h = hash(key)
            block = self.cached.get(h)
            if block is None or self.block_key[block] != key:
                break
            if self.ref_count[block] == 0:
                del self.free[block]
            self.ref_count[block] += 1
            seq.block_table.append(block)
            seq.block_hashes.append(h)
            parent = h
        seq.num_computed = seq.num_cached_tokens = len(seq.block_table) * bs
        self.prefix_queries += len(tokens)
        self.prefix_hits += seq.num_computed

    def commit(self, seq: Sequence) -> None:
        """After a step: hash the blocks that became full so later sequences can share them."""
        bs = self.block_size
        tokens = seq.token_ids
        for i in range(len(seq.block_hashes), seq.num_computed // bs):
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            key = (parent, tuple(tokens[i * bs:(i + 1) * bs]))
            h = hash(key)
            seq.block_hashes.append(h)
            block = seq.block_table[i]
            self._drop_residual(block)
            if self.enable_prefix_caching and h not in self.cached:
                self.cached[h] = block
                self.block_key[block] = key

    def free_seq(self, seq: Sequence) -> None:
        """Release a sequence's blocks; hashed ones stay revivable until evicted (tail blocks first)."""
        for block in reversed(seq.block_table):
            self._drop_residual(block)
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                self.free[block] = None
                if self.block_key[block] is None:  # nothing to revive: reuse it first
                    self.free.move_to_end(block, last=False)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed = 0

    def fork(self, parent: Sequence, child: Sequence) -> tuple[int, int] | None:
        """Let `child` share `parent`'s blocks; a partial last block is copied (returns (src, dst))."""
        bs = self.block_size
        full = parent.num_computed // bs
        for block in parent.block_table[:full]:
            self.ref_count[block] += 1
        child.block_table = parent.block_table[:full]
        child.block_hashes = parent.block_hashes[:full]
        child.num_computed = parent.num_computed
        child.num_cached_tokens = parent.num_cached_tokens
        if parent.num_computed % bs == 0:
            return None
        dst = self._take_free()
        self.ref_count[dst] = 1
        child.block_table.append(dst)
        if self.use_residual:
            self._give_residual(dst)
        return parent.block_table[full], dst

    def _give_residual(self, block: int) -> None:
        if block not in self.residual_of:
            if not self.free_residual:  # more sequences than planned (forks): the runner grows the pool
                self.free_residual.append(self.num_residual)
                self.num_residual += 1
            self.residual_of[block] = self.free_residual.pop()

    def _drop_residual(self, block: int) -> None:
        slot = self.residual_of.pop(block, None)
        if slot is not None:
            self.free_residual.append(slot)

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
