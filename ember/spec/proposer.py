"""The proposer seam and the Speculator: who drafts, how many tokens each sequence drafts this step, and what
speculation has cost and gained."""
from __future__ import annotations

import time
from dataclasses import dataclass

from ember.engine.sequence import Sequence


class Proposer:
    """Drafts candidate next tokens for decoding sequences; the engine verifies them in its next step."""

    def propose(self, seqs: dict[Sequence, int]) -> dict[Sequence, list[int]]:
        """Up to k drafts for each sequence (seqs: sequence -> k); sequences without drafts may be left out."""
        raise NotImplementedError

    def observe(self, seqs: list[Sequence], seconds: float = 0.0) -> None:
        """After a step of `seconds`: these sequences have new tokens (a proposer that learns from generation
        reads them)."""

    def release(self, seq: Sequence) -> None:
        """The sequence finished or was aborted: drop whatever is kept for it."""


@dataclass
class _Acceptance:
    """A sequence's recent acceptance: accepted drafts and rejections, decayed, so that the chance a draft is
    accepted given the one before it was is accepted / (accepted + rejected)."""

    accepted: float = 2.0  # a prior worth three verifications, leaning to speculate
    rejected: float = 1.0
    idle: int = 0  # steps since it last speculated

    @property
    def rate(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def add(self, drafted: int, accepted: int, decay: float = 0.8) -> None:
        self.accepted = decay * self.accepted + accepted
        self.rejected = decay * self.rejected + (accepted < drafted)
        self.idle = 0


class StepTimes:
    """Seconds of a decode-only step by the number of rows it runs, measured; guessed where not yet measured."""

    # Before a measurement: a row beyond the first costs this share of a one-row step (a CPU step reads every
    # weight once whatever its rows; each row adds its arithmetic and its attention), and a one-row step this.
    PRIOR_ROW_COST = 0.1
    PRIOR_STEP_S = 0.01

    def __init__(self) -> None:
        self.seconds: dict[int, float] = {}

    def add(self, rows: int, seconds: float) -> None:
        old = self.seconds.get(rows)
        self.seconds[rows] = seconds if old is None else 0.8 * old + 0.2 * seconds

    def __call__(self, rows: int) -> float:
        if rows in self.seconds:
            return self.seconds[rows]
        below = [r for r in self.seconds if r < rows]
        above = [r for r in self.seconds if r > rows]
        if below and above:  # interpolate
            lo, hi = max(below), min(above)
            f = (rows - lo) / (hi - lo)
            return self.seconds[lo] * (1 - f) + self.seconds[hi] * f
        # Outside the measured rows: the prior's shape, scaled to the nearest measurement.
        near = max(below) if below else min(above) if above else None
        scale = self.PRIOR_STEP_S if near is None else self.seconds[near] / self._prior(near)
        return scale * self._prior(rows)

    def _prior(self, rows: int) -> float:
        return 1 + self.PRIOR_ROW_COST * (rows - 1)


class Speculator:
    """Runs a proposer each step for the decoding sequences and decides how many drafts each may carry.

    With `adaptive`, drafts are handed out one at a time to the sequence whose next draft is likeliest to be
    accepted (its acceptance rate to the power of its drafts so far plus one), while the expected tokens per
    second of the step still rise: the extra row's cost comes from the measured step times (StepTimes) plus the
    proposer's own drafting time. A sequence whose drafts stopped paying rests, and tries one draft again after
    `probe_every` steps, so a change of text (a quote begins) is noticed; after proportionally more where a
    draft costs more than a tenth of a step (a drafting forward), so probes keep to a few percent of the time."""

    def __init__(self, proposer: Proposer, k: int, adaptive: bool = True, disable_by_batch_size: int | None = None,
                 probe_every: int = 16) -> None:
        self.proposer = proposer
        self.k = k
        self.adaptive = adaptive
        self.disable_by_batch_size = disable_by_batch_size
        self.probe_every = probe_every
        self.times = StepTimes()
        self.draft_seconds = 0.0  # the proposer's seconds per drafted token, measured
        self._acceptance: dict[Sequence, _Acceptance] = {}
        self.stats = {"draft_tokens": 0, "accepted_tokens": 0, "verifications": 0, "propose_s": 0.0}

    def propose(self, decoding: list[Sequence], room: dict[Sequence, int]) -> None:
        """Set spec_tokens of the decoding sequences (room: most drafts each may carry)."""
        if not decoding or (self.disable_by_batch_size is not None and len(decoding) >= self.disable_by_batch_size):
            return
        ks = self._budget(decoding, room)
        if not ks:
            return
        began = time.perf_counter()
        drafts = self.proposer.propose(ks)
        spent = time.perf_counter() - began
        self.stats["propose_s"] += spent
        made = sum(len(d) for d in drafts.values())
        if made:
            self.draft_seconds = 0.8 * self.draft_seconds + 0.2 * spent / made if self.draft_seconds else spent / made
        for seq, tokens in drafts.items():
            seq.spec_tokens = list(tokens[: ks.get(seq, 0)])

    def _budget(self, decoding: list[Sequence], room: dict[Sequence, int]) -> dict[Sequence, int]:
        ks: dict[Sequence, int] = {}
        if not self.adaptive:
            return {s: min(self.k, room[s]) for s in decoding if room[s] > 0}
        acc = {s: self._acceptance.setdefault(s, _Acceptance()) for s in decoding}
        rows = len(decoding)
        tokens = float(rows)  # expected tokens of the step
        seconds = self.times(rows)
        for s in decoding:
            acc[s].idle += 1
        probe_every = self.probe_every * max(1.0, self.draft_seconds / (0.1 * self.times(1)))
        while True:
            best, gain = None, 0.0
            for s in decoding:
                have = ks.get(s, 0)
                if have >= min(self.k, room[s]):
                    continue
                a = acc[s]
                g = a.rate ** (have + 1)
                if not have and a.idle > probe_every:  # resting: one draft now and then, to re-measure
                    g = max(g, 1.0)
                if g > gain:
                    best, gain = s, g
            if best is None:
                break
            more = self.times(rows + 1) - self.times(rows) + self.draft_seconds
            if (tokens + gain) / (seconds + more) <= tokens / seconds:
                break
            ks[best] = ks.get(best, 0) + 1
            rows, tokens, seconds = rows + 1, tokens + gain, seconds + more
        return ks

    def verified(self, seq: Sequence, drafted: int, accepted: int) -> None:
        self.stats["draft_tokens"] += drafted
        self.stats["accepted_tokens"] += accepted
        self.stats["verifications"] += 1
        self._acceptance.setdefault(seq, _Acceptance()).add(drafted, accepted)

    def step_done(self, rows: int, decode_only: bool, seconds: float, advanced: list[Sequence]) -> None:
        if decode_only and rows:
            self.times.add(rows, seconds)
        self.proposer.observe(advanced, seconds)

    def release(self, seq: Sequence) -> None:
        self._acceptance.pop(seq, None)
        self.proposer.release(seq)

    def summary(self) -> dict[str, float]:
        d, a, v = self.stats["draft_tokens"], self.stats["accepted_tokens"], self.stats["verifications"]
        return {"draft_tokens": d, "accepted_tokens": a, "acceptance_rate": a / d if d else 0.0,
                # vLLM's mean acceptance length: tokens a verification step yields, its own sampled one included
                "mean_acceptance_length": 1 + a / v if v else 0.0, "verifications": v}
