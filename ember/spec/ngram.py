"""Prompt lookup (vLLM's n-gram proposer): the tokens that followed an earlier occurrence of the sequence's suffix."""
from __future__ import annotations

import numpy as np

from ember.engine.sequence import Sequence
from ember.spec.proposer import Proposer


def ngram_propose(tokens: list[int] | np.ndarray, k: int, min_n: int, max_n: int) -> list[int]:
    """Up to k tokens that followed the earliest earlier occurrence of the longest suffix of `tokens` whose
    length is in [min_n, max_n]; [] when no such suffix occurred before."""
    a = np.asarray(tokens, dtype=np.int64)
    size = len(a)
    if k <= 0 or size < min_n + 1:
        return []
    # match[i]: how many tokens ending at i (and at the end of the sequence) agree, capped at max_n; grown
    # one token back at a time, so one pass per length instead of one per window.
    hist = a[:-1]  # an occurrence must end before the last token, so something follows it
    alive = np.ones(len(hist), dtype=bool)
    best = -1
    for n in range(1, min(max_n, size - 1) + 1):
        # hist[i - n + 1 .. i] == a[-n:]: extend the previous length's matches by the token n back.
        shifted = np.full(len(hist), False)
        shifted[n - 1:] = hist[: len(hist) - n + 1] == a[-n]
        alive &= shifted
        hits = np.flatnonzero(alive)
        if len(hits) == 0:
            break
        if n >= min_n:
            best = int(hits[0])  # the earliest occurrence of the longest suffix so far
    if best < 0:
        return []
    return a[best + 1: best + 1 + k].tolist()


class NgramProposer(Proposer):
    """Prompt lookup: free to run, so it drafts only where the sequence repeats itself or its prompt."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n

    def propose(self, seqs: dict[Sequence, int]) -> dict[Sequence, list[int]]:
        return {seq: drafts for seq, k in seqs.items()
                if (drafts := ngram_propose(seq.token_ids, k, self.min_n, self.max_n))}
