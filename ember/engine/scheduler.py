"""Token-budget scheduling (Dynamic SplitFuse or prefill-first), preemption by recomputation, aborts."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ember.engine.kv_cache import BlockManager
from ember.engine.sequence import Sequence, Status

POLICIES = ("splitfuse", "prefill-first")


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 256  # the token budget of one step
    policy: str = "splitfuse"


class Scheduler:
    """Decides, each step, how many tokens of which sequences go through the model: {seq: n_tokens}."""

    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> dict[Sequence, int]:
        if self.config.policy == "prefill-first":
            return self._schedule_prefill_first()
        return self._schedule_splitfuse()

    # -- policies -------------------------------------------------------------------------

    def _schedule_splitfuse(self) -> dict[Sequence, int]:
        budget = self.config.max_num_batched_tokens
        batch = self._schedule_decodes(budget)
        budget -= len(batch)
        # Prompt chunks fill what is left: running sequences mid-prompt first, then new arrivals.
        for seq in [s for s in self.running if s.in_prefill and s not in batch]:
            if budget <= 0:
                break
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            n = self._fit_or_preempt(seq, min(seq.num_remaining, budget), batch)
            if n:
                batch[seq] = n
                budget -= n
        self._admit(batch, budget, whole_prompts=False)
        return batch

    def _schedule_prefill_first(self) -> dict[Sequence, int]:
        # Older engines: whole prompts first (a decode step waits for them), then decodes.
        batch: dict[Sequence, int] = {}
        budget = self.config.max_num_batched_tokens
        for seq in [s for s in self.running if s.in_prefill]:
            if seq.status is not Status.RUNNING:
                continue
            n = self._fit_or_preempt(seq, seq.num_remaining, batch)
            if n:
                batch[seq] = n
                budget -= n
        self._admit(batch, budget, whole_prompts=True)
        if batch:
            return batch
        return self._schedule_decodes(None)

    # -- pieces ---------------------------------------------------------------------------

    def _schedule_decodes(self, budget: int | None) -> dict[Sequence, int]:
        """One token for every decoding sequence, preempting the newest when blocks run out."""
        batch: dict[Sequence, int] = {}
        for seq in list(self.running):
            if seq.in_prefill or seq.status is not Status.RUNNING:
                continue
            if budget is not None and len(batch) >= budget:
                break
            while not self.blocks.can_allocate(seq, 1):
                victim = self.running[-1]
                self._preempt(victim)
                batch.pop(victim, None)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                self.blocks.allocate(seq, 1)
                batch[seq] = 1
        return batch

    def _admit(self, batch: dict[Sequence, int], budget: int, whole_prompts: bool) -> None:
        """Move waiting sequences to running while budget, sequence slots and blocks allow."""
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            if budget <= 0 and not whole_prompts:
                break
            seq = self.waiting[0]
            self.blocks.match_prefix(seq)
            want = seq.num_remaining
            if not whole_prompts:
                want = min(want, budget)
            elif batch and want > budget:
                break  # this prompt goes alone in a later step
            n = self._fit(seq, want) if want > 0 else 0
            if n == 0 or (whole_prompts and n < want):
                self._release(seq)  # a waiting sequence holds no blocks
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch[seq] = n
            budget -= n

    def _fit_or_preempt(self, seq: Sequence, want: int, batch: dict[Sequence, int]) -> int:
        """Like _fit for a running sequence, preempting newer ones while it cannot take a single token.

        Without this, sequences admitted part-way through their prompts could each hold blocks the
        others need, with no decode left to trigger preemption: a deadlock.
        """
        while True:
            n = self._fit(seq, want)
            victim = self.running[-1]
            if n or victim is seq:  # the newest waits for blocks instead of preempting itself
                return n
            batch.pop(victim, None)
            self._preempt(victim)

    def _fit(self, seq: Sequence, want: int) -> int:
        """Allocate blocks for up to `want` tokens of `seq`; returns how many fit (maybe 0)."""
        bs = self.blocks.block_size
        room = (len(seq.block_table) + self.blocks.num_free_blocks) * bs - seq.num_computed
        n = max(0, min(want, room))
        if n:
            self.blocks.allocate(seq, n)
        return n

    def _release(self, seq: Sequence) -> None:
        self.blocks.free_seq(seq)
        seq.num_cached_tokens = 0

    def _preempt(self, seq: Sequence) -> None:
        """Free everything `seq` holds and put it first in line to be recomputed."""
        self.running.remove(seq)
        self.blocks.free_seq(seq)
        seq.status = Status.WAITING
        seq.num_cached_tokens = 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence wherever it is and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_seq(seq)
        seq.status = Status.FINISHED
