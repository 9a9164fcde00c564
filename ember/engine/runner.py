"""Turns a schedule into row spans and batch tensors, runs the model over the attention backend, and hands back
the hidden rows the engine asked for (to sample, score, pool) and any captured attention."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ember.engine.sequence import Sequence
from ember.models.llama import LlamaModel
from ember.ops.attention import AttentionBackend, AttentionCapture, KeyWindow, RowSpan
from ember.ops.long_context import LongContext


@dataclass
class PromptLogprobRows:
    """Hidden rows [row, row + count) score prompt tokens first_token .. first_token + count - 1."""

    seq: Sequence
    first_token: int
    row: int
    count: int


@dataclass
class PoolRows:
    """Hidden rows [row, row + count) are prompt positions first .. first + count - 1 of a pooling request."""

    seq: Sequence
    first: int
    row: int
    count: int


@dataclass
class CapturedRows:
    """Attention of a sequence's positions first .. first + n - 1 (probs [n, first + n], summed over heads and
    the asked layers)."""

    seq: Sequence
    first: int
    probs: torch.Tensor


@dataclass
class StepResult:
    hidden: torch.Tensor  # [R, hidden]: the rows asked for; the first num_logit_rows need logits
    num_logit_rows: int = 0
    sample_rows: dict[Sequence, list[int]] = field(default_factory=dict)  # seq -> rows to sample, in order
    # (one, or 1 + k for a sequence carrying k candidate tokens)
    prompt_rows: list[PromptLogprobRows] = field(default_factory=list)
    pool_rows: list[PoolRows] = field(default_factory=list)
    captures: list[CapturedRows] = field(default_factory=list)
    forward_s: float = 0.0  # time in the model, to separate the engine's own overhead
    logits: torch.Tensor | None = None  # set by the engine: rows [0, num_logit_rows) through the LM head


class ModelRunner:
    """Describes each step generically (spans of rows per sequence) to the attention backend, which owns the
    KV storage and its metadata; never branches on the cache format."""

    def __init__(self, model: LlamaModel, backend: AttentionBackend) -> None:
        self.model = model
        self.backend = backend
        # A mask variant for every step: a KeyWindow (tests) or a long-context mode (set_long_context).
        self.window: KeyWindow | LongContext | None = None

    def set_long_context(self, long: LongContext) -> None:
        if not hasattr(self.backend, "refresh_sinks"):
            raise ValueError("long-context modes need a float KV cache")
        self.window = long

    def copy_block(self, src: int, dst: int) -> None:
        """Give dst the contents of src (a partly filled block being forked)."""
        self.backend.copy_block(src, dst)

    @torch.inference_mode()
    def run(self, batch: dict[Sequence, int], skip: frozenset[int] | None = None) -> StepResult:
        """One forward of the batch (sequence -> tokens this step); `skip`: sub-layers to leave out (2i: layer
        i's attention, 2i + 1: its MLP), as SWIFT's drafter runs."""
        tokens: list[int] = []
        spans: list[RowSpan] = []
        captures: list[tuple[Sequence, AttentionCapture]] = []
        logit_rows: list[int] = []  # hidden rows the engine needs logits of; then the pooled rows
        pool: list[tuple[Sequence, int, int, int]] = []  # (seq, first position, first row, count)
        result = StepResult(hidden=torch.empty(0))
        sinks: list[tuple[Sequence, int]] = []  # decode rows of a long-context mode: (seq, position)
        for seq, n in batch.items():
            start, row0 = seq.num_computed, len(tokens)
            candidates = max(0, n - seq.num_remaining)
            tokens.extend(seq.tokens(start, start + n - candidates) + seq.spec_tokens[:candidates])
            spans.append(self._span(seq, start, n, row0, candidates, sinks))
            self._logit_rows(seq, start, n, row0, logit_rows, result)
            if seq.pooling is not None:
                self._pooling_rows(seq, len(spans) - 1, start, n, row0, pool, captures)
        plan = self.backend.plan(spans, self.window, [c for _, c in captures])
        plan.skip = skip
        began = time.perf_counter()
        if sinks:
            self._refresh_sinks(sinks)
        depths = [seq.depth for seq in batch]
        depth = None if None in depths else max(depths)  # type: ignore[type-var]
        hidden = self.model(torch.tensor(tokens), plan.positions, self.backend, plan, depth)
        self.backend.finish(plan)
        result.forward_s = time.perf_counter() - began
        result.num_logit_rows = len(logit_rows)
        for seq, first, row, count in pool:
            result.pool_rows.append(PoolRows(seq, first, len(logit_rows), count))
            logit_rows.extend(range(row, row + count))
        result.hidden = hidden[torch.tensor(logit_rows, dtype=torch.long)]
        for seq, cap in captures:
            assert cap.probs is not None, "the backend captured nothing"
            result.captures.append(CapturedRows(seq, spans[cap.span].start + cap.offset, cap.probs))
        return result

    def _span(self, seq: Sequence, start: int, n: int, row0: int, candidates: int,
              sinks: list[tuple[Sequence, int]]) -> RowSpan:
        """seq's rows as the backend sees them: under a long-context mode, its table without the evicted blocks
        (cache positions shifted by the tokens they held) and, for a decode row whose window has left the
        sinks, the private sink copies."""
        long = self.window
        if not isinstance(long, LongContext):
            return RowSpan(seq.block_table, start, n, row0, candidates)
        k = long.sink_blocks(self.backend.block_size)
        table = seq.block_table[:k] + seq.block_table[k + seq.evicted_blocks:]
        if n == 1 and start >= long.window and k:
            table[:k] = seq.sink_blocks
            sinks.append((seq, start))
        shift = seq.evicted_blocks * self.backend.block_size
        return RowSpan(table, start - shift, n, row0, candidates, shift)

    def _refresh_sinks(self, rows: list[tuple[Sequence, int]]) -> None:
        long = self.window
        assert isinstance(long, LongContext)
        k = long.sink_blocks(self.backend.block_size)
        fresh = [seq for seq, _ in rows if not seq.sinks_copied]
        if fresh:  # the sink blocks are full and never change again: copy them whole once
            self.backend.copy_blocks([b for seq in fresh for b in seq.block_table[:k]],  # type: ignore[attr-defined]
                                     [b for seq in fresh for b in seq.sink_blocks])
            for seq in fresh:
                seq.sinks_copied = True
        src = [b for seq, _ in rows for b in seq.block_table[:k]]
        dst = [b for seq, _ in rows for b in seq.sink_blocks]
        shifts = long.key_shift(torch.tensor([p for _, p in rows]))
        self.backend.refresh_sinks(src, dst, shifts, long)  # type: ignore[attr-defined]

    @staticmethod
    def _logit_rows(seq: Sequence, start: int, n: int, row0: int, rows: list[int], result: StepResult) -> None:
        """Note which hidden rows need logits: prompt-logprob rows, then the rows to sample."""
        if seq.wants_prompt_logprobs:
            # Row for position p scores token p + 1; only prompt tokens are scored here.
            last = min(start + n, len(seq.prompt_ids) - 1)
            if last > start:
                result.prompt_rows.append(PromptLogprobRows(seq, start + 1, len(rows), last - start))
                rows.extend(range(row0, row0 + last - start))
        if seq.pooling is None and start + n >= len(seq):  # the last known token, then each candidate
            first = len(seq) - 1 - start
            result.sample_rows[seq] = list(range(len(rows), len(rows) + n - first))
            rows.extend(range(row0 + first, row0 + n))

    @staticmethod
    def _pooling_rows(seq: Sequence, span: int, start: int, n: int, row0: int,
                      pool: list[tuple[Sequence, int, int, int]],
                      captures: list[tuple[Sequence, AttentionCapture]]) -> None:
        """The rows a pooling request needs from this step: hidden rows to pool, rows to capture attention of."""
        p = seq.pooling
        assert p is not None
        if p.pooling == "mean":
            pool.append((seq, start, row0, n))
        elif p.pooling == "last" and start + n == len(seq):
            pool.append((seq, len(seq) - 1, row0 + n - 1, 1))
        if p.attention_span is not None:
            lo, hi = max(start, p.attention_span[0]), min(start + n, p.attention_span[1])
            if lo < hi:
                layers = frozenset(p.attention_layers)
                captures.append((seq, AttentionCapture(span, lo - start, hi - lo, layers)))
