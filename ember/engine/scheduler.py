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
    # Prompt tokens a step with decodes may always carry, however slow, so prompts progress. Small: on a
    # CPU every token costs (SmolLM2 int8: 16 prompt tokens took longer than 8 decodes), so a larger floor
    # would overrule any target near a plain decode step.
    min_chunk: int = 4


class _LineFit:
    """Exponentially weighted least squares for y ~ a + b * x."""

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self._w = self._x = self._y = self._xx = self._xy = 0.0

    def add(self, x: float, y: float) -> None:
        d = self.decay
        self._w = d * self._w + 1.0
        self._x = d * self._x + x
        self._y = d * self._y + y
        self._xx = d * self._xx + x * x
        self._xy = d * self._xy + x * y

    def line(self) -> tuple[float, float] | None:
        """(a, b), or None until points of clearly different x were seen."""
        if self._w < 2:
            return None
        mx, my = self._x / self._w, self._y / self._w
        var = self._xx / self._w - mx * mx
        if var < 16.0:  # x too alike (spread < 4) to tell the slope
            return None
        b = (self._xy / self._w - mx * my) / var
        if b <= 0:
            return None
        return max(0.0, my - b * mx), b


class StepCost:
    """The measured latency-vs-tokens curve: step seconds ~ a + b * tokens.

    On a GPU a forward pass costs about the same up to hundreds of tokens, so DeepSpeed-FastGen fills
    every pass to one budget. On a CPU the cost grows with every token from the first, so the budget that
    keeps decodes flowing has to come from this curve. Fitted online to the engine's steps that carry
    prompt tokens, preferring those that also carry decodes (the steps it must predict; prompt-only steps
    run other code paths, long chunks through SDPA and a float GEMM); decode-only steps are tracked on
    their own, keyed by their batch size."""

    def __init__(self, decay: float = 0.9) -> None:
        self._mixed = _LineFit(decay)
        self._prompt = _LineFit(decay)
        self._decode: dict[int, float] = {}

    def observe(self, tokens: int, decodes: int, seconds: float) -> None:
        if tokens == decodes:
            old = self._decode.get(tokens)
            self._decode[tokens] = seconds if old is None else 0.8 * old + 0.2 * seconds
            return
        self._prompt.add(tokens, seconds)
        if decodes:
            self._mixed.add(tokens, seconds)

    def line(self) -> tuple[float, float] | None:
        """(a, b) of the fit, or None until steps of clearly different sizes were seen."""
        return self._mixed.line() or self._prompt.line()

    def decode_seconds(self, batch: int) -> float | None:
        """A decode-only step of `batch` sequences, from the nearest batch size seen."""
        if not self._decode:
            return None
        near = min(self._decode, key=lambda n: (abs(n - batch), n))
        return self._decode[near] * max(1.0, batch / near)  # scaled up from a smaller batch, never down

    def max_tokens(self, seconds: float) -> int | None:
        """Most tokens a step may carry to take at most `seconds`, or None while the curve is unknown."""
        fit = self.line()
        if fit is None:
            return None
        a, b = fit
        return max(0, math.floor((seconds - a) / b + 1e-6))  # (the epsilon: float noise at exact fits)


class Scheduler:
    """Decides, each step, how many tokens of which sequences go through the model: {seq: n_tokens}."""

    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest first
        self.num_preemptions = 0
        self.cost = StepCost()

    def observe(self, batch: dict[Sequence, int], seconds: float) -> None:
        """The wall time of a step the engine ran from `batch` (feeds the latency curve)."""
        self.cost.observe(sum(batch.values()), sum(1 for n in batch.values() if n == 1), seconds)

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
        if batch:
            budget = min(budget, self._chunk_allowance(len(batch)))
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

    def _chunk_allowance(self, decodes: int) -> int:
        """Prompt tokens a step with `decodes` decoding sequences may carry and stay within the ITL target."""
        target = self.config.itl_target
        if target is None:
            return self.config.max_num_batched_tokens
        factor = itl_factor(target)
        if factor is not None:
            plain = self.cost.decode_seconds(decodes)
            if plain is None:
                return self.config.min_chunk
            target = factor * plain
        most = self.cost.max_tokens(target)
        if most is None:  # no curve yet: a small chunk, which also measures a point on it
            return self.config.min_chunk
        return max(self.config.min_chunk, most - decodes)

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
