"""Pooling requests' results: hidden rows pooled over a prompt's chunks, captured attention gathered by
position, and the output handed back."""
from __future__ import annotations

from typing import Any, Callable

import torch

from ember.engine.outputs import PoolingOutput
from ember.engine.runner import CapturedRows, StepResult
from ember.engine.sequence import Sequence


def collect(result: StepResult, guard: Callable[..., Any]) -> None:
    """Fold this step's pooled rows and captured attention into their sequences (each under guard)."""
    for part in result.pool_rows:
        guard(part.seq.request_id, _pool, part.seq, part.first, result.hidden[part.row: part.row + part.count])
    for cap in result.captures:
        guard(cap.seq.request_id, _capture, cap)


def _pool(seq: Sequence, first: int, rows: torch.Tensor) -> None:
    assert seq.pooling is not None
    rows = rows.float()
    if seq.pooling.pooling == "last":
        seq.pooled = rows[-1].clone()
        return
    # Mean: a running sum over the prompt's chunks; a recomputed prompt (after preemption) starts again at 0.
    total = rows.sum(dim=0)
    seq.pooled = total if first == 0 or seq.pooled is None else seq.pooled + total


def _capture(cap: CapturedRows) -> None:
    seq = cap.seq
    assert seq.pooling is not None and seq.pooling.attention_span is not None
    lo, hi = seq.pooling.attention_span
    if seq.attention is None:
        seq.attention = torch.zeros(hi - lo, hi)
    n, keys = cap.probs.shape
    seq.attention[cap.first - lo: cap.first - lo + n, :keys] = cap.probs  # by position: a recompute overwrites


def finish(seq: Sequence) -> None:
    """The prompt is done: turn the running sum into the mean, normalise if asked."""
    p = seq.pooling
    assert p is not None
    if seq.pooled is None:
        return
    if p.pooling == "mean":
        seq.pooled = seq.pooled / len(seq)
    if p.normalize:
        seq.pooled = torch.nn.functional.normalize(seq.pooled, dim=0)


def output(seq: Sequence) -> PoolingOutput | None:
    if seq.pooling is None:
        return None
    return PoolingOutput(seq.pooled, seq.attention)
