"""Token-budget scheduling (Dynamic SplitFuse or prefill-first), preemption by recomputation, aborts."""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from ember.engine.kv_cache import BlockManager
from ember.engine.sequence import Sequence, Status

POLICIES = ("splitfuse", "prefill-first")


# With an automatic latency target, a step that carries prompt chunks may take this many times as long
# as a plain decode step of the same sequences ("auto"; "<N>x" asks for N times instead).
AUTO_ITL_FACTOR = 2.0


def itl_factor(target: float | str | None) -> float | None:
    """The multiple of a plain decode step a relative target allows ("auto", or "1.25x" for 1.25), or None
    for a target in seconds, none, or text that is neither (see valid_itl_target)."""
    if target == "auto":
        return AUTO_ITL_FACTOR
    if isinstance(target, str) and target.endswith("x"):
        try:
            return float(target[:-1])
        except ValueError:
            return None
    return None


def valid_itl_target(target: object) -> bool:
    """None, seconds > 0, "auto", or "<N>x" with N >= 1 (below 1 no step with decodes could meet it)."""
    if target is None:
        return True
    if isinstance(target, str):
        factor = itl_factor(target)
        return factor is not None and 1 <= factor < math.inf
    return isinstance(target, (int, float)) and not isinstance(target, bool) and 0 < target < math.inf


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 256  # the token budget of one step
    policy: str = "splitfuse"
    # SplitFuse's bound on a step that carries both decodes and prompt chunks: seconds, "auto"
    # (AUTO_ITL_FACTOR x a plain decode step) or "<N>x" (N x one); None = off (every step filled to the budget).
    itl_target: float | str | None = None
    # Most prompt tokens one sequence may take in a step (vLLM's long_prefill_token_threshold); 0: no cap.
    long_prefill_token_threshold: int = 0
    # Prompt tokens a step with decodes may always carry, however slow, so prompts progress. One: on a CPU
    # every token costs (SmolLM2 int8, beside 8 decodes: 2-4 ms each, a plain step ~19 ms), so a larger
    # floor would overrule a target near a plain decode step.
    min_chunk: int = 1


class _SlopeFit:
    """Exponentially weighted least squares through the origin: y ~ b * x."""

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self._xx = self._xy = 0.0

    def add(self, x: float, y: float) -> None:
        self._xx = self.decay * self._xx + x * x
        self._xy = self.decay * self._xy + x * y

    def slope(self) -> float | None:
        """b, or None before any point (or while the points say nothing costs: noise, not a price)."""
        return self._xy / self._xx if self._xx > 0 and self._xy > 0 else None


class StepCost:
    """What a step costs, measured online from the engine's own steps: a decode-only step of n sequences,
    plus seconds for each prompt token the step carries beside them.

    On a GPU a forward pass costs about the same up to hundreds of tokens, so DeepSpeed-FastGen fills
    every pass to one budget. On a CPU every token costs, but not along one line: a few decode rows cost
    the weight read (SmolLM2 int8: one decode at 1500 tokens of context 9 ms) and each further row its
    arithmetic and its own KV cache read (two such decodes 14 ms, four 24). So a step with decodes is
    predicted as the plain decode step of that many sequences, measured recently, plus the marginal cost of
    its prompt tokens, fitted from the steps that carried both (prompt-only steps, another code path,
    stand in until one was seen)."""

    def __init__(self, decay: float = 0.9, fresh_steps: int = 64) -> None:
        self.fresh_steps = fresh_steps  # a decode step measured longer ago than this is re-measured
        self._mixed = _SlopeFit(decay)
        self._prompt = _SlopeFit(decay)
        self._decode: dict[int, tuple[float, int]] = {}  # batch size -> (seconds, step it was last seen)
        self._steps = 0

    def observe(self, tokens: int, decodes: int, seconds: float) -> None:
        self._steps += 1
        chunk = tokens - decodes
        if chunk == 0:
            old = self.decode_seconds(decodes)
            self._decode[decodes] = (seconds if old is None else 0.8 * old + 0.2 * seconds, self._steps)
        elif decodes == 0:
            self._prompt.add(chunk, seconds)
        elif (plain := self.decode_seconds(decodes)) is not None:
            self._mixed.add(chunk, seconds - plain)

    def decode_seconds(self, batch: int) -> float | None:
        """A decode-only step of `batch` sequences, or None if not measured in the last fresh_steps steps
        (contexts grow, and with them the step; an older measurement is replaced, not averaged in)."""
        seen = self._decode.get(batch)
        return seen[0] if seen is not None and self._steps - seen[1] <= self.fresh_steps else None

    def token_seconds(self) -> float | None:
        """Marginal seconds of one prompt token in a step, or None until a step with prompt tokens was seen."""
        return self._mixed.slope() or self._prompt.slope()

    def max_chunk(self, decodes: int, seconds: float) -> int | None:
        """Most prompt tokens a step with `decodes` decoding sequences may carry to take at most `seconds`,
        or None while either part of the cost is unknown."""
        plain, per = self.decode_seconds(decodes), self.token_seconds()
        if plain is None or per is None:
            return None
        return max(0, math.floor((seconds - plain) / per + 1e-6))  # (the epsilon: float noise at exact fits)


class Scheduler:
    """Decides, each step, how many tokens of which sequences go through the model: {seq: n_tokens}."""

    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest first
        self.num_preemptions = 0
        self.cost = StepCost()
        self._decodes = 0  # decoding sequences in the last batch scheduled

    def observe(self, batch: dict[Sequence, int], seconds: float) -> None:
        """The wall time of the step the engine ran from the last batch scheduled (feeds the step cost)."""
        self.cost.observe(sum(batch.values()), self._decodes, seconds)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A sequence whose KV is already in place (a fork of a finished prompt): it decodes from the next step."""
        seq.status = Status.RUNNING
        self.running.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> dict[Sequence, int]:
        if self.config.policy == "prefill-first":
            batch = self._schedule_prefill_first()
        else:
            batch = self._schedule_splitfuse()
        # Counted now: once it has run, a one-token prompt chunk looks like a decode.
        self._decodes = sum(1 for s in batch if not s.in_prefill)
        return batch

    # -- policies -------------------------------------------------------------------------

    def _schedule_splitfuse(self) -> dict[Sequence, int]:
        budget = self.config.max_num_batched_tokens
        batch = self._schedule_decodes(budget)
        budget -= sum(batch.values())
        if batch:
            budget = min(budget, self._chunk_allowance(len(batch)))
        # Prompt chunks fill what is left: running sequences mid-prompt first, then new arrivals.
        for seq in [s for s in self.running if s.in_prefill and s not in batch]:
            if budget <= 0:
                break
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            n = self._fit_or_preempt(seq, self._chunk(seq, budget), batch)
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

    def _chunk_allowance(self, decodes: int) -> int:
        """Prompt tokens a step with `decodes` decoding sequences may carry and stay within the ITL target."""
        target = self.config.itl_target
        if target is None:
            return self.config.max_num_batched_tokens
        plain = self.cost.decode_seconds(decodes)
        if plain is None:  # measure this batch's plain step first: it is what the target is relative to
            return 0
        factor = itl_factor(target)
        most = self.cost.max_chunk(decodes, plain * factor if factor is not None else target)
        if most is None:  # the price of a prompt token is unknown: a small chunk, which measures it
            return self.config.min_chunk
        return max(self.config.min_chunk, most)

    def _chunk(self, seq: Sequence, budget: int) -> int:
        """Prompt tokens of `seq` for this step: what remains, within the budget and the per-sequence cap."""
        cap = self.config.long_prefill_token_threshold
        return min(seq.num_remaining, budget, cap if cap > 0 else budget)

    def _schedule_decodes(self, budget: int | None) -> dict[Sequence, int]:
        """One token for every decoding sequence, preempting the newest when blocks run out; then candidate
        tokens from the budget and blocks left (candidates never cost another sequence its token)."""
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
        self._add_candidates(batch, budget)
        return batch

    def _add_candidates(self, batch: dict[Sequence, int], budget: int | None) -> None:
        """Grow each decode to 1 + its candidates, oldest first, within the budget and the free blocks."""
        left = None if budget is None else budget - len(batch)
        for seq in batch:
            k = len(seq.spec_tokens)
            if left is not None:
                k = min(k, left)
            while k > 0 and not self.blocks.can_allocate(seq, 1 + k):
                k -= 1
            if k > 0:
                self.blocks.allocate(seq, 1 + k)  # the block for its first token is already there
                batch[seq] = 1 + k
                if left is not None:
                    left -= k

    def _admit(self, batch: dict[Sequence, int], budget: int, whole_prompts: bool) -> None:
        """Move waiting sequences to running while budget, sequence slots and blocks allow."""
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            if budget <= 0 and not whole_prompts:
                break
            seq = self.waiting[0]
            self.blocks.match_prefix(seq)
            want = seq.num_remaining
            if not whole_prompts:
                want = self._chunk(seq, budget)
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
        free = self.blocks.num_free_blocks - self.blocks.extra_blocks(seq)
        room = (len(seq.block_table) + free) * bs - seq.num_computed
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
